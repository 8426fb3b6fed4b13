"""`megatron-puzzle run`: every stage, in order, over one run directory, resumable."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Callable

from ..model import parallel
from ..utils.io import atomic_write_text, read_json, sweep_before_start
from . import config as run_config
from .stages import STAGE, check_run_layout, is_complete, set_aside

log = logging.getLogger(__name__)


def run_pipeline(run_dir: str | Path, cfg: dict, *, from_stage: str | None = None, until: str | None = None,
                 on_stage: Callable[[str], None] | None = None) -> dict:
    """Run the stages not yet complete (all from `from_stage` on, if given); returns the timings.

    The resolved config is written to RUN/config.yaml. A rerun with a different config
    keeps finished stages (their outputs stay valid for what they were run with) and
    logs the difference; use `from_stage` to redo stages under the new config.

    Under torchrun every rank calls this. Rank 0 alone sweeps temporaries, writes the config and
    sets outputs aside; each stage runs on the ranks it declares (`stages.PIPELINE`), the others
    wait at a barrier, and every rank passes a barrier after each stage before checking its outputs.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    run = Path(run_dir)
    check_run_layout(run, cfg)  # parallel sizes the models cannot take: one line, before anything starts
    run.mkdir(parents=True, exist_ok=True)
    stages = run_config.STAGES
    if from_stage is not None and from_stage not in stages:
        raise run_config.ConfigError(f"unknown stage {from_stage!r}; stages: {', '.join(stages)}")
    if until is not None and until not in stages:
        raise run_config.ConfigError(f"unknown stage {until!r}; stages: {', '.join(stages)}")
    if (cfg.get("plan") or {}).get("check", True):
        from ..plan.plan import check_fits

        check_fits(cfg)  # on a GPU scenario, a config that does not fit stops here with the plan's answer
    cfg_path = run / "config.yaml"
    if parallel.world_size() > 1:
        parallel.init_process_group()  # the barriers between stages need it before any stage starts it
    rank0 = parallel.is_rank0()
    if rank0:
        if cfg_path.exists():
            import yaml

            old = yaml.safe_load(cfg_path.read_text())
            if old != cfg and from_stage is None:
                log.warning("RUN/config.yaml differs from this config; finished stages are kept as they are "
                            "(use --from STAGE to redo stages with the new settings)")
        sweep_before_start(run)  # temporaries of a killed run would otherwise sit beside the real results
        atomic_write_text(cfg_path, run_config.dump(cfg))
        if from_stage is not None:
            set_aside(run, stages[stages.index(from_stage):])
    parallel.barrier()  # no rank looks at the run directory before it is swept and set aside
    todo = stages[: stages.index(until) + 1] if until else stages

    timings: dict[str, float] = {}
    console = Console(stderr=True)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} stages"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False, disable=not rank0) as progress:
        task = progress.add_task("puzzle", total=len(todo))
        solo = False  # after a rank0-alone stage: rank 0 alone, in a world of one
        for stage in todo:
            if parallel.broadcast_from_rank0(is_complete(run, stage)):  # one decision for every rank
                log.info("stage %s: complete, skipped", stage)
                progress.advance(task)
                continue
            st = STAGE[stage]
            progress.update(task, description=f"stage {stage}")
            t0 = time.perf_counter()
            if on_stage is not None:
                on_stage(stage)
            if st.ranks == "rank0-alone" and not solo and parallel.world_size() > 1:
                parallel.shutdown()  # rank 0 goes on in a world of its own; the others are done
                solo = True
                if not rank0:
                    log.info("stage %s and later: rank 0 works alone; this rank is done", stage)
                    break
            with parallel.alone() if solo else contextlib.nullcontext():
                if st.ranks != "rank0" or rank0:
                    log.info("stage %s: running%s", stage, " on rank 0 alone" if solo else "")
                    st.run(run, cfg)
                else:
                    log.info("stage %s: rank 0 works, this rank waits", stage)
            parallel.barrier()  # every rank sees the stage's outputs, and no rank runs ahead of a rank-0 stage
            timings[stage] = time.perf_counter() - t0
            if not is_complete(run, stage):
                raise RuntimeError(f"stage {stage} returned without writing its outputs ({run})")
            log.info("stage %s: done in %.1f s", stage, timings[stage])
            progress.advance(task)
    if rank0:
        _record_timings(run, timings)
    return timings


def _record_timings(run: Path, timings: dict[str, float]) -> None:
    from ..utils.io import atomic_write_json

    path = run / "timings.json"
    old = read_json(path) if path.exists() else {}
    old.update({k: round(v, 2) for k, v in timings.items()})
    atomic_write_json(path, old)


def summary(run_dir: str | Path) -> str:
    """One screen: what the run produced (from report.json and realize.json when present)."""
    run = Path(run_dir)
    lines = [f"run directory: {run}"]
    rep = run / "report.json"
    if rep.exists():
        r = read_json(rep)
        p, c = r.get("parent", {}), r.get("child", {})

        def row(name, key, fmt="{:.3f}", scale=1.0):
            pv, cv = (v * scale if isinstance(v, (int, float)) else v for v in (p.get(key), c.get(key)))
            f = lambda v: fmt.format(v) if isinstance(v, (int, float)) else "-"  # noqa: E731
            return f"  {name:28s} {f(pv):>12s} {f(cv):>12s}"

        lines += [f"  {'':28s} {'parent':>12s} {'child':>12s}",
                  row("decode tokens/s", "decode_tokens_per_s", "{:.1f}"),
                  row("prefill tokens/s", "prefill_tokens_per_s", "{:.1f}"),
                  row("parameters (M)", "params", "{:.1f}", 1e-6),
                  row("memory (MiB)", "memory_bytes", "{:.1f}", 1 / 2**20),
                  row("next-token accuracy", "next_token_accuracy"),
                  row("KL to parent", "kl_to_parent", "{:.4f}"),
                  row("LM loss", "lm_loss"),
                  row("top-1 agreement", "top1_agreement")]
        if "decode_speedup" in c:
            lines.append(f"  decode speedup: {c['decode_speedup']:.2f}x")
        lines.append(f"report: {run / 'report.md'}")
    timings = run / "timings.json"
    if timings.exists():
        t = read_json(timings)
        lines.append("stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()))
    return "\n".join(lines)
