"""The stages of `megatron-puzzle run`, in order, over one run directory.

Each stage is a function of (run_dir, config) that calls its stage's entry function
with a typed config (the same one its CLI command calls), and declares the ranks it
works on (`PIPELINE`). `is_complete` says whether its outputs are all there (the
`done` marker each stage writes last), so a killed run resumes at the first
incomplete stage. Stages resume inside themselves too (BLD entries, score cache,
GKD checkpoints).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..utils.io import is_done
from .config import STAGES

log = logging.getLogger(__name__)

# What each stage writes under RUN/: a directory finished by its `done` marker, or a file
# written atomically as the stage's last step.
OUTPUTS = {
    "import": "parent", "data": "data", "init": "init", "bld": "library", "score": "score",
    "measure": "measure", "search": "search", "realize": "child", "gkd": "gkd", "export": "export",
    "eval": "report.json",
}
LAST_FILE = {"realize": "child/realize.json", "eval": "report.json"}
# What a stage writes besides OUTPUTS: caches and side products that `--from` must set aside
# too, or a redone stage would reuse them (the eval stage's baselines and cached metrics).
ALSO_WRITES = {"eval": ("report.md", "architecture.png", "comparison.png", "pareto.png", "eval", "baselines")}


def is_complete(run: Path, stage: str) -> bool:
    if stage in LAST_FILE:
        return (run / LAST_FILE[stage]).exists()
    return is_done(run / OUTPUTS[stage])


def _parent_source(cfg: dict) -> Path:
    from ..convert.hf_io import default_parent_path

    return default_parent_path() if cfg["parent"] == "default" else Path(cfg["parent"])


def check_run_layout(run: Path, cfg: dict) -> None:
    """The run's TP / PP / world size against the parent and every variant of the search space, before
    any stage starts: pure arithmetic on configs, the same error on every rank. The parent is read from
    RUN/parent once imported, else from the HF directory's config.json (a GGUF parent is checked by the
    import stage itself, which reads its header before building anything)."""
    from dataclasses import replace

    from ..arch.search_space import configured_search_space
    from ..model import checkpoint
    from ..model.gpt import check_layout, launch_world
    from ..utils.io import is_done

    if is_done(run / "parent"):
        parent = checkpoint.load_config(run / "parent")
    else:
        source = _parent_source(cfg)
        if not (source.is_dir() and (source / "config.json").exists()):
            return
        from ..convert.hf_io import _read_hf_config

        parent = _read_hf_config(source)
        if cfg.get("parent_layers"):
            parent = replace(parent, num_layers=cfg["parent_layers"], blocks=parent.blocks[:cfg["parent_layers"]])
    try:
        space = configured_search_space(parent, cfg.get("search_space"))
    except ValueError:  # the init stage names a search space that does not fit the parent
        space = None
    gkd = cfg.get("gkd") or {}
    check_layout(parent, tp=cfg["tensor_parallel"], pp=cfg.get("pipeline_parallel", 1), world=launch_world(),
                 fp8=bool(gkd.get("fp8")), first_stage_layers=gkd.get("pp_first_stage_layers"),
                 last_stage_layers=gkd.get("pp_last_stage_layers"), what="parent", variants=space)


def stage_import(run: Path, cfg: dict) -> None:
    from ..convert.megatron_io import import_hf

    import_hf(_parent_source(cfg), run / "parent", tp=cfg["tensor_parallel"], overwrite=True,
              layers=cfg["parent_layers"])


def stage_data(run: Path, cfg: dict) -> None:
    from ..data.stage import DataConfig, run_data

    run_data(run, DataConfig.from_dict(dict(cfg["data"], seed=cfg["seed"], overwrite=True)))


def stage_init(run: Path, cfg: dict) -> None:
    from ..distill.bld_run import RunConfig, run_init

    run_init(run, RunConfig.from_dict(cfg))


def stage_bld(run: Path, cfg: dict) -> None:
    from ..distill.bld_run import RunConfig, run_bld

    run_bld(run, RunConfig.from_dict(cfg))


def stage_score(run: Path, cfg: dict) -> None:
    from ..score.stage import ScoreConfig, run_score

    run_score(run, ScoreConfig.from_dict(dict(cfg["score"], tensor_parallel=cfg["tensor_parallel"],
                                              pipeline_parallel=cfg.get("pipeline_parallel", 1))))


def stage_measure(run: Path, cfg: dict) -> None:
    from ..cost.stage import MeasureConfig, run_measure

    run_measure(run, MeasureConfig.from_dict(dict(cfg["measure"], scenario=cfg["scenario"])))


def stage_search(run: Path, cfg: dict) -> None:
    from ..search.run import SearchConfig, run_search

    s = cfg["search"]
    run_search(run, SearchConfig(constraints=list(s["constraints"]), objective=s["objective"],
                                 num_solutions=s["num_solutions"], min_diff=s["min_diff"], pareto=s.get("pareto"),
                                 seed=cfg["seed"], attention_floors=list(s.get("attention_floors") or [])))


def stage_realize(run: Path, cfg: dict) -> None:
    from .aim import realize_on_target

    realize_on_target(run, cfg)


def stage_gkd(run: Path, cfg: dict) -> None:
    from ..distill.gkd import GKDConfig, run_gkd

    run_gkd(run, GKDConfig.from_dict(dict(cfg["gkd"], tp=cfg["tensor_parallel"],
                                          pp=cfg.get("pipeline_parallel", 1), seed=cfg["seed"])))


def stage_export(run: Path, cfg: dict) -> None:
    from ..convert.megatron_io import export_hf
    from ..model.parallel import barrier, is_rank0

    if is_rank0():
        shutil.rmtree(run / "export", ignore_errors=True)
    barrier()
    export_hf(run / "gkd" / "final", run / "export", tp=cfg["tensor_parallel"])


def stage_eval(run: Path, cfg: dict) -> None:
    from ..report.make import make_report

    make_report(run, cfg)


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline and the ranks it works on.

    `ranks`: "all" (every rank works; the stage's collectives need them all), "rank0" (global rank 0
    works, the others wait at a barrier; the stage must make no collective call) or "rank0-alone"
    (the launch's process group is shut down, rank 0 works in a world of its own and the other ranks
    are done: for a last stage whose work is not split over ranks but that builds models).
    """

    name: str
    run: Callable[[Path, dict], None]
    ranks: str


PIPELINE: list[Stage] = [
    Stage("import", stage_import, "all"),  # a distributed checkpoint save; rank 0 writes the tokenizer
    Stage("data", stage_data, "all"),  # ranks tokenize shares of the corpus; rank 0 writes
    Stage("init", stage_init, "all"),  # entries dealt over ranks
    Stage("bld", stage_bld, "all"),  # entries dealt over data-parallel ranks, TP inside
    Stage("score", stage_score, "all"),  # entries dealt over data-parallel ranks; rank 0 merges
    Stage("measure", stage_measure, "rank0"),  # timing: ranks timing at once would measure each other
    Stage("search", stage_search, "rank0"),  # one MIP solve
    Stage("realize", stage_realize, "all"),  # checkpoint save and evaluation; rank 0 times and writes realize.json
    Stage("gkd", stage_gkd, "all"),  # Megatron-Core data/tensor parallel training
    Stage("export", stage_export, "all"),  # a distributed checkpoint load; rank 0 writes
    Stage("eval", stage_eval, "rank0-alone"),  # timings pick the baselines: one process decides and measures
]
STAGE = {s.name: s for s in PIPELINE}
RUNNERS: dict[str, Callable[[Path, dict], None]] = {s.name: s.run for s in PIPELINE}
assert list(RUNNERS) == STAGES and all(s.ranks in ("all", "rank0", "rank0-alone") for s in PIPELINE)
# after a rank0-alone stage the other ranks have left: only such stages may follow it
assert all(b.ranks == "rank0-alone" for a, b in zip(PIPELINE, PIPELINE[1:]) if a.ranks == "rank0-alone")


def set_aside(run: Path, stages: list[str]) -> Path | None:
    """Move the outputs of `stages` to RUN/previous/<time>/ (for --from): nothing computed is deleted."""
    paths = {s: [p for p in (OUTPUTS[s], *ALSO_WRITES.get(s, ())) if (run / p).exists()] for s in stages}
    moved = [s for s in stages if paths[s]]
    if not moved:
        return None
    dest = run / "previous" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for s in moved:
        for p in paths[s]:
            shutil.move(str(run / p), str(dest / p))
    log.info("moved the outputs of %s to %s", ", ".join(moved), dest)
    return dest
