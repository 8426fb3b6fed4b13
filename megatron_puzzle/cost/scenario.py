"""The deployment scenario a cost is measured for: batch, prompt and generation lengths, dtypes, device.

A scenario comes from a YAML/JSON file or a named preset (`PRESETS`). `device` is
"cpu" or "cuda" (time on this machine) or a GPU profile name from
`megatron_puzzle.cost.gpus` (e.g. "h100-sxm": estimate with the analytic roofline).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


class ScenarioError(ValueError):
    """A scenario that cannot be costed; the message names the field and the fix."""


# Canonical dtype names and their storage size in bytes. FP8 means E4M3 (what
# Hopper/Ada inference engines store weights and KV caches in).
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}
_DTYPE_ALIASES = {
    "fp32": "float32", "float": "float32", "f32": "float32",
    "bf16": "bfloat16", "fp16": "float16", "half": "float16", "f16": "float16",
    "float8": "fp8", "fp8_e4m3": "fp8", "float8_e4m3fn": "fp8", "e4m3": "fp8",
}
LOCAL_DEVICES = ("cpu", "cuda")
# Transformer Engine's FP8 scaling recipes a measured FP8 scenario can use: "delayed" (DelayedScaling:
# scales from an amax history) or "current" (Float8CurrentScaling: scales from each tensor as it is cast).
FP8_RECIPES = ("delayed", "current")


def canonical_dtype(name: str, field: str = "dtype") -> str:
    key = str(name).strip().lower()
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_BYTES:
        raise ScenarioError(f"scenario.{field}: unknown dtype {name!r}; use one of {sorted(DTYPE_BYTES)}")
    return key


def dtype_bytes(name: str) -> int:
    return DTYPE_BYTES[canonical_dtype(name)]


@dataclass(frozen=True)
class Scenario:
    name: str
    batch_size: int
    prefill_len: int
    decode_len: int
    weight_dtype: str = "float32"
    kv_dtype: str = "float32"
    device: str = "cpu"
    fp8_recipe: str = "delayed"

    def __post_init__(self):
        for f in ("batch_size", "prefill_len", "decode_len"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ScenarioError(f"scenario {self.name!r}: {f} must be a positive integer, got {v!r}")
        object.__setattr__(self, "weight_dtype", canonical_dtype(self.weight_dtype, "weight_dtype"))
        object.__setattr__(self, "kv_dtype", canonical_dtype(self.kv_dtype, "kv_dtype"))
        device = str(self.device).strip().lower()
        object.__setattr__(self, "device", device)
        recipe = str(self.fp8_recipe).strip().lower()
        if recipe not in FP8_RECIPES:
            raise ScenarioError(f"scenario {self.name!r}: fp8_recipe must be one of {FP8_RECIPES}, got {self.fp8_recipe!r}")
        object.__setattr__(self, "fp8_recipe", recipe)
        if device not in LOCAL_DEVICES:
            from .gpus import get_gpu  # raises, listing the known profiles

            gpu = get_gpu(device)
            for f in ("weight_dtype", "kv_dtype"):
                if getattr(self, f) == "fp8" and not gpu.supports_fp8:
                    raise ScenarioError(
                        f"scenario {self.name!r}: {gpu.name} has no FP8 tensor cores ({f}=fp8); "
                        f"use bfloat16 or an FP8-capable GPU (Hopper or Ada: h100-sxm, h200, l40s, ...)"
                    )

    # ------------------------------------------------------------------ derived
    @property
    def is_local(self) -> bool:
        """True when the device is this machine's CPU or GPU (timed), False for a GPU profile (analytic)."""
        return self.device in LOCAL_DEVICES

    @property
    def cache_len(self) -> int:
        """Tokens per sequence the KV cache must hold: prompt + generated."""
        return self.prefill_len + self.decode_len

    @property
    def mean_decode_context(self) -> int:
        """Average KV length seen by a decode step (formats.md: prefill_len + decode_len / 2)."""
        return self.prefill_len + self.decode_len // 2

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if "fp8" not in (self.weight_dtype, self.kv_dtype):
            del d["fp8_recipe"]  # meaningless without FP8; older files do not have it
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], default_name: str = "custom") -> "Scenario":
        if not isinstance(d, dict):
            raise ScenarioError(f"a scenario must be a mapping of fields, got {type(d).__name__}")
        d = dict(d.get("scenario", d))  # a costs.json (or any file holding one) works too
        known = {"name", "batch_size", "prefill_len", "decode_len", "weight_dtype", "kv_dtype", "device", "fp8_recipe"}
        unknown = set(d) - known
        if unknown:
            raise ScenarioError(f"scenario has unknown fields {sorted(unknown)}; allowed: {sorted(known)}")
        missing = {"batch_size", "prefill_len", "decode_len"} - set(d)
        if missing:
            raise ScenarioError(f"scenario is missing {sorted(missing)}")
        d.setdefault("name", default_name)
        return cls(**d)


# Named presets. The GPU ones follow the Puzzle paper's way of reporting throughput
# (one H100, a short prompt with a long generation, and a long prompt with a long
# generation, FP8 for the deployed model); batch sizes are ours.
PRESETS: dict[str, Scenario] = {
    s.name: s
    for s in (
        # The CPU check used by tests and benchmarks: small enough for a laptop.
        Scenario("cpu-b8", 8, 128, 128, "float32", "float32", "cpu"),
        Scenario("cpu-b1", 1, 128, 128, "float32", "float32", "cpu"),
        # This machine's GPU, bf16.
        Scenario("cuda-b64", 64, 1024, 1024, "bfloat16", "bfloat16", "cuda"),
        # Analytic H100 SXM: short prompt / long answer, bf16 and FP8.
        Scenario("h100-bf16-128-1024", 256, 128, 1024, "bfloat16", "bfloat16", "h100-sxm"),
        Scenario("h100-fp8-128-1024", 256, 128, 1024, "fp8", "fp8", "h100-sxm"),
        # Analytic H100 SXM: long prompt / long answer.
        Scenario("h100-fp8-1024-1024", 64, 1024, 1024, "fp8", "fp8", "h100-sxm"),
        Scenario("h200-fp8-128-1024", 256, 128, 1024, "fp8", "fp8", "h200"),
        Scenario("a100-bf16-128-1024", 128, 128, 1024, "bfloat16", "bfloat16", "a100-sxm"),
    )
}


def load_scenario(spec: str | Path | dict | Scenario) -> Scenario:
    """A Scenario from a preset name, a YAML/JSON file path, or a dict."""
    if isinstance(spec, Scenario):
        return spec
    if isinstance(spec, dict):
        return Scenario.from_dict(spec)
    text = str(spec)
    if text in PRESETS:
        return PRESETS[text]
    path = Path(text)
    if not path.exists():
        raise ScenarioError(
            f"scenario {text!r} is neither a preset nor an existing file; presets: {', '.join(PRESETS)}"
        )
    import yaml

    raw = path.read_text()
    try:
        data = json.loads(raw) if path.suffix == ".json" else yaml.safe_load(raw)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ScenarioError(f"scenario file {path} could not be parsed: {e}") from None
    return Scenario.from_dict(data, default_name=path.stem)
