"""Baselines on the same scores and costs as the MIP: greedy and random feasible.

Both walk single replacements (one group of one layer switches option) that
shrink the total violation ``V = sum over bounds of max(0, excess) / |bound|``
until every constraint holds.

- greedy starts from the parent and takes the replacement with the least
  objective lost per unit of violation removed;
- random feasible starts from a random architecture (seeded) and takes a random
  violation-reducing replacement.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from .constraints import Constraint, Row, as_constraints, to_row
from .mip import InfeasibleError, Objective, Solution, diagnose, make_solution, parse_objective
from .problem import Problem

_EPS = 1e-12


def _violations(totals: np.ndarray, rows: Sequence[Row]) -> np.ndarray:
    """Summed relative violation for every column of `totals` (rows x candidates)."""
    v = np.zeros(totals.shape[1:])
    for r, row in enumerate(rows):
        t = totals[r]
        if np.isfinite(row.hi):
            v += np.maximum(t - row.hi, 0.0) / max(abs(row.hi), 1e-30)
        if np.isfinite(row.lo):
            v += np.maximum(row.lo - t, 0.0) / max(abs(row.lo), 1e-30)
    return v


def _moves(problem: Problem, rows: Sequence[Row], choice: np.ndarray):
    """For every option: the violation after switching its group to it, and the current violation."""
    coef = np.stack([r.coef for r in rows]) if rows else np.zeros((0, problem.num_options))
    const = np.array([r.const for r in rows])
    current = coef[:, choice].sum(axis=1) + const
    # switching group g to option i changes each total by coef[i] - coef[choice[g]]
    new = current[:, None] + coef - coef[:, choice[problem.group_of]]
    return _violations(new, rows), float(_violations(current[:, None], rows)[0])


def _walk(problem: Problem, rows, choice, pick) -> np.ndarray | None:
    choice = choice.copy()
    for _ in range(problem.num_options * 4):
        after, now = _moves(problem, rows, choice)
        if now <= 1e-9:
            return choice
        gain = now - after
        gain[choice] = 0.0
        ok = np.flatnonzero(gain > _EPS * max(now, 1.0))
        if ok.size == 0:
            return None
        i = pick(ok, gain, choice)
        choice[problem.group_of[i]] = i
    return None


def greedy(
    problem: Problem,
    constraints: Sequence[str | Constraint] = (),
    objective: str | Objective = "kl_div",
    *,
    sense: str | None = None,
    reference: dict[str, float] | None = None,
) -> Solution:
    """From the parent, repeatedly take the replacement with least objective lost per violation removed."""
    obj = parse_objective(problem, objective, sense)
    rows = [to_row(problem, c, reference) for c in as_constraints(constraints)]
    coef, _ = problem.linear(obj.key)
    loss = coef if obj.sense == "min" else -coef
    if problem.parent is not None:
        start = problem.parent.copy()
    else:  # no parent option: start from the best-scoring option of every group
        start = np.asarray([int(g[np.argmin(loss[g])]) for g in problem.groups])

    def pick(ok, gain, cur):
        lost = loss[ok] - loss[cur[problem.group_of[ok]]]
        ratio = lost / gain[ok]
        best = np.flatnonzero(ratio <= ratio.min() + 1e-15)
        return int(ok[best[np.argmax(gain[ok][best])]])  # ties: the bigger step

    t0 = time.perf_counter()
    choice = _walk(problem, rows, start, pick)
    if choice is None:
        raise InfeasibleError("greedy found no feasible architecture: " + diagnose(problem, rows, reference))
    return make_solution(problem, choice, obj, "greedy", "heuristic", time.perf_counter() - t0)


def random_feasible(
    problem: Problem,
    constraints: Sequence[str | Constraint] = (),
    objective: str | Objective = "kl_div",
    *,
    seed: int = 0,
    tries: int = 20,
    sense: str | None = None,
    reference: dict[str, float] | None = None,
) -> Solution:
    """A random architecture that meets the constraints (reproducible for a given seed)."""
    obj = parse_objective(problem, objective, sense)
    rows = [to_row(problem, c, reference) for c in as_constraints(constraints)]
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for _ in range(tries):
        start = np.asarray([int(rng.choice(g)) for g in problem.groups])
        choice = _walk(problem, rows, start, lambda ok, gain, cur: int(rng.choice(ok)))
        if choice is not None:
            return make_solution(problem, choice, obj, f"random(seed={seed})", "heuristic", time.perf_counter() - t0)
    raise InfeasibleError("random search found no feasible architecture: " + diagnose(problem, rows, reference))
