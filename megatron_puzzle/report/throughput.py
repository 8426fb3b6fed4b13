"""Whole-model prefill and decode throughput of several architectures, timed together.

Every model runs in this process through the same runtime: the project's HF DeciLM
modeling code (the code an exported child is served with). Timing uses the cost
stage's round-robin timer (`cost.measure.time_interleaved`): each round times every
model once, so a burst of background load hits all of them alike; the median over
rounds is reported.

- prefill tokens/s = batch x prefill_len / time of one forward over the prompts
  (logits of the last position only, as generation does);
- decode tokens/s = batch x decode_len / time of decode_len steps. Mode "loop" runs
  a real greedy generation loop with a KV cache after an (untimed) prefill; mode
  "step" times one decode step with a cache of the mean context length
  (prefill_len + decode_len / 2, as costs.json defines) and multiplies by decode_len.

Weights do not change the time; models are built with random weights unless real
canonical tensors are given (then the same module serves generations too).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import torch

from ..arch import ModelConfig
from ..cost.measure import Job, cpu_threads, time_interleaved
from ..cost.memory import kv_cache_bytes, non_block_params, non_block_weight_bytes, subblock_params, subblock_weight_bytes
from ..cost.scenario import Scenario

DECODE_MODES = ("loop", "step")


@dataclass
class ModelSize:
    params: int
    weight_bytes: int
    kv_cache_bytes: int

    @property
    def memory_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes


def model_size(cfg: ModelConfig, scenario: Scenario) -> ModelSize:
    """Parameters, weight bytes and the scenario's KV cache (prompt + generation), from cost/memory.py."""
    params = non_block_params(cfg)
    weights = non_block_weight_bytes(cfg, scenario)
    kv = 0
    for b in cfg.blocks:
        for v in (b.attention, b.ffn):
            params += subblock_params(cfg, v)
            weights += subblock_weight_bytes(cfg, v, scenario)
        kv += kv_cache_bytes(cfg, b.attention, scenario)
    return ModelSize(params, weights, kv)


def _cache():
    from transformers.cache_utils import DynamicCache

    return DynamicCache()


def prefill_job(model, cfg: ModelConfig, s: Scenario, device) -> Job:
    def setup():
        return torch.randint(0, cfg.vocab_size, (s.batch_size, s.prefill_len), device=device)

    return Job(run=lambda ids: model(input_ids=ids, cache=_cache(), use_cache=True, logits_to_keep=1), setup=setup)


def generation_steps(model, cfg: ModelConfig, s: Scenario, device) -> tuple[Callable, Callable]:
    """(prefill, step): the scenario's prompt through the model (-> state: its cache and next tokens), and
    one greedy decode step on that state (-> the next state); a generation is a prefill and decode_len steps."""

    def prefill():
        ids = torch.randint(0, cfg.vocab_size, (s.batch_size, s.prefill_len), device=device)
        cache = _cache()
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        return cache, out.logits[:, -1].argmax(-1, keepdim=True)

    def step(state):
        cache, nxt = state
        out = model(input_ids=nxt, cache=cache, use_cache=True)
        return cache, out.logits[:, -1].argmax(-1, keepdim=True)

    return prefill, step


def generation_jobs(model, cfg: ModelConfig, s: Scenario, device) -> tuple[Callable, Callable]:
    """(prefill, decode): the scenario's prompt through the model, then decode_len greedy steps on its cache
    (the baselines' matching times the decode loop alone)."""
    prefill, step = generation_steps(model, cfg, s, device)

    def decode(state):
        for _ in range(s.decode_len):
            state = step(state)
        return state[1]

    return prefill, decode


def decode_loop_job(model, cfg: ModelConfig, s: Scenario, device) -> Job:
    """decode_len greedy steps with the KV cache; the prompt's prefill is the untimed setup."""
    prefill, decode = generation_jobs(model, cfg, s, device)
    return Job(run=decode, setup=prefill)


# Consecutive greedy steps one "step"-mode sample times. A single step is too short to time
# on a busy CPU (its ratio to another model's spread by ~30% over repeated measurements on
# the default run); 16 steps brought that to ~6% at a tenth of a full decode loop's cost.
DECODE_BURST = 16


def decode_step_job(model, cfg: ModelConfig, s: Scenario, device, kv_dtype: torch.dtype,
                    steps: int = DECODE_BURST) -> Job:
    """Time per decode step, from `steps` greedy steps on a cache filled to around the mean
    decode context (from mean - steps/2 on), without the cost of a whole decode loop."""
    from ..cost.decilm_runtime import fill_kv_cache

    layers = [(i, l.self_attn.num_kv_heads) for i, l in enumerate(model.model.layers) if l.uses_cache]
    start = max(1, s.mean_decode_context - steps // 2)

    def setup():
        cache = _cache()
        if layers:
            fill_kv_cache(cache, [i for i, _ in layers], s.batch_size, start, [g for _, g in layers],
                          cfg.head_dim, kv_dtype, torch.device(device))
        return torch.randint(0, cfg.vocab_size, (s.batch_size, 1), device=device), cache

    def run(state):
        nxt, cache = state
        for _ in range(steps):
            out = model(input_ids=nxt, cache=cache, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        return nxt

    return Job(run=run, setup=setup, units=steps)


@dataclass
class Throughput:
    prefill_s: float
    decode_s: float  # all decode_len steps
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    throughput_tokens_per_s: float  # batch x decode_len / (prefill + decode): the search's throughput

    def to_dict(self) -> dict:
        return asdict(self)


def _device(s: Scenario) -> torch.device:
    from ..cost.measure import check_local_device

    return check_local_device(s)


def measure_throughput(models: Mapping[str, ModelConfig | tuple[ModelConfig, Mapping | None] | torch.nn.Module],
                       scenario: Scenario, *, decode_mode: str = "loop", warmup: int = 1, repeats: int = 5,
                       threads: int | None = None, phases=("prefill", "decode")) -> dict[str, Throughput]:
    """Time every model's prefill and decode at `scenario`, interleaved; tokens/s per model.

    `models` maps a name to a ModelConfig (random weights), a (config, canonical tensors) pair,
    or a ready `runtime_model`.
    """
    if decode_mode not in DECODE_MODES:
        raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {decode_mode!r}")
    from ..cost.decilm_runtime import TORCH_DTYPES, runtime_model

    device = _device(scenario)
    dtype, kv_dtype = TORCH_DTYPES[scenario.weight_dtype], TORCH_DTYPES[scenario.kv_dtype]
    s = scenario
    jobs: dict[tuple[str, str], Job] = {}
    for name, spec in models.items():
        if isinstance(spec, torch.nn.Module):
            model, cfg = spec, spec.puzzle_config
        else:
            cfg, tensors = spec if isinstance(spec, tuple) else (spec, None)
            model = runtime_model(cfg, tensors, dtype, device)
            model.puzzle_config = cfg
        if "prefill" in phases:
            jobs[name, "prefill"] = prefill_job(model, cfg, s, device)
        if "decode" in phases:
            jobs[name, "decode"] = (decode_loop_job(model, cfg, s, device) if decode_mode == "loop"
                                    else decode_step_job(model, cfg, s, device, kv_dtype))
    with cpu_threads(threads if device.type == "cpu" else None):
        t = time_interleaved(jobs, device, warmup=warmup, rounds=repeats, min_sample_s=0.0)
    out = {}
    for name in models:
        pre = t.get((name, "prefill"), float("nan"))
        dec = t.get((name, "decode"), float("nan"))
        if decode_mode == "step":
            dec *= s.decode_len
        work = s.batch_size * s.decode_len
        out[name] = Throughput(pre, dec, s.batch_size * s.prefill_len / pre, work / dec, work / (pre + dec))
    return out
