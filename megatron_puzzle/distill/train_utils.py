"""Training helpers for distillation: LR schedule, data-parallel gradient averaging,
global-norm clipping over tensor-parallel shards, optimizer state sharded over
data-parallel ranks (ZeRO stage 1), optimizer/RNG state files.

Plain `torch.optim.AdamW` over the model's parameters: Megatron-Core's distributed
optimizer and its `clip_grad_norm_fp32` assume CUDA tensors, and these few lines
work on CPU and GPU alike.
"""

from __future__ import annotations

import json
import math

import torch
import torch.distributed as dist

from ..utils.io import atomic_save_safetensors


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps to `lr`, then cosine decay to `min_lr` at `total`.

    `step` counts optimizer steps from 0 (the LR used for the first update is lr_at(0)).
    """
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value


def shard_owners(model: torch.nn.Module, size: int) -> dict[str, int]:
    """Owner data-parallel rank of each trainable parameter, for sharding AdamW state (ZeRO stage 1).

    Whole tensors, largest first (ties by name), each to the least-loaded rank so far:
    every rank computes the same assignment from the same model, with no communication.
    """
    params = sorted(((n, p.numel()) for n, p in model.named_parameters() if p.requires_grad),
                    key=lambda item: (-item[1], item[0]))
    if len(params) < size:
        raise ValueError(f"cannot shard {len(params)} parameter tensors over {size} data-parallel ranks; "
                         "set shard_optimizer: false")
    load = [0] * size
    owners = {}
    for name, numel in params:
        rank = min(range(size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += numel
    return owners


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float,
                    betas=(0.9, 0.95), eps: float = 1e-8, owned: set[str] | None = None) -> torch.optim.AdamW:
    """AdamW with no weight decay on 1-D parameters (norm weights), the usual LLM recipe.

    `owned`: names of the only parameters this optimizer updates (and holds state for);
    None: all trainable parameters.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and (owned is None or name in owned):
            (no_decay if p.ndim < 2 else decay).append(p)
    # both groups always exist (possibly empty) so saved state lines up group by group
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False keeps CPU and GPU on the same per-tensor arithmetic
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)


def average_gradients_dp(model: torch.nn.Module, bucket_bytes: int = 256 * 2**20) -> None:
    """All-reduce gradients over the data-parallel group and divide by its size.

    Gradients are packed into flat buckets of at most `bucket_bytes` (a parameter larger
    than that goes alone): few collectives, and never a second copy of every gradient.
    """
    from megatron.core import parallel_state

    if not dist.is_initialized() or parallel_state.get_data_parallel_world_size() == 1:
        return
    group = parallel_state.get_data_parallel_group()
    size = dist.get_world_size(group)
    bucket, nbytes = [], 0
    for g in (p.grad for p in model.parameters() if p.grad is not None):
        if bucket and nbytes + g.numel() * 4 > bucket_bytes:
            _all_reduce_mean(bucket, group, size)
            bucket, nbytes = [], 0
        bucket.append(g)
        nbytes += g.numel() * 4
    if bucket:
        _all_reduce_mean(bucket, group, size)


def _all_reduce_mean(grads: list[torch.Tensor], group, size: int) -> None:
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def broadcast_from_owners(model: torch.nn.Module, owners: dict[str, int]) -> None:
    """After each rank stepped its own parameters, send every parameter from its owner to the DP group."""
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    named = dict(model.named_parameters())
    for owner in sorted(set(owners.values())):
        params = [named[n] for n in sorted(owners) if owners[n] == owner]
        # one flat buffer per owner: N collectives per step instead of one per tensor
        flat = torch.cat([p.data.reshape(-1) for p in params])
        dist.broadcast(flat, src=dist.get_global_rank(group, owner), group=group)
        offset = 0
        for p in params:
            p.data.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip to a global L2 norm over the whole (tensor-parallel) model; return the norm before clipping.

    Parameters marked `tensor_model_parallel` hold a shard each: their squared norms are
    summed over the TP group. The others (norm weights) are replicated with identical
    gradients on every TP rank and count once. Gradients are identical over DP after
    `average_gradients_dp`, so no DP reduction is needed.
    """
    from megatron.core import parallel_state

    params = [p for p in model.parameters() if p.grad is not None]
    dev = params[0].grad.device if params else torch.device("cpu")
    sharded = torch.zeros((), dtype=torch.float64, device=dev)
    replicated = torch.zeros((), dtype=torch.float64, device=dev)
    for p in params:
        sq = p.grad.detach().double().pow(2).sum()
        if getattr(p, "tensor_model_parallel", False):
            sharded += sq
        else:
            replicated += sq
    if dist.is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(sharded, group=parallel_state.get_tensor_model_parallel_group())
    norm = float((sharded + replicated).sqrt())
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            p.grad.mul_(scale)
    return norm


# --------------------------------------------------------------------------- state files

def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    """Flatten an optimizer state dict into named tensors plus JSON for the rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, json.dumps({"param_groups": sd["param_groups"], "scalars": scalars})


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: str) -> None:
    meta = json.loads(meta)
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    current = optimizer.state_dict()
    if len(meta["param_groups"]) != len(current["param_groups"]) or any(
        len(a["params"]) != len(b["params"]) for a, b in zip(meta["param_groups"], current["param_groups"])
    ):
        raise ValueError("saved optimizer state does not match this model's parameters; "
                         "resume with the same child and the same tensor/data-parallel sizes")
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    if "rng.cpu" in tensors:
        torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def save_rank_state(path, optimizer: torch.optim.Optimizer) -> None:
    """This rank's optimizer and RNG state as one safetensors file (atomic)."""
    tensors, meta = optimizer_tensors(optimizer)
    tensors.update(rng_tensors())
    atomic_save_safetensors(path, tensors, metadata={"optimizer": meta})


def load_rank_state(path, optimizer: torch.optim.Optimizer) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()["optimizer"]
    tensors = load_file(str(path))
    rng = {k: tensors.pop(k) for k in list(tensors) if k.startswith("rng.")}
    dev = next(iter(p.device for g in optimizer.param_groups for p in g["params"]), torch.device("cpu"))
    tensors = {k: v.to(dev) if not k.endswith(".step") else v for k, v in tensors.items()}
    load_optimizer_tensors(optimizer, tensors, meta)
    restore_rng(rng)
