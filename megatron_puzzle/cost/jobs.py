"""What a timing job is, shared by the timer (measure.py) and the runtimes that build jobs
(decilm_runtime.py), so neither imports the other."""

from __future__ import annotations

import contextlib
import glob
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch


class MeasureError(RuntimeError):
    """Measuring is impossible here (no CUDA, no NVML, unsupported dtype); the message suggests the fix."""


@dataclass
class Job:
    """One thing to time: `run(setup())`; `setup` is not timed. `units`: how many
    subblocks one run executes (a stack of copies); times are reported per unit."""

    run: Callable[[Any], Any]
    setup: Callable[[], Any] = lambda: None
    units: int = 1
    # False when `setup` does work comparable to `run` (e.g. filling a KV cache): the energy counter
    # cannot tell them apart, so such a job gets no energy figure.
    light_setup: bool = True


class Runtime(Protocol):
    """Builds timing jobs for subblock variants and the non-block parts of a model config."""

    def subblock_job(self, variant: str, phase: str) -> Job: ...

    def non_block_job(self, phase: str) -> Job: ...


def last_level_cache_bytes(device: torch.device) -> int:
    """Size of the last-level cache (CPU L3 from sysfs, GPU L2 from torch); 32 MiB if unknown."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or 2**25
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with contextlib.suppress(OSError, ValueError):
            text = open(path).read().strip()
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
            sizes.append(int(text.rstrip("KMG")) * mult)
    return max(sizes, default=2**25)
