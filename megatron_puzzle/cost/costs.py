"""`measure/costs.json`: per-variant costs of a search space in one scenario (docs/formats.md).

The same layout holds costs from every source ("measured", "analytic", "file"). A
user-given costs file is read with `load_costs(path, space=...)`, which checks that
every variant of the space has a cost and names the missing ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..utils.io import atomic_write_json, read_json
from .scenario import Scenario

SOURCES = ("measured", "analytic", "file")
COST_FIELDS = ("params", "weight_bytes", "kv_cache_bytes", "prefill_time_s", "decode_time_s")
# Measured on a GPU with an NVML energy counter only: joules of one prefill of the scenario's batch and of
# one decode step (the same work as the times), absent (None) where not measured.
ENERGY_FIELDS = ("prefill_energy_j", "decode_energy_j")


class CostsError(ValueError):
    """A costs file or table that does not fit its search space; the message names what is missing."""


@dataclass(frozen=True)
class Cost:
    params: int = 0
    weight_bytes: int = 0
    kv_cache_bytes: int = 0
    prefill_time_s: float = 0.0
    decode_time_s: float = 0.0
    prefill_energy_j: float | None = None
    decode_energy_j: float | None = None

    def __add__(self, other: "Cost") -> "Cost":
        energy = [None if getattr(self, f) is None or getattr(other, f) is None else getattr(self, f) + getattr(other, f)
                  for f in ENERGY_FIELDS]
        return Cost(*(getattr(self, f) + getattr(other, f) for f in COST_FIELDS), *energy)

    @property
    def has_energy(self) -> bool:
        return all(getattr(self, f) is not None for f in ENERGY_FIELDS)

    def energy_per_token(self, scenario: Scenario) -> dict[str, float] | None:
        """Joules per token: prefill (per prompt token), decode (per generated token) and a whole request
        (prompt and every decode step, per generated token); None where energy was not measured."""
        if not self.has_energy:
            return None
        s = scenario
        request = self.prefill_energy_j + s.decode_len * self.decode_energy_j
        return {"prefill_j_per_token": self.prefill_energy_j / (s.batch_size * s.prefill_len),
                "decode_j_per_token": self.decode_energy_j / s.batch_size,
                "request_j_per_token": request / (s.batch_size * s.decode_len)}

    @property
    def memory_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "Cost":
        if not isinstance(d, dict):
            raise CostsError(f"{where} must be an object with {list(COST_FIELDS)}, got {type(d).__name__}")
        missing = [f for f in COST_FIELDS if f not in d]
        if missing:
            raise CostsError(f"{where} is missing {missing}")
        vals = {}
        for f in COST_FIELDS:
            v = d[f]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise CostsError(f"{where}.{f} must be a finite number >= 0, got {v!r}")
            vals[f] = int(v) if f in ("params", "weight_bytes", "kv_cache_bytes") else float(v)
        for f in ENERGY_FIELDS:  # optional
            v = d.get(f)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise CostsError(f"{where}.{f} must be a finite number >= 0 (or absent), got {v!r}")
            vals[f] = float(v)
        return cls(**vals)


def space_layers(space: Any) -> list[list[str]]:
    """Variant names per layer from a search space: a list of lists of names, a dict with
    "layers" (e.g. library/space.json), or an object with a `layers` attribute. A layer may
    also be {"attention": [...], "ffn": [...]}."""
    layers = space
    if isinstance(space, dict):
        if "layers" not in space:
            raise CostsError("a search space object needs a 'layers' list (variant names per layer)")
        layers = space["layers"]
    elif hasattr(space, "layers"):
        layers = space.layers
    if not isinstance(layers, (list, tuple)) or not layers:
        raise CostsError(f"a search space must be a non-empty list of layers, got {type(layers).__name__}")
    out = []
    for i, layer in enumerate(layers):
        if isinstance(layer, dict):
            layer = [n for key in ("attention", "ffn") for n in layer.get(key, [])]
        if isinstance(layer, str) or not all(isinstance(n, str) for n in layer):
            raise CostsError(f"search space layer {i} must be a list of variant names, got {layer!r}")
        out.append(list(dict.fromkeys(layer)))
    return out


@dataclass
class CostTable:
    scenario: Scenario
    source: str
    device: dict[str, Any]
    non_block: Cost
    layers: list[dict[str, Cost]] = field(default_factory=list)
    # The parent's variants per layer, when known: costs.json then gives its whole-model energy per token.
    parent: list[list[str]] | None = None

    def __post_init__(self):
        if self.source not in SOURCES:
            raise CostsError(f"costs source must be one of {SOURCES}, got {self.source!r}")

    # ------------------------------------------------------------------ use
    def total(self, variants: Sequence[Iterable[str]]) -> Cost:
        """Whole-model cost: non_block plus each layer's chosen variants (e.g. [["attn_kv3", "ffn_768"], ...])."""
        if len(variants) != len(self.layers):
            raise CostsError(f"{len(variants)} layers chosen but the costs cover {len(self.layers)}")
        total = self.non_block
        for i, names in enumerate(variants):
            for n in names:
                if n not in self.layers[i]:
                    raise CostsError(f"layer {i}: no cost for variant {n!r}; costed: {sorted(self.layers[i])}")
                total = total + self.layers[i][n]
        return total

    def check_space(self, space: Any) -> None:
        """Raise naming every (layer, variant) of `space` this table has no cost for."""
        layers = space_layers(space)
        if len(layers) != len(self.layers):
            raise CostsError(f"the search space has {len(layers)} layers but the costs cover {len(self.layers)}")
        missing = [f"layer {i}: {n}" for i, names in enumerate(layers) for n in names if n not in self.layers[i]]
        if missing:
            more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
            raise CostsError(f"the costs have no entry for {len(missing)} variants: {'; '.join(missing[:10])}{more}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out = {
            "scenario": self.scenario.to_dict(),
            "source": self.source,
            "device": self.device,
            "non_block": self.non_block.to_dict(),
            "layers": [{n: c.to_dict() for n, c in layer.items()} for layer in self.layers],
        }
        if self.parent is not None:
            out["parent"] = self.parent
        energy = self.energy_per_token()
        if energy:
            out["energy_per_token"] = energy
        return out

    def energy_per_token(self) -> dict[str, Any] | None:
        """Joules per token of every variant and of the non-block parts (`Cost.energy_per_token`), for
        reading; a model's figure is the sum over its variants plus the non-block parts."""
        if not self.non_block.has_energy:
            return None
        variants = {n: c.energy_per_token(self.scenario) for layer in self.layers for n, c in layer.items()
                    if c.has_energy}
        out = {"non_block": self.non_block.energy_per_token(self.scenario), "variants": variants}
        if self.parent is not None:
            try:
                out["parent_model"] = self.model_energy_per_token(self.parent)
            except CostsError:  # the parent's variants are not all in this space
                pass
        return out

    def model_energy_per_token(self, variants: Sequence[Iterable[str]]) -> dict[str, float] | None:
        """Joules per token of a whole model (per-layer variant names, as `total`)."""
        return self.total(variants).energy_per_token(self.scenario)

    @classmethod
    def from_dict(cls, d: Any, *, source: str | None = None) -> "CostTable":
        if not isinstance(d, dict):
            raise CostsError(f"a costs file must hold a JSON object, got {type(d).__name__}")
        missing = [k for k in ("scenario", "non_block", "layers") if k not in d]
        if missing:
            raise CostsError(f"a costs file needs {missing} (layout in docs/formats.md)")
        if not isinstance(d["layers"], list):
            raise CostsError("costs 'layers' must be a list with one object per layer")
        layers = []
        for i, layer in enumerate(d["layers"]):
            if not isinstance(layer, dict):
                raise CostsError(f"costs layers[{i}] must map variant names to costs")
            layers.append({n: Cost.from_dict(c, f"layers[{i}].{n}") for n, c in layer.items()})
        return cls(
            scenario=Scenario.from_dict(d["scenario"]),
            source=source or d.get("source", "file"),
            device=dict(d.get("device") or {}),
            non_block=Cost.from_dict(d["non_block"], "non_block"),
            layers=layers,
            parent=d.get("parent"),
        )

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())


def load_costs(path: str | Path, space: Any = None, *, as_user_file: bool = False) -> CostTable:
    """Read a costs.json; with `space`, check it covers every variant. A user-given file
    (`as_user_file`) is marked source "file" whatever it says."""
    path = Path(path)
    if not path.exists():
        raise CostsError(f"costs file {path} does not exist")
    try:
        data = read_json(path)
    except ValueError as e:
        raise CostsError(f"costs file {path} is not valid JSON: {e}") from None
    try:
        table = CostTable.from_dict(data, source="file" if as_user_file else None)
        if space is not None:
            table.check_space(space)
    except CostsError as e:
        raise CostsError(f"{path}: {e}") from None
    return table


def table_for_space(
    space: Any, scenario: Scenario, source: str, device: dict, non_block: Cost, cost_of: Any
) -> CostTable:
    """Build a table by calling `cost_of(layer_index, variant_name) -> Cost` for every variant."""
    layers = [{n: cost_of(i, n) for n in names} for i, names in enumerate(space_layers(space))]
    return CostTable(scenario, source, device, non_block, layers)
