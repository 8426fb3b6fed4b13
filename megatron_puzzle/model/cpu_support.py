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
4. ``torch.cuda.synchronize()`` in distributed-checkpoint saving becomes a no-op.

Call :func:`apply` before building a model. It does nothing when CUDA is available.
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
    _APPLIED = True
