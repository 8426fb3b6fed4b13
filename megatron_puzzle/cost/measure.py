"""Measured costs: time each variant alone on this machine at the scenario's shapes.

A *runtime* builds the work to time: for a variant and a phase it returns a `Job`
(`setup()` prepares fresh inputs and KV cache outside the timed region, `run(state)`
is the timed forward). The default runtime is the project's own DeciLM modeling code
(`decilm_runtime.py`), the code that serves the final model, so the sum of variant
costs predicts the served model's time.

Timing: `warmup` untimed runs, then the median of `repeats` timed rounds, all jobs
timed round-robin (`time_interleaved`) so background load hits them alike; the
caches are flushed before every timed run (in a model, a layer's weights were
evicted by the layers before it). Wall clock on CPU (with
`torch.set_num_threads(threads)`), CUDA events on GPU with NVML telemetry (device
name, memory, SM clock, power) sampled during the run. The time of a variant does
not depend on its weights or its layer, so each variant name is timed once.

On a GPU the decode step is replayed from a CUDA graph (captured once per variant with a
static KV cache, `decilm_runtime.py`): an eager decode step is bound by kernel launches,
which is not how a served model runs. FP8 scenarios run the subblocks' linear layers as
Transformer Engine modules under its FP8 autocast (the scenario's `fp8_recipe`). Energy:
after timing, each job runs back to back for about `energy_window_s` between two reads of
NVML's energy counter (`nvml.py`); the difference per run is its energy in joules.
"""

from __future__ import annotations

import contextlib
import logging
import math
import platform
import statistics
import time
from typing import Any, Callable, Hashable, Mapping

import torch

from ..arch import ModelConfig
from .costs import Cost
from .memory import (
    kv_cache_bytes, non_block_params, non_block_weight_bytes, subblock_params, subblock_weight_bytes,
)
from .jobs import Job, MeasureError, Runtime, last_level_cache_bytes  # noqa: F401 (re-exported)
from .nvml import NvmlMonitor, NvmlUnavailable
from .scenario import Scenario

log = logging.getLogger(__name__)

PHASES = ("prefill", "decode")
# CPU clocks: "wall" is what a user waits; "process" (CPU time of this process) is
# robust to other processes on a shared machine and equals wall time with one thread
# and no contention. Use "process" only with threads=1.
CPU_CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
NON_BLOCK = "<non_block>"


# ---------------------------------------------------------------------- timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_flusher(device: str | torch.device) -> Callable[[], None]:
    """A function that evicts the caches by writing twice the last-level cache.

    In a whole model a subblock's weights were evicted by the layers before it; timed
    alone and repeated, a small subblock would run from cache and look too fast.
    """
    device = torch.device(device)
    buf = torch.empty(2 * last_level_cache_bytes(device) // 4, dtype=torch.float32, device=device)

    def flush():
        buf.fill_(1.0)

    return flush


@torch.inference_mode()
def time_job(
    job: Job,
    device: str | torch.device = "cpu",
    warmup: int = 2,
    repeats: int = 5,
    *,
    flush: Callable[[], None] | None = None,
    clock: str = "wall",
) -> list[float]:
    """Seconds of each of `repeats` timed runs of `job`, after `warmup` untimed ones.

    `flush` runs before each timed run, outside the timed region; `clock` picks the
    CPU clock (`CPU_CLOCKS`); CUDA is timed with events.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
    if clock not in CPU_CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CPU_CLOCKS)}, got {clock!r}")
    now = CPU_CLOCKS[clock]
    device = torch.device(device)
    for _ in range(warmup):
        job.run(job.setup())
    _sync(device)
    samples: list[float] = []
    for _ in range(repeats):
        state = job.setup()
        if flush is not None:
            flush()
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            job.run(state)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = now()
            job.run(state)
            samples.append(now() - t0)
        del state
    return samples


def median_time(job: Job, device: str | torch.device = "cpu", warmup: int = 2, repeats: int = 5, **kw) -> float:
    return statistics.median(time_job(job, device, warmup, repeats, **kw))


@torch.inference_mode()
def time_interleaved(
    jobs: Mapping[Hashable, Job],
    device: str | torch.device = "cpu",
    *,
    warmup: int = 1,
    rounds: int = 5,
    min_sample_s: float = 0.02,
    max_inner: int = 20,
    flush: Callable[[], None] | None = None,
    clock: str = "wall",
) -> dict[Hashable, float]:
    """Median seconds per job (per unit of the job), timing all jobs round-robin.

    Each round times every job once, so a burst of background load hits all jobs
    alike instead of one job's every repeat. A round's sample of a short job is the
    mean of enough runs to last `min_sample_s` (at most `max_inner`); the result is
    the median over `rounds`. `flush` runs before each timed run, outside the timing.
    """
    if warmup < 0 or rounds < 1:
        raise ValueError(f"need warmup >= 0 and rounds >= 1, got {warmup} and {rounds}")
    device = torch.device(device)
    inner = {}
    for key, job in jobs.items():
        for _ in range(warmup):
            job.run(job.setup())
        t = time_job(job, device, 0, 1, flush=flush, clock=clock)[0]
        inner[key] = max(1, min(max_inner, math.ceil(min_sample_s / max(t, 1e-9))))
    samples: dict[Hashable, list[float]] = {k: [] for k in jobs}
    for _ in range(rounds):
        for key, job in jobs.items():
            run_s = statistics.fmean(time_job(job, device, 0, inner[key], flush=flush, clock=clock))
            samples[key].append(run_s / job.units)
    return {k: statistics.median(v) for k, v in samples.items()}


@torch.inference_mode()
def job_energy_j(job: Job, device: str | torch.device, read_mj: Callable[[], int | None], run_s: float,
                 window_s: float = 0.3, max_runs: int = 100_000) -> float | None:
    """Joules per unit of `job`: the energy counter (`read_mj`, millijoules) across back-to-back runs
    lasting about `window_s` (`run_s`: seconds of one run, from the timing). None without a counter."""
    if not job.light_setup:
        return None
    device = torch.device(device)
    runs = max(1, min(max_runs, math.ceil(window_s / max(run_s, 1e-9))))
    states = job.setup()
    job.run(states)
    _sync(device)
    start = read_mj()
    for _ in range(runs):  # no sync between runs: the GPU stays busy, as in a served model
        job.run(job.setup())
    _sync(device)
    end = read_mj()
    if start is None or end is None:
        return None
    return (end - start) / 1e3 / runs / job.units


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Run with `n` intra-op threads (None: leave torch's setting), restoring it after."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------- device checks and telemetry

def check_local_device(scenario: Scenario) -> torch.device:
    """The torch device a measured scenario runs on, or a MeasureError saying why not."""
    if not scenario.is_local:
        raise MeasureError(
            f"scenario {scenario.name!r} targets the GPU profile {scenario.device!r}, which is not this machine; "
            f"use --source analytic for it, or set the scenario's device to 'cpu' or 'cuda' to measure here"
        )
    fp8 = "fp8" in (scenario.weight_dtype, scenario.kv_dtype)
    if fp8 and scenario.device == "cpu":
        raise MeasureError(
            f"scenario {scenario.name!r}: FP8 is measured on a GPU with FP8 tensor cores (Hopper, Ada) through "
            f"Transformer Engine, not on a CPU; measure a 16-bit dtype here, or use --source analytic with an "
            f"FP8-capable GPU profile (device: h100-sxm, h200, l40s)"
        )
    if scenario.device == "cuda":
        if not torch.cuda.is_available():
            raise MeasureError(
                "the scenario's device is 'cuda' but torch sees no CUDA device (CPU build or no driver); "
                "measure on 'cpu', or estimate a GPU with --source analytic and a GPU profile (e.g. device: h100-sxm)"
            )
        if fp8:
            check_fp8_here(scenario)
        return torch.device("cuda")
    if scenario.weight_dtype == "float16" and not _cpu_runs(torch.float16):
        raise MeasureError("this CPU build of torch cannot run float16 matmuls; use float32 or bfloat16 on cpu")
    return torch.device("cpu")


def check_fp8_here(scenario: Scenario) -> None:
    """FP8 needs compute capability >= 8.9 and Transformer Engine; a MeasureError says which is missing."""
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise MeasureError(
            f"scenario {scenario.name!r}: {torch.cuda.get_device_name()} (compute capability {major}.{minor}) has "
            f"no FP8 tensor cores; measure bfloat16, or use --source analytic with an FP8-capable GPU profile"
        )
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError as e:
        raise MeasureError(
            f"scenario {scenario.name!r}: FP8 is measured with Transformer Engine, which does not import here "
            f"({e}); use the project's image (Dockerfile) or `pip install transformer-engine[pytorch]`"
        ) from None


def _cpu_runs(dtype: torch.dtype) -> bool:
    try:
        torch.ones(2, 2, dtype=dtype) @ torch.ones(2, 2, dtype=dtype)
        return True
    except RuntimeError:
        return False


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------- the cost model

class MeasuredCostModel:
    """Costs of every variant of a model config, timed on this machine with `runtime`."""

    def __init__(
        self,
        cfg: ModelConfig,
        scenario: Scenario,
        runtime: Runtime | None = None,
        *,
        warmup: int = 2,
        repeats: int = 5,
        threads: int | None = None,
        telemetry: bool = True,
        min_sample_s: float = 0.02,
        flush_cache: bool = True,
        clock: str = "wall",
        cuda_graphs: bool = True,
        energy: bool = True,
        energy_window_s: float = 0.3,
    ):
        self.cfg, self.scenario = cfg, scenario
        self.device = check_local_device(scenario)
        self.warmup, self.repeats, self.threads = warmup, repeats, threads
        self.min_sample_s = min_sample_s
        if clock not in CPU_CLOCKS:
            raise MeasureError(f"clock must be one of {sorted(CPU_CLOCKS)}, got {clock!r}")
        self.clock = clock
        self.flush = cache_flusher(self.device) if flush_cache else None
        self.monitor = None
        if telemetry and self.device.type == "cuda":
            try:
                self.monitor = NvmlMonitor(self.device)  # found by UUID: right under CUDA_VISIBLE_DEVICES
            except NvmlUnavailable as e:
                raise MeasureError(str(e)) from None
        self.energy_window_s = energy_window_s
        self.read_energy = self.monitor.energy_mj if (energy and self.monitor and self.monitor.has_energy) else None
        if runtime is None:
            from .decilm_runtime import DeciLMRuntime

            runtime = DeciLMRuntime(cfg, scenario, self.device, cuda_graphs=cuda_graphs)
        self.runtime = runtime
        self._times: dict[str, tuple[float, float]] = {}
        self._energy: dict[str, tuple[float | None, float | None]] = {}

    def measure(self, variants: list[str]) -> None:
        """Time every not yet timed variant of `variants` and the non-block parts, interleaved."""
        todo = [v for v in dict.fromkeys(variants) if v not in self._times and subblock_params(self.cfg, v) > 0]
        keys = todo + ([NON_BLOCK] if NON_BLOCK not in self._times else [])
        if not keys:
            return
        jobs = {}
        for key in keys:
            for phase in PHASES:
                jobs[key, phase] = (self.runtime.non_block_job(phase) if key == NON_BLOCK
                                    else self.runtime.subblock_job(key, phase))
        with cpu_threads(self.threads if self.device.type == "cpu" else None):
            t = time_interleaved(jobs, self.device, warmup=self.warmup, rounds=self.repeats,
                                 min_sample_s=self.min_sample_s, flush=self.flush, clock=self.clock)
            energy = {}
            if self.read_energy is not None:
                for (key, phase), job in jobs.items():
                    energy[key, phase] = job_energy_j(job, self.device, self.read_energy, t[key, phase] * job.units,
                                                      self.energy_window_s)
        for key in keys:
            self._times[key] = (t[key, "prefill"], t[key, "decode"])
            self._energy[key] = (energy.get((key, "prefill")), energy.get((key, "decode")))
            log.debug("%s: prefill %.3g s, decode step %.3g s, energy %s J", key, *self._times[key], self._energy[key])

    def energy(self, job: Job, run_s: float) -> float | None:
        """Joules per unit of one `job` (None without an NVML energy counter)."""
        if self.read_energy is None:
            return None
        return job_energy_j(job, self.device, self.read_energy, run_s, self.energy_window_s)

    def time(self, job: Job) -> float:
        """Median seconds of one `job` with this model's timing settings."""
        with cpu_threads(self.threads if self.device.type == "cpu" else None):
            return time_interleaved({0: job}, self.device, warmup=self.warmup, rounds=self.repeats,
                                    min_sample_s=self.min_sample_s, flush=self.flush, clock=self.clock)[0]

    def variant_cost(self, variant: str) -> Cost:
        if subblock_params(self.cfg, variant) == 0:  # no-op: nothing runs
            prefill = decode = 0.0
            energy = (0.0, 0.0) if self.read_energy is not None else (None, None)
        else:
            self.measure([variant])
            prefill, decode = self._times[variant]
            energy = self._energy[variant]
        s = self.scenario
        return Cost(subblock_params(self.cfg, variant), subblock_weight_bytes(self.cfg, variant, s),
                    kv_cache_bytes(self.cfg, variant, s), prefill, decode, *_both(energy))

    def non_block_cost(self) -> Cost:
        self.measure([])
        prefill, decode = self._times[NON_BLOCK]
        return Cost(non_block_params(self.cfg), non_block_weight_bytes(self.cfg, self.scenario), 0, prefill, decode,
                    *_both(self._energy[NON_BLOCK]))

    @contextlib.contextmanager
    def session(self):
        """Wrap a whole measurement (NVML sampling runs for its duration)."""
        try:
            with self.monitor if self.monitor else contextlib.nullcontext():
                yield self
        finally:
            if self.monitor:
                self.monitor.close()

    def device_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"type": self.device.type, "torch": torch.__version__,
                                "warmup": self.warmup, "repeats": self.repeats, "min_sample_s": self.min_sample_s,
                                "cache_flush": self.flush is not None, "statistic": "median"}
        if self.device.type == "cpu":
            info.update({"name": _cpu_name(), "clock": self.clock,
                         "threads": self.threads or torch.get_num_threads()})
        else:
            info["name"] = torch.cuda.get_device_name(self.device)
            info["timer"] = "cuda events"
            if self.monitor:
                info["nvml"] = self.monitor.summary()
            info["energy"] = ("nvml total energy counter, back-to-back runs of about "
                              f"{self.energy_window_s} s per job" if self.read_energy else None)
        paths = getattr(self.runtime, "timing_paths", None)
        if paths:  # which code ran each phase (eager, cuda-graphs; fp8 recipe)
            info["timing_paths"] = paths()
        return info


def _both(pair: tuple[float | None, float | None]) -> tuple[float | None, float | None]:
    """Energy of (prefill, decode), or neither: a cost with half its energy would mislead a sum."""
    return pair if None not in pair else (None, None)
