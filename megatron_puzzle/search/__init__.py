"""Architecture search: choose one variant per subblock per layer by mixed-integer programming."""

from .baselines import greedy, random_feasible
from .constraints import Constraint, parse_constraint
from .mip import InfeasibleError, Objective, Solution, parse_objective, solve
from .plots import plot_architecture, plot_pareto
from .problem import (
    Problem,
    SearchError,
    load_library_stats,
    load_problem,
    problem_from_dicts,
    problem_from_library_stats,
)
from .run import search_library_stats, search_run_dir
from .sweeps import batch_sweep, pareto_sweep, write_pareto_csv

__all__ = [
    "Constraint", "InfeasibleError", "Objective", "Problem", "SearchError", "Solution", "batch_sweep", "greedy",
    "load_library_stats", "load_problem", "pareto_sweep", "parse_constraint", "parse_objective", "plot_architecture",
    "plot_pareto", "problem_from_dicts", "problem_from_library_stats", "random_feasible", "search_library_stats",
    "search_run_dir", "solve", "write_pareto_csv",
]
