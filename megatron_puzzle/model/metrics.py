"""Next-token metrics computed from vocab-parallel logits.

Under tensor parallelism each rank holds the logits of one contiguous slice of the
vocabulary ([batch, seq, vocab / tp]). Every metric here reduces over the TP group
with small all-reduces (per-position maxima, sums, indices), so the whole
vocabulary is never gathered on one rank. With TP 1 the reductions are no-ops.

Metrics per position (token-weighted means are taken by `MetricSums`):
- `kl_div`: KL(parent || candidate) of the next-token distributions;
- `lm_loss`: cross entropy of the candidate on the next token;
- `top1_agreement`: argmax of the candidate equals the parent's argmax;
- `accuracy`: argmax of the candidate equals the next token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import losses

METRICS = ("kl_div", "lm_loss", "top1_agreement")
ALL_METRICS = METRICS + ("accuracy",)


# One implementation of the vocab-parallel maths, shared with the distillation losses.
log_softmax = losses.vocab_parallel_log_softmax  # this rank's slice of log-softmax over the whole vocabulary
argmax = losses.vocab_parallel_argmax  # global argmax (the lowest id among exact ties, like torch.argmax)
cross_entropy = losses.per_token_cross_entropy  # per-position -log q(target)


def kl_div(parent_logp: torch.Tensor, logp: torch.Tensor, parent_p: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position KL(parent || candidate) from vocab-parallel log-probabilities."""
    return losses.per_token_kl(parent_logp, logp, parent_p)


@dataclass
class Reference:
    """What a candidate is compared with, for one batch: the parent's log-probs and argmax, and the labels."""

    logp: torch.Tensor  # vocab-parallel [batch, seq, vocab / tp]
    p: torch.Tensor  # exp(logp), kept because every candidate needs it
    top1: torch.Tensor  # [batch, seq]
    targets: torch.Tensor  # [batch, seq]

    @classmethod
    def from_logits(cls, parent_logits: torch.Tensor, targets: torch.Tensor) -> "Reference":
        logp = log_softmax(parent_logits)
        return cls(logp, logp.exp(), argmax(parent_logits), targets)


@dataclass
class MetricSums:
    """Token-weighted sums of the per-position metrics (float64), for running means over batches."""

    sums: dict[str, float] = field(default_factory=lambda: {m: 0.0 for m in ALL_METRICS})
    tokens: int = 0

    def add(self, logits: torch.Tensor, ref: Reference) -> None:
        logp = log_softmax(logits)
        top1 = argmax(logits)
        per_pos = {
            "kl_div": kl_div(ref.logp, logp, ref.p),
            "lm_loss": cross_entropy(logp, ref.targets),
            "top1_agreement": (top1 == ref.top1).double(),
            "accuracy": (top1 == ref.targets).double(),
        }
        for name, v in per_pos.items():
            self.sums[name] += float(v.double().sum())
        self.tokens += ref.targets.numel()

    def means(self, names=ALL_METRICS) -> dict[str, float]:
        if self.tokens == 0:
            raise ValueError("no tokens were scored; give at least one batch of held-out tokens")
        return {m: self.sums[m] / self.tokens for m in names}
