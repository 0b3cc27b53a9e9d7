"""Exact bit allocation with `scipy.optimize.milp` (HiGHS), pairwise terms linearized.

Serves HAWQ-V3's ILP (docs/methods.md §9.2: one-hot over any candidate set, diagonal objective) and
CLADO's IQP (docs/methods.md §3.2: pairwise terms, solved here as an exact MILP on the unprojected
interactions instead of CVXPY + Gurobi on the PSD projection). The program is described in
`mixq.search.formulation`.
"""

from __future__ import annotations

import logging

from mixq.progress import progress
from mixq.search.highs import highs
from mixq.search.portfolio import portfolio
from mixq.search.problem import (
    InfeasibleBudgetError,
    Problem,
    Solution,
)

__all__ = ["highs", "ilp", "pareto_sweep"]

logger = logging.getLogger(__name__)


def ilp(problem: Problem, time_limit: float | None = None, warm_start: list[int] | None = None) -> Solution:
    """Minimize ``f(x)`` under the budgets: the exact solver every method calls.

    Without pairwise terms this is `highs` (a multiple-choice knapsack, solved to optimality in
    milliseconds). With them it is `mixq.search.portfolio.portfolio` (greedy + local-search warm
    start, then HiGHS, the SDP bound and SCIP, best incumbent and best bound; without SCIP,
    HiGHS and the SDP bound).
    Arguments, returns and errors as in `highs`; the `Solution` carries ``bound`` and a ``note``
    naming the solvers that ran.
    """
    if problem.interactions is None:
        return highs(problem, time_limit=time_limit, warm_start=warm_start)
    return portfolio(problem, time_limit=time_limit, warm_start=warm_start)


def pareto_sweep(
    problem: Problem, budget_name: str, values: list[float], time_limit: float | None = None
) -> list[Solution]:
    """Solve `ilp` for each value of one budget and return the non-dominated solutions.

    Values are solved in increasing order with the other budgets fixed, each warm-started
    from the previous solution (always feasible for a larger budget). Values below the
    smallest feasible budget are skipped with a warning. A solution is kept when no other
    has ``objective ≤`` and ``costs[budget_name] ≤`` with one of them strict (duplicates are
    kept once).

    Args:
        problem: The problem; its value for ``budget_name``, if any, is replaced.
        budget_name: A cost table of ``problem``.
        values: Budget values to solve for.
        time_limit: Passed to `ilp` for every value.

    Returns:
        Non-dominated solutions in increasing ``costs[budget_name]`` (decreasing objective).

    Raises:
        ValueError: Unknown ``budget_name`` or no values.
        InfeasibleBudgetError: Every value is infeasible.
    """
    if budget_name not in problem.costs:
        raise ValueError(f"unknown budget {budget_name!r}; cost tables: {sorted(problem.costs)}")
    if not values:
        raise ValueError("pareto_sweep needs at least one budget value")
    solutions: list[Solution] = []
    previous: list[int] | None = None
    error: InfeasibleBudgetError | None = None
    for value in progress(sorted({float(v) for v in values}), f"pareto sweep ({budget_name})", unit="budget"):
        budgets = {**problem.budgets, budget_name: value}
        sub = Problem(problem.scores, problem.costs, budgets, problem.pairs)
        try:
            solution = ilp(sub, time_limit=time_limit, warm_start=previous)
        except InfeasibleBudgetError as exc:
            logger.warning("pareto_sweep: %s = %g skipped: %s", budget_name, value, exc)
            error = exc
            continue
        solutions.append(solution)
        previous = solution.choices
    if error is not None and not solutions:
        raise error
    front: list[Solution] = []
    for solution in sorted(solutions, key=lambda s: (s.costs[budget_name], s.objective)):
        if not front or solution.objective < front[-1].objective:
            front.append(solution)
    return front
