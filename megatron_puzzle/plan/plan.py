"""The memory plan of a run config: each stage's peak bytes per GPU, and whether the run fits.

`plan_config(cfg)` plans in a fresh Python process (a fake process group must not meet a real
one); `plan_in_process(cfg)` is what that process runs. `check_fits(cfg)` is the pipeline's
guard: a config that does not fit its device gets one line naming the stage, the excess and
the settings that lower it, before any work starts.

Layout keys read from the run config: `tensor_parallel`, `pipeline_parallel`, `plan.world_size`
(GPUs the run is launched on; default TP x PP), `plan.micro_batch_size` (GKD's micro-batch).
The device is the scenario's, unless `plan.device_memory` names another (the GPUs that train
may not be the serving target). With pipeline parallelism the first and the last stage are
planned (the first holds the most micro-batches in flight, the last the logits) and the larger
peak is reported.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..arch import ModelConfig
from .stages import STAGES

log = logging.getLogger(__name__)

GB = 1e9

# Published config.json values of parents a run config may name without a local copy.
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, num_layers=32, num_attention_heads=32, num_kv_heads=8,
                         intermediate_size=14336, rope_theta=500000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=131072, tie_word_embeddings=False),
    "llama-3.1-70b": dict(vocab_size=128256, hidden_size=8192, num_layers=80, num_attention_heads=64, num_kv_heads=8,
                          intermediate_size=28672, rope_theta=500000.0, rms_norm_eps=1e-5,
                          max_position_embeddings=131072, tie_word_embeddings=False),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, num_layers=30, num_attention_heads=9, num_kv_heads=3,
                         intermediate_size=1536, rope_theta=100000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=8192, tie_word_embeddings=True),
}


class PlanError(ValueError):
    """A config the plan cannot read, or one that does not fit its device; one line with the fix."""


# --------------------------------------------------------------------------- reading the config

def parse_bytes(value) -> int:
    """80e9, "80GB", "80 GiB" -> bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9.]+)\s*(GB|GiB|MB|MiB|TB|B)?\s*", str(value), re.IGNORECASE)
    if not m:
        raise PlanError(f"plan.device_memory {value!r} is not a size; write it like 80GB or 80GiB")
    unit = (m.group(2) or "B").lower()
    scale = {"b": 1, "mb": 1e6, "mib": 2**20, "gb": 1e9, "gib": 2**30, "tb": 1e12}[unit]
    return int(float(m.group(1)) * scale)


def model_shape(cfg: dict) -> ModelConfig:
    """The parent's shape: `plan.model` (a name in SHAPES or a mapping), else the parent's config.json."""
    given = (cfg.get("plan") or {}).get("model")
    if isinstance(given, dict):
        shape = ModelConfig(**given)
    elif isinstance(given, str):
        if given not in SHAPES:
            raise PlanError(f"plan.model {given!r} is not a known shape ({', '.join(SHAPES)}); give a mapping "
                            "of ModelConfig fields or point parent at a directory with config.json")
        shape = ModelConfig(**SHAPES[given])
    elif cfg.get("parent") == "default":
        shape = ModelConfig(**SHAPES["smollm2-135m"])
    else:
        path = Path(str(cfg.get("parent"))) / "config.json"
        if not path.exists():
            raise PlanError(f"cannot read the parent's shape: {path} does not exist; set plan.model to one of "
                            f"{', '.join(SHAPES)} or to a mapping of ModelConfig fields")
        shape = ModelConfig.from_hf(json.loads(path.read_text()))
    if cfg.get("parent_layers"):
        shape = replace(shape, num_layers=min(shape.num_layers, cfg["parent_layers"]), blocks=[])
    return shape


def device_memory(cfg: dict) -> tuple[int | None, str]:
    """Bytes of one GPU of the run and its name; (None, "cpu") when the run is on this machine's CPU."""
    plan = cfg.get("plan") or {}
    if plan.get("device_memory") is not None:
        return parse_bytes(plan["device_memory"]), "plan.device_memory"
    from ..cost.gpus import get_gpu
    from ..cost.scenario import load_scenario

    scenario = load_scenario(cfg["scenario"])
    if scenario.device == "cpu":
        return None, "cpu"
    if scenario.device in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            return None, "cuda (not visible here)"
        return torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)
    gpu = get_gpu(scenario.device)
    return gpu.memory_bytes, gpu.full_name


def stage_layout(cfg: dict, stage: str) -> tuple[int, int, int, int]:
    """(world, TP, PP, DP) a stage runs at: BLD, scoring, realize and GKD at the run's TP x PP (BLD at
    `bld.tensor_parallel` x `bld.pipeline_parallel`, which the pipeline keeps equal to the run's); import
    at PP 1 (each TP group reads the whole checkpoint's slices)."""
    world, tp, pp, dp = layout(cfg)
    if stage in ("score", "realize", "gkd"):
        return world, tp, pp, dp
    if stage == "bld":
        bld = cfg.get("bld") or {}
        tp = int(bld.get("tensor_parallel") or tp)
        pp = int(bld.get("pipeline_parallel") or pp)
    else:
        pp = 1
    if world % (tp * pp):
        raise PlanError(f"plan.world_size {world} is not a multiple of the {stage} stage's "
                        f"tensor_parallel x pipeline_parallel = {tp * pp}")
    return world, tp, pp, world // (tp * pp)


def layout(cfg: dict) -> tuple[int, int, int, int]:
    """(world, TP, PP, DP) of the run."""
    tp = int(cfg.get("tensor_parallel", 1))
    pp = int(cfg.get("pipeline_parallel", 1) or 1)
    world = int((cfg.get("plan") or {}).get("world_size") or tp * pp)
    if world % (tp * pp):
        raise PlanError(f"plan.world_size {world} is not a multiple of tensor_parallel x pipeline_parallel = {tp * pp}")
    return world, tp, pp, world // (tp * pp)


def stage_settings(cfg: dict, shape: ModelConfig, on_gpu: bool):
    """StageSettings per stage from the run config's sections."""
    from .stages import StageSettings

    dtype = torch.bfloat16 if on_gpu else torch.float32
    plan = cfg.get("plan") or {}
    gkd = cfg.get("gkd") or {}
    bld = cfg.get("bld") or {}
    score = cfg.get("score") or {}
    batch = int(gkd.get("batch_size", 1))
    mbs = min(int(plan.get("micro_batch_size") or batch), batch)
    if batch % mbs:
        raise PlanError(f"gkd.batch_size {batch} is not a multiple of plan.micro_batch_size {mbs}")
    # the frozen parent: bf16 on a GPU when asked, fp32 otherwise (GKDConfig's default)
    teacher = torch.bfloat16 if on_gpu and gkd.get("teacher_dtype") == "bfloat16" else torch.float32
    base = StageSettings(dtype=dtype, teacher_dtype=dtype)
    return {
        "import": base,
        "realize": base,
        "score": replace(base, micro_batch_size=int(score.get("batch_size", 1)),
                         seq_len=int(score.get("seq_len", 128))),
        "bld": replace(base, micro_batch_size=int(bld.get("batch_size", 1)), seq_len=int(bld.get("seq_len", 128)),
                       variants=tuple(bld_entries(cfg, shape)) * bld_layers_per_pass(cfg, shape)),
        "gkd": replace(base, micro_batch_size=mbs, num_microbatches=batch // mbs, seq_len=int(gkd.get("seq_len", 128)),
                       teacher_dtype=teacher, recompute=bool(gkd.get("recompute", False)),
                       distributed_optimizer=bool(gkd.get("shard_optimizer", False))),
    }


def bld_entries(cfg: dict, shape: ModelConfig) -> list:
    """The trained library entries of the layer with the most of them, as BLD lists them (`bld.entries_of_space`)."""
    from ..arch.search_space import configured_search_space
    from ..distill.bld import BLDConfig, entries_of_space, pairs_of_space
    from ..init.variants import InitConfig

    space = configured_search_space(shape, cfg.get("search_space"))
    bld = BLDConfig.from_dict(cfg.get("bld") or {})
    entries = entries_of_space(shape, space, pairs_of_space(space, bld.coupled_pairs),
                           InitConfig.from_dict(cfg.get("init") or {}))
    per_layer: dict[int, list] = {}
    for e in entries:
        if e.trainable:
            per_layer.setdefault(e.layer, []).append((e.block, e.subblocks))
    return max(per_layer.values(), key=len) if per_layer else []


def bld_layers_per_pass(cfg: dict, shape: ModelConfig) -> int:
    """Layers whose entries a BLD rank holds at once (`bld.layers_per_pass`; 0 means every layer of its
    pipeline stage)."""
    from ..distill.bld import BLDConfig

    _, _, pp, _ = stage_layout(cfg, "bld")
    k = BLDConfig.from_dict(cfg.get("bld") or {}).layers_per_pass
    per_stage = max(1, shape.num_layers // pp)
    return min(k, per_stage) if k else per_stage


# --------------------------------------------------------------------------- planning

def _planned_ranks(tp: int, pp: int, dp: int) -> list[int]:
    """Global ranks of the first and last pipeline stage (Megatron's order puts PP outermost)."""
    return [0] if pp == 1 else [0, (pp - 1) * tp * dp]


def plan_in_process(cfg: dict, stages: tuple[str, ...] = STAGES) -> dict[str, Any]:
    """The plan (see `plan_config`), computed in this process; no process group may be running here."""
    from .fake import fake_world
    from .stages import plan_stage

    shape = model_shape(cfg)
    mem, device_name = device_memory(cfg)
    world, _, pp, _ = layout(cfg)
    if shape.num_layers % pp:
        raise PlanError(f"pipeline_parallel {pp} does not divide the parent's {shape.num_layers} layers")
    settings = stage_settings(cfg, shape, on_gpu=mem is not None)
    limit = None if mem is None else int(mem * float((cfg.get("plan") or {}).get("max_fraction", 0.9)))
    out: dict[str, Any] = {"device_memory_bytes": mem, "device": device_name, "limit_bytes": limit,
                           "world_size": world, "stages": {}}
    for stage in stages:
        world, tp, pp, dp = stage_layout(cfg, stage)
        best = None
        for rank in _planned_ranks(tp, pp, dp):
            t0 = time.perf_counter()
            log.info("plan: stage %s, rank %d of %d (TP %d, PP %d, DP %d)", stage, rank, world, tp, pp, dp)
            with fake_world(world_size=world, tensor_parallel=tp, pipeline_parallel=pp, rank=rank,
                            seed=int(cfg.get("seed", 1234))):
                b = plan_stage(stage, shape, settings[stage])
            log.info("plan: stage %s, rank %d: peak %.2f GB (%.1f s)", stage, rank, b.peak_bytes / GB,
                     time.perf_counter() - t0)
            if best is None or b.peak_bytes > best[1].peak_bytes:
                best = (rank, b)
        rank, b = best
        s = settings[stage]
        entry = {**b.to_dict(), "tensor_parallel": tp, "pipeline_parallel": pp, "data_parallel": dp,
                 "fits": None if limit is None else b.peak_bytes <= limit,
                 "pipeline_stage": rank // (tp * dp), "dtype": str(s.dtype).replace("torch.", "")}
        if stage not in ("import", "realize"):  # these hold weights only: no batch
            entry.update(micro_batch_size=s.micro_batch_size, seq_len=s.seq_len)
        if stage == "gkd":
            entry.update(num_microbatches=s.num_microbatches, recompute=s.recompute,
                         distributed_optimizer=s.distributed_optimizer,
                         teacher_dtype=str(s.teacher_dtype).replace("torch.", ""))
        if stage == "bld":
            entry["entries"] = len(s.variants)
            entry["layers_per_pass"] = bld_layers_per_pass(cfg, shape)
        if stage == "gkd":
            entry["optimizer_cpu_offload"] = bool((cfg.get("gkd") or {}).get("optimizer_cpu_offload", False))
        out["stages"][stage] = entry
    return out


def plan_config(cfg: dict, stages: tuple[str, ...] = STAGES) -> dict[str, Any]:
    """Per stage: peak bytes per GPU (weights, gradients, optimizer state, activations) and whether it fits.

    Runs in a fresh Python process, so a fake process group never meets this process's real one.
    """
    for s in stages:
        if s not in STAGES:
            raise PlanError(f"plan knows the stages {', '.join(STAGES)}, not {s!r}")
    request = json.dumps({"config": cfg, "stages": list(stages)})
    proc = subprocess.run([sys.executable, "-m", "megatron_puzzle.plan.worker"], input=request, text=True,
                          stdout=subprocess.PIPE)  # stderr passes through: the worker's progress lines
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"the planning process exited with status {proc.returncode} and no result")
    result = json.loads(lines[-1])
    if "error" in result:
        raise PlanError(result["error"])
    return result


# --------------------------------------------------------------------------- verdicts

def advice(cfg: dict, stage: str, entry: dict, limit: int | None = None) -> str:
    """Settings that lower a stage's peak, the largest part first."""
    tp, pp, dp = entry["tensor_parallel"], entry["pipeline_parallel"], entry["data_parallel"]
    tips = []
    k = entry.get("layers_per_pass", 1)
    if stage == "bld" and k > 1:  # entries' weights, gradients and Adam state grow with the layers per pass
        tips.append(f"bld.layers_per_pass: {max(1, k // 2)}")
    if (stage == "gkd" and not entry.get("optimizer_cpu_offload") and limit is not None
            and entry["peak_bytes"] - entry["optimizer_bytes"] <= limit):
        # Megatron-Core's optimizer CPU offload keeps the fp32 master weights and Adam state in host memory
        tips.append("gkd.optimizer_cpu_offload: true")
    parts = sorted(("weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes"),
                   key=lambda k: -entry[k])
    for part in parts:
        if part == "activations_bytes":
            if stage == "gkd" and not entry.get("recompute"):
                tips.append("gkd.recompute: true")
            if stage == "gkd" and entry.get("micro_batch_size", 1) > 1:
                tips.append(f"plan.micro_batch_size: {max(1, entry['micro_batch_size'] // 2)}")
            if stage in ("bld", "score") and entry.get("micro_batch_size", 1) > 1:
                tips.append(f"{stage}.batch_size: {max(1, entry['micro_batch_size'] // 2)}")
        elif part == "optimizer_bytes" and stage == "gkd":
            if not entry.get("distributed_optimizer") and dp > 1:
                tips.append("gkd.shard_optimizer: true")
            elif entry.get("distributed_optimizer"):
                tips.append(f"plan.world_size: {2 * tp * pp * dp} (Adam state over {2 * dp} data-parallel groups)")
        elif part in ("weights_bytes", "gradients_bytes") and stage == "gkd" and entry.get("teacher_dtype") == "float32":
            tips.append("gkd.teacher_dtype: bfloat16")
    if stage != "import":  # import holds the parent per TP group (no pipeline parallelism)
        tips.append(f"pipeline_parallel: {pp * 2} (plan.world_size: {2 * tp * pp * dp} keeps {dp} data-parallel "
                    f"group{'s' if dp > 1 else ''})")
    if tp < 8:
        tips.append(f"{'bld.' if stage == 'bld' else ''}tensor_parallel: {tp * 2}")
    return ", ".join(dict.fromkeys(tips))


def _size(n: float) -> str:
    return f"{n / GB:.1f} GB" if abs(n) >= 0.05 * GB else f"{n / 1e6:.1f} MB"


def verdict(cfg: dict, result: dict) -> str | None:
    """One line for the first stage over its limit, or None when every stage fits."""
    limit = result.get("limit_bytes")
    if limit is None:
        return None
    for stage, e in result["stages"].items():
        if not e["fits"]:
            return (f"stage {stage} needs {_size(e['peak_bytes'])} per GPU at TP {e['tensor_parallel']} x "
                    f"PP {e['pipeline_parallel']} x DP {e['data_parallel']} (weights {_size(e['weights_bytes'])}, "
                    f"gradients {_size(e['gradients_bytes'])}, optimizer {_size(e['optimizer_bytes'])}, "
                    f"activations {_size(e['activations_bytes'])}), {_size(e['peak_bytes'] - limit)} over "
                    f"{_size(limit)} ({result['device']}); to fit, try {advice(cfg, stage, e, limit)}")
    return None


def check_fits(cfg: dict) -> dict | None:
    """Plan `cfg` when its device memory is known; raise PlanError when a stage does not fit. Returns the plan."""
    mem, _ = device_memory(cfg)
    if mem is None:
        return None
    result = plan_config(cfg)
    line = verdict(cfg, result)
    if line:
        raise PlanError(line)
    return result


# --------------------------------------------------------------------------- tables

def markdown(result: dict) -> str:
    """The plan as a markdown table (docs/scale-out.md's tables come from this)."""
    rows = ["| stage | TP x PP x DP | micro-batch x seq | weights | gradients | optimizer | activations | "
            "peak per GPU | fits |", "|---|---|---|---|---|---|---|---|---|"]
    limit = result.get("limit_bytes")
    for stage, e in result["stages"].items():
        fits = "-" if e["fits"] is None else ("yes" if e["fits"] else "**no**")
        batch = f"{e['micro_batch_size']} x {e['seq_len']}" if "micro_batch_size" in e else "-"
        share = f" ({e['peak_bytes'] / result['device_memory_bytes']:.0%})" if result.get("device_memory_bytes") else ""
        rows.append(f"| {stage} | {e['tensor_parallel']} x {e['pipeline_parallel']} x {e['data_parallel']} | "
                    f"{batch} | {e['weights_bytes'] / GB:.1f} GB | "
                    f"{e['gradients_bytes'] / GB:.1f} GB | {e['optimizer_bytes'] / GB:.1f} GB | "
                    f"{e['activations_bytes'] / GB:.1f} GB | {e['peak_bytes'] / GB:.1f} GB{share} | {fits} |")
    if limit:
        rows.append(f"\nLimit: {limit / GB:.1f} GB per GPU ({result['device']}, "
                    f"{limit / result['device_memory_bytes']:.0%} of {result['device_memory_bytes'] / GB:.0f} GB).")
    return "\n".join(rows)


__all__ = ["PlanError", "SHAPES", "STAGES", "check_fits", "markdown", "plan_config", "plan_in_process", "verdict"]
