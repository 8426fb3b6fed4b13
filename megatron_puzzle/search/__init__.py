"""Architecture search: choose one variant per subblock per layer by mixed-integer programming."""

from .baselines import greedy, random_feasible
from .constraints import Constraint, parse_constraint
from .mip import InfeasibleError, Objective, Solution, parse_objective, solve
from .problem import (
    Problem,
    SearchError,
    load_library_stats,
    load_problem,
    problem_from_dicts,
    problem_from_library_stats,
)

__all__ = [
    "Constraint", "InfeasibleError", "Objective", "Problem", "SearchError", "Solution", "greedy",
    "load_library_stats", "load_problem", "parse_constraint", "parse_objective", "problem_from_dicts",
    "problem_from_library_stats", "random_feasible", "solve",
]
