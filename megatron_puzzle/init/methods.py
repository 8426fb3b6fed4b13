"""Training-free initialisation of subblock variants from the parent's weights.

Pure tensor functions on canonical (HF-layout) weights, testable on tiny layers:

- `mean_pool_kv`: fewer KV heads; each new KV head is the mean of the parent KV
  heads its query heads used.
- `channel_contribution` / `prune_ffn`: narrower FFN keeping the channels with the
  largest mean |activation| x ||down-projection column||; `truncate_ffn` keeps the
  first channels (the baseline).
- `linear_attention_from_vo`: attention where each token attends only to itself is
  O @ V (V heads repeated per query group).
- `linear_ffn_lstsq`: least-squares map of the FFN's (normed) input to its output;
  `linear_ffn_up_down`: down @ up, the comparison baseline.
- `random_like_std`: random weights for the ablation.
"""

from __future__ import annotations

import torch


def _kv_group_of_query_heads(num_heads: int, num_kv: int) -> torch.Tensor:
    """Index of the KV head each query head reads (GQA: consecutive query heads share one)."""
    return torch.arange(num_heads) // (num_heads // num_kv)


def mean_pool_kv(k: torch.Tensor, v: torch.Tensor, num_heads: int, new_kv: int, head_dim: int):
    """K, V projections [kv*d, hidden] -> [new_kv*d, hidden] by mean-pooling.

    New KV head j serves query heads [j*H/new_kv, (j+1)*H/new_kv); it becomes the mean,
    over those query heads, of the parent KV head each one used. When `new_kv` divides
    the parent's KV count this is the plain mean of each group of parent KV heads.
    """
    old_kv = k.shape[0] // head_dim
    if num_heads % new_kv or num_heads % old_kv:
        raise ValueError(f"{new_kv} and {old_kv} KV heads must both divide the {num_heads} query heads")
    if new_kv > old_kv:
        raise ValueError(f"cannot mean-pool {old_kv} KV heads into more ({new_kv})")
    src = _kv_group_of_query_heads(num_heads, old_kv)  # parent KV head per query head
    dst = _kv_group_of_query_heads(num_heads, new_kv)  # new KV head per query head
    out = []
    for w in (k, v):
        heads = w.reshape(old_kv, head_dim, -1)
        pooled = torch.stack([heads[src[dst == j]].mean(dim=0) for j in range(new_kv)])
        out.append(pooled.reshape(new_kv * head_dim, -1).clone())
    return out[0], out[1]


def ffn_activations(x_normed: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU intermediate activations [tokens, M] (the input of the down projection)."""
    return torch.nn.functional.silu(x_normed @ gate.T) * (x_normed @ up.T)


def channel_contribution(mean_abs_activation: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Contribution of each FFN channel: mean |activation_i| x ||down[:, i]|| ([M])."""
    return mean_abs_activation * down.norm(dim=0)


def top_channels(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, in ascending channel order (ties: lower index first)."""
    if not 0 < keep <= scores.numel():
        raise ValueError(f"cannot keep {keep} of {scores.numel()} FFN channels")
    order = torch.sort(-scores.double(), stable=True).indices
    return order[:keep].sort().values


def prune_ffn(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, keep_idx: torch.Tensor):
    """Keep the channels `keep_idx`: rows of gate/up, columns of down."""
    return gate[keep_idx].clone(), up[keep_idx].clone(), down[:, keep_idx].clone()


def truncate_ffn(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, keep: int):
    return prune_ffn(gate, up, down, torch.arange(keep))


def linear_attention_from_vo(v: torch.Tensor, o: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """[hidden, hidden] = O @ V_rep, V_rep repeating each KV head's rows for its query heads."""
    kv = v.shape[0] // head_dim
    groups = _kv_group_of_query_heads(num_heads, kv)
    v_rep = v.reshape(kv, head_dim, -1)[groups].reshape(num_heads * head_dim, -1)
    return (o.double() @ v_rep.double()).float()


class LstsqAccumulator:
    """Streaming normal equations for Y ~ X W^T: sums of X^T X and X^T Y in float64."""

    def __init__(self, dim_in: int, dim_out: int, device: torch.device | str = "cpu"):
        self.xtx = torch.zeros(dim_in, dim_in, dtype=torch.float64, device=device)
        self.xty = torch.zeros(dim_in, dim_out, dtype=torch.float64, device=device)
        self.count = 0

    def to(self, device: torch.device | str) -> "LstsqAccumulator":
        self.xtx, self.xty = self.xtx.to(device), self.xty.to(device)
        return self

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.count += x.shape[0]

    def solve(self, ridge: float = 0.0) -> torch.Tensor:
        """W [out, in]; `ridge` is relative to the mean diagonal of X^T X (keeps rank-deficient fits finite)."""
        if self.count == 0:
            raise ValueError("no calibration activations were accumulated")
        a = self.xtx
        if ridge > 0:
            a = a + ridge * a.diagonal().mean() * torch.eye(a.shape[0], dtype=a.dtype)
        return torch.linalg.solve(a, self.xty).T.float().contiguous()


def linear_ffn_lstsq(x: torch.Tensor, y: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    acc = LstsqAccumulator(x.shape[-1], y.shape[-1])
    acc.add(x, y)
    return acc.solve(ridge)


def linear_ffn_up_down(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down @ up: the FFN with its gate dropped (the baseline for the least-squares fit)."""
    return (down.double() @ up.double()).float()


def random_like_std(shape, generator: torch.Generator, std: float = 0.02) -> torch.Tensor:
    return std * torch.randn(shape, generator=generator)
