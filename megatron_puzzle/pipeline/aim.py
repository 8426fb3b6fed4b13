"""Aim the search at the measured speed: solve, realize, measure; re-solve tighter while the child misses.

The search constrains the child's predicted speed (per-variant costs summed); the realized
child's measured speed (report/speed.py, the run's one speed) lands off it by a margin
that depends on the machine and the architecture. When the lower end of the measured
decode-speedup interval misses `realize.target`, the ratio of predicted to measured speed
calibrates the next ask: the search's relative decode-throughput bound becomes the
solution's predicted speedup x target / measured low end (x 1.01), and the new solution is
realized and measured again, up to `realize.max_tries` times. Every try is logged and kept
in RUN/child/aim.json.

With `realize.solution: best`, each try first assembles every candidate of RUN/search (the
search's solutions and its attention-floor candidates) and realizes the one with the lowest
measured held-out KL; the candidates' measurements are kept in aim.json too.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from ..utils.io import atomic_write_json, read_json

log = logging.getLogger(__name__)

QUANTITY = "decode_throughput"


def predicted_speedup(solutions: dict, solution: int = 0) -> float | None:
    """The search's predicted decode tokens/s of a solution over the parent's (None without a parent)."""
    parent = (solutions.get("parent") or {}).get("totals", {}).get(QUANTITY)
    child = solutions["solutions"][solution].get("totals", {}).get(QUANTITY)
    return child / parent if parent and child else None


def tightened(constraints: list[str], ask: float) -> list[str]:
    """`constraints` with every relative lower bound on decode throughput replaced by `ask` x."""
    from ..search.constraints import ALIASES, parse_constraint

    keep = []
    for text in constraints:
        c = parse_constraint(text)
        if ALIASES.get(c.quantity, c.quantity) == QUANTITY and c.upper is None and c.lower is not None \
                and c.lower.relative:
            continue
        keep.append(text)
    return keep + [f"{QUANTITY}>={math.ceil(ask * 1000) / 1000:.3f}x"]


def choose_solution(run: Path, cfg: dict) -> tuple[int, list[dict] | None]:
    """The solution to realize: `realize.solution`, or with `best` the one whose assembled child has the
    lowest measured held-out KL (with its candidates' measurements; None when there was no choice)."""
    r, sc = cfg["realize"], cfg["score"]
    if r.get("solution", 0) != "best":
        return int(r.get("solution", 0)), None
    n = len(read_json(run / "search" / "solutions.json").get("solutions", []))
    if n < 2:
        return 0, None
    from .realize import measure_candidates

    table = measure_candidates(run, eval_tokens=sc["tokens"], seq_len=sc["seq_len"], batch_size=sc["batch_size"],
                               tensor_parallel=cfg["tensor_parallel"],
                               pipeline_parallel=cfg.get("pipeline_parallel", 1),
                               pp_first_stage_layers=r.get("pp_first_stage_layers"),
                               pp_last_stage_layers=r.get("pp_last_stage_layers"))
    best = min(table, key=lambda c: c["kl_div"])["solution"]
    log.info("realize: %d candidates; solution %d has the lowest measured KL", n, best)
    return best, table


def candidate_quality(candidates: list[dict] | None, solution: int) -> dict | None:
    """The held-out metrics `measure_candidates` took of `solution` (None without a candidate table); realize
    evaluates with the same tokens, so it keeps these instead of evaluating again."""
    from ..model.metrics import ALL_METRICS

    row = next((c for c in candidates or [] if c["solution"] == solution), None)
    return None if row is None else {k: row[k] for k in (*ALL_METRICS, "tokens")}


def realize_on_target(run: Path, cfg: dict) -> dict:
    """The realize stage with its aim loop; returns the last realize report (RUN/child/realize.json)."""
    from ..report.speed import SpeedConfig
    from ..search.problem import SearchError
    from ..search.run import search_run_dir
    from ..model.parallel import barrier, broadcast_from_rank0, is_rank0
    from .realize import realize

    r, s, sc = cfg["realize"], cfg["search"], cfg["score"]
    target, tries = r.get("target"), max(1, int(r.get("max_tries", 1)))
    speed = SpeedConfig.from_dict(r.get("speed"))
    # the constraints of the solution realized first: the search's, or a tighter ask of an earlier aim
    constraints = list(read_json(run / "search" / "solutions.json").get("constraints") or s["constraints"])
    history: list[dict] = []
    report: dict = {}
    for i in range(tries):
        solution, candidates = choose_solution(run, cfg)
        report = realize(run, solution, eval_tokens=sc["tokens"], seq_len=sc["seq_len"],
                         quality=candidate_quality(candidates, solution),
                         batch_size=sc["batch_size"], force=True, speed=speed, target=target,
                         tensor_parallel=cfg["tensor_parallel"],
                         pipeline_parallel=cfg.get("pipeline_parallel", 1),
                         pp_first_stage_layers=r.get("pp_first_stage_layers"),
                         pp_last_stage_layers=r.get("pp_last_stage_layers"))
        m = report.get("measured") or {}
        pred = predicted_speedup(read_json(run / "search" / "solutions.json"), solution)
        history.append({"constraints": constraints, "solution": solution, "candidates": candidates,
                        "predicted_decode_speedup": pred,
                        **{k: m.get(k) for k in ("decode_speedup", "decode_speedup_low", "decode_speedup_high")},
                        "kl_div": (report.get("measured_quality") or {}).get("kl_div")})
        low = m.get("decode_speedup_low")
        if target is None or low is None or low >= target:
            break
        if i + 1 == tries or pred is None:
            log.warning("realize: the child's measured decode speedup %.3fx [%.3f, %.3f] misses the target %.2fx "
                        "after %d tries; keeping it (raise realize.max_tries or the search's decode_throughput "
                        "bound)", m["decode_speedup"], low, m["decode_speedup_high"], target, i + 1)
            break
        ask = pred * target / low * 1.01
        constraints = tightened(constraints, ask)
        log.info("realize: measured %.3fx (low end %.3f) < target %.2fx, predicted %.3fx; re-solving with %s",
                 m["decode_speedup"], low, target, pred, constraints)
        failed = None
        if is_rank0():  # the search writes RUN/search: one writer; every rank got the same report, so all loop alike
            try:
                search_run_dir(run, constraints, s["objective"], num_solutions=s["num_solutions"],
                               min_diff=s["min_diff"], pareto=s.get("pareto"), seed=cfg["seed"],
                               attention_floors=list(s.get("attention_floors") or []))
            except SearchError as e:
                failed = str(e)
        failed = broadcast_from_rank0(failed)
        if failed is not None:
            log.warning("realize: the tighter search failed (%s); keeping the child measured above", failed)
            break
    if is_rank0():
        atomic_write_json(run / "child" / "aim.json", {"target": target, "tries": history})
    barrier()
    return report
