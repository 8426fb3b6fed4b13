"""Sweeps: a Pareto front over a range of targets, and the batch size of the scenario.

- `pareto_sweep`: solve for each target of one quantity (``throughput:1.2x:3x:8``
  = 8 throughput targets from 1.2x to 3x the parent), with greedy and random
  baselines at the same targets.
- `batch_sweep`: costs measured at several batch sizes. Throughput depends on the
  batch, and a bigger batch needs more KV-cache memory, so, as in the Puzzle
  paper, a model's throughput is its best over the batch sizes that fit memory.
  Relative throughput targets refer to the parent's best such throughput.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..utils.io import atomic_path
from .baselines import greedy, random_feasible
from .constraints import ALIASES, RATE_QUANTITIES, Constraint, as_constraints, parse_value, satisfied, to_row
from .mip import InfeasibleError, Solution, parse_objective, solve
from .problem import Problem, SearchError

log = logging.getLogger(__name__)

_TIME_QUANTITIES = {"throughput", "decode_throughput", "latency", "ttft", "prefill_time_s", "decode_time_s"}


# ---------------------------------------------------------------------- Pareto


@dataclass
class ParetoPoint:
    target: Constraint
    optimal: Solution | None
    greedy: Solution | None = None
    random: Solution | None = None
    error: str | None = None


def parse_sweep(spec: str) -> list[Constraint]:
    """``throughput:1.2x:3x:8`` -> 8 constraints ``throughput>=...`` evenly spaced (``<=`` for others)."""
    parts = spec.split(":")
    if len(parts) != 4:
        raise SearchError(f"malformed sweep {spec!r}; write QUANTITY:START:STOP:COUNT, e.g. throughput:1.2x:3x:8")
    q = ALIASES.get(parts[0].strip(), parts[0].strip())
    start, stop = parse_value(parts[1], q), parse_value(parts[2], q)
    if start.relative != stop.relative:
        raise SearchError(f"sweep {spec!r}: give both ends relative (x) or both absolute")
    if not re.fullmatch(r"\s*\d+\s*", parts[3]) or int(parts[3]) < 1:
        raise SearchError(f"sweep {spec!r}: COUNT must be a positive integer")
    op = ">=" if q in RATE_QUANTITIES else "<="
    out = []
    for v in np.linspace(start.value, stop.value, int(parts[3])):
        text = f"{q}{op}{v:.6g}x" if start.relative else f"{q}{op}{v:.6g}"
        out.extend(as_constraints([text]))
    return out


def pareto_sweep(
    problem: Problem,
    targets: str | Sequence[str | Constraint],
    constraints: Sequence[str | Constraint] = (),
    objective: str = "kl_div",
    *,
    sense: str | None = None,
    baselines: bool = True,
    seed: int = 0,
    solver: str = "auto",
    reference: dict[str, float] | None = None,
) -> list[ParetoPoint]:
    """Best architecture (and greedy / random baselines) for each target plus `constraints`
    (minus those on the swept quantity, which each target replaces)."""
    targets = parse_sweep(targets) if isinstance(targets, str) else as_constraints(targets)
    # a swept quantity's own constraint (e.g. the run's throughput>=2x) would clip the sweep
    swept = {t.quantity for t in targets}
    base = [c for c in as_constraints(constraints) if c.quantity not in swept]
    points = []
    for t in targets:
        cons = base + [t]
        try:
            sol = solve(problem, cons, objective, sense=sense, solver=solver, reference=reference)[0]
        except InfeasibleError as e:
            points.append(ParetoPoint(t, None, error=str(e)))
            continue
        pt = ParetoPoint(t, sol)
        if baselines:
            for name, fn, kw in (("greedy", greedy, {}), ("random", random_feasible, {"seed": seed})):
                try:
                    setattr(pt, name, fn(problem, cons, objective, sense=sense, reference=reference, **kw))
                except InfeasibleError:
                    pass
        points.append(pt)
    return points


_CSV_TOTALS = ("throughput", "throughput_vs_parent", "decode_throughput", "decode_throughput_vs_parent", "memory_bytes", "memory_bytes_vs_parent", "params",
               "latency_s", "ttft_s")


def write_pareto_csv(points: Sequence[ParetoPoint], path: str | Path, parent: Solution | None = None) -> None:
    """One row per (target, method): target, method, feasible, objective, totals."""
    header = ["target", "method", "feasible", "objective", *_CSV_TOTALS]

    def row(target: str, method: str, s: Solution | None) -> list:
        if s is None:
            return [target, method, False, ""] + [""] * len(_CSV_TOTALS)
        return [target, method, True, f"{s.objective:.8g}"] + [
            f"{s.totals[k]:.8g}" if k in s.totals else "" for k in _CSV_TOTALS]

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        if parent is not None:
            w.writerow(row("parent", "parent", parent))
        for p in points:
            for method in ("optimal", "greedy", "random"):
                w.writerow(row(p.target.text, method, getattr(p, method)))


# ---------------------------------------------------------------------- batch size


@dataclass
class BatchPoint:
    batch_size: int
    problem: Problem
    parent_throughput: float | None
    parent_fits: bool
    max_throughput: float | None  # the fastest child that meets the memory (non-time) constraints
    solutions: list[Solution] = field(default_factory=list)
    error: str | None = None

    def summary(self) -> dict:
        best = self.solutions[0] if self.solutions else None
        return {
            "batch_size": self.batch_size,
            "parent_throughput": self.parent_throughput,
            "parent_fits_memory": self.parent_fits,
            "max_throughput_fitting_memory": self.max_throughput,
            "feasible": best is not None,
            "objective": best.objective if best else None,
            "throughput": best.totals.get("throughput") if best else None,
            "memory_bytes": best.totals.get("memory_bytes") if best else None,
            "error": self.error,
        }


@dataclass
class BatchSweep:
    points: list[BatchPoint]
    best: int | None  # index into points
    reference_throughput: float | None


def batch_sweep(
    problems: Sequence[Problem],
    constraints: Sequence[str | Constraint] = (),
    objective: str = "kl_div",
    *,
    sense: str | None = None,
    num_solutions: int = 1,
    min_diff: int = 0,
    solver: str = "auto",
) -> BatchSweep:
    """Solve each scenario (one per batch size); the best is the best objective, then throughput."""
    cons = as_constraints(constraints)
    memory_cons = [c for c in cons if c.quantity not in _TIME_QUANTITIES]
    parent_tp, fits = [], []
    for p in problems:
        if p.parent is None or not p.has_timing():
            parent_tp.append(None)
            fits.append(False)
            continue
        parent_tp.append(p.throughput(p.parent))
        fits.append(satisfied(p, p.parent, [to_row(p, c) for c in memory_cons]))
    candidates = [t for t, f in zip(parent_tp, fits) if f and t is not None]
    if not candidates and any(t is not None for t in parent_tp):
        log.warning("the parent fits memory at none of the batch sizes; relative throughput refers to its best "
                    "throughput over all of them")
        candidates = [t for t in parent_tp if t is not None]
    ref = max(candidates) if candidates else None
    reference = {"throughput": ref} if ref else None
    obj = None
    points = []
    for p, tp, fit in zip(problems, parent_tp, fits):
        obj = parse_objective(p, objective, sense)
        try:
            fastest = solve(p, memory_cons, "latency", sense="min", solver=solver)[0].totals.get("throughput")
        except InfeasibleError:
            fastest = None
        pt = BatchPoint(int(p.batch_size or 0), p, tp, fit, fastest)
        try:
            pt.solutions = solve(p, cons, obj, num_solutions=num_solutions, min_diff=min_diff, solver=solver,
                                 reference=reference)
        except InfeasibleError as e:
            pt.error = str(e)
        points.append(pt)
    sign = 1.0 if obj is None or obj.sense == "min" else -1.0
    feasible = [i for i, pt in enumerate(points) if pt.solutions]
    best = min(feasible, key=lambda i: (sign * points[i].solutions[0].objective,
                                        -points[i].solutions[0].totals.get("throughput", 0.0)), default=None)
    return BatchSweep(points, best, ref)


def infeasible_sweep_message(sweep: BatchSweep) -> str:
    lines = [f"batch {p.batch_size}: {p.error}" for p in sweep.points if p.error]
    return "no batch size admits an architecture meeting the constraints: " + " | ".join(lines)


def finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None
