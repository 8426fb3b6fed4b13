"""The `score` stage over a run directory: spread, cache, merge.

(layer, variant) entries are dealt round-robin over data-parallel ranks; the ranks of
one tensor-parallel group, and the pipeline stages of one model replica, score the same
entries together. Each finished entry is cached in
`RUN/score/cache/layer_NNN__<variant>.json` (atomically, by TP rank 0 of the last pipeline stage), so
a rerun skips what is scored. A cached score is reused only when it was made with
the same held-out settings and after its library entry was last written. Rank 0
then merges every entry into `RUN/score/scores.json` (docs/formats.md) and writes `done`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from ..utils.config import from_section
from ..utils.io import DONE_MARKER, atomic_write_json, atomic_write_text, is_done, read_json
from . import library as lib
from ..model.metrics import ALL_METRICS, METRICS
from .replace import Entry, ReplaceScorer

log = logging.getLogger(__name__)


class ScoreError(ValueError):
    """Score settings that cannot be used (too few tokens, unknown metrics); the message names the fix."""


@dataclass(frozen=True)
class Settings:
    """What a cached score depends on besides the library entry."""

    tokens: int
    seq_len: int
    batch_size: int
    split: str = "heldout"


def cache_path(score_dir: Path, entry: Entry) -> Path:
    layer, name = entry
    return score_dir / "cache" / f"layer_{layer:03d}__{name}.json"


def parent_cache_path(score_dir: Path) -> Path:
    return score_dir / "cache" / "parent.json"


def read_cached(path: Path, settings: Settings, newer_than: float | None = None) -> dict | None:
    """The cached metrics at `path` if they were made with `settings` (and after `newer_than`), else None."""
    if not path.exists():
        return None
    try:
        entry = read_json(path)
    except ValueError:
        return None
    if entry.get("settings") != asdict(settings):
        return None
    if newer_than is not None and path.stat().st_mtime < newer_than:
        return None
    return entry["metrics"]


def write_cached(path: Path, settings: Settings, metrics: dict, **extra) -> None:
    atomic_write_json(path, {"settings": asdict(settings), "metrics": metrics, **extra})


def entries_of(space: Sequence[Sequence[str]], coupled: bool = False, only: Sequence[str] | None = None) -> list[Entry]:
    """Every (layer, variant) of the space in layer order; with `coupled`, every (attention, FFN) pair.

    `only` keeps the named variants (and, coupled, pairs whose two parts are both named).
    """
    keep = None if only is None else set(only)
    out: list[Entry] = []
    for layer, names in enumerate(space):
        names = [n for n in names if keep is None or n in keep]
        if coupled:
            attn = [n for n in names if lib.is_attention(n)]
            ffn = [n for n in names if not lib.is_attention(n)]
            out.extend((layer, f"{a}+{f}") for a in attn for f in ffn)
        else:
            out.extend((layer, n) for n in names)
    return out


def merge(score_dir: Path, entries: Sequence[Entry], num_layers: int, settings: Settings,
          metrics: Sequence[str] = METRICS) -> dict:
    """scores.json content from the cache (every entry must be there)."""
    layers: list[dict] = [{} for _ in range(num_layers)]
    missing = []
    for entry in entries:
        m = read_cached(cache_path(score_dir, entry), settings)
        if m is None:
            missing.append(entry)
            continue
        layers[entry[0]][entry[1]] = {k: m[k] for k in metrics}
    parent = read_cached(parent_cache_path(score_dir), settings)
    if missing or parent is None:
        raise RuntimeError(f"scores missing from {score_dir / 'cache'} for {missing[:5]} (parent: {parent is not None}); "
                           "rerun `megatron-puzzle score` to fill them in")
    return {"metrics": list(metrics), "parent": {k: parent[k] for k in metrics}, "tokens": settings.tokens,
            "layers": layers}


def heldout_batches(data_dir: Path, tokens: int, seq_len: int, batch_size: int) -> list:
    """The first `tokens` held-out positions as windows [batch, seq + 1], in shard order (every rank the same)."""
    from ..data import TokenBatches

    loader = TokenBatches(data_dir, seq_len, batch_size, shuffle=False, targets=True, split="heldout")
    n = tokens // (seq_len * batch_size)
    if n < 1:
        raise ScoreError(f"--tokens {tokens} is less than one batch ({batch_size} x {seq_len}); raise it or "
                         "lower --batch-size/--seq-len")
    if n > loader.batches_per_epoch:
        log.warning("held-out split holds %d batches of %d x %d; scoring on those instead of %d tokens",
                    loader.batches_per_epoch, batch_size, seq_len, tokens)
        n = loader.batches_per_epoch
    return [loader.batch(i) for i in range(n)]


def score_space(parent, variant_weights, space: Sequence[Sequence[str]], batches: list, score_dir: Path, *,
              settings: Settings, metrics: Sequence[str] = METRICS, coupled: bool = False,
              only: Sequence[str] | None = None, library_dir: Path | None = None, max_entries: int = 64,
              force: bool = False, progress: bool = True) -> dict | None:
    """Score every entry of `space` not yet cached; rank 0 writes scores.json and returns it.

    Call on every rank (after `init_distributed`); `parent` is the loaded parent model.
    """
    from ..model import parallel

    unknown = sorted(set(metrics) - set(ALL_METRICS))
    if unknown:
        raise ScoreError(f"unknown metrics {unknown}; choose from {', '.join(ALL_METRICS)}")
    cfg = parent.puzzle_config
    if len(space) != cfg.num_layers:
        raise lib.LibraryError(f"the search space lists {len(space)} layers but the parent has {cfg.num_layers}")
    score_dir = Path(score_dir)
    entries = entries_of(space, coupled, only)
    from megatron.core import parallel_state

    # the metrics exist on the last pipeline stage; its TP rank 0 writes them
    dp_rank, dp_size = parallel.dp_rank(), parallel.dp_size()
    writer = parallel.tp_rank() == 0 and parallel_state.is_pipeline_last_stage()

    def fresh(entry: Entry) -> bool:
        if force:
            return False
        stamp = None
        if library_dir is not None:
            stamps = [lib.weights_mtime(library_dir, entry[0], p) for p in entry[1].split("+")]
            stamp = max((s for s in stamps if s is not None), default=None)
        return read_cached(cache_path(score_dir, entry), settings, stamp) is not None

    mine = entries[dp_rank::dp_size]
    pending = [it for it in mine if not fresh(it)]
    need_parent = dp_rank == 0 and (force or read_cached(parent_cache_path(score_dir), settings) is None)
    log.info("rank %d: %d of its %d entries to score (%d cached)", dp_rank, len(pending), len(mine),
             len(mine) - len(pending))
    if parallel.is_rank0():  # scores.json is stale until this run merges a new one
        (score_dir / DONE_MARKER).unlink(missing_ok=True)
    parallel.barrier()  # every rank has decided what to score before any cache file changes

    start = time.perf_counter()

    def on_done(entry: Entry, m: dict) -> None:
        if writer:
            write_cached(cache_path(score_dir, entry), settings, m, layer=entry[0], variant=entry[1])

    if pending or need_parent:
        scorer = ReplaceScorer(parent, variant_weights, max_entries=max_entries)
        _, parent_m = scorer.score(pending, batches, parent_metrics=need_parent, on_done=on_done, progress=progress)
        if need_parent and writer:
            write_cached(parent_cache_path(score_dir), settings, parent_m)
    log.info("rank %d scored %d entries in %.1f s", dp_rank, len(pending), time.perf_counter() - start)
    parallel.barrier()
    if not parallel.is_rank0():
        return None
    scores = merge(score_dir, entries, cfg.num_layers, settings, metrics)
    atomic_write_json(score_dir / "scores.json", scores)
    atomic_write_text(score_dir / DONE_MARKER, "ok\n")
    return scores


@dataclass
class ScoreConfig:
    """The score stage's settings (the `score` section of a run config, and `megatron-puzzle score`)."""

    tokens: int = 16384  # held-out tokens to score on
    batch_size: int = 8
    seq_len: int = 256
    coupled: bool = False  # score (attention, FFN) pairs of each layer together
    metrics: list[str] = field(default_factory=lambda: list(METRICS))  # written to scores.json
    variants: list[str] | None = None  # score only these variant names
    tensor_parallel: int = 1
    pipeline_parallel: int = 1  # the parent split over this many stages (world = TP x PP x DP)
    pp_first_stage_layers: int | None = None  # uneven split: layers on the first / last stage (None: even)
    pp_last_stage_layers: int | None = None
    max_entries: int = 64  # entries (built layers) kept in memory at once
    force: bool = False  # score again even what is cached
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict | None) -> "ScoreConfig":
        return from_section(cls, d, "score")


def run_score(run_dir: str | Path, cfg: ScoreConfig) -> dict | None:
    """The score stage: RUN/parent + RUN/library + RUN/data -> RUN/score/scores.json. Every rank works.

    Returns scores.json's content on global rank 0, None on the others.
    """
    from ..model import checkpoint, parallel
    from ..model.gpt import RuntimeOptions, check_layout, launch_world

    run = Path(run_dir)
    for sub, stage in (("parent", "import"), ("data", "data"), ("library", "bld")):
        if not is_done(run / sub):
            raise FileNotFoundError(f"{run / sub} is missing or unfinished; run `megatron-puzzle {stage}` first")
    space = lib.read_space(run / "library")
    # sizes the parent or a variant cannot be split by: one line on every rank, before any process group waits
    check_layout(checkpoint.load_config(run / "parent"), tp=cfg.tensor_parallel, pp=cfg.pipeline_parallel,
                 world=launch_world(), first_stage_layers=cfg.pp_first_stage_layers,
                 last_stage_layers=cfg.pp_last_stage_layers, what="parent", variants=space)
    batches = heldout_batches(run / "data", cfg.tokens, cfg.seq_len, cfg.batch_size)
    settings = Settings(tokens=sum(b[:, 1:].numel() for b in batches), seq_len=cfg.seq_len, batch_size=cfg.batch_size)
    parallel.init_distributed(tensor_parallel=cfg.tensor_parallel, pipeline_parallel=cfg.pipeline_parallel)
    parent = checkpoint.load(run / "parent", RuntimeOptions(first_stage_layers=cfg.pp_first_stage_layers,
                                                            last_stage_layers=cfg.pp_last_stage_layers))
    return score_space(parent, lib.library_weights(run / "library"), space, batches, run / "score", settings=settings,
                       metrics=cfg.metrics, coupled=cfg.coupled, only=cfg.variants, library_dir=run / "library",
                       max_entries=cfg.max_entries, force=cfg.force, progress=cfg.progress)
