"""Training helpers for distillation around Megatron-Core's engine: the LR schedule and the
optimizer-state pieces of a checkpoint load that the no-Transformer-Engine/apex path of
Megatron-Core's optimizers leaves to the caller.

Data parallelism, gradient reduction, clipping and the (distributed) optimizer itself are
Megatron-Core's (`DistributedDataParallel`, `finalize_model_grads`, `get_megatron_optimizer`).
"""

from __future__ import annotations

import math

import torch


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps to `lr`, then cosine decay to `min_lr` at `total`.

    `step` counts optimizer steps from 0 (the LR used for the first update is lr_at(0)):
    Megatron-Core's OptimizerParamScheduler would spend the first step at LR 0.
    """
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def _inner(optimizer):
    """The torch optimizers under a Megatron-Core optimizer (chained or not)."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        yield sub.optimizer


def init_optimizer_state(optimizer) -> None:
    """Adam moments and step counters before the first step, so a sharded state dict has
    every tensor to load into (the distributed optimizer asserts on an empty state)."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = sub.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if "step" not in st:
                    st["step"] = torch.zeros((), dtype=torch.float32)


def step_count(optimizer) -> int:
    """The optimizer steps taken, as torch's Adam counts them (one counter per parameter)."""
    steps = {int(st["step"]) for inner in _inner(optimizer) for st in inner.state.values() if "step" in st}
    return max(steps) if steps else 0


def set_step_count(optimizer, steps: int) -> None:
    """Give every parameter its own step tensor: a loaded state shares one tensor, which
    torch's Adam would then advance once per parameter per step (bias correction drifts)."""
    for inner in _inner(optimizer):
        for st in inner.state.values():
            st["step"] = torch.tensor(float(steps), dtype=torch.float32)
