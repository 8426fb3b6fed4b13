"""MILP backends: Gurobi when importable and licensed for the model, else HiGHS, else SciPy.

A model is ``min c @ x`` s.t. ``row_lo <= A @ x <= row_hi``, ``lb <= x <= ub``, with
``integrality[j] == 1`` for integer columns. The free Gurobi licence refuses
models over 2000 variables or constraints (GurobiError 10010); `auto` then falls
back to HiGHS with one logged line.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .problem import SearchError

log = logging.getLogger(__name__)

SOLVERS = ("auto", "gurobi", "highs", "scipy")
# Relative/absolute optimality gaps: tight enough that two solvers agree on the optimum.
MIP_REL_GAP = 1e-7
MIP_ABS_GAP = 1e-10


@dataclass
class MilpModel:
    c: np.ndarray
    A: sp.csr_matrix
    row_lo: np.ndarray
    row_hi: np.ndarray
    lb: np.ndarray
    ub: np.ndarray
    integrality: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.A.shape


@dataclass
class MilpResult:
    status: str  # "optimal", "time_limit" (a feasible incumbent), "infeasible"
    x: np.ndarray | None
    objective: float | None
    solver: str


class SolverUnavailable(Exception):
    """The backend cannot run this model here (not installed, or its licence refuses the size)."""


# ---------------------------------------------------------------------- HiGHS


_BANNER_SHOWN = False


def _new_highs(highspy):
    """A Highs instance, without the copyright banner the first one writes to stdout (C level,
    before any option can turn output off): it would land in the middle of a run's progress."""
    global _BANNER_SHOWN
    if _BANNER_SHOWN:
        return highspy.Highs()
    import os
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            h = highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    _BANNER_SHOWN = True
    return h


def solve_highs(model: MilpModel, time_limit: float | None = None) -> MilpResult:
    try:
        import highspy
    except ImportError as e:
        raise SolverUnavailable(f"highspy is not installed ({e})") from None
    h = _new_highs(highspy)
    h.setOptionValue("output_flag", False)
    h.setOptionValue("mip_rel_gap", MIP_REL_GAP)
    h.setOptionValue("mip_abs_gap", MIP_ABS_GAP)
    h.setOptionValue("random_seed", 0)
    if time_limit:
        h.setOptionValue("time_limit", float(time_limit))
    inf = highspy.kHighsInf
    A = sp.csc_matrix(model.A)
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = A.shape[1], A.shape[0]
    lp.col_cost_ = model.c
    lp.col_lower_ = np.where(np.isinf(model.lb), -inf, model.lb)
    lp.col_upper_ = np.where(np.isinf(model.ub), inf, model.ub)
    lp.row_lower_ = np.where(np.isinf(model.row_lo), -inf, model.row_lo)
    lp.row_upper_ = np.where(np.isinf(model.row_hi), inf, model.row_hi)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = A.indptr
    lp.a_matrix_.index_ = A.indices
    lp.a_matrix_.value_ = A.data
    lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
                       for i in model.integrality]
    h.passModel(lp)
    h.run()
    st = h.getModelStatus()
    S = highspy.HighsModelStatus
    has_sol = h.getInfo().primal_solution_status == 2  # kSolutionStatusFeasible
    if st == S.kOptimal:
        status = "optimal"
    elif st == S.kInfeasible:
        return MilpResult("infeasible", None, None, "highs")
    elif has_sol and st in (S.kTimeLimit, S.kInterrupt, S.kSolutionLimit, S.kIterationLimit):
        status = "time_limit"
    elif st in (S.kTimeLimit,):
        raise SearchError("HiGHS hit the time limit before finding any feasible architecture; raise the limit")
    else:
        raise SearchError(f"HiGHS stopped with status {h.modelStatusToString(st)}")
    x = np.asarray(h.getSolution().col_value)
    return MilpResult(status, x, float(model.c @ x), "highs")


# ---------------------------------------------------------------------- SciPy (HiGHS inside SciPy)


def solve_scipy(model: MilpModel, time_limit: float | None = None) -> MilpResult:
    from scipy.optimize import Bounds, LinearConstraint, milp

    opts = {"disp": False, "mip_rel_gap": MIP_REL_GAP}
    if time_limit:
        opts["time_limit"] = float(time_limit)
    res = milp(model.c, constraints=LinearConstraint(model.A, model.row_lo, model.row_hi),
               integrality=model.integrality, bounds=Bounds(model.lb, model.ub), options=opts)
    if res.status == 2:
        return MilpResult("infeasible", None, None, "scipy")
    if res.x is None:
        raise SearchError(f"scipy.optimize.milp stopped without a solution: {res.message}")
    return MilpResult("optimal" if res.status == 0 else "time_limit", res.x, float(model.c @ res.x), "scipy")


# ---------------------------------------------------------------------- Gurobi


def solve_gurobi(model: MilpModel, time_limit: float | None = None) -> MilpResult:
    try:
        import gurobipy as gp
    except ImportError as e:
        raise SolverUnavailable(f"gurobipy is not installed ({e})") from None
    GRB = gp.GRB
    try:
        env = gp.Env(empty=True)
        env.setParam("OutputFlag", 0)
        env.start()
        m = gp.Model(env=env)
        m.Params.MIPGap = MIP_REL_GAP
        m.Params.MIPGapAbs = MIP_ABS_GAP
        m.Params.Seed = 0
        if time_limit:
            m.Params.TimeLimit = float(time_limit)
        vtype = np.where(model.integrality > 0, GRB.INTEGER, GRB.CONTINUOUS)
        x = m.addMVar(model.c.shape[0], lb=model.lb, ub=model.ub, vtype=vtype)
        m.setMObjective(None, model.c, 0.0, sense=GRB.MINIMIZE)
        A = sp.csr_matrix(model.A)
        eq = model.row_lo == model.row_hi
        for mask, sense, rhs in (
            (eq, GRB.EQUAL, model.row_hi),
            (~eq & np.isfinite(model.row_hi), GRB.LESS_EQUAL, model.row_hi),
            (~eq & np.isfinite(model.row_lo), GRB.GREATER_EQUAL, model.row_lo),
        ):
            if mask.any():
                m.addMConstr(A[mask], x, sense, rhs[mask])
        m.optimize()
        status = m.Status
        if status == GRB.OPTIMAL:
            out = "optimal"
        elif status in (GRB.INFEASIBLE, GRB.INF_OR_UNBD):
            return MilpResult("infeasible", None, None, "gurobi")
        elif m.SolCount > 0:
            out = "time_limit"
        else:
            raise SearchError(f"Gurobi stopped with status {status} and no solution")
        xv = np.asarray(x.X)
        return MilpResult(out, xv, float(model.c @ xv), "gurobi")
    except gp.GurobiError as e:
        # 10009: no licence; 10010: model too large for the size-limited licence.
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise SolverUnavailable(f"GurobiError {getattr(e, 'errno', '?')}: {first_line}") from None


BACKENDS = {"gurobi": solve_gurobi, "highs": solve_highs, "scipy": solve_scipy}


class SolverChain:
    """Tries backends in order, remembering ones that refused, so a K-solution search logs once."""

    def __init__(self, solver: str = "auto", time_limit: float | None = None):
        if solver not in SOLVERS:
            raise SearchError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
        self.order = ["gurobi", "highs", "scipy"] if solver == "auto" else [solver]
        self.explicit = solver != "auto"
        self.time_limit = time_limit

    def solve(self, model: MilpModel) -> MilpResult:
        while self.order:
            name = self.order[0]
            try:
                return BACKENDS[name](model, self.time_limit)
            except SolverUnavailable as e:
                if self.explicit:
                    raise SearchError(f"solver {name} cannot run: {e}") from None
                self.order.pop(0)
                nxt = self.order[0] if self.order else "nothing"
                if name == "gurobi" and "not installed" in str(e):
                    log.debug("gurobipy not importable; using %s", nxt)
                else:
                    log.info("%s cannot solve this model (%s); falling back to %s", name, e, nxt)
        raise SearchError("no MILP solver available: install highspy (pip install highspy) or scipy>=1.9")


def is_integral(x: np.ndarray, tol: float = 1e-5) -> bool:
    return bool(np.all(np.abs(x - np.round(x)) <= tol)) and not math.isnan(float(np.sum(x)))
