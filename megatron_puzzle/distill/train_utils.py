"""Training helpers for distillation around Megatron-Core's engine: its LR scheduler, and the
optimizer-state pieces of a checkpoint that Megatron-Core's optimizers leave to the caller when
neither Transformer Engine nor apex is installed (torch's Adam underneath).

Data parallelism, gradient reduction, clipping, the (distributed) optimizer and the LR schedule
are Megatron-Core's (`DistributedDataParallel`, `finalize_model_grads`, `get_megatron_optimizer`,
`OptimizerParamScheduler`). The optimizer state is saved in model space: the plain optimizer
maps it onto the model's sharded tensors, the distributed optimizer uses its `fully_reshardable`
format, so a checkpoint loads at any TP x PP x DP. What this module adds to a load, each for one
gap in Megatron-Core 0.16 (tests/test_gkd.py checks that each gap is still there):

1. an empty optimizer state: the distributed optimizer's `state_dict()` asserts on it
   (distrib_optimizer.py, "assert len(steps) == 1") -> `init_optimizer_state` fills it first;
2. fp32 main params are views of parameters that require grad: copying into them outside
   `torch.no_grad()` raises -> the caller loads under no_grad;
3. the `fully_reshardable` load copies every key of the torch state, `step` included, from a
   dict that never has `step` (KeyError 'step') -> `load_optimizer_state` drops the step before
   the parameter state and restores it after;
4. a loaded state shares one `step` tensor between all parameters, which torch's Adam then
   advances once per parameter per step -> `set_step_count` gives each parameter its own.
(The distributed optimizer's default format, `fully_sharded_model_space`, cannot be saved at all:
dist_checkpointing/mapping.py rejects its flattened shards; it is never asked for here.)
"""

from __future__ import annotations

import torch

# the distributed optimizer's checkpoint format: model-space tensors, any TP x PP x DP on load
DISTRIBUTED_FORMAT = "fully_reshardable"


def lr_scheduler(optimizer, *, lr: float, min_lr: float, warmup: int, total: int, weight_decay: float):
    """Megatron-Core's OptimizerParamScheduler: linear warm-up over `warmup` steps from 0 to `lr`,
    then cosine decay to `min_lr` at step `total`; constant weight decay (times each parameter
    group's wd_mult: 0 for norms and biases). Call `.step(1)` before each optimizer step: the
    update of step s (from 0) then uses the LR at s + 1, so the first step is not spent at LR 0
    and the last one reaches `min_lr`."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=lr, min_lr=min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(total, warmup + 1), lr_decay_style="cosine", start_wd=weight_decay,
        end_wd=weight_decay, wd_incr_steps=max(total, 1), wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=False)


def _subs(optimizer):
    """The Megatron-Core optimizers under a (chained or not) one."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _inner(optimizer):
    """The torch optimizers under a Megatron-Core optimizer (chained or not)."""
    for sub in _subs(optimizer):
        yield sub.optimizer


def is_distributed(optimizer) -> bool:
    return bool(optimizer.config.use_distributed_optimizer)


def sharded_optimizer_state(optimizer, model_sharded_state_dict, *, is_loading: bool, layout_free: bool = True):
    """The optimizer's sharded state dict in model space (see the module docstring). `layout_free=False`
    reads a distributed optimizer's older `dp_reshardable` checkpoint (flat buffers: same TP x PP only)."""
    metadata = None
    if is_distributed(optimizer):
        metadata = {"distrib_optim_sharding_type": DISTRIBUTED_FORMAT if layout_free else "dp_reshardable"}
    return optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading, metadata=metadata)


def init_optimizer_state(optimizer) -> None:
    """Adam moments and step counters before the first step, so a sharded state dict has
    every tensor to load into (gap 1: the distributed optimizer asserts on an empty state)."""
    for inner in _inner(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if "step" not in st:
                    st["step"] = torch.zeros((), dtype=torch.float32)


@torch.no_grad()  # gap 2: fp32 main params are views of grad-requiring parameters
def load_optimizer_state(optimizer, state_dict, steps: int) -> None:
    """Load what `dist_checkpointing.load` returned for `sharded_optimizer_state(..., is_loading=True)`,
    then give every parameter its own step counter at `steps`."""
    subs = _subs(optimizer)
    states = [state_dict] if len(subs) == 1 else [state_dict[k] for k in sorted(state_dict)]
    for sub, sd in zip(subs, states):
        if sd.get("param_state_sharding_type") == DISTRIBUTED_FORMAT:
            param_state = sd.pop("param_state")
            sd.pop("param_state_sharding_type")
            sub.load_state_dict(sd)  # parameter groups and the (shared) step
            for st in sub.optimizer.state.values():
                st.pop("step", None)  # gap 3: the parameter-state copy would look for a saved 'step'
            sub.load_parameter_state_from_fully_reshardable(param_state)
        else:
            sub.load_state_dict(sd)
    set_step_count(optimizer, steps)


def step_count(optimizer) -> int:
    """The optimizer steps taken, as torch's Adam counts them (one counter per parameter)."""
    steps = {int(st["step"]) for inner in _inner(optimizer) for st in inner.state.values() if "step" in st}
    return max(steps) if steps else 0


def set_step_count(optimizer, steps: int) -> None:
    """Gap 4: give every parameter its own step tensor: a loaded state shares one tensor, which
    torch's Adam would then advance once per parameter per step (bias correction drifts)."""
    for inner in _inner(optimizer):
        for st in inner.state.values():
            st["step"] = torch.tensor(float(steps), dtype=torch.float32)
