"""The search problem: one-hot groups of options per layer, each option with its numbers.

Every layer holds one or two *groups*; exactly one option of each group is chosen.

- ``decoupled``: two groups per layer, attention variants and FFN variants,
  scored separately (``attn_kv3`` and ``ffn_768``);
- ``pairs``: one group per layer of whole blocks (``attn_kv3+ffn_768``). Coupled
  scores key pairs directly; with decoupled scores a pair scores the sum of its
  two variants. Costs are a pair's own entry when given, else the sum of its parts;
- ``blocks``: one group per layer of opaque block descriptions (the block-library
  stats layout of the public Puzzle demo).

Numbers live in ``values[key]``, one float per option (NaN where unknown), keyed by
cost name (``params``, ``weight_bytes``, ``kv_cache_bytes``, ``prefill_time_s``,
``decode_time_s``), ``metrics.<name>`` for scores and ``stats.<name>`` for
library stats, and ``attention_layers`` (1 where an option keeps a layer's attention).
``constants[key]`` holds the non-block part of a total.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

COST_KEYS = ("params", "weight_bytes", "kv_cache_bytes", "prefill_time_s", "decode_time_s")
# A count, not a cost: how many layers of an architecture keep an attention subblock (constraints
# such as ``attention_layers>=0.3x`` bound it).
ATTENTION_LAYERS = "attention_layers"
# Joules of one request of the scenario (prefill + decode_len steps), and per generated token.
ENERGY_QUANTITIES = ("energy", "energy_per_token")
MODES = ("auto", "decoupled", "pairs")


class SearchError(ValueError):
    """Bad search input (files, names, constraints); the message names the problem and the fix."""


@dataclass
class Problem:
    """Flat arrays over all options; ``groups[g]`` lists the option indices of group g."""

    mode: str
    num_layers: int
    names: list[str]
    layer_of: np.ndarray
    group_of: np.ndarray
    groups: list[np.ndarray]
    group_layer: np.ndarray
    group_kind: list[str]  # "attention", "ffn", "block"
    values: dict[str, np.ndarray]
    constants: dict[str, float] = field(default_factory=dict)
    parent: np.ndarray | None = None  # the parent's option index per group
    scenario: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def num_options(self) -> int:
        return len(self.names)

    @property
    def batch_size(self) -> int | None:
        return self.scenario.get("batch_size")

    @property
    def decode_len(self) -> int | None:
        return self.scenario.get("decode_len")

    def metrics(self) -> list[str]:
        return sorted(k[len("metrics."):] for k in self.values if k.startswith("metrics."))

    def groups_of_layer(self, layer: int) -> list[int]:
        return [g for g in range(self.num_groups) if self.group_layer[g] == layer]

    # ------------------------------------------------------------------ quantities
    def linear(self, key: str) -> tuple[np.ndarray, float]:
        """(per-option coefficients, constant) of a total that is a sum over the chosen options."""
        if key in ("memory", "memory_bytes"):
            w, cw = self.linear("weight_bytes")
            k, ck = self.linear("kv_cache_bytes")
            return w + k, cw + ck
        if key in ("latency", "latency_s"):
            if not self.decode_len:
                raise SearchError("latency needs the scenario's decode_len (costs.json 'scenario')")
            p, cp = self.linear("prefill_time_s")
            d, cd = self.linear("decode_time_s")
            return p + self.decode_len * d, cp + self.decode_len * cd
        if key in ("ttft", "ttft_s"):
            return self.linear("prefill_time_s")
        if key in ENERGY_QUANTITIES:  # joules of one request: its prefill and decode_len decode steps
            if not (self.batch_size and self.decode_len):
                raise SearchError(f"{key} needs the scenario's batch_size and decode_len (costs.json 'scenario')")
            if "prefill_energy_j" not in self.values or "decode_energy_j" not in self.values:
                raise SearchError(f"{key} needs costs with energy (prefill_energy_j, decode_energy_j): "
                                  "measure on a GPU with NVML's energy counter (megatron-puzzle measure)")
            p, cp = self.linear("prefill_energy_j")
            d, cd = self.linear("decode_energy_j")
            coef, const = p + self.decode_len * d, cp + self.decode_len * cd
            if key == "energy_per_token":  # per generated token: a constant factor keeps it linear
                n = self.batch_size * self.decode_len
                return coef / n, const / n
            return coef, const
        key = self.resolve_key(key)
        coef = self.values[key]
        if np.isnan(coef).any():
            i = int(np.flatnonzero(np.isnan(coef))[0])
            raise SearchError(
                f"{key!r} is missing for layer {self.layer_of[i]} option {self.names[i]!r}; "
                "give it for every option or choose another quantity"
            )
        return coef, float(self.constants.get(key, 0.0))

    def resolve_key(self, key: str) -> str:
        """Map a user-given name to a key of ``values`` (bare metric names are allowed)."""
        if key in self.values or (key in ENERGY_QUANTITIES and "decode_energy_j" in self.values):
            return key
        for prefix in ("metrics.", "stats."):
            if prefix + key in self.values:
                return prefix + key
        known = sorted(self.values) + (["memory", "latency", "ttft", "throughput", "decode_throughput"]
                                         if self.decode_len else [])
        raise SearchError(f"unknown quantity {key!r}; known: {', '.join(known)}")

    def total(self, key: str, choice: Sequence[int]) -> float:
        coef, const = self.linear(key)
        return float(coef[np.asarray(choice)].sum() + const)

    def throughput(self, choice: Sequence[int]) -> float:
        """Tokens/s = batch x decode_len / (prefill + decode_len x decode step)."""
        t = self.total("latency", choice)
        return self.batch_size * self.decode_len / t if t > 0 else math.inf

    def has_timing(self) -> bool:
        return bool(self.batch_size and self.decode_len) and "prefill_time_s" in self.values

    def totals(self, choice: Sequence[int]) -> dict[str, float]:
        """Every total of an architecture, derived ones (memory, latency, throughput) included."""
        idx = np.asarray(choice)
        out: dict[str, float] = {}
        for key, v in self.values.items():
            vals = v[idx]
            if not np.isnan(vals).any():
                out[key] = float(vals.sum() + self.constants.get(key, 0.0))
        if "weight_bytes" in out and "kv_cache_bytes" in out:
            out["memory_bytes"] = out["weight_bytes"] + out["kv_cache_bytes"]
        if self.has_timing() and "decode_time_s" in out:
            out["ttft_s"] = out["prefill_time_s"]
            out["latency_s"] = out["prefill_time_s"] + self.decode_len * out["decode_time_s"]
            out["throughput"] = (
                self.batch_size * self.decode_len / out["latency_s"] if out["latency_s"] > 0 else math.inf
            )
            out["decode_throughput"] = (
                self.batch_size / out["decode_time_s"] if out["decode_time_s"] > 0 else math.inf
            )
        if self.batch_size and self.decode_len and "prefill_energy_j" in out and "decode_energy_j" in out:
            out["energy_j"] = out["prefill_energy_j"] + self.decode_len * out["decode_energy_j"]
            out["energy_per_token"] = out["energy_j"] / (self.batch_size * self.decode_len)
        return out

    def parent_totals(self) -> dict[str, float] | None:
        return None if self.parent is None else self.totals(self.parent)

    def layer_variants(self, choice: Sequence[int]) -> list[list[str]]:
        """Per layer, the chosen names: [attention, ffn] (decoupled and pairs) or [block]."""
        out: list[list[str]] = [[] for _ in range(self.num_layers)]
        for g, i in enumerate(choice):
            name = self.names[int(i)]
            out[int(self.group_layer[g])].extend(name.split("+") if self.mode == "pairs" else [name])
        return out

    def choice_from_variants(self, variants: Sequence[Sequence[str] | str]) -> np.ndarray:
        """Inverse of `layer_variants`: option indices per group from per-layer names."""
        if len(variants) != self.num_layers:
            raise SearchError(f"{len(variants)} layers given for a {self.num_layers}-layer problem")
        choice = []
        for layer, names in enumerate(variants):
            names = [names] if isinstance(names, str) else list(names)
            if self.mode == "pairs" and len(names) == 2:
                names = ["+".join(names)]
            gs = self.groups_of_layer(layer)
            if len(names) != len(gs):
                raise SearchError(f"layer {layer}: expected {len(gs)} names, got {names}")
            for g, name in zip(gs, names):
                hits = [i for i in self.groups[g] if self.names[i] == name]
                if not hits:
                    raise SearchError(f"layer {layer}: {name!r} is not an option of this search space")
                choice.append(hits[0])
        return np.asarray(choice, dtype=np.int64)

    def as_pairs(self) -> tuple["Problem", list[np.ndarray]]:
        """The same problem with one group per layer (the product of its groups; totals add up).

        Returns the pairs problem and, per pair option, the original option indices it
        combines. Its LP relaxation of "layer unchanged" is tight, which makes
        diversity cuts much cheaper to solve than on two groups per layer.
        """
        b = _Builder("pairs", self.num_layers)
        parts: list[np.ndarray] = []
        for layer in range(self.num_layers):
            gs = self.groups_of_layer(layer)
            opts, parent = {}, None
            for combo in itertools.product(*(self.groups[g] for g in gs)):
                name = "+".join(self.names[i] for i in combo)
                opts[name] = {k: float(v[list(combo)].sum()) for k, v in self.values.items()}
                parts.append(np.asarray(combo))
                if self.parent is not None and all(self.parent[g] == i for g, i in zip(gs, combo)):
                    parent = name
            b.add_group(layer, "block", opts, parent)
        return b.build(self.constants, self.scenario, self.source), parts


# ---------------------------------------------------------------------- building


class _Builder:
    def __init__(self, mode: str, num_layers: int):
        self.mode, self.num_layers = mode, num_layers
        self.names: list[str] = []
        self.layer_of: list[int] = []
        self.group_of: list[int] = []
        self.groups: list[list[int]] = []
        self.group_layer: list[int] = []
        self.group_kind: list[str] = []
        self.rows: list[dict[str, float]] = []
        self.parent: list[int | None] = []

    def add_group(self, layer: int, kind: str, options: Mapping[str, dict[str, float]], parent: str | None):
        if not options:
            raise SearchError(
                f"layer {layer} has no {kind} option that is both scored and costed; "
                "check that scores.json and costs.json cover the same variants"
            )
        g = len(self.groups)
        self.groups.append([])
        self.group_layer.append(layer)
        self.group_kind.append(kind)
        self.parent.append(None)
        for name, row in options.items():
            i = len(self.names)
            self.names.append(name)
            self.layer_of.append(layer)
            self.group_of.append(g)
            self.groups[g].append(i)
            self.rows.append(row)
            if name == parent:
                self.parent[g] = i

    def build(self, constants, scenario, source) -> Problem:
        keys = sorted({k for r in self.rows for k in r})
        values = {k: np.array([r.get(k, np.nan) for r in self.rows], dtype=np.float64) for k in keys}
        if self.mode in ("decoupled", "pairs"):
            # layers that keep an attention subblock: summed 1-block scores judge one attention removal in a
            # parent that keeps all the others, and miss what removing most of them together costs
            values[ATTENTION_LAYERS] = np.array([float(attention_kept(n)) for n in self.names])
        parent = None if any(p is None for p in self.parent) else np.asarray(self.parent, dtype=np.int64)
        return Problem(
            mode=self.mode, num_layers=self.num_layers, names=self.names,
            layer_of=np.asarray(self.layer_of), group_of=np.asarray(self.group_of),
            groups=[np.asarray(g, dtype=np.int64) for g in self.groups],
            group_layer=np.asarray(self.group_layer), group_kind=self.group_kind,
            values=values, constants=dict(constants), parent=parent, scenario=dict(scenario), source=source,
        )


def attention_kept(name: str) -> bool:
    """Whether an option (``attn_kv1``, ``attn_linear+ffn_768``, ``ffn_768``) keeps a layer's attention."""
    attn = name.split("+")[0]
    return attn.startswith("attn_") and attn != "attn_no_op"


def _numbers(d: Any, where: str) -> dict[str, float]:
    if not isinstance(d, dict):
        raise SearchError(f"{where} must be an object of numbers, got {type(d).__name__}")
    out = {}
    for k, v in d.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue  # descriptive fields (strings, nested objects) are not quantities
        out[k] = float(v)
    return out


def _kv(name: str) -> int | None:
    m = re.fullmatch(r"attn_kv(\d+)", name)
    return int(m.group(1)) if m else None


def _ffn_size(name: str) -> int | None:
    m = re.fullmatch(r"ffn_(\d+)", name)
    return int(m.group(1)) if m else None


def default_parent(attention: Sequence[str], ffn: Sequence[str]) -> tuple[str | None, str | None]:
    """The parent is the largest KV count and the largest FFN among a layer's variants."""
    kvs = [n for n in attention if _kv(n) is not None]
    ffs = [n for n in ffn if _ffn_size(n) is not None]
    return (max(kvs, key=_kv) if kvs else None, max(ffs, key=_ffn_size) if ffs else None)


def _space_for_layer(space: Any, layer: int) -> set[str] | None:
    """Names allowed at `layer` by a space description (see `load_space`), or None for all."""
    if space is None:
        return None
    if isinstance(space, dict) and "layers" in space:
        space = space["layers"]
    if isinstance(space, dict):  # the same allowance for every layer
        entry = space
    elif isinstance(space, list):
        if layer >= len(space):
            raise SearchError(f"the search space lists {len(space)} layers; layer {layer} is missing")
        entry = space[layer]
    else:
        raise SearchError("the search space must be a list (one entry per layer) or an object")
    if isinstance(entry, dict):
        names = [n for k in ("attention", "ffn", "blocks", "variants") for n in entry.get(k, [])]
    elif isinstance(entry, list):
        names = list(entry)
    else:
        raise SearchError(f"search space entry for layer {layer} must be a list of variant names")
    return {str(n) for n in names}


def load_space(path: str | Path) -> Any:
    """A search space file: ``[[names of layer 0], ...]``, ``{"layers": [...]}`` with lists
    or ``{"attention": [...], "ffn": [...]}`` entries, or one such object for all layers."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SearchError(f"search space file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise SearchError(f"search space file {path} is not valid JSON: {e}") from None


def _allowed(name: str, allowed: set[str] | None) -> bool:
    if allowed is None or name in allowed:
        return True
    return "+" in name and all(p in allowed for p in name.split("+"))


def problem_from_dicts(
    scores: Mapping[str, Any],
    costs: Mapping[str, Any],
    *,
    space: Any = None,
    mode: str = "auto",
    parent: str | Sequence[str] | None = None,
    source: str = "",
) -> Problem:
    """Build a problem from parsed scores.json and costs.json (layouts of docs/formats.md).

    `parent` names the parent block (``attn_kv8+ffn_14336``, or one such name per layer);
    by default it is the largest KV count and largest FFN of each layer.
    """
    if mode not in MODES:
        raise SearchError(f"mode must be one of {MODES}, got {mode!r}")
    s_layers, c_layers = scores.get("layers"), costs.get("layers")
    if not isinstance(s_layers, list) or not isinstance(c_layers, list):
        raise SearchError("scores.json and costs.json each need a 'layers' list (docs/formats.md)")
    if len(s_layers) != len(c_layers):
        raise SearchError(f"scores.json has {len(s_layers)} layers but costs.json has {len(c_layers)}")
    coupled = any("+" in name for layer in s_layers for name in layer)
    if mode == "auto":
        mode = "pairs" if coupled else "decoupled"
    if coupled and mode != "pairs":
        raise SearchError("these scores are coupled (keys like attn_kv1+ffn_768): search them in 'pairs' mode")
    parent_metrics = _numbers(scores.get("parent", {}), "scores.json 'parent'")
    num_layers = len(s_layers)
    if isinstance(parent, str) or parent is None:
        parents = [parent] * num_layers
    else:
        parents = list(parent)
        if len(parents) != num_layers:
            raise SearchError(f"{len(parents)} parent names given for {num_layers} layers")

    b = _Builder(mode, num_layers)
    for layer, (s_raw, c_raw) in enumerate(zip(s_layers, c_layers)):
        allowed = _space_for_layer(space, layer)
        s = {k: {"metrics." + m: x for m, x in _numbers(v, f"scores layer {layer} {k}").items()}
             for k, v in s_raw.items()}
        c = {k: _numbers(v, f"costs layer {layer} {k}") for k, v in c_raw.items()}
        singles = [n for n in c if "+" not in n and _allowed(n, allowed)]
        p_attn, p_ffn = default_parent([n for n in singles if n.startswith("attn_")],
                                       [n for n in singles if n.startswith("ffn_")])
        if parents[layer] is not None:
            p_attn, _, p_ffn = parents[layer].partition("+")
        # Replacing a block by the parent's own variant leaves the parent: its score is the parent's.
        own = [p_attn, p_ffn] + ([f"{p_attn}+{p_ffn}"] if coupled and p_attn and p_ffn else [])
        for p in own:
            if p and p not in s and parent_metrics and (p in c or "+" in p):
                s[p] = {"metrics." + m: x for m, x in parent_metrics.items()}

        def costed(name: str) -> dict[str, float] | None:
            if name in c:
                return c[name]
            a, _, f = name.partition("+")
            if f and a in c and f in c:
                return {k: c[a].get(k, np.nan) + c[f].get(k, np.nan) for k in set(c[a]) | set(c[f])}
            return None

        if mode == "decoupled":
            for kind, prefix, p in (("attention", "attn_", p_attn), ("ffn", "ffn_", p_ffn)):
                opts = {n: {**c[n], **s[n]} for n in s
                        if n.startswith(prefix) and "+" not in n and n in c and _allowed(n, allowed)}
                b.add_group(layer, kind, opts, p)
        elif coupled:
            opts = {}
            for n in s:
                cost = costed(n) if "+" in n and _allowed(n, allowed) else None
                if cost is not None:
                    opts[n] = {**cost, **s[n]}
            b.add_group(layer, "block", opts, f"{p_attn}+{p_ffn}")
        else:
            attn = [n for n in s if n.startswith("attn_") and "+" not in n and n in c and _allowed(n, allowed)]
            ffn = [n for n in s if n.startswith("ffn_") and "+" not in n and n in c and _allowed(n, allowed)]
            opts = {}
            for a in attn:
                for f in ffn:
                    score = {k: s[a].get(k, np.nan) + s[f].get(k, np.nan) for k in set(s[a]) | set(s[f])}
                    opts[f"{a}+{f}"] = {**costed(f"{a}+{f}"), **score}
            b.add_group(layer, "block", opts, f"{p_attn}+{p_ffn}")
    constants = _numbers(costs.get("non_block", {}), "costs.json 'non_block'")
    return b.build(constants, costs.get("scenario", {}), source)


def _read_json(path: str | Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SearchError(f"{what} file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise SearchError(f"{what} file {path} is not valid JSON: {e}") from None


def load_problem(
    scores_path: str | Path,
    costs_path: str | Path,
    space: Any = None,
    *,
    mode: str = "auto",
    parent: str | Sequence[str] | None = None,
) -> Problem:
    """Read score/scores.json and measure/costs.json; `space` is a parsed space or a path."""
    if isinstance(space, (str, Path)):
        space = load_space(space)
    scores = _read_json(scores_path, "scores")
    costs = _read_json(costs_path, "costs")
    return problem_from_dicts(scores, costs, space=space, mode=mode, parent=parent,
                              source=f"{scores_path} + {costs_path}")


# ---------------------------------------------------------------------- block-library stats


def _layer_index(key: str) -> int:
    m = re.fullmatch(r"(?:layer|block)_?(\d+)", key)
    if not m:
        raise SearchError(f"library stats key {key!r} is not a layer name like 'layer_0'")
    return int(m.group(1))


def problem_from_library_stats(data: Mapping[str, Any], *, parent: str | None = None, source: str = "") -> Problem:
    """The public Puzzle demo layout: ``{"layer_0": {"<block>": {"stats": {...}, "metrics": {...}}}}``.

    Each entry is a whole block choice. The parent (for relative constraints) is
    `parent` when named, else the entry with the most ``stats.num_params`` per layer.
    """
    if not isinstance(data, dict) or not data:
        raise SearchError("library stats must be a JSON object keyed by layer ('layer_0', 'layer_1', ...)")
    layers = sorted(data, key=_layer_index)
    idx = [_layer_index(k) for k in layers]
    if idx != list(range(len(idx))):
        raise SearchError(f"library stats layers must be layer_0 .. layer_{len(idx) - 1} without gaps, got {layers}")
    b = _Builder("blocks", len(layers))
    for layer, key in enumerate(layers):
        entries = data[key]
        if not isinstance(entries, dict) or not entries:
            raise SearchError(f"library stats {key!r} must map block descriptions to {{'stats', 'metrics'}}")
        opts = {}
        for name, entry in entries.items():
            if not isinstance(entry, dict):
                raise SearchError(f"library stats {key}/{name} must be an object with 'stats' and 'metrics'")
            row = {}
            for part in ("stats", "metrics"):
                for k, v in _numbers(entry.get(part, {}), f"{key}/{name}/{part}").items():
                    row[f"{part}.{k}"] = v
            opts[name] = row
        p = parent
        if p is None and all("stats.num_params" in r for r in opts.values()):
            p = max(opts, key=lambda n: opts[n]["stats.num_params"])
        b.add_group(layer, "block", opts, p)
    return b.build({}, {}, source)


def load_library_stats(path: str | Path, *, parent: str | None = None) -> Problem:
    return problem_from_library_stats(_read_json(path, "library stats"), parent=parent, source=str(path))
