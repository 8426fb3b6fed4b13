"""Baseline architectures at the child's measured decode throughput, realized from the library.

- width (Minitron-style): the same (KV heads, FFN size) in every layer. Candidates
  are the library's variants present in every layer, plus (with `interpolate`) FFN
  sizes between them on the search space's multiple; library entries are the
  BLD-trained ones (the same weights the child is built from), interpolated sizes are
  channel-contribution pruned from the parent with mean-pooled KV (the library's init).
- depth (ShortGPT-style): whole layers (attention and FFN no-op) dropped in order of
  least Block Influence, BI = 1 - mean cosine(layer input, layer output) over
  calibration tokens; the kept layers are the parent's.
- random: a random feasible architecture of the library under the child's search
  constraints (`search.random_feasible`), seeded; further seeds when it misses.

Each baseline is picked by predicted throughput (measure/costs.json where it covers the
variants, else weight + KV bytes read per decode step), then timed against the child in
the same process, moving along the candidates until the measured decode tokens/s is
within `tolerance` of the child's (`match_throughput`).

Every step leaves its output under RUN/baselines/<name>/ and is skipped when it exists:
arch.json (chosen blocks and the measurements), child/ (checkpoint), gkd/ (the child's
GKD budget, run through `distill.gkd.run_gkd` with parent/ and data/ linked to the run's).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from ..arch import AttentionVariant as A, BlockConfig, FFNVariant as F, ModelConfig, variant_from_name
from ..utils.io import atomic_write_json, is_done, read_json

log = logging.getLogger(__name__)

BASELINE_DIR = "baselines"
ARCH_FILE = "arch.json"


# --------------------------------------------------------------------------- matching


@dataclass
class Candidate:
    key: str
    blocks: list[BlockConfig]
    predicted: float  # predicted decode tokens/s relative to the child's (1.0 = the same)
    info: dict = field(default_factory=dict)


@dataclass
class Match:
    candidate: Candidate
    ratio: float  # measured decode tokens/s relative to the child's
    within: bool
    history: list[tuple[str, float]]  # every (candidate key, measured ratio), in the order timed

    @property
    def gap(self) -> float:
        return abs(self.ratio - 1.0)


def match_throughput(candidates: Sequence[Candidate], measure: Callable[[Candidate], float], *,
                     tolerance: float = 0.05, max_measurements: int = 6) -> Match:
    """Find a candidate whose measured decode throughput ratio to the child is within `tolerance` of 1.

    Starts from the candidate predicted closest to 1; after each measurement it rescales the
    predictions by measured / predicted and jumps to the candidate expected closest to 1 on the
    side that is needed (faster when too slow, slower when too fast), never leaving the bracket
    of measured candidates. Returns the first one within tolerance, else the closest measured.
    """
    if not candidates:
        raise ValueError("no candidate architectures to match the child's throughput with")
    order = sorted(candidates, key=lambda c: c.predicted)
    lo, hi = -math.inf, math.inf  # predicted values of the fastest too-slow and slowest too-fast measured
    scale = 1.0
    history: list[tuple[Candidate, float]] = []
    current = min(order, key=lambda c: abs(c.predicted - 1.0))
    for _ in range(max_measurements):
        ratio = float(measure(current))
        history.append((current, ratio))
        log.info("baseline candidate %s: %.3fx the child's decode tokens/s (predicted %.3fx)", current.key, ratio,
                 current.predicted * scale)
        if abs(ratio - 1.0) <= tolerance:
            break
        if ratio < 1.0:
            lo = max(lo, current.predicted)
        else:
            hi = min(hi, current.predicted)
        scale = ratio / current.predicted if current.predicted > 0 else scale
        inside = [c for c in order if lo < c.predicted < hi and c.key not in {h.key for h, _ in history}]
        if not inside:
            break
        current = min(inside, key=lambda c: abs(c.predicted * scale - 1.0))
    best, ratio = min(history, key=lambda h: abs(h[1] - 1.0))
    return Match(best, ratio, abs(ratio - 1.0) <= tolerance, [(c.key, r) for c, r in history])


# --------------------------------------------------------------------------- prediction


class DecodePredictor:
    """Predicted time of one decode step of an architecture: measure/costs.json where it costs every
    variant, else the bytes a decode step reads (weights + KV cache of the mean context)."""

    def __init__(self, parent: ModelConfig, scenario, costs=None):
        self.parent, self.s, self.costs = parent, scenario, costs

    def _costed(self, blocks: Sequence[BlockConfig]) -> bool:
        if self.costs is None or len(self.costs.layers) != len(blocks):
            return False
        return all(v.name in self.costs.layers[i] for i, b in enumerate(blocks) for v in (b.attention, b.ffn))

    def _bytes(self, blocks: Sequence[BlockConfig]) -> float:
        from ..cost.memory import kv_cache_bytes, non_block_weight_bytes, subblock_weight_bytes

        total = non_block_weight_bytes(self.parent, self.s)
        for b in blocks:
            total += subblock_weight_bytes(self.parent, b.attention, self.s) + subblock_weight_bytes(self.parent, b.ffn, self.s)
            total += kv_cache_bytes(self.parent, b.attention, self.s, tokens=self.s.mean_decode_context)
        return float(total)

    def ratio(self, blocks: Sequence[BlockConfig], reference: Sequence[BlockConfig]) -> float:
        """Predicted decode tokens/s of `blocks` over that of `reference` (time of reference / time of blocks)."""
        if self._costed(blocks) and self._costed(reference):
            t = lambda bl: self.costs.total([[b.attention.name, b.ffn.name] for b in bl]).decode_time_s  # noqa: E731
        else:
            t = self._bytes
        return t(reference) / t(blocks)


# --------------------------------------------------------------------------- architectures


def common_variants(space: Sequence[Sequence[str]]) -> tuple[list[int], list[int]]:
    """KV-head counts and FFN sizes offered in every layer of a search space (largest first)."""
    sets = [set(names) for names in space if names]
    common = set.intersection(*sets) if sets else set()
    kvs, ffns = [], []
    for n in common:
        v = variant_from_name(n)
        if isinstance(v, A) and v.kind == "full":
            kvs.append(v.num_kv_heads)
        elif isinstance(v, F) and v.kind == "full":
            ffns.append(v.intermediate_size)
    return sorted(kvs, reverse=True), sorted(ffns, reverse=True)


def width_architectures(parent: ModelConfig, space: Sequence[Sequence[str]], *, round_to: int = 64,
                        interpolate: bool = True) -> list[tuple[str, list[BlockConfig], bool]]:
    """(key, homogeneous blocks, from_library) for every (KV heads, FFN size) choice."""
    kvs, sizes = common_variants(space)
    if not kvs or not sizes:
        raise ValueError("the width baseline needs attention (attn_kvN) and FFN (ffn_N) variants offered in every "
                         "layer of the library's search space")
    all_sizes = {m: True for m in sizes}
    if interpolate:
        top = max(sizes)
        for m in range(round_to, top, round_to):
            if min(sizes) <= m:
                all_sizes.setdefault(m, False)
    out = []
    for kv in kvs:
        for m in sorted(all_sizes, reverse=True):
            block = BlockConfig(A("full", kv), F("full", m))
            out.append((f"width_kv{kv}_ffn{m}", [block] * parent.num_layers, all_sizes[m]))
    return out


def block_influence(inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> list[float]:
    """ShortGPT's Block Influence per layer: 1 - mean over tokens of cos(input, output) ([..., hidden])."""
    out = []
    for x, y in zip(inputs, outputs):
        x, y = x.double().reshape(-1, x.shape[-1]), y.double().reshape(-1, y.shape[-1])
        cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
        out.append(float(1.0 - cos.mean()))
    return out


class InfluenceSums:
    """Token-weighted running mean of 1 - cos over several batches, per layer."""

    def __init__(self, num_layers: int):
        self.sums = [0.0] * num_layers
        self.tokens = 0

    def add(self, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> None:
        n = inputs[0].numel() // inputs[0].shape[-1]
        for i, bi in enumerate(block_influence(inputs, outputs)):
            self.sums[i] += bi * n
        self.tokens += n

    def means(self) -> list[float]:
        return [s / max(self.tokens, 1) for s in self.sums]


@torch.no_grad()
def parent_block_influence(model, batches: Sequence[torch.Tensor]) -> list[float]:
    """Block Influence of every layer of a (Megatron-Core) model on token batches [batch, seq]."""
    from ..model import forward

    sums = InfluenceSums(model.puzzle_config.num_layers)
    for tokens in batches:
        h0 = forward.embed(model, tokens)
        _, outs = forward.run_layers(model, h0, collect=True)
        sums.add([h0] + outs[:-1], outs)
    return sums.means()


def depth_order(influence: Sequence[float]) -> list[int]:
    """Layers in the order ShortGPT drops them: least influence first (ties: the later layer first)."""
    return sorted(range(len(influence)), key=lambda i: (influence[i], -i))


def depth_blocks(parent: ModelConfig, drop: Sequence[int]) -> list[BlockConfig]:
    gone = set(drop)
    return [BlockConfig(A("no_op"), F("no_op")) if i in gone else b for i, b in enumerate(parent.blocks)]


def depth_architectures(parent: ModelConfig, influence: Sequence[float]) -> list[tuple[str, list[BlockConfig], list[int]]]:
    order = depth_order(influence)
    return [(f"depth_drop{k}", depth_blocks(parent, order[:k]), sorted(order[:k])) for k in range(parent.num_layers)]


# --------------------------------------------------------------------------- weights


class BaselineWeights:
    """Canonical tensors of a baseline, made one layer at a time, and where each subblock comes from.

    A subblock is the library's entry when it has one, the parent's own for the parent's
    variant, else initialised from the parent like the library's init does (channel-contribution
    FFN pruning needs calibration statistics: `stats_fn()` gives them, once, when some subblock
    needs them). `parent_tensors` may be a `CanonicalView`: only the layer being made is read.
    """

    def __init__(self, parent: ModelConfig, blocks: Sequence[BlockConfig], library,
                 parent_tensors: Mapping[str, torch.Tensor], stats_fn: Callable[[], object] | None = None):
        self.parent, self.blocks, self.library, self.parent_tensors = parent, list(blocks), library, parent_tensors
        self.stats_fn, self._stats = stats_fn, None
        own = parent.parent_block()
        self.plan: list[list[tuple[str, object]]] = []
        self.sources: dict[str, int] = {}
        for i, b in enumerate(self.blocks):
            row = []
            for v, pv in ((b.attention, own.attention), (b.ffn, own.ffn)):
                if v.kind == "no_op":
                    src = "no_op"
                elif library is not None and library.has(i, v.name):
                    src = "library"
                elif v == pv:
                    src = "parent"
                else:
                    src = "init"
                row.append((src, v))
                self.sources[src] = self.sources.get(src, 0) + 1
            self.plan.append(row)

    def non_block(self) -> dict[str, torch.Tensor]:
        from ..arch.shapes import non_block_shapes

        return {k: self.parent_tensors[k] for k in non_block_shapes(self.parent)}

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        from ..arch.shapes import variant_shapes
        from ..init.variants import InitConfig, init_variant

        out: dict[str, torch.Tensor] = {}
        for src, v in self.plan[i]:
            if src == "library":
                out.update(self.library.load(i, v.name))
            elif src == "parent":
                out.update({k: self.parent_tensors[k] for k in variant_shapes(self.parent, i, v)})
            elif src == "init":
                if self._stats is None and self.stats_fn is not None:
                    self._stats = self.stats_fn()
                out.update(init_variant(self.parent, self.parent_tensors, i, v, InitConfig(), self._stats)[0])
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor at once (small models, tests)."""
        out = self.non_block()
        for i in range(len(self.blocks)):
            out.update(self.layer(i))
        return out


# --------------------------------------------------------------------------- run directory steps


def baseline_dir(run: Path, name: str) -> Path:
    return Path(run) / BASELINE_DIR / name


def save_arch(path: Path, parent: ModelConfig, match: Match, extra: dict) -> dict:
    cfg = parent.with_blocks(match.candidate.blocks)
    data = {"key": match.candidate.key, "blocks": cfg.block_configs_json(),
            "variants": [[b.attention.name, b.ffn.name] for b in match.candidate.blocks],
            "decode_ratio_to_child": match.ratio, "within_tolerance": match.within,
            "measurements": [{"candidate": k, "decode_ratio_to_child": r} for k, r in match.history],
            "info": match.candidate.info, **extra}
    atomic_write_json(path, data)
    return data


def load_arch_blocks(parent: ModelConfig, data: dict) -> list[BlockConfig]:
    return [BlockConfig(variant_from_name(a), variant_from_name(f)) for a, f in data["variants"]]


def realize(run: Path, name: str, cfg: ModelConfig, weights: BaselineWeights, extra: dict) -> Path:
    """RUN/baselines/<name>/child (checkpoint) with parent/ and data/ linked, ready for `run_gkd`;
    the child is filled one layer at a time from `weights`."""
    from ..convert.megatron_layout import load_layers
    from ..model import checkpoint
    from ..model.gpt import build_model

    d = baseline_dir(run, name)
    d.mkdir(parents=True, exist_ok=True)
    for link in ("parent", "data"):
        target = d / link
        if not target.exists():
            os.symlink(os.path.relpath(Path(run) / link, d), target)
    if is_done(d / "child"):
        return d / "child"
    model = build_model(cfg)
    load_layers(model, weights.non_block(), weights.layer)
    checkpoint.save(model, d / "child", extra={"stage": "baseline", "baseline": name, **extra})
    return d / "child"


def child_gkd_config(run: Path, run_config: dict, overrides: Mapping):
    """The GKD settings the child was trained with (RUN/gkd/config.json, else the run's `gkd` section),
    with `overrides` applied."""
    from ..distill.gkd import GKDConfig

    saved = Path(run) / "gkd" / "config.json"
    base = read_json(saved) if saved.exists() else dict(run_config.get("gkd") or {})
    return GKDConfig.from_dict({**base, **dict(overrides)})


def gkd_baseline(run: Path, name: str, gkd_cfg) -> Path:
    """Uptrain RUN/baselines/<name>/child with the child's GKD budget; returns the trained checkpoint."""
    from ..distill.gkd import FINAL_DIR, STAGE_DIR, run_gkd

    d = baseline_dir(run, name)
    run_gkd(d, gkd_cfg)  # resumes, and keeps a finished run
    return d / STAGE_DIR / FINAL_DIR


# --------------------------------------------------------------------------- selection


def select_width(parent: ModelConfig, space, child_blocks, predictor: DecodePredictor, measure, cfg) -> Match:
    cands = [Candidate(key, blocks, predictor.ratio(blocks, child_blocks), {"from_library": lib})
             for key, blocks, lib in width_architectures(parent, space, round_to=cfg.round_to,
                                                         interpolate=cfg.interpolate)]
    return match_throughput(cands, measure, tolerance=cfg.tolerance, max_measurements=cfg.max_measurements)


def select_depth(parent: ModelConfig, influence, child_blocks, predictor: DecodePredictor, measure, cfg) -> Match:
    cands = [Candidate(key, blocks, predictor.ratio(blocks, child_blocks),
                       {"dropped_layers": drop, "block_influence": list(influence)})
             for key, blocks, drop in depth_architectures(parent, influence)]
    return match_throughput(cands, measure, tolerance=cfg.tolerance, max_measurements=cfg.max_measurements)


def select_random(problem, constraints, child_blocks, predictor: DecodePredictor, measure, cfg) -> Match:
    """Seeds `random_seed`, `random_seed + 1`, ... until one lands within tolerance (else the closest)."""
    from ..search import random_feasible

    history: list[tuple[Candidate, float]] = []
    for seed in range(cfg.random_seed, cfg.random_seed + cfg.random_tries):
        sol = random_feasible(problem, constraints, "kl_div", seed=seed)
        blocks = [BlockConfig(variant_from_name(v[0]), variant_from_name(v[1])) for v in sol.variants]
        cand = Candidate(f"random_seed{seed}", blocks, predictor.ratio(blocks, child_blocks),
                         {"seed": seed, "constraints": [str(c) for c in constraints], "objective": sol.objective})
        ratio = float(measure(cand))
        history.append((cand, ratio))
        if abs(ratio - 1.0) <= cfg.tolerance:
            break
    best, ratio = min(history, key=lambda h: abs(h[1] - 1.0))
    return Match(best, ratio, abs(ratio - 1.0) <= cfg.tolerance, [(c.key, r) for c, r in history])
