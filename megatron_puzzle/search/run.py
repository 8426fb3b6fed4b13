"""The whole search stage over a run directory, and the library-stats variant of it.

`search_run_dir` reads RUN/score/scores.json and RUN/measure/costs.json (or several
costs files, one per batch size), solves, and writes RUN/search/ atomically:
solutions.json (docs/formats.md), architecture_K.png, and with a sweep
pareto.csv + pareto.png; the `done` marker comes last.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..utils.config import from_section
from ..utils.io import atomic_dir, atomic_write_json
from .constraints import RATE_QUANTITIES, as_constraints
from .mip import InfeasibleError, Solution, make_solution, parse_objective, solve
from .plots import plot_architecture, plot_pareto
from .problem import ATTENTION_LAYERS, Problem, SearchError, load_library_stats, load_problem, load_space
from .sweeps import batch_sweep, infeasible_sweep_message, pareto_sweep, write_pareto_csv

log = logging.getLogger(__name__)


@dataclass
class SearchConfig:
    """The search stage's settings (the `search` section of a run config, and `megatron-puzzle search`)."""

    constraints: list[str] = field(default_factory=list)  # e.g. decode_throughput>=2x, memory<=1GiB
    objective: str = "kl_div"
    sense: str | None = None
    num_solutions: int = 1
    min_diff: int = 0  # layers in which each further solution differs from the earlier ones
    pareto: str | None = None  # quantity:from:to:points
    scores_path: str | None = None  # default RUN/score/scores.json
    costs_paths: list[str] | None = None  # default RUN/measure/costs.json
    space: Any = None  # default RUN/library/space.json
    mode: str = "auto"
    parent: str | None = None
    solver: str = "auto"
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    plots: bool = True
    seed: int = 0
    # one more candidate per floor on kept attention layers (0.35 = attention_layers>=0.35x), for realize's
    # `solution: best` to choose among by measured held-out KL (attention_candidates)
    attention_floors: list[float] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict | None) -> "SearchConfig":
        return from_section(cls, d, "search")


def run_search(run_dir: str | Path, cfg: SearchConfig) -> dict:
    """The search stage: RUN/score + RUN/measure -> RUN/search/solutions.json. Rank 0 only (a MIP solve)."""
    if cfg.num_solutions < 1 or cfg.min_diff < 0:
        raise SearchError("num_solutions must be >= 1 and min_diff >= 0")
    return search_run_dir(run_dir, **asdict(cfg))


def model_shape(run_dir: Path, hidden_size: int | None, num_attention_heads: int | None) -> tuple[int, int]:
    """hidden_size and num_attention_heads from RUN/parent/model_config.json, else the given ones."""
    if hidden_size and num_attention_heads:
        return hidden_size, num_attention_heads
    path = run_dir / "parent" / "model_config.json"
    if path.exists():
        from ..arch import ModelConfig

        cfg = ModelConfig.load(path)
        return hidden_size or cfg.hidden_size, num_attention_heads or cfg.num_attention_heads
    raise SearchError(f"{path} does not exist: pass --hidden-size and --num-heads to write block configs")


def search_run_dir(
    run_dir: str | Path,
    constraints: Sequence[str] = (),
    objective: str = "kl_div",
    *,
    sense: str | None = None,
    num_solutions: int = 1,
    min_diff: int = 0,
    pareto: str | None = None,
    scores_path: str | Path | None = None,
    costs_paths: Sequence[str | Path] | None = None,
    space: Any = None,
    mode: str = "auto",
    parent: str | None = None,
    solver: str = "auto",
    hidden_size: int | None = None,
    num_attention_heads: int | None = None,
    plots: bool = True,
    seed: int = 0,
    attention_floors: Sequence[float] = (),
) -> dict:
    """Run the search stage; returns the solutions.json content it wrote.

    With `attention_floors`, the solutions are followed by one candidate per floor
    (`attention_candidates`), each tagged with its `attention_floor`."""
    run = Path(run_dir)
    scores_path = Path(scores_path) if scores_path else run / "score" / "scores.json"
    costs_paths = [Path(p) for p in costs_paths] if costs_paths else [run / "measure" / "costs.json"]
    for p in [scores_path, *costs_paths]:
        if not p.exists():
            raise SearchError(f"{p} does not exist; run the stage that writes it or pass its path")
    if space is None and (run / "library" / "space.json").exists():
        space = run / "library" / "space.json"
    if isinstance(space, (str, Path)):
        space = load_space(space)
    hidden, heads = model_shape(run, hidden_size, num_attention_heads)
    cons = as_constraints(constraints)
    problems = [load_problem(scores_path, c, space, mode=mode, parent=parent) for c in costs_paths]

    out: dict[str, Any] = {"objective": objective, "constraints": [c.text for c in cons]}
    reference = None
    if len(problems) > 1:
        sweep = batch_sweep(problems, cons, objective, sense=sense, num_solutions=num_solutions,
                            min_diff=min_diff, solver=solver)
        out["batch_sweep"] = [p.summary() for p in sweep.points]
        out["reference_throughput"] = sweep.reference_throughput
        if sweep.best is None:
            raise InfeasibleError(infeasible_sweep_message(sweep))
        best = sweep.points[sweep.best]
        problem, solutions = best.problem, best.solutions
        reference = {"throughput": sweep.reference_throughput} if sweep.reference_throughput else None
        log.info("best batch size: %d", best.batch_size)
    else:
        problem = problems[0]
        solutions = solve(problem, cons, objective, sense=sense, num_solutions=num_solutions, min_diff=min_diff,
                          solver=solver)
    obj = parse_objective(problem, objective, sense)
    floors = attention_candidates(problem, cons, obj, attention_floors, solutions, solver=solver, reference=reference)
    out["objective"] = _bare(obj.key)
    out["sense"] = obj.sense
    out["mode"] = problem.mode
    out["scenario"] = problem.scenario
    parent_sol = _parent_solution(problem, obj)
    if parent_sol is not None:
        out["parent"] = {"variants": parent_sol.variants, "objective": parent_sol.objective,
                         "totals": _bare_keys(parent_sol.totals)}
    out["solutions"] = [s.to_json(hidden, heads) for s in solutions]
    for floor, s in floors:
        out["solutions"].append(dict(s.to_json(hidden, heads), attention_floor=floor))
    solutions = solutions + [s for _, s in floors]
    for s in out["solutions"]:
        s["totals"] = _bare_keys(s["totals"])

    search_dir = run / "search"
    with atomic_dir(search_dir, overwrite=True) as tmp:
        if pareto:
            points = pareto_sweep(problem, pareto, cons, obj, seed=seed, solver=solver, reference=reference)
            write_pareto_csv(points, tmp / "pareto.csv", parent_sol)
            out["pareto"] = "pareto.csv"
            if plots:
                x = points[0].target.quantity if points else "throughput"
                plot_pareto(points, tmp / "pareto.png", parent=parent_sol, objective_name=_bare(obj.key),
                            x=x if x == "memory" or x in RATE_QUANTITIES else "throughput")
        if plots:
            for k, s in enumerate(solutions):
                plot_architecture(s, tmp / f"architecture_{k}.png")
        atomic_write_json(tmp / "solutions.json", out)
    return out


def check_attention_floors(floors) -> None:
    """Attention floors are a list of shares of the parent's layers in (0, 1]; SearchError names a bad one."""
    if not isinstance(floors, (list, tuple)):
        raise SearchError(f"attention floors are a list of shares of the parent's layers, got {floors!r}")
    for f in floors:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise SearchError(f"attention floors are shares of the parent's layers in (0, 1] (e.g. 0.35), "
                              f"got {f!r}")


def attention_candidates(problem: Problem, cons, obj, floors: Sequence[float], found: Sequence[Solution], *,
                         solver: str = "auto", reference: dict | None = None) -> list[tuple[float, Solution]]:
    """The best architecture under `cons` plus `attention_layers>=F x` for each floor F (a share of the
    parent's layers): one candidate per floor that is new (not among `found` or an earlier floor's),
    in the floors' order; a floor no architecture meets is skipped with a log line.

    Summed 1-block scores rank architectures that drop most attention subblocks too well (each removal
    was scored beside all the others kept); these candidates let the assembled children's measured
    KL decide instead (realize's `solution: best`)."""
    check_attention_floors(floors)
    if not floors:
        return []
    if ATTENTION_LAYERS not in problem.values:
        raise SearchError(f"attention floors need attention and FFN variants per layer; this problem's mode "
                          f"is {problem.mode!r}")
    seen = {tuple(map(tuple, s.variants)) for s in found}
    out = []
    for f in floors:
        text = f"{ATTENTION_LAYERS}>={f:g}x"
        try:
            sol = solve(problem, [*cons, text], obj, solver=solver, reference=reference)[0]
        except InfeasibleError as e:
            log.info("no candidate with %s: %s", text, e)
            continue
        key = tuple(map(tuple, sol.variants))
        if key in seen:
            continue
        seen.add(key)
        out.append((float(f), sol))
        log.info("candidate with %s: %d attention layers, %s %.4g", text, int(sol.totals[ATTENTION_LAYERS]),
                 _bare(obj.key), sol.objective)
    return out


def _bare(key: str) -> str:
    """scores.json names metrics bare (kl_div); the run-dir outputs keep those names."""
    return key[len("metrics."):] if key.startswith("metrics.") else key


def _bare_keys(totals: dict) -> dict:
    return {_bare(k): v for k, v in totals.items()}


def _parent_solution(problem: Problem, obj) -> Solution | None:
    if problem.parent is None:
        return None
    return make_solution(problem, problem.parent, obj, "parent", "parent")


def search_library_stats(
    stats_path: str | Path,
    constraints: Sequence[str] = (),
    objective: str = "metrics.kl_div",
    *,
    sense: str | None = None,
    out: str | Path | None = None,
    num_solutions: int = 1,
    min_diff: int = 0,
    parent: str | None = None,
    solver: str = "auto",
    plot: str | Path | None = None,
) -> dict:
    """Search the public Puzzle demo's block-library stats; write the chosen block per layer to `out`."""
    problem = load_library_stats(stats_path, parent=parent)
    cons = as_constraints(constraints)
    solutions = solve(problem, cons, objective, sense=sense, num_solutions=num_solutions, min_diff=min_diff,
                      solver=solver)
    obj = parse_objective(problem, objective, sense)
    result = {
        "objective": obj.key,
        "sense": obj.sense,
        "constraints": [c.text for c in cons],
        "solutions": [
            {
                "chosen": {f"layer_{i}": v[0] for i, v in enumerate(s.variants)},
                "objective": s.objective,
                "constrained": {c.quantity: _constrained_total(problem, s, c.quantity) for c in cons},
                "totals": s.totals,
                "solver": s.solver,
            }
            for s in solutions
        ],
    }
    if out:
        atomic_write_json(out, result)
    if plot and solutions:
        plot_architecture(solutions[0], plot)
    return result


def _constrained_total(problem: Problem, s: Solution, quantity: str) -> float:
    if quantity in RATE_QUANTITIES:
        return s.totals.get(quantity, float("nan"))
    return problem.total(quantity, s.choice)
