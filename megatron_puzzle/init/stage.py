"""The `init` stage: training-free initial weights of every (layer, variant), written as a library.

Calibration statistics are gathered once (every rank runs the same calibration
batches through the parent), then the entries are dealt round-robin over all ranks.
The output has the block-library layout (docs/formats.md), so BLD and tools read it
with `Library`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from ..arch.shapes import non_block_shapes
from ..library import write_entry, write_non_block, write_space
from ..library.store import entry_dir
from ..model import parallel
from ..utils.io import DONE_MARKER, atomic_write_text
from .calibration import collect_calibration
from .variants import InitConfig, init_variant

log = logging.getLogger(__name__)


def init_settings(init: InitConfig, seed: int) -> str:
    return hashlib.sha256(json.dumps({"init": init.to_dict(), "seed": seed}, sort_keys=True).encode()).hexdigest()[:16]


def is_complete(init_dir: str | Path, space: Sequence[Sequence[str]], init: InitConfig, seed: int = 0) -> bool:
    """True when `init_dir` holds every entry of `space`, made with these settings (a rerun keeps it)."""
    root = Path(init_dir)
    if not (root / DONE_MARKER).exists():
        return False
    meta = json.loads((root / "space.json").read_text())
    return meta.get("settings", {}).get("settings") == init_settings(init, seed) and \
        meta["layers"] == [list(n) for n in space]


def run_init(parent_model, parent_tensors: Mapping[str, torch.Tensor], init_dir: str | Path, space: Sequence[Sequence[str]],
             init: InitConfig, calib_batches: Iterable[torch.Tensor], seed: int = 0, progress: bool = True) -> Path:
    """Write the initial weights of every variant of `space` into `init_dir` (skips finished entries).

    `parent_tensors`: the parent's canonical tensors, a dict or a `CanonicalView` (read one layer at
    a time, in layer order; at TP > 1 every rank steps through the layers together, since each read
    gathers over the TP group, while the entries are dealt over all ranks)."""
    cfg = parent_model.puzzle_config
    root = Path(init_dir)
    settings = init_settings(init, seed)
    rank, world = parallel.rank(), parallel.world_size()
    if is_complete(root, space, init, seed):
        log.info("init: %s is complete; keeping it", root)
        return root
    # read on every rank: a `CanonicalView` at TP > 1 gathers over the TP group
    non_block = {k: parent_tensors[k] for k in non_block_shapes(cfg)}
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        (root / DONE_MARKER).unlink(missing_ok=True)
        write_space(root, [list(n) for n in space], [[] for _ in space], cfg,
                    {"init": init.to_dict(), "seed": seed, "settings": settings})
        write_non_block(root, cfg, non_block)
    del non_block
    parallel.barrier()
    entries = [(i, n) for i, names in enumerate(space) for n in names]
    need_channels, need_lstsq = init.needs()
    stats = None
    if need_channels or need_lstsq:
        stats = collect_calibration(parent_model, parent_tensors, calib_batches,
                                    need_channels=need_channels, need_lstsq=need_lstsq, progress=progress)
    in_step = parallel.tp_size() > 1 and hasattr(parent_tensors, "layer")
    for k, (i, name) in enumerate(entries):
        if in_step and (k == 0 or entries[k - 1][0] != i):
            parent_tensors.layer(i)  # every rank of a TP group gathers each layer together, in order
        if k % world != rank:
            continue
        path = entry_dir(root, i, name)
        if (path / DONE_MARKER).exists() and json.loads((path / "stats.json").read_text()).get("settings") == settings:
            continue
        tensors, method = init_variant(cfg, parent_tensors, i, name, init, stats, seed)
        write_entry(root, i, name, tensors, {"init": method, "settings": settings,
                                            "calib_tokens": stats.tokens if stats else 0})
    parallel.barrier()
    if rank == 0:
        atomic_write_text(root / DONE_MARKER, "ok\n")
    log.info("init: %d entries in %s", len(entries), root)
    return root
