"""The realize stage: a search solution + the block library -> the child checkpoint.

The child's weights are exactly the library entries of its chosen variants (and the
parent's embeddings, final norm and LM head). After saving, the child is measured
with the runtime that produced the variant costs and scored on held-out tokens, and
both are written next to what the search predicted (RUN/child/realize.json).
"""

from __future__ import annotations

import logging
import shutil
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


def measure_model(cfg: ModelConfig, scenario, warmup: int = 2, repeats: int = 5) -> dict[str, float]:
    """Whole-model prefill time and decode-step time at `scenario`, with the variant-cost runtime."""
    from ..cost.measure import MeasuredCostModel

    costs = MeasuredCostModel(cfg, scenario, warmup=warmup, repeats=repeats)
    prefill = costs.time(costs.runtime.model_job(None, "prefill"))
    decode = costs.time(costs.runtime.model_job(None, "decode"))
    s = scenario
    total = prefill + s.decode_len * decode
    return {"prefill_time_s": prefill, "decode_time_s": decode, "throughput": s.batch_size * s.decode_len / total,
            "decode_throughput": s.batch_size / decode}


def realize(run_dir: str | Path, solution: int = 0, *, evaluate: bool = True, eval_tokens: int = 4096,
            seq_len: int = 128, batch_size: int = 8, warmup: int = 2, repeats: int = 5, force: bool = False,
            speed=None) -> dict:
    """Write RUN/child from a solution; returns the realize report (predicted vs measured)."""
    from ..convert.megatron_io import TOKENIZER_DIR
    from ..convert.megatron_layout import load_canonical
    from ..library import Library
    from ..model import checkpoint
    from ..model.gpt import build_model
    from ..model.parallel import init_distributed

    run = Path(run_dir)
    out = run / "child"
    if is_done(out) and (out / "realize.json").exists() and not force:
        log.info("%s already realized; keeping it", out)
        return read_json(out / "realize.json")
    child, sol = child_config(run, solution)
    log.info("realizing solution %d:\n%s", solution, describe(child.blocks))
    tensors = Library(run / "library").assemble(child)
    init_distributed(1)
    model = build_model(child)
    load_canonical(model, tensors)
    checkpoint.save(model, out, extra={"stage": "realize", "solution": solution, "variants": sol.get("variants")})
    tok = run / "parent" / TOKENIZER_DIR
    if tok.is_dir() and not (out / TOKENIZER_DIR).exists():
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
            report.update(child_vs_parent(child, checkpoint.load_config(run / "parent"), scenario, speed))
    if evaluate:
        from ..score.evaluate import evaluate_model
        from ..score.stage import heldout_batches

        parent = checkpoint.load(run / "parent")
        batches = heldout_batches(run / "data", eval_tokens, seq_len, batch_size)
        with torch.no_grad():
            report["measured_quality"] = evaluate_model(model, parent, batches)
    atomic_write_json(out / "realize.json", report)
    _log_report(report)
    return report


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
