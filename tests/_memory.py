"""Counting the bytes of tensors a piece of code allocates and keeps (CPU), for the memory tests."""

from __future__ import annotations

import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary


class TensorBytes(TorchDispatchMode):
    """Bytes of tensor storage allocated inside the block and still alive: the current and the peak.

    Every op's outputs are seen here; a storage is counted once, when first seen, and
    uncounted when it dies. Storages that exist on entry (the parent's weights) count 0."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = WeakIdKeyDictionary()

    def __enter__(self):
        gc.collect()
        for o in gc.get_objects():
            if isinstance(o, torch.Tensor) and not o.is_meta:
                self.seen[o.untyped_storage()] = 0
        return super().__enter__()

    def _free(self, n):
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st not in self.seen:
                    n = st.nbytes()
                    self.seen[st] = n
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, n)
        return out
