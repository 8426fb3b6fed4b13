"""Distillation losses: hidden-state cosine, KL(parent || child) and LM loss.

Logits arrive vocab-parallel (`[batch, seq, vocab / tp]`, each tensor-parallel rank
holding one contiguous vocabulary shard). The log-softmax normaliser is built from
per-shard maxima and sums of exponentials all-reduced over the TP group, and the
per-token KL / cross-entropy is a sum of per-shard terms all-reduced once, so no rank
ever holds the full vocabulary. Autograd stays exact: the normaliser's all-reduce
sums gradients in backward (every shard's terms depend on it), the final reduction
passes them through unchanged (Megatron-Core's `reduce_from_tensor_model_parallel_region`).

Every function returns the mean over tokens; with TP 1 (or no process group) the
reductions are no-ops, so the same code is the single-device loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def _tp_group():
    from megatron.core import parallel_state

    if not dist.is_initialized() or not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_tensor_model_parallel_group()


def _tp_size_rank() -> tuple[int, int]:
    group = _tp_group()
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the TP group in forward, and sum of gradients in backward.

    Used for the softmax normaliser: every rank's loss terms depend on the global
    sum, so each rank's input needs the gradient summed over all ranks.
    """

    @staticmethod
    def forward(ctx, x):
        group = _tp_group()
        ctx.group = group
        if group is None or dist.get_world_size(group) == 1:
            return x.clone()
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.group is None or dist.get_world_size(ctx.group) == 1:
            return grad
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad


def _reduce_terms(x: torch.Tensor) -> torch.Tensor:
    """Sum per-shard terms over TP; gradient passes through (each rank owns its shard's terms)."""
    if _tp_group() is None or _tp_size_rank()[0] == 1:
        return x
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(x)


def _global_max(x: torch.Tensor) -> torch.Tensor:
    """Max over the last dim across all vocab shards (no gradient: a constant shift)."""
    m = x.detach().amax(dim=-1)
    group = _tp_group()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    return m


def vocab_parallel_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the full vocabulary, returned for this rank's shard only."""
    logits = logits.float()
    shifted = logits - _global_max(logits).unsqueeze(-1)
    sum_exp = _AllReduceSum.apply(shifted.exp().sum(dim=-1))
    return shifted - sum_exp.log().unsqueeze(-1)


def vocab_parallel_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of softmax(logits / T), times T^2.

    Both logits are vocab-parallel shards of the same vocabulary split. The teacher
    side carries no gradient. `mask` ([batch, seq], bool) selects the tokens averaged.
    """
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} differ; they must be the same vocab shard")
    t = float(temperature)
    with torch.no_grad():
        log_p = vocab_parallel_log_softmax(teacher_logits.detach() / t)
        p = log_p.exp()
    log_q = vocab_parallel_log_softmax(student_logits / t)
    return _masked_mean(per_token_kl(log_p, log_q, p), mask) * (t * t)


def per_token_kl(log_p: torch.Tensor, log_q: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p || q) per position from vocab-parallel log-probabilities (`p` = exp(log_p) if already at hand)."""
    p = log_p.exp() if p is None else p
    return _reduce_terms((p * (log_p - log_q)).sum(dim=-1))


def per_token_cross_entropy(log_q: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log q(target) per position from vocab-parallel log-probabilities; `targets` are global ids."""
    _, rank = _tp_size_rank()
    shard = log_q.shape[-1]
    lo = rank * shard
    local = (targets >= lo) & (targets < lo + shard)
    idx = (targets - lo).clamp(0, shard - 1)
    return -_reduce_terms(log_q.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * local)


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross entropy; `targets` [batch, seq] are global vocabulary ids."""
    return _masked_mean(per_token_cross_entropy(vocab_parallel_log_softmax(logits), targets), mask)


def vocab_parallel_unlikelihood(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                                over: torch.Tensor) -> torch.Tensor:
    """Unlikelihood (Welleck et al. 2019): the sum of -log(1 - q(target)) over the positions in `mask`,
    divided by the count of positions in `over` ([batch, seq] bools), so the term shrinks as the masked
    positions (the child's repeats) become rarer. q(target) near 1 is clamped to 1 - 1e-6."""
    q = torch.exp(-per_token_cross_entropy(vocab_parallel_log_softmax(logits), targets))
    per_token = -torch.log1p(-q.clamp(max=1.0 - 1e-6))
    return (per_token * mask.to(per_token.dtype)).sum() / over.to(per_token.dtype).sum().clamp_min(1.0)


def vocab_parallel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Global vocabulary id of the largest logit (ties: the lowest id)."""
    size, rank = _tp_size_rank()
    val, idx = logits.detach().float().max(dim=-1)
    idx = idx + rank * logits.shape[-1]
    if size == 1:
        return idx
    group = _tp_group()
    vals = [torch.empty_like(val) for _ in range(size)]
    idxs = [torch.empty_like(idx) for _ in range(size)]
    dist.all_gather(vals, val.contiguous(), group=group)
    dist.all_gather(idxs, idx.contiguous(), group=group)
    vals, idxs = torch.stack(vals), torch.stack(idxs)
    best = vals.argmax(dim=0, keepdim=True)  # first max = lowest shard = lowest id among ties
    return idxs.gather(0, best).squeeze(0)


def cosine_term(student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor],
                sequence_parallel: bool = False) -> torch.Tensor:
    """Sum over layers of the token mean of (1 - cosine similarity) over the hidden dim.

    Hidden states are [seq, batch, hidden] (replicated over TP without sequence
    parallelism, so each rank computes the same value). With sequence parallelism each TP
    rank holds an equal slice of the sequence: the slices' means are averaged over the TP
    group (sum in forward, gradient passed through, so each rank's slice gets 1/TP of it).
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"{len(student_hidden)} student layers vs {len(teacher_hidden)} teacher layers: "
                         "the child must keep the parent's layer count")
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student_hidden, teacher_hidden):
        cos = torch.nn.functional.cosine_similarity(s.float(), t.detach().float(), dim=-1, eps=1e-8)
        total = total + (1.0 - cos).mean()
    if sequence_parallel:
        size, _ = _tp_size_rank()
        total = _reduce_terms(total) / size
    return total


def repeating(seq, n: int = 3) -> list[bool]:
    """Per position of `seq` (any hashable items): whether the n-gram ending there already occurred
    earlier in `seq` (a loop going on); False for the first n - 1 positions."""
    seen, flags = set(), [False] * min(n - 1, len(seq))
    for t in range(n - 1, len(seq)):
        gram = tuple(seq[t - n + 1:t + 1])
        flags.append(gram in seen)
        seen.add(gram)
    return flags


def repeat_mask(tokens: torch.Tensor, n: int = 3) -> torch.Tensor:
    """[batch, seq] bool: `repeating` of each row, computed where `tokens` lies with no copy to the host
    (GKD calls it every micro-batch). A stable sort of the n-grams by each of their tokens, last one first
    (a radix sort), lines equal n-grams up in order of position; all but the first of each run repeat."""
    b, s = tokens.shape
    out = torch.zeros((b, s), dtype=torch.bool, device=tokens.device)
    if s < n:
        return out
    grams = tokens.unfold(1, n, 1)  # [b, s - n + 1, n]: the n-gram ending at position n - 1 + j
    order = torch.arange(s - n + 1, device=tokens.device).expand(b, -1)
    for k in reversed(range(n)):
        order = order.gather(1, torch.sort(grams[..., k].gather(1, order), dim=1, stable=True).indices)
    lined = grams.gather(1, order.unsqueeze(-1).expand(-1, -1, n))
    again = torch.cat([out[:, :1], (lined[:, 1:] == lined[:, :-1]).all(-1)], dim=1)
    out[:, n - 1:] = torch.zeros_like(again).scatter(1, order, again)
    return out


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean()
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


@dataclass
class LossWeights:
    """Weights of the GKD loss terms (0 switches a term off and skips its compute)."""

    cosine: float = 1.0
    kl: float = 1.0
    lm: float = 0.0

    def __post_init__(self):
        for k in ("cosine", "kl", "lm"):
            if getattr(self, k) < 0:
                raise ValueError(f"loss weight {k} must be >= 0, got {getattr(self, k)}")
        if self.cosine == 0 and self.kl == 0 and self.lm == 0:
            raise ValueError("all loss weights are 0: set at least one of cosine, kl, lm above 0")


def gkd_loss(student_logits, teacher_logits, student_hidden, teacher_hidden, targets,
             weights: LossWeights, temperature: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted GKD loss and its terms (as floats, for logging).

    `teacher_logits` / `teacher_hidden` may be None when their terms are weighted 0.
    """
    terms: dict[str, torch.Tensor] = {}
    if weights.cosine:
        terms["cosine"] = cosine_term(student_hidden, teacher_hidden)
    if weights.kl:
        terms["kl"] = vocab_parallel_kl(teacher_logits, student_logits, temperature)
    if weights.lm:
        terms["lm"] = vocab_parallel_cross_entropy(student_logits, targets)
    loss = sum(getattr(weights, k) * v for k, v in terms.items())
    return loss, {k: float(v.detach()) for k, v in terms.items()}
