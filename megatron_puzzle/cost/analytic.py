"""Roofline costs on a GPU that is not here, from its datasheet figures (`gpus.py`).

Each subblock's prefill (the whole batch x prefill_len tokens in one forward) and
decode step (one token per sequence, KV cache of mean length
prefill_len + decode_len / 2) is reduced to FLOPs and DRAM bytes:

    time = max(gemm_flops / peak(weight dtype) + attn_flops / peak(attention dtype)) / efficiency.compute,
               bytes / bandwidth / efficiency.memory)

- gemm FLOPs: 2 x tokens x (weights of the matmuls); attention FLOPs: QK^T and PV,
  causal in prefill (2 x batch x heads x head_dim x L x (L+1)), 4 x batch x heads x
  head_dim x context per decode step;
- bytes: weights read once, hidden states read and written once (fused kernels keep
  the intermediates on chip), the KV cache written in prefill and read per decode step.
- attention matmuls run in the KV dtype when the GPU has it (FP8 attention on Hopper
  and Ada), else in bf16; activations are 16-bit unless the weights are float32.
- non-block: embedding rows read for every token, final norm, and the LM head for the
  last position of each sequence only (serving engines compute no other logits).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..arch import AttentionVariant, ModelConfig
from .costs import Cost
from .gpus import Efficiency, GPUProfile, get_gpu
from .memory import (
    as_variant, kv_cache_bytes, non_block_params, non_block_weight_bytes, non_block_weight_dtype,
    subblock_params, subblock_weight_bytes,
)
from .scenario import Scenario, dtype_bytes


@dataclass(frozen=True)
class Work:
    """What one forward costs the hardware: matmul FLOPs, attention FLOPs, DRAM bytes."""

    gemm_flops: float = 0.0
    attn_flops: float = 0.0
    bytes: float = 0.0


def _act_bytes(s: Scenario) -> int:
    return dtype_bytes(non_block_weight_dtype(s))


def _attn_dtype(s: Scenario, gpu: GPUProfile) -> str:
    if s.kv_dtype in gpu.flops:
        return s.kv_dtype
    return "float32" if s.weight_dtype == "float32" else "bfloat16"


def subblock_work(cfg: ModelConfig, variant, s: Scenario, phase: str) -> Work:
    """FLOPs and bytes of one variant in `phase` ("prefill" or "decode")."""
    v = as_variant(variant)
    if v.kind == "no_op":
        return Work()
    h = cfg.hidden_size
    tokens = s.batch_size * (s.prefill_len if phase == "prefill" else 1)
    matmul_params = subblock_params(cfg, v) - h  # the norm's weight is not a matmul
    gemm = 2.0 * tokens * matmul_params
    bytes_ = subblock_weight_bytes(cfg, v, s) + 2.0 * tokens * h * _act_bytes(s)
    attn = 0.0
    if isinstance(v, AttentionVariant) and v.kind == "full":
        qd = cfg.num_attention_heads * cfg.head_dim
        kv_per_token = kv_cache_bytes(cfg, v, s, tokens=1) / s.batch_size
        if phase == "prefill":
            L = s.prefill_len
            attn = 2.0 * s.batch_size * qd * L * (L + 1)
            bytes_ += tokens * kv_per_token  # K and V written
        else:
            c = s.mean_decode_context
            attn = 4.0 * s.batch_size * qd * c
            bytes_ += s.batch_size * c * kv_per_token  # the whole cache read
    return Work(gemm, attn, bytes_)


def non_block_work(cfg: ModelConfig, s: Scenario, phase: str) -> Work:
    h, V = cfg.hidden_size, cfg.vocab_size
    tokens = s.batch_size * (s.prefill_len if phase == "prefill" else 1)
    act = _act_bytes(s)
    head_bytes = V * h * dtype_bytes(non_block_weight_dtype(s))
    gemm = 2.0 * s.batch_size * h * V  # logits of the last position only
    # embedding rows + final norm in/out + LM head weight + logits
    bytes_ = tokens * h * act + 2.0 * s.batch_size * h * act + head_bytes + s.batch_size * V * act
    return Work(gemm, 0.0, bytes_)


def roofline_time(work: Work, s: Scenario, gpu: GPUProfile, eff: Efficiency, gemm_dtype: str) -> float:
    compute = work.gemm_flops / gpu.peak_flops(gemm_dtype) + work.attn_flops / gpu.peak_flops(_attn_dtype(s, gpu))
    memory = work.bytes / gpu.bandwidth
    return max(compute / eff.compute, memory / eff.memory)


class AnalyticCostModel:
    """Costs of every variant of a model config on a named GPU profile."""

    def __init__(self, cfg: ModelConfig, scenario: Scenario, gpu: str | GPUProfile | None = None,
                 efficiency: Efficiency | None = None):
        self.cfg, self.scenario = cfg, scenario
        if gpu is None:
            if scenario.is_local:
                raise ValueError(
                    f"the analytic cost model needs a GPU profile, but scenario {scenario.name!r} has "
                    f"device {scenario.device!r}; set the scenario's device to one of the GPU profiles "
                    f"(e.g. h100-sxm) or measure with --source measured"
                )
            gpu = scenario.device
        self.gpu = gpu if isinstance(gpu, GPUProfile) else get_gpu(gpu)
        self.efficiency = efficiency or Efficiency()
        for f in ("weight_dtype", "kv_dtype"):
            if getattr(scenario, f) == "fp8" and not self.gpu.supports_fp8:
                raise ValueError(f"{self.gpu.full_name} cannot run {f}=fp8 (no FP8 tensor cores); use bfloat16")

    def _time(self, work: Work, gemm_dtype: str) -> float:
        return roofline_time(work, self.scenario, self.gpu, self.efficiency, gemm_dtype)

    def variant_cost(self, variant) -> Cost:
        s, cfg = self.scenario, self.cfg
        return Cost(
            params=subblock_params(cfg, variant),
            weight_bytes=subblock_weight_bytes(cfg, variant, s),
            kv_cache_bytes=kv_cache_bytes(cfg, variant, s),
            prefill_time_s=self._time(subblock_work(cfg, variant, s, "prefill"), s.weight_dtype),
            decode_time_s=self._time(subblock_work(cfg, variant, s, "decode"), s.weight_dtype),
        )

    def non_block_cost(self) -> Cost:
        s, cfg = self.scenario, self.cfg
        dt = non_block_weight_dtype(s)
        return Cost(
            params=non_block_params(cfg),
            weight_bytes=non_block_weight_bytes(cfg, s),
            kv_cache_bytes=0,
            prefill_time_s=self._time(non_block_work(cfg, s, "prefill"), dt),
            decode_time_s=self._time(non_block_work(cfg, s, "decode"), dt),
        )

    def device_info(self) -> dict:
        return {**self.gpu.to_dict(), "efficiency": {"compute": self.efficiency.compute,
                                                     "memory": self.efficiency.memory}}
