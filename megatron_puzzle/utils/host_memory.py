"""Keep freed host memory in the process on CPU runs, so large tensors are not page-faulted in anew each step.

glibc serves an allocation above its mmap threshold (128 KiB, rising on its own to at most
32 MiB) with a fresh mmap and gives it back to the kernel when it is freed. A CPU training
step allocates and frees tensors far above that every time (the logits of a 4 x 128 batch
over a 49k vocabulary are 100 MB, the embedding's gradient as much), so every step pays
for page faults and for zeroing the new pages; on a virtual machine the pages come back
from the host. Raising the threshold to 1 GiB and never trimming the heap lets the
allocator reuse freed memory instead: GKD on the default run's child went from ~175 to
~250 tokens/s on 2 cores (docs/report.md). The price is that the process keeps its peak
heap, which a CPU run has to hold anyway.

Only CPU runs change: a GPU run's tensors live in the CUDA caching allocator, and its host
side (loading a 70B checkpoint) is better served by memory that goes back to the system.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 1 << 30  # allocations up to 1 GiB come from the heap, and their memory is reused
ENV_OPT_OUT = "MEGATRON_PUZZLE_SYSTEM_MALLOC"  # set to 1 to keep glibc's own behaviour


def keep_freed_memory(force: bool = False) -> bool:
    """Set glibc's mmap and trim thresholds for a CPU run; True when both were set.

    Does nothing (False) on a machine with CUDA unless `force`, off glibc, or when
    MEGATRON_PUZZLE_SYSTEM_MALLOC=1.
    """
    if os.environ.get(ENV_OPT_OUT, "") not in ("", "0") or not sys.platform.startswith("linux"):
        return False
    if not force:
        import torch

        if torch.cuda.is_available():
            return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs: nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    log.debug("host memory: mmap threshold %d, no trimming: %s", MMAP_THRESHOLD, "set" if ok else "refused")
    return ok
