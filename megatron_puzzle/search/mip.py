"""The mixed-integer program: one-hot choices, budget rows, objective, diversity cuts.

Columns are one binary per option (plus, for diversity in two-group layers, one
continuous "layer unchanged" indicator per layer and earlier solution). Rows:

- one-hot: the options of each group sum to 1;
- each constraint: ``lo - const <= coef @ x <= hi - const`` (scaled to unit size);
- diversity against an earlier solution s: at most ``L - d`` layers keep all of
  s's choices. With one group per layer that is ``sum_l x[l, s_l] <= L - d``; with
  two, ``z_l >= x[l, attn_l] + x[l, ffn_l] - 1`` and ``sum_l z_l <= L - d``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from .constraints import RATE_QUANTITIES, Constraint, Row, as_constraints, fmt, parent_value, rate_basis, to_row
from .problem import Problem, SearchError
from .solvers import MilpModel, SolverChain

log = logging.getLogger(__name__)

_MAXIMISED = ("agreement", "accuracy", "acc", "top1", "reward")


class InfeasibleError(SearchError):
    """No architecture meets the constraints; the message names the constraint and what is achievable."""


@dataclass(frozen=True)
class Objective:
    key: str  # a key of problem.values, e.g. metrics.kl_div
    sense: str  # "min" or "max"

    def __str__(self) -> str:
        return f"{self.sense}:{self.key}"


def parse_objective(problem: Problem, objective: str | Objective = "kl_div", sense: str | None = None) -> Objective:
    """``kl_div``, ``metrics.kl_div``, ``max:top1_agreement``; agreement/accuracy metrics default to max."""
    if isinstance(objective, Objective):
        return objective
    name = objective.strip()
    if name[:4] in ("max:", "min:"):
        sense, name = sense or name[:3], name[4:]
    # Derived sums (memory, latency, ttft) are objectives too, e.g. the fastest child that fits.
    key = name if name in ("memory", "latency", "ttft") else problem.resolve_key(name)
    if sense is None:
        sense = "max" if any(w in key.rsplit(".", 1)[-1] for w in _MAXIMISED) else "min"
    if sense not in ("min", "max"):
        raise SearchError(f"objective sense must be 'min' or 'max', got {sense!r}")
    problem.linear(key)  # raises when some option lacks the metric
    return Objective(key, sense)


@dataclass
class Solution:
    """One architecture: per-layer variant names, its objective and totals."""

    variants: list[list[str]]  # per layer: [attention, ffn] (decoupled/pairs) or [block]
    objective: float
    objective_name: str
    totals: dict[str, float]
    choice: np.ndarray = field(repr=False)  # option index per group
    solver: str = ""
    status: str = "optimal"
    solve_time_s: float = 0.0

    @property
    def block_names(self) -> list[str]:
        return ["+".join(v) for v in self.variants]

    def blocks(self):
        """The `BlockConfig` of every layer (needs attention/FFN variant names)."""
        from ..arch import AttentionVariant, BlockConfig, FFNVariant

        out = []
        for layer, v in enumerate(self.variants):
            if len(v) != 2:
                raise SearchError(f"layer {layer}: {v} is not an attention+FFN pair; blocks need variant names")
            out.append(BlockConfig(AttentionVariant.from_name(v[0]), FFNVariant.from_name(v[1])))
        return out

    def to_json(self, hidden_size: int | None = None, num_attention_heads: int | None = None) -> dict:
        d: dict = {}
        if hidden_size and num_attention_heads:
            from ..arch import blocks_to_json

            d["blocks"] = blocks_to_json(self.blocks(), hidden_size, num_attention_heads)
        d.update(variants=self.variants, objective=self.objective, totals=self.totals,
                 solver=self.solver, status=self.status)
        return d


def make_solution(problem: Problem, choice, objective: Objective, solver: str, status: str,
                  solve_time_s: float = 0.0) -> Solution:
    choice = np.asarray(choice, dtype=np.int64)
    totals = problem.totals(choice)
    parent = problem.parent_totals()
    if parent:  # ratios to the parent, the way targets are written (2.0x)
        for k in ("throughput", "decode_throughput", "memory_bytes", "params", "latency_s"):
            if k in totals and parent.get(k):
                totals[f"{k}_vs_parent"] = totals[k] / parent[k]
    return Solution(problem.layer_variants(choice), problem.total(objective.key, choice), objective.key,
                    totals, choice, solver, status, solve_time_s)


# ---------------------------------------------------------------------- formulation


def build_model(problem: Problem, rows: Sequence[Row], objective: Objective,
                earlier: Sequence[np.ndarray] = (), min_diff: int = 0) -> MilpModel:
    n, L = problem.num_options, problem.num_layers
    groups_per_layer = [problem.groups_of_layer(l) for l in range(L)]
    multi = any(len(g) > 1 for g in groups_per_layer) and min_diff > 0 and len(earlier) > 0
    n_aux = L * len(earlier) if multi else 0
    nvar = n + n_aux
    r_idx, c_idx, vals, lo, hi = [], [], [], [], []

    def add_row(cols, coefs, row_lo, row_hi):
        r = len(lo)
        r_idx.extend([r] * len(cols))
        c_idx.extend(cols)
        vals.extend(coefs)
        lo.append(row_lo)
        hi.append(row_hi)

    for g in problem.groups:
        add_row(g.tolist(), [1.0] * len(g), 1.0, 1.0)
    for row in rows:
        scale = float(np.max(np.abs(row.coef))) or 1.0  # unit-size rows keep tolerances meaningful
        nz = np.flatnonzero(row.coef)
        add_row(nz.tolist(), (row.coef[nz] / scale).tolist(), (row.lo - row.const) / scale,
                (row.hi - row.const) / scale)
    for k, prev in enumerate(earlier):
        keep_max = L - min_diff
        if not multi:
            add_row([int(i) for i in prev], [1.0] * len(prev), -math.inf, keep_max)
            continue
        z0 = n + k * L
        for l, gs in enumerate(groups_per_layer):
            cols = [int(prev[g]) for g in gs]
            # z_l - sum x >= 1 - |groups|: z_l is forced to 1 when the layer keeps every choice
            add_row(cols + [z0 + l], [-1.0] * len(cols) + [1.0], 1.0 - len(cols), math.inf)
        add_row(list(range(z0, z0 + L)), [1.0] * L, -math.inf, keep_max)

    coef, _ = problem.linear(objective.key)
    c = np.zeros(nvar)
    c[:n] = coef if objective.sense == "min" else -coef
    A = sp.csr_matrix((vals, (r_idx, c_idx)), shape=(len(lo), nvar))
    integrality = np.zeros(nvar, dtype=np.int64)
    integrality[:n] = 1
    return MilpModel(c, A, np.asarray(lo, float), np.asarray(hi, float), np.zeros(nvar), np.ones(nvar), integrality)


def _choice_from_x(problem: Problem, x: np.ndarray) -> np.ndarray:
    return np.asarray([int(g[np.argmax(x[g])]) for g in problem.groups], dtype=np.int64)


# ---------------------------------------------------------------------- achievable bounds


def extreme(problem: Problem, coef: np.ndarray, const: float, maximise: bool) -> tuple[float, np.ndarray]:
    """The smallest (largest) total of one quantity alone: separable, so per-group extremes."""
    pick = [int(g[np.argmax(coef[g])] if maximise else g[np.argmin(coef[g])]) for g in problem.groups]
    return float(coef[pick].sum() + const), np.asarray(pick)


_WORDS = {  # (quantity, bound) -> how the best achievable child is described
    ("memory", "upper"): "the smallest child needs",
    ("params", "upper"): "the smallest child has",
    ("latency", "upper"): "the fastest child takes",
    ("ttft", "upper"): "the fastest child takes",
    **{(rate, "lower"): "the fastest child reaches" for rate in RATE_QUANTITIES},
    **{(rate, "upper"): "the slowest child reaches" for rate in RATE_QUANTITIES},
}


def diagnose(problem: Problem, rows: Sequence[Row], reference=None) -> str:
    """Explain an infeasible constraint set: each constraint's best achievable value alone."""
    alone = []
    for row in rows:
        c = row.constraint
        q = c.quantity
        for side in ("upper", "lower"):
            bound = getattr(c, side)
            if bound is None:
                continue
            if q in RATE_QUANTITIES:  # a rate's lower bound is an upper bound on its time
                maximise_lat = side == "upper"
                lat, _ = extreme(problem, row.coef, row.const, maximise_lat)
                best = rate_basis(problem, q)[1] / lat if lat > 0 else math.inf
                target = row.hi if side == "lower" else row.lo
                ok = lat <= target * (1 + 1e-9) if side == "lower" else lat >= target * (1 - 1e-9)
            else:
                best, _ = extreme(problem, row.coef, row.const, maximise=side == "lower")
                target = row.hi if side == "upper" else row.lo
                ok = best <= target * (1 + 1e-9) + 1e-12 if side == "upper" else best >= target * (1 - 1e-9) - 1e-12
            value = fmt(q, best)
            if bound.relative:
                try:
                    value += f" ({best / parent_value(problem, q, reference):.3g}x the parent)"
                except SearchError:
                    pass
            words = _WORDS.get((q, side), "the lowest achievable is" if side == "upper" else "the highest achievable is")
            op = "<=" if side == "upper" else ">="
            shown = f"{q} {op} {bound.text if bound.relative else fmt(q, bound.value)}"
            if bound.relative:
                shown += f" ({fmt(q, bound.value * parent_value(problem, q, reference))})"
            if not ok:
                return f"{shown} is infeasible: {words} {value}"
            alone.append(f"{shown} ({words} {value})")
    return ("the constraints cannot all hold together although each can alone: " + "; ".join(alone)
            + "; relax one of them")


# ---------------------------------------------------------------------- solve


def solve(
    problem: Problem,
    constraints: Sequence[str | Constraint] = (),
    objective: str | Objective = "kl_div",
    *,
    sense: str | None = None,
    num_solutions: int = 1,
    min_diff: int = 0,
    solver: str = "auto",
    time_limit: float | None = None,
    reference: dict[str, float] | None = None,
) -> list[Solution]:
    """The best architectures under `constraints`, best first.

    With ``num_solutions = K > 1`` each solution differs from every earlier one in
    at least ``max(min_diff, 1)`` layers (a layer differs if its attention or FFN
    differs). Fewer than K come back (with a warning) when no further one exists.
    Raises `InfeasibleError` naming the constraint when none exists.
    `reference` overrides parent totals for relative bounds (e.g. {"throughput": T}).
    """
    cons = as_constraints(constraints)
    obj = parse_objective(problem, objective, sense)
    rows = [to_row(problem, c, reference) for c in cons]
    if num_solutions < 1:
        raise SearchError(f"num_solutions must be >= 1, got {num_solutions}")
    d = max(min_diff, 1) if num_solutions > 1 else 0
    if d > problem.num_layers:
        raise SearchError(f"min_diff={min_diff} exceeds the {problem.num_layers} layers")
    chain = SolverChain(solver, time_limit)
    # Diversity on two groups per layer: solve the equivalent one-group (pairs) problem, whose
    # "layer unchanged" relaxation is tight, and map its choices back.
    work, work_rows, parts = problem, rows, None
    if d > 0 and len(problem.groups) > problem.num_layers:
        work, parts = problem.as_pairs()
        work_rows = [to_row(work, c, reference) for c in cons]
    found: list[Solution] = []
    work_choices: list[np.ndarray] = []
    while len(found) < num_solutions:
        model = build_model(work, work_rows, obj, work_choices, d)
        t0 = time.perf_counter()
        res = chain.solve(model)
        dt = time.perf_counter() - t0
        if res.status == "infeasible":
            if not found:
                raise InfeasibleError(diagnose(problem, rows, reference))
            log.warning("found %d of %d solutions differing in >= %d layers; no further one exists",
                        len(found), num_solutions, d)
            break
        choice = _choice_from_x(work, res.x)
        work_choices.append(choice)
        if parts is not None:
            choice = np.concatenate([parts[i] for i in choice])
        found.append(make_solution(problem, choice, obj, res.solver, res.status, dt))
        log.debug("solution %d: %s=%.6g (%s, %.2fs)", len(found), obj.key, found[-1].objective, res.solver, dt)
    return found
