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
import torch.distributed as dist

METRICS = ("kl_div", "lm_loss", "top1_agreement")
ALL_METRICS = METRICS + ("accuracy",)


def _tp_group():
    """The tensor-parallel group and its size; (None, 1) outside Megatron-Core's parallel state."""
    try:
        from megatron.core import parallel_state
    except ImportError:  # pragma: no cover - megatron-core is a hard dependency
        return None, 1
    if not parallel_state.model_parallel_is_initialized():
        return None, 1
    return parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_world_size()


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    group, size = _tp_group()
    if size > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def vocab_offset(local_vocab: int) -> int:
    """First vocabulary index held by this TP rank."""
    group, size = _tp_group()
    return 0 if size == 1 else dist.get_rank(group) * local_vocab


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the whole (sharded) vocabulary; returns this rank's slice, float32."""
    x = logits.float()
    m = _all_reduce(x.max(dim=-1, keepdim=True).values, dist.ReduceOp.MAX)
    s = _all_reduce((x - m).exp().sum(dim=-1, keepdim=True), dist.ReduceOp.SUM)
    return x - m - s.log()


def kl_div(parent_logp: torch.Tensor, logp: torch.Tensor, parent_p: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position KL(parent || candidate) from vocab-parallel log-probabilities."""
    p = parent_logp.exp() if parent_p is None else parent_p
    return _all_reduce((p * (parent_logp - logp)).sum(dim=-1), dist.ReduceOp.SUM)


def cross_entropy(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position -log q(target) from vocab-parallel log-probabilities."""
    local = logp.shape[-1]
    idx = targets - vocab_offset(local)
    here = (idx >= 0) & (idx < local)
    picked = logp.gather(-1, idx.clamp(0, local - 1).unsqueeze(-1)).squeeze(-1)
    return -_all_reduce(torch.where(here, picked, torch.zeros_like(picked)), dist.ReduceOp.SUM)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Global argmax over the sharded vocabulary (the lowest index among exact ties, like torch.argmax)."""
    x = logits.float()
    local_max, local_idx = x.max(dim=-1)
    best = _all_reduce(local_max.clone(), dist.ReduceOp.MAX)
    idx = local_idx + vocab_offset(x.shape[-1])
    big = torch.iinfo(torch.int64).max
    idx = torch.where(local_max == best, idx, torch.full_like(idx, big))
    return _all_reduce(idx, dist.ReduceOp.MIN)


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
