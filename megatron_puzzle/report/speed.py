"""One speed for the whole run: decode tokens/s of the real greedy loop, timed against the parent.

The realize stage checks the child with it, the report prints it for every model, and
the realize stage's aim loop (pipeline/aim.py) re-solves the search with it; so the
three are the same quantity, measured the same way:

- every round runs each model's whole greedy generation at the scenario's shapes: the
  prefill of `batch x prefill_len` prompt tokens (timed apart), then `decode_len` greedy
  steps with the KV cache (decode tokens/s = batch x decode_len / their time);
- the models are interleaved step by step: every model's prefill, then decode step 1 of
  every model, step 2 of every model, ... (the order reversed every other step and every
  other round, the reference first). A CPU's speed moves between levels 10-20% apart from
  one minute to the next; a round of whole generations one after the other (the parent's
  takes ~14 s at cpu-b8) put the models of a round at different levels and left the
  interval +-4-10% wide after 8-12 rounds, while steps of ~0.1 s interleaved see the same;
- torch's intra-op threads are pinned for the whole measurement;
- a model's speed relative to another is the geometric mean of their per-round ratios,
  with a Student-t confidence interval on the log ratios; rounds are added (up to
  `max_rounds`) until every interval is narrow enough, or, given a `target` speedup
  (realize's check), until every interval lies wholly above or below it: a child whose
  estimate straddles the target gets more rounds, which cost far less than re-solving.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

import torch

from ..arch import ModelConfig
from ..cost.scenario import Scenario

log = logging.getLogger(__name__)


@dataclass
class SpeedConfig:
    warmup: int = 1  # untimed generations per model before the rounds
    min_rounds: int = 4
    max_rounds: int = 10
    halfwidth: float = 0.03  # stop once every ratio's interval is within +-3% (relative)
    level: float = 0.95  # confidence level of the intervals
    threads: int | None = None  # torch intra-op threads while timing (None: torch's current setting)

    def __post_init__(self):
        if self.warmup < 0 or self.min_rounds < 2 or self.max_rounds < self.min_rounds:
            raise ValueError(f"speed: need warmup >= 0 and 2 <= min_rounds <= max_rounds, got warmup={self.warmup}, "
                             f"min_rounds={self.min_rounds}, max_rounds={self.max_rounds}")
        if not 0 < self.halfwidth < 1 or not 0 < self.level < 1:
            raise ValueError(f"speed: halfwidth and level must be in (0, 1), got {self.halfwidth} and {self.level}")

    @classmethod
    def from_dict(cls, d: Mapping | None) -> "SpeedConfig":
        from ..utils.config import from_section

        return from_section(cls, dict(d or {}), "speed")


def ratio_interval(ref_s: list[float], model_s: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(ratio, low, high): how many times faster the model runs than the reference.

    Per round the ratio is ref time / model time; the estimate is their geometric mean and
    the interval a Student-t interval on the log ratios (rounds are paired, so load that
    hits both in one round cancels). Needs two rounds or more.
    """
    if len(ref_s) != len(model_s) or len(ref_s) < 2:
        raise ValueError(f"need >= 2 paired rounds, got {len(ref_s)} and {len(model_s)}")
    from scipy.stats import t as student_t

    logs = [math.log(r / m) for r, m in zip(ref_s, model_s)]
    n = len(logs)
    mean = sum(logs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


@dataclass
class Speed:
    """Per-round seconds of every model's prefill and decode loop, and what follows from them."""

    scenario: dict
    reference: str
    level: float
    threads: int
    prefill_s: dict[str, list[float]] = field(default_factory=dict)
    decode_s: dict[str, list[float]] = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        return len(self.decode_s[self.reference])

    def ratio(self, model: str, reference: str | None = None) -> tuple[float, float, float]:
        """Decode tokens/s of `model` over `reference`'s (default: the run's reference), with its interval."""
        ref = reference or self.reference
        return ratio_interval(self.decode_s[ref], self.decode_s[model], self.level)

    def summary(self, name: str) -> dict:
        """Median tokens/s of one model (the report's figures) and its ratio to the reference."""
        s = self.scenario
        pre, dec = _median(self.prefill_s[name]), _median(self.decode_s[name])
        work = s["batch_size"] * s["decode_len"]
        out = {"prefill_s": pre, "decode_s": dec, "prefill_tokens_per_s": s["batch_size"] * s["prefill_len"] / pre,
               "decode_tokens_per_s": work / dec, "throughput_tokens_per_s": work / (pre + dec)}
        if name != self.reference:
            r, lo, hi = self.ratio(name)
            out.update(decode_speedup=r, decode_speedup_low=lo, decode_speedup_high=hi)
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def _median(xs: list[float]) -> float:
    ys = sorted(xs)
    n = len(ys)
    return ys[n // 2] if n % 2 else 0.5 * (ys[n // 2 - 1] + ys[n // 2])


def _runtime(spec, scenario: Scenario, device):
    from ..cost.decilm_runtime import TORCH_DTYPES, runtime_model

    if isinstance(spec, torch.nn.Module):
        return spec, spec.puzzle_config
    cfg, tensors = spec if isinstance(spec, tuple) else (spec, None)
    return runtime_model(cfg, tensors, TORCH_DTYPES[scenario.weight_dtype], device), cfg


@torch.inference_mode()
def measure_speed(models: Mapping[str, ModelConfig | tuple | torch.nn.Module], scenario: Scenario,
                  config: SpeedConfig | None = None, *, reference: str = "parent",
                  clock: Callable[[], float] = time.perf_counter, progress: bool = False,
                  target: float | None = None) -> Speed:
    """Time every model's greedy generation at `scenario`, decode steps interleaved; see the module doc.

    Without `target`, rounds stop once every interval is within `halfwidth`; with it, once every
    interval is wholly at or above `target` or wholly below it (decided either way).

    `models` maps a name to a ModelConfig (random weights: they do not change the time), a
    (config, canonical tensors) pair, or a ready `runtime_model` with `.puzzle_config`.
    """
    from ..cost.measure import _sync, check_local_device, cpu_threads
    from .throughput import generation_steps

    cfg = config or SpeedConfig()
    if reference not in models:
        raise ValueError(f"the reference model {reference!r} is not among {list(models)}")
    device = check_local_device(scenario)
    names = [reference] + [n for n in models if n != reference]
    jobs = {}
    for n in names:
        model, mcfg = _runtime(models[n], scenario, device)
        jobs[n] = generation_steps(model, mcfg, scenario, device)
    threads = (cfg.threads or torch.get_num_threads()) if device.type == "cpu" else 0
    speed = Speed(scenario.to_dict(), reference, cfg.level, threads,
                  {n: [] for n in names}, {n: [] for n in names})
    with cpu_threads(threads or None):
        for n in names:
            for _ in range(cfg.warmup):
                prefill, step = jobs[n]
                state = prefill()
                for _ in range(scenario.decode_len):
                    state = step(state)
        for r in range(cfg.max_rounds):
            order = names if r % 2 == 0 else names[::-1]
            states, decode_s = {}, dict.fromkeys(names, 0.0)
            for n in order:
                _sync(device)
                t0 = clock()
                states[n] = jobs[n][0]()
                _sync(device)
                speed.prefill_s[n].append(clock() - t0)
            for i in range(scenario.decode_len):
                for n in (order if i % 2 == 0 else order[::-1]):
                    t0 = clock()
                    states[n] = jobs[n][1](states[n])
                    _sync(device)
                    decode_s[n] += clock() - t0
            for n in names:
                speed.decode_s[n].append(decode_s[n])
            del states
            if r + 1 < cfg.min_rounds:
                continue
            widths = {n: speed.ratio(n) for n in names[1:]}
            if progress:
                log.info("speed round %d: %s", r + 1, ", ".join(f"{n} {m:.3f}x [{lo:.3f}, {hi:.3f}]"
                                                              for n, (m, lo, hi) in widths.items()))
            if target is not None:
                if all(lo >= target or hi < target for _, lo, hi in widths.values()):
                    break
            elif all(math.sqrt(hi / lo) - 1 <= cfg.halfwidth for _, lo, hi in widths.values()):
                break
    return speed


def child_vs_parent(child: ModelConfig, parent: ModelConfig, scenario: Scenario,
                    config: SpeedConfig | None = None, target: float | None = None) -> dict:
    """The realize stage's measurement: `measured` (child), `measured_parent` and `speed` (rounds, interval);
    with `target`, rounds run until the child's interval is decided against it."""
    speed = measure_speed({"parent": parent, "child": child}, scenario, config, progress=True, target=target)
    out = {}
    for name in ("child", "parent"):
        s = speed.summary(name)
        out[name] = {"prefill_time_s": s["prefill_s"], "decode_time_s": s["decode_s"] / scenario.decode_len,
                     "throughput": s["throughput_tokens_per_s"], "decode_throughput": s["decode_tokens_per_s"]}
    m, p = out["child"], out["parent"]
    m["speedup"] = m["throughput"] / p["throughput"]
    r, lo, hi = speed.ratio("child")
    m.update(decode_speedup=r, decode_speedup_low=lo, decode_speedup_high=hi)
    return {"measured": m, "measured_parent": p,
            "speed": {"rounds": speed.rounds, "level": speed.level, "threads": speed.threads,
                      "decode_s": speed.decode_s, "prefill_s": speed.prefill_s}}
