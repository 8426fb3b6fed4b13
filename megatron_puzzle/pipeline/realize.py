"""The realize stage: a search solution + the block library -> the child checkpoint.

The child's weights are exactly the library entries of its chosen variants (and the
parent's embeddings, final norm and LM head). After saving, the child is measured
with the runtime that produced the variant costs and scored on held-out tokens, and
both are written next to what the search predicted (RUN/child/realize.json).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..arch import ModelConfig, blocks_from_json, describe
from ..utils.io import atomic_write_json, is_done, read_json

log = logging.getLogger(__name__)


class RealizeError(ValueError):
    """A solution that cannot be realized; the message names the problem and the fix."""


def child_config(run: Path, solution: int = 0) -> tuple[ModelConfig, dict[str, Any]]:
    """The child's ModelConfig for solution number `solution` of RUN/search/solutions.json."""
    from ..model import checkpoint

    path = run / "search" / "solutions.json"
    if not path.exists():
        raise RealizeError(f"{path} does not exist; run `megatron-puzzle search --run-dir {run}` first")
    sols = read_json(path).get("solutions", [])
    if not 0 <= solution < len(sols):
        raise RealizeError(f"solution {solution} does not exist: {path} holds {len(sols)} solution(s) (0..{len(sols) - 1})")
    sol = sols[solution]
    parent = checkpoint.load_config(run / "parent")
    blocks = blocks_from_json(sol["blocks"], num_layers=parent.num_layers, hidden_size=parent.hidden_size,
                              num_attention_heads=parent.num_attention_heads, num_kv_heads=parent.num_kv_heads,
                              intermediate_size=parent.intermediate_size)
    return parent.with_blocks(blocks), sol


@dataclass
class RealizeConfig:
    """The realize stage's settings: which solution, and how the child is checked after saving."""

    solution: int = 0  # index into RUN/search/solutions.json
    evaluate: bool = True  # score the child on held-out tokens
    eval_tokens: int = 4096
    seq_len: int = 128
    batch_size: int = 8
    warmup: int = 2  # timing of the child and the parent (rank 0)
    repeats: int = 5
    force: bool = False  # realize again even if RUN/child is complete
    tensor_parallel: int = 1  # the child checkpoint's TP (each rank writes its shards)
    pipeline_parallel: int = 1  # the child split over this many stages (each builds and writes its layers)
    pp_first_stage_layers: int | None = None  # uneven split: layers on the first / last stage (None: even)
    pp_last_stage_layers: int | None = None


def run_realize(run_dir: str | Path, cfg: RealizeConfig) -> dict:
    """The realize stage: RUN/search + RUN/library -> RUN/child (+ realize.json). Every rank works."""
    return realize(run_dir, **asdict(cfg))


def realize(run_dir: str | Path, solution: int = 0, *, evaluate: bool = True, eval_tokens: int = 4096,
            seq_len: int = 128, batch_size: int = 8, warmup: int = 2, repeats: int = 5, force: bool = False,
            tensor_parallel: int = 1, pipeline_parallel: int = 1, pp_first_stage_layers: int | None = None,
            pp_last_stage_layers: int | None = None, speed=None, target: float | None = None,
            quality: dict | None = None) -> dict:
    """Write RUN/child from a solution; returns the realize report (predicted vs measured).

    At `tensor_parallel` > 1 (under torchrun) each rank reads the library one layer at a time,
    keeps its own partition and writes its shards of the checkpoint. At `pipeline_parallel` > 1
    each rank builds only its stage of the child (Megatron-Core's split, even or
    `pp_first/last_stage_layers`) and reads only that stage's layers; the ranks write one
    distributed checkpoint together, which loads at any layout. The held-out evaluation then
    runs the child and the parent through the stages (metrics on the last, shared with all).
    The child's speed is measured on rank 0 alone (other ranks timing at once would slow it) and
    shared, so every rank returns the same report. Given a `target` decode speedup, its rounds run
    until the child's interval lies wholly above or below it (or `speed.max_rounds`). `quality`: the held-out
    metrics `measure_candidates` already took of this solution on the same tokens, kept instead of loading the
    parent again to evaluate the same model (one parent load less per try on a large parent)."""
    from ..convert.megatron_io import TOKENIZER_DIR
    from ..model import checkpoint
    from ..model.gpt import RuntimeOptions
    from ..model.parallel import barrier, broadcast_from_rank0, init_distributed, is_rank0

    run = Path(run_dir)
    out = run / "child"
    if is_done(out) and (out / "realize.json").exists() and not force:
        log.info("%s already realized; keeping it", out)
        return read_json(out / "realize.json")
    child, sol = child_config(run, solution)
    lib = _checked_library(run, child, tensor_parallel, pipeline_parallel, pp_first_stage_layers, pp_last_stage_layers)
    log.info("realizing solution %d:\n%s", solution, describe(child.blocks))
    init_distributed(tensor_parallel, pipeline_parallel=pipeline_parallel)
    opts = RuntimeOptions(first_stage_layers=pp_first_stage_layers, last_stage_layers=pp_last_stage_layers)
    model = assembled_child(lib, child, opts)
    checkpoint.save(model, out, extra={"stage": "realize", "solution": solution, "variants": sol.get("variants")})
    tok = run / "parent" / TOKENIZER_DIR
    if is_rank0() and tok.is_dir() and not (out / TOKENIZER_DIR).exists():  # one copy, not one per rank
        shutil.copytree(tok, out / f".{TOKENIZER_DIR}.tmp")
        (out / f".{TOKENIZER_DIR}.tmp").rename(out / TOKENIZER_DIR)

    report: dict[str, Any] = {"solution": solution, "variants": sol.get("variants"),
                              "predicted": {"objective": sol.get("objective"), **(sol.get("totals") or {})}}
    costs_path = run / "measure" / "costs.json"
    if costs_path.exists():
        from ..cost.costs import load_costs

        scenario = load_costs(costs_path).scenario
        if scenario.is_local:  # the run's one speed (report/speed.py), as the report will measure it
            from ..report.speed import SpeedConfig, child_vs_parent

            speed = speed or SpeedConfig(warmup=warmup, min_rounds=max(2, repeats), max_rounds=max(2, repeats))
            measured = (child_vs_parent(child, checkpoint.load_config(run / "parent"), scenario, speed, target)
                        if is_rank0() else None)
            report.update(broadcast_from_rank0(measured) or {})
    if evaluate and quality is not None:
        report["measured_quality"] = dict(quality)
    elif evaluate:
        from ..score.evaluate import evaluate_model
        from ..score.stage import heldout_batches

        parent = checkpoint.load(run / "parent", opts)  # the same stage split as the child
        batches = heldout_batches(run / "data", eval_tokens, seq_len, batch_size)
        with torch.no_grad():
            report["measured_quality"] = evaluate_model(model, parent, batches)
    if is_rank0():
        atomic_write_json(out / "realize.json", report)
    barrier()  # realize.json (the stage's last output) is there for every rank
    _log_report(report)
    return report


def _checked_library(run: Path, child: ModelConfig, tp: int, pp: int, first: int | None, last: int | None):
    """RUN's library, once the sizes the child cannot be split by and the library entries it lacks are ruled
    out: one line on every rank, before any process group waits (the layout first, before the library is read)."""
    from ..library import Library
    from ..model.gpt import check_layout, launch_world

    check_layout(child, tp=tp, pp=pp, world=launch_world(), first_stage_layers=first, last_stage_layers=last,
                 what="child")
    lib = Library(run / "library")
    lib.check_child(child)
    return lib


def assembled_child(lib, child: ModelConfig, opts):
    """This rank's stage of `child`, its weights the library entries of its variants (and the parent's
    non-block weights), read one layer at a time."""
    from ..convert.megatron_layout import load_layers
    from ..model.gpt import build_model

    model = build_model(child, opts)
    load_layers(model, lib.non_block, lambda i: lib.child_layer(child, i))
    return model


def measure_candidates(run_dir: str | Path, *, eval_tokens: int = 512, seq_len: int = 128, batch_size: int = 4,
                       tensor_parallel: int = 1, pipeline_parallel: int = 1, pp_first_stage_layers: int | None = None,
                       pp_last_stage_layers: int | None = None) -> list[dict[str, Any]]:
    """Held-out KL to the parent (and the other metrics) of every solution in RUN/search/solutions.json,
    each assembled from the library in memory (nothing saved), on every rank alike.

    The search's objective sums 1-block scores; the assembled child's KL is what those sums
    estimate, so where several candidates meet the same constraints this one decides
    (`realize.solution: best`)."""
    from ..model import checkpoint
    from ..model.gpt import RuntimeOptions
    from ..model.parallel import init_distributed
    from ..score.evaluate import evaluate_model, parent_references
    from ..score.stage import heldout_batches

    run = Path(run_dir)
    sols = read_json(run / "search" / "solutions.json").get("solutions", [])
    init_distributed(tensor_parallel, pipeline_parallel=pipeline_parallel)
    opts = RuntimeOptions(first_stage_layers=pp_first_stage_layers, last_stage_layers=pp_last_stage_layers)
    parent = checkpoint.load(run / "parent", opts)
    batches = heldout_batches(run / "data", eval_tokens, seq_len, batch_size)
    # whole models reuse the parent's forwards over the candidates; pipeline stages run it alongside
    refs = parent_references(parent, batches) if pipeline_parallel == 1 else None
    out = []
    for i in range(len(sols)):
        child, sol = child_config(run, i)
        lib = _checked_library(run, child, tensor_parallel, pipeline_parallel, pp_first_stage_layers,
                               pp_last_stage_layers)
        model = assembled_child(lib, child, opts)
        with torch.no_grad():
            q = evaluate_model(model, parent, batches, refs)
        del model
        totals = sol.get("totals") or {}
        out.append({"solution": i, "attention_floor": sol.get("attention_floor"),
                    "attention_layers": totals.get("attention_layers"), "predicted_objective": sol.get("objective"),
                    "predicted_decode_throughput": totals.get("decode_throughput"), **q})
        log.info("candidate %d (attention floor %s, %s attention layers): summed 1-block KL %.4f, measured KL %.4f",
                 i, sol.get("attention_floor"), totals.get("attention_layers"), sol.get("objective") or float("nan"),
                 q["kl_div"])
    return out


def _log_report(r: dict) -> None:
    p, m = r.get("predicted", {}), r.get("measured", {})
    if m:
        log.info("throughput: predicted %.1f tok/s, measured %.1f tok/s (%.2fx the parent)",
                 p.get("throughput", float("nan")), m["throughput"], m.get("speedup", float("nan")))
        log.info("decode throughput: predicted %.1f tok/s, measured %.1f tok/s (%.2fx the parent, interval "
                 "[%.2f, %.2f])", p.get("decode_throughput", float("nan")), m["decode_throughput"],
                 m.get("decode_speedup", float("nan")), m.get("decode_speedup_low", float("nan")),
                 m.get("decode_speedup_high", float("nan")))
    q = r.get("measured_quality")
    if q:
        log.info("held-out KL to parent: predicted (sum of 1-block KL) %.4f, measured %.4f",
                 p.get("objective") or float("nan"), q.get("kl_div", float("nan")))
