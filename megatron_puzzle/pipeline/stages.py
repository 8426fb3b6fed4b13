"""The stages of `megatron-puzzle run`, in order, over one run directory.

Each stage is a function of (run_dir, config); `is_complete` says whether its
outputs are all there (the `done` marker each stage writes last), so a killed run
resumes at the first incomplete stage. Stages resume inside themselves too (BLD
entries, score cache, GKD checkpoints).
"""

from __future__ import annotations

import logging
import shutil
import time
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


def stage_import(run: Path, cfg: dict) -> None:
    from ..convert.megatron_io import import_hf

    src = _parent_source(cfg)
    if cfg["parent_layers"]:
        _import_truncated(src, run / "parent", cfg["parent_layers"], cfg["tensor_parallel"])
    else:
        import_hf(src, run / "parent", tp=cfg["tensor_parallel"], overwrite=True)


def _import_truncated(src: Path, out: Path, layers: int, tp: int) -> None:
    """Import only the first `layers` layers of a parent (with its embeddings, final norm and head)."""
    from dataclasses import replace

    from ..convert.hf_io import load_tokenizer, read_hf_checkpoint
    from ..convert.megatron_io import TOKENIZER_DIR
    from ..convert.megatron_layout import load_canonical
    from ..model import checkpoint
    from ..model.gpt import build_model
    from ..model.parallel import init_distributed

    cfg, tensors = read_hf_checkpoint(src)
    if layers > cfg.num_layers:
        raise ValueError(f"parent_layers={layers} but the parent has only {cfg.num_layers} layers")
    cfg = replace(cfg, num_layers=layers, blocks=cfg.blocks[:layers])
    keep = {k: v for k, v in tensors.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    init_distributed(tp)
    model = build_model(cfg)
    load_canonical(model, keep)
    checkpoint.save(model, out, extra={"source": str(src), "parent_layers": layers})
    tok = load_tokenizer(src)
    tmp = out / f".{TOKENIZER_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    tmp.rename(out / TOKENIZER_DIR)


def stage_data(run: Path, cfg: dict) -> None:
    from ..convert.megatron_io import load_checkpoint_tokenizer
    from ..data import build_token_shards

    d = cfg["data"]
    tok = load_checkpoint_tokenizer(run / "parent")
    if tok is None:
        raise ValueError(f"{run / 'parent'} has no tokenizer; re-import the parent from a checkpoint with one")
    build_token_shards(run / "data", tok, source=d["source"], train_tokens=d["train_tokens"],
                       calib_tokens=d["calib_tokens"], heldout_tokens=d["heldout_tokens"], seed=cfg["seed"],
                       overwrite=True)


def stage_init(run: Path, cfg: dict) -> None:
    from ..distill.bld_run import build_library

    build_library(run, run / "config.yaml", init_only=True)


def stage_bld(run: Path, cfg: dict) -> None:
    from ..distill.bld_run import build_library

    build_library(run, run / "config.yaml")


def stage_score(run: Path, cfg: dict) -> None:
    from ..cli import main

    s = cfg["score"]
    argv = ["score", "--run-dir", str(run), "--tokens", str(s["tokens"]), "--batch-size", str(s["batch_size"]),
            "--seq-len", str(s["seq_len"]), "--tensor-parallel", str(cfg["tensor_parallel"])]
    if s.get("coupled"):
        argv.append("--coupled")
    _check(main(argv), "score")


def stage_measure(run: Path, cfg: dict) -> None:
    from ..cli import main
    from ..utils.io import atomic_write_json

    m, scenario = cfg["measure"], cfg["scenario"]
    if isinstance(scenario, dict):  # the measure command takes a preset or a file
        path = run / "scenario.json"
        atomic_write_json(path, scenario)
        scenario = str(path)
    argv = ["measure", "--run-dir", str(run), "--scenario", str(scenario),
            "--warmup", str(m.get("warmup", 2)), "--repeats", str(m.get("repeats", 5))]
    if m.get("source"):
        argv += ["--source", str(m["source"])]
    if m.get("gpu"):
        argv += ["--gpu", str(m["gpu"])]
    _check(main(argv), "measure")


def stage_search(run: Path, cfg: dict) -> None:
    from ..search.run import search_run_dir

    s = cfg["search"]
    search_run_dir(run, s["constraints"], s["objective"], num_solutions=s["num_solutions"],
                   min_diff=s["min_diff"], pareto=s.get("pareto"), seed=cfg["seed"])


def stage_realize(run: Path, cfg: dict) -> None:
    from .aim import realize_on_target

    realize_on_target(run, cfg)


def stage_gkd(run: Path, cfg: dict) -> None:
    from ..distill.gkd import GKDConfig, run_gkd

    run_gkd(run, GKDConfig.from_dict(dict(cfg["gkd"], tp=cfg["tensor_parallel"], seed=cfg["seed"])))


def stage_export(run: Path, cfg: dict) -> None:
    from ..convert.megatron_io import export_hf

    shutil.rmtree(run / "export", ignore_errors=True)
    export_hf(run / "gkd" / "final", run / "export", tp=cfg["tensor_parallel"])


def stage_eval(run: Path, cfg: dict) -> None:
    from ..report.make import make_report

    make_report(run, cfg)


def _check(rc: int, stage: str) -> None:
    if rc:
        raise RuntimeError(f"stage {stage} failed (exit code {rc}); see the message above")


RUNNERS: dict[str, Callable[[Path, dict], None]] = {
    "import": stage_import, "data": stage_data, "init": stage_init, "bld": stage_bld, "score": stage_score,
    "measure": stage_measure, "search": stage_search, "realize": stage_realize, "gkd": stage_gkd,
    "export": stage_export, "eval": stage_eval,
}
assert list(RUNNERS) == STAGES


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
