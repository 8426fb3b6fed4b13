"""Run Megatron-Core on machines without CUDA.

Megatron-Core 0.16 assumes CUDA in a handful of places. When CUDA is absent we
redirect exactly these, and nothing else:

1. ``torch.cuda.current_device()`` is used as the allocation device (attention
   buffers, TP mappings, rotary embeddings): it returns the CPU device.
2. ``transformer.utils.get_default_causal_mask`` builds its mask with
   ``device="cuda"``; ``fusions.fused_softmax`` imported it by name, so both
   references are replaced.
3. The CUDA RNG tracker (``tensor_parallel.random``) keeps CUDA generator states;
   a tracker keeping CPU generator states makes ``model_parallel_cuda_manual_seed``
   and ``fork()`` work.
4. ``torch.cuda.synchronize()`` in distributed-checkpoint saving (and pipeline
   send/receive) becomes a no-op.

The training engine (DDP, optimizer, grad clipping, pipeline schedules) adds:

5. ``device="cuda"`` literals (optimizer flags and scales, clip-grad buffers, the
   local l2-norm fallback, the schedules' token counters, the grad scaler): those
   modules see a ``torch`` whose tensor factories map ``"cuda"`` to the CPU.
6. ``Tensor.type()`` string checks (``'torch.cuda.FloatTensor'``) in grad clipping
   and the distributed optimizer's setup: while those two functions run, CPU
   tensors report the CUDA type names of the same dtype.
7. ``weight.data.cuda()`` of the tied embedding under pipeline parallelism
   (``LanguageModule.setup_embeddings_and_output_layer``): ``.cuda()`` stays on the
   CPU while that method runs.
8. Activation recompute (``tensor_parallel.checkpoint``) saves and restores the CUDA RNG
   state (``_get_cuda_rng_state`` / ``_set_cuda_rng_state``): without CUDA there is none;
   the CPU state and the tracker's states are still saved and restored.
9. The tensor-parallel linear functions (``tensor_parallel.layers``) carry
   ``custom_fwd``/``custom_bwd`` bound to ``device_type="cuda"``, so under CPU bf16 autocast
   their backward runs outside the forward's autocast (bf16 gradient @ fp32 weight fails):
   the backward re-enters the CPU autocast its forward ran under.
10. ``send_tensor.cuda()`` before the all-gather that builds the distributed optimizer's
   model-space (``fully_reshardable``) checkpoint state
   (``DistributedOptimizer.get_parameter_state_dp_zero``): ``.cuda()`` stays on the CPU
   while that method runs (gloo gathers CPU tensors).

Call :func:`apply` before building a model. It does nothing when CUDA is available.
Each redirected spot is listed in :data:`REDIRECTED` (module, attribute) and the
test suite checks that they still exist in the installed Megatron-Core.

11. The memory plan (``megatron_puzzle.plan``) steps the engine on fake tensors on any machine,
    CUDA or not, and the plan's check against real CPU tensors does the same: the context manager
    :func:`engine_on_cpu` makes, while it is open, ``device="cuda"`` tensors from
    ``torch.tensor`` / ``torch.zeros`` on the CPU, has every float tensor answer ``type()`` with
    its CUDA name (the plan is of a GPU run) and computes the local grad-norm fallback on tensors
    (fake tensors have no Python values). Listed in :data:`REDIRECTED_IN_CONTEXT`; undone on exit.
"""

from __future__ import annotations

import contextlib
import functools

import torch

_APPLIED = False


class CPURNGStatesTracker:
    """Named RNG states kept as CPU generator states (the CUDA tracker's interface)."""

    def __init__(self, *args, **kwargs):
        self.reset()

    def reset(self):
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        gen = torch.Generator().manual_seed(seed)
        self.states_[name] = gen.get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


class _CPUTorch:
    """`torch` as seen by a Megatron-Core module that allocates with device="cuda": the
    factories below put those tensors on the CPU; every other name is torch's own."""

    _FACTORIES = ("tensor", "zeros", "ones", "empty", "full")

    def __init__(self, real):
        self._real = real
        for name in self._FACTORIES:
            setattr(self, name, self._wrap(getattr(real, name)))

    @staticmethod
    def _wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            dev = kwargs.get("device")
            if dev == "cuda" or (isinstance(dev, torch.device) and dev.type == "cuda"):
                kwargs["device"] = "cpu"
                kwargs.pop("pin_memory", None)
            return fn(*args, **kwargs)
        return call

    def __getattr__(self, name):
        return getattr(self._real, name)


_CUDA_TYPE_NAMES = {"torch.FloatTensor": "torch.cuda.FloatTensor", "torch.HalfTensor": "torch.cuda.HalfTensor",
                    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}


@contextlib.contextmanager
def _cuda_type_names():
    """CPU tensors answer `.type()` (no argument) with the CUDA type name of their dtype."""
    real = torch.Tensor.type

    def type_(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        return _CUDA_TYPE_NAMES.get(out, out) if not args and not kwargs else out

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = real


@contextlib.contextmanager
def _cuda_stays_on_cpu():
    real = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = real


def _within(fn, context):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with context():
            return fn(*args, **kwargs)
    call._cpu_support_wrapped = True
    return call


def _keep_cpu_autocast(fn_cls) -> None:
    """Run `fn_cls.backward` under the CPU autocast state its forward saw (what custom_bwd does for CUDA)."""
    forward, backward = fn_cls.forward, fn_cls.backward

    @functools.wraps(forward)
    def forward_(ctx, *args, **kwargs):
        ctx.cpu_autocast_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        return forward(ctx, *args, **kwargs)

    @functools.wraps(backward)
    def backward_(ctx, *grads):
        if ctx.cpu_autocast_dtype is None:
            return backward(ctx, *grads)
        with torch.autocast("cpu", dtype=ctx.cpu_autocast_dtype):
            return backward(ctx, *grads)

    forward_.cpu_support_original, backward_.cpu_support_original = forward, backward
    fn_cls.forward, fn_cls.backward = staticmethod(forward_), staticmethod(backward_)


# (module, attribute) of every redirected spot; tests/test_model_parity.py checks each still exists.
REDIRECTED = [
    ("torch.cuda", "current_device"),  # 1
    ("megatron.core.transformer.utils", "get_default_causal_mask"),  # 2
    ("megatron.core.fusions.fused_softmax", "get_default_causal_mask"),  # 2
    ("megatron.core.tensor_parallel.random", "_CUDA_RNG_STATE_TRACKER"),  # 3
    ("torch.cuda", "synchronize"),  # 4
    ("megatron.core.optimizer.optimizer", "torch"),  # 5: found_inf, _scale_one, _dummy_overflow_buf
    ("megatron.core.optimizer.clip_grads", "torch"),  # 5: norm and overflow buffers
    ("megatron.core.optimizer.grad_scaler", "torch"),  # 5: loss-scale tensors
    ("megatron.core.utils", "torch"),  # 5: local_multi_tensor_l2_norm's result
    ("megatron.core.pipeline_parallel.schedules", "torch"),  # 5: total_num_tokens
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),  # 6
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),  # 6: imported by name
    ("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer", "__init__"),  # 6
    ("megatron.core.models.common.language_module.language_module.LanguageModule",
     "setup_embeddings_and_output_layer"),  # 7
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),  # 8
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),  # 8
    ("megatron.core.tensor_parallel.layers.LinearWithGradAccumulationAndAsyncCommunication", "backward"),  # 9
    ("megatron.core.tensor_parallel.layers.LinearWithFrozenWeight", "backward"),  # 9
    ("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer", "get_parameter_state_dp_zero"),  # 10
]


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), so bf16 beats fp32 on it."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def apply() -> None:
    """Redirect Megatron-Core's CUDA-only calls to the CPU (idempotent; no-op with CUDA)."""
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return

    torch.cuda.current_device = lambda: torch.device("cpu")  # 1
    torch.cuda.synchronize = lambda *a, **k: None  # 4

    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer import utils as mcore_utils

    cached_mask = functools.lru_cache(maxsize=8)(_cpu_causal_mask)
    mcore_utils.get_default_causal_mask = cached_mask  # 2
    fused_softmax.get_default_causal_mask = cached_mask

    tracker = CPURNGStatesTracker()  # 3
    mcore_random._CUDA_RNG_STATE_TRACKER = tracker
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mcore_random.initialize_rng_tracker = lambda *a, **k: None
    mcore_random._get_cuda_rng_state = lambda *a, **k: None  # 8
    mcore_random._set_cuda_rng_state = lambda *a, **k: None

    from megatron.core import utils as mcore_core_utils
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer import clip_grads, distrib_optimizer, grad_scaler, optimizer
    from megatron.core.pipeline_parallel import schedules

    cpu_torch = _CPUTorch(torch)  # 5
    for module in (optimizer, clip_grads, grad_scaler, mcore_core_utils, schedules):
        module.torch = cpu_torch
    clipped = _within(clip_grads.clip_grad_by_total_norm_fp32, _cuda_type_names)  # 6
    clip_grads.clip_grad_by_total_norm_fp32 = clipped
    optimizer.clip_grad_by_total_norm_fp32 = clipped
    DO = distrib_optimizer.DistributedOptimizer
    DO.__init__ = _within(DO.__init__, _cuda_type_names)
    DO.get_parameter_state_dp_zero = _within(DO.get_parameter_state_dp_zero, _cuda_stays_on_cpu)  # 10
    LanguageModule.setup_embeddings_and_output_layer = _within(  # 7
        LanguageModule.setup_embeddings_and_output_layer, _cuda_stays_on_cpu)
    from megatron.core.tensor_parallel import layers as tp_layers

    for fn_cls in (tp_layers.LinearWithGradAccumulationAndAsyncCommunication, tp_layers.LinearWithFrozenWeight):
        _keep_cpu_autocast(fn_cls)  # 9
    _APPLIED = True


# (module, attribute) of the spots `engine_on_cpu` redirects while it is open (11).
REDIRECTED_IN_CONTEXT = [
    ("torch", "tensor"),
    ("torch", "zeros"),
    ("torch.Tensor", "type"),
    ("megatron.core.optimizer.clip_grads", "l2_norm_impl"),
]

_CUDA_NAMES = {torch.float32: "torch.cuda.FloatTensor", torch.bfloat16: "torch.cuda.BFloat16Tensor",
               torch.float16: "torch.cuda.HalfTensor"}


@contextlib.contextmanager
def engine_on_cpu():
    """Megatron-Core's DDP, optimizer and schedules on CPU tensors (fake or real), as on a GPU.

    Undone on exit. Literal `device="cuda"` scalars are made on the CPU; tensors answer `type()`
    with CUDA names (the distributed optimizer accepts no others); the local grad-norm fallback,
    which builds a tensor from Python floats, computes the same norm on tensors.
    """
    from megatron.core.optimizer import clip_grads

    saved = {"tensor": torch.tensor, "zeros": torch.zeros}
    saved_type = torch.Tensor.type
    saved_l2 = clip_grads.l2_norm_impl

    def on_cpu(factory):
        def make(*args, **kwargs):
            dev = kwargs.get("device")
            if dev is not None and torch.device(dev).type == "cuda":
                kwargs["device"] = torch.device("cpu")
            return factory(*args, **kwargs)
        return make

    def type_(self, *args, **kwargs):
        if not args and not kwargs and self.dtype in _CUDA_NAMES:
            return _CUDA_NAMES[self.dtype]
        return saved_type(self, *args, **kwargs)

    def l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
        norms = torch.stack([torch.linalg.vector_norm(t) for ts in tensor_lists for t in ts])
        return torch.linalg.vector_norm(norms).float().reshape(1), None

    for name, fn in saved.items():
        setattr(torch, name, on_cpu(fn))
    torch.Tensor.type = type_
    clip_grads.l2_norm_impl = l2_norm
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)
        torch.Tensor.type = saved_type
        clip_grads.l2_norm_impl = saved_l2
