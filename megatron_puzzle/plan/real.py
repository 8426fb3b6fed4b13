"""The plan's reference: the same stage step on real tensors, measured by the CPU allocator.

`measure_stage` builds the stage exactly as the plan does, in a real process group, then runs
its step under `torch.profiler` with memory profiling: every allocation and free of the
c10 allocator, in order. The peak is the bytes alive before the step (the stage's weights,
gradient buffers and optimizer state, counted once per storage) plus the highest point of
that running sum. MemTracker is not involved, so this checks the fake-tensor plan with a
different instrument.
"""

from __future__ import annotations

import itertools

import torch

from ..arch import ModelConfig
from ..model import cpu_support
from . import fake, stages


def _storages_bytes(objs) -> int:
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()

    for o in objs:
        if isinstance(o, torch.nn.Module):
            for t in itertools.chain(o.parameters(), o.buffers()):
                add(t)
        else:
            add(o)
    return sum(seen.values())


def allocator_peak(fn) -> int:
    """Highest bytes allocated above the start while `fn()` runs, from the profiler's allocator events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    return max([0, *itertools.accumulate(e.nbytes() for e in events)])


def measure_stage(stage: str, cfg: ModelConfig, s: stages.StageSettings) -> int:
    """Peak bytes of one real step of `stage` on this process (call inside a real process group)."""
    tracker = fake.Tracker(enabled=False)
    with cpu_support.engine_on_cpu():
        run, held = stages.PREPARE[stage](cfg, s, tracker)
        before = _storages_bytes(tracker.registered)
        return before + allocator_peak(run)
