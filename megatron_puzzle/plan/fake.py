"""A world of fake tensors: one rank of a TP x PP x DP job, built and stepped without allocating.

`fake_world(...)` starts torch.distributed's fake process group (every collective is a no-op
that returns tensors of the right shape) and Megatron-Core's parallel state for one rank, then
turns on PyTorch's `FakeTensorMode`, so the stage's real modules can be built at full size and
one step of the stage can run. `Tracker` wraps `torch.distributed._tools.mem_tracker.MemTracker`
(as torchtitan's memory estimator does) and splits its peak into weights, gradients, optimizer
state and activations.

What stood in the way of running Megatron-Core's engine on fake tensors (handled here, only while a
fake world is open, and undone when it closes):
- values read back to Python (`.item()`: grad norms, Adam's step count, `all_gather_object`) have no
  data: scalars read as 1 (False for flags); `all_gather_object` fills every slot with this rank's object;
- literal `device="cuda"` tensors in the optimizer and schedules, the distributed optimizer's
  'torch.cuda.*' type-name checks and the local grad-norm fallback: `model.cpu_support.engine_on_cpu`
  (the project's one module of CUDA redirections; the plan is of a GPU run);
- `torch.distributed._coalescing_manager` has no fake kernel: a no-op context.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from ..model.cpu_support import engine_on_cpu


class _NoData(TorchDispatchMode):
    """Fake tensors have no values: scalars read back as 1 (False for flags)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            if t.dtype == torch.bool:
                return False
            return 1.0 if t.dtype.is_floating_point else 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _fake_collectives():
    """all_gather_object fills every slot with this rank's object; the coalescing manager is a no-op."""
    from megatron.core.distributed import param_and_grad_buffer

    saved_ago = dist.all_gather_object
    saved_cm = param_and_grad_buffer._coalescing_manager

    def all_gather_object(out, obj, group=None):
        for i in range(len(out)):
            out[i] = obj

    class _Done:
        def wait(self):
            pass

    @contextlib.contextmanager
    def coalescing(*args, **kwargs):
        yield _Done()

    dist.all_gather_object = all_gather_object
    param_and_grad_buffer._coalescing_manager = coalescing
    try:
        yield
    finally:
        dist.all_gather_object = saved_ago
        param_and_grad_buffer._coalescing_manager = saved_cm


@contextlib.contextmanager
def fake_world(*, world_size: int, tensor_parallel: int, pipeline_parallel: int = 1, rank: int = 0,
               seed: int = 1234):
    """Be `rank` of a fake job; inside, tensors are fake. Refuses to run beside a real process group."""
    from megatron.core import parallel_state
    from megatron.core import tensor_parallel as mcore_tp
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from ..model import cpu_support

    if dist.is_initialized():
        raise RuntimeError("a process group is already running here; plan in a fresh process (plan.plan_config does)")
    cpu_support.apply()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                                 pipeline_model_parallel_size=pipeline_parallel,
                                                 create_gloo_process_groups=False)
        mcore_tp.model_parallel_cuda_manual_seed(seed)
        with FakeTensorMode(allow_non_fake_inputs=True), engine_on_cpu(), _fake_collectives(), _NoData():
            yield
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


# --------------------------------------------------------------------------- memory tracking

@dataclass
class Breakdown:
    """Bytes per GPU at the peak of one stage step."""

    peak_bytes: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class Tracker:
    """MemTracker with Megatron's own buffers put in their categories.

    Megatron's DDP keeps gradients in flat main-grad buffers and the optimizer keeps fp32 master
    copies outside `optimizer.state`; MemTracker sees neither as such, so they are registered here.
    """

    def __init__(self, enabled: bool = True):
        from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

        self.enabled = enabled  # off: nothing is tracked, registrations are only listed (a real run measured otherwise)
        self.registered: list = []

        class _Tracker(MemTracker):
            """Totals only: the per-module statistics refuse a module run twice (micro-batches, a second
            step) and are not needed for a per-rank peak, so the module hooks only register weights."""

            def _pre_fw_hook(self, module, inputs):
                # frozen models (teacher, parent) have parameters that cannot take a gradient hook
                hooks = all(p.requires_grad for p in module.parameters())
                self._track_module_params_and_buffers(module, install_grad_hooks=hooks)

            def _post_fw_hook(self, module, inputs, outputs):
                pass

            def _pre_bw_hook(self, module, args):
                pass

            def _post_bw_hook(self, module, args):
                pass

        self.mt = _Tracker()
        self._types = _MemRefType

    def weights(self, *objs) -> None:
        if not self.enabled:
            self.registered.extend(objs)
            return
        for o in objs:
            self.mt.track_external(o)

    def _register(self, tensors, reftype) -> None:
        if not self.enabled:
            self.registered.extend(tensors)
            return
        for t in tensors:
            if t is not None:
                # MemTracker's own registration, with the category it has no public argument for
                self.mt._update_and_maybe_create_winfos(t, reftype)

    def gradients(self, tensors) -> None:
        self._register(tensors, self._types.GRAD)

    def optimizer_state(self, tensors) -> None:
        self._register(tensors, self._types.OPT)

    def activations(self, tensors) -> None:
        self._register(tensors, self._types.ACT)

    def __enter__(self):
        if self.enabled:
            self.mt.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.mt.__exit__(*exc)

    def peak(self) -> Breakdown:
        t = self._types
        total = {k: 0 for k in ("Total", *t)}
        for dev_snap in self.mt.get_tracker_snapshot("peak").values():
            for k, v in dev_snap.items():
                total[k] = total.get(k, 0) + v
        weights = total[t.PARAM] + total[t.BUFFER]
        grads = total[t.GRAD]
        opt = total[t.OPT]
        peak = total["Total"]
        return Breakdown(peak_bytes=int(peak), weights_bytes=int(weights), gradients_bytes=int(grads),
                         optimizer_bytes=int(opt), activations_bytes=int(peak - weights - grads - opt))


def megatron_main_grads(ddp_model) -> list[torch.Tensor]:
    """The flat gradient buffers of a Megatron-Core DDP model."""
    return [b.grad_data for b in ddp_model.buffers + getattr(ddp_model, "expert_parallel_buffers", [])]


def megatron_optimizer_tensors(optimizer) -> list[torch.Tensor]:
    """fp32 master copies and moments of a Megatron-Core optimizer (plain or distributed)."""
    out = []
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    for o in opts:
        for attr in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):
            for group in getattr(o, attr, None) or []:
                out.extend(group)
        inner = o.optimizer
        for state in inner.state.values():
            out.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return out
