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
"""

from __future__ import annotations

import contextlib
import glob
import logging
import math
import platform
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping, Protocol

import torch

from ..arch import ModelConfig
from .costs import Cost
from .memory import (
    kv_cache_bytes, non_block_params, non_block_weight_bytes, subblock_params, subblock_weight_bytes,
)
from .scenario import Scenario

log = logging.getLogger(__name__)

PHASES = ("prefill", "decode")
# CPU clocks: "wall" is what a user waits; "process" (CPU time of this process) is
# robust to other processes on a shared machine and equals wall time with one thread
# and no contention. Use "process" only with threads=1.
CPU_CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
NON_BLOCK = "<non_block>"


class MeasureError(RuntimeError):
    """Measuring is impossible here (no CUDA, no NVML, unsupported dtype); the message suggests the fix."""


@dataclass
class Job:
    """One thing to time: `run(setup())`; `setup` is not timed. `units`: how many
    subblocks one run executes (a stack of copies); times are reported per unit."""

    run: Callable[[Any], Any]
    setup: Callable[[], Any] = lambda: None
    units: int = 1


class Runtime(Protocol):
    """Builds timing jobs for subblock variants and the non-block parts of a model config."""

    def subblock_job(self, variant: str, phase: str) -> Job: ...

    def non_block_job(self, phase: str) -> Job: ...


# ---------------------------------------------------------------------- timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    if "fp8" in (scenario.weight_dtype, scenario.kv_dtype):
        raise MeasureError(
            f"scenario {scenario.name!r}: the torch runtime has no FP8 matmuls or FP8 KV cache to time; "
            f"use --source analytic with an FP8-capable GPU profile (h100-sxm, h200, l40s) or a 16-bit dtype"
        )
    if scenario.device == "cuda":
        if not torch.cuda.is_available():
            raise MeasureError(
                "the scenario's device is 'cuda' but torch sees no CUDA device (CPU build or no driver); "
                "measure on 'cpu', or estimate a GPU with --source analytic and a GPU profile (e.g. device: h100-sxm)"
            )
        return torch.device("cuda")
    if scenario.weight_dtype == "float16" and not _cpu_runs(torch.float16):
        raise MeasureError("this CPU build of torch cannot run float16 matmuls; use float32 or bfloat16 on cpu")
    return torch.device("cpu")


def _cpu_runs(dtype: torch.dtype) -> bool:
    try:
        torch.ones(2, 2, dtype=dtype) @ torch.ones(2, 2, dtype=dtype)
        return True
    except RuntimeError:
        return False


class NvmlMonitor:
    """Samples SM clock, power and memory of one GPU in a background thread (nvidia-ml-py)."""

    def __init__(self, index: int = 0, interval_s: float = 0.05):
        try:
            import pynvml
        except ImportError:
            raise MeasureError(
                "NVML telemetry needs nvidia-ml-py (`pip install nvidia-ml-py`); install it, "
                "measure with telemetry off (--no-telemetry), or use --source analytic with a GPU profile"
            ) from None
        try:
            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(self.handle)
        except pynvml.NVMLError as e:
            raise MeasureError(
                f"NVML is not usable here ({e}); check the NVIDIA driver, measure with --no-telemetry, "
                f"or use --source analytic with a GPU profile"
            ) from None
        self.nvml, self.interval_s = pynvml, interval_s
        self.name = name.decode() if isinstance(name, bytes) else name
        self.memory_total = pynvml.nvmlDeviceGetMemoryInfo(self.handle).total
        self.samples: list[tuple[float, float, int]] = []  # (sm clock MHz, power W, memory used bytes)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self):
        n = self.nvml
        while not self._stop.is_set():
            try:
                clock = n.nvmlDeviceGetClockInfo(self.handle, n.NVML_CLOCK_SM)
                power = n.nvmlDeviceGetPowerUsage(self.handle) / 1e3
                used = n.nvmlDeviceGetMemoryInfo(self.handle).used
                self.samples.append((clock, power, used))
            except n.NVMLError:  # one failed read must not stop the measurement
                pass
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()
        with contextlib.suppress(self.nvml.NVMLError):
            self.nvml.nvmlShutdown()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "memory_total_bytes": self.memory_total, "samples": len(self.samples)}
        if self.samples:
            clocks, powers, used = zip(*self.samples)
            out.update({
                "sm_clock_mhz_median": statistics.median(clocks), "sm_clock_mhz_min": min(clocks),
                "power_w_mean": statistics.fmean(powers), "power_w_max": max(powers),
                "memory_used_bytes_max": max(used),
            })
        return out


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
    ):
        self.cfg, self.scenario = cfg, scenario
        self.device = check_local_device(scenario)
        self.warmup, self.repeats, self.threads = warmup, repeats, threads
        self.min_sample_s = min_sample_s
        if clock not in CPU_CLOCKS:
            raise MeasureError(f"clock must be one of {sorted(CPU_CLOCKS)}, got {clock!r}")
        self.clock = clock
        self.flush = cache_flusher(self.device) if flush_cache else None
        self.monitor = NvmlMonitor(self.device.index or 0) if (telemetry and self.device.type == "cuda") else None
        if runtime is None:
            from .decilm_runtime import DeciLMRuntime

            runtime = DeciLMRuntime(cfg, scenario, self.device)
        self.runtime = runtime
        self._times: dict[str, tuple[float, float]] = {}

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
        for key in keys:
            self._times[key] = (t[key, "prefill"], t[key, "decode"])
            log.debug("%s: prefill %.3g s, decode step %.3g s", key, *self._times[key])

    def time(self, job: Job) -> float:
        """Median seconds of one `job` with this model's timing settings."""
        with cpu_threads(self.threads if self.device.type == "cpu" else None):
            return time_interleaved({0: job}, self.device, warmup=self.warmup, rounds=self.repeats,
                                    min_sample_s=self.min_sample_s, flush=self.flush, clock=self.clock)[0]

    def variant_cost(self, variant: str) -> Cost:
        if subblock_params(self.cfg, variant) == 0:  # no-op: nothing runs
            prefill = decode = 0.0
        else:
            self.measure([variant])
            prefill, decode = self._times[variant]
        s = self.scenario
        return Cost(subblock_params(self.cfg, variant), subblock_weight_bytes(self.cfg, variant, s),
                    kv_cache_bytes(self.cfg, variant, s), prefill, decode)

    def non_block_cost(self) -> Cost:
        self.measure([])
        prefill, decode = self._times[NON_BLOCK]
        return Cost(non_block_params(self.cfg), non_block_weight_bytes(self.cfg, self.scenario), 0, prefill, decode)

    @contextlib.contextmanager
    def session(self):
        """Wrap a whole measurement (NVML sampling runs for its duration)."""
        with self.monitor if self.monitor else contextlib.nullcontext():
            yield self

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
        return info
