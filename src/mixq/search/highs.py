"""The HiGHS MILP (`scipy.optimize.milp`): exact bit allocation, pairwise terms linearized
(`mixq.search.formulation`). `mixq.search.ilp` and the portfolio call it.
"""

from __future__ import annotations

import logging
import math
import time

from mixq.search.formulation import solve
from mixq.search.greedy import greedy
from mixq.search.local import polish
from mixq.search.problem import (
    Problem,
    Solution,
    check_budgets,
    relative_gap,
)

__all__ = ["highs"]

logger = logging.getLogger(__name__)


def highs(problem: Problem, time_limit: float | None = None, warm_start: list[int] | None = None) -> Solution:
    """Minimize ``f(x)`` under the budgets exactly, with HiGHS through `scipy.optimize.milp`.

    Solves ``min_x Σ_l s[l, x_l] + Σ_{l<m} Q[l, x_l, m, x_m]`` subject to
    ``Σ_l costs[k][l, x_l] ≤ B_k`` (``Q = ½ (P + Pᵀ)``, see `mixq.search.problem`) as the MILP
    of `mixq.search.formulation`, with a relative MIP gap tolerance of 0 (HiGHS still stops
    at its default absolute gap of 1e-6). The solver's ``x`` is rounded and the budgets are
    re-checked exactly (`mixq.search.formulation.solve`).

    `scipy.optimize.milp` takes no starting point, so ``warm_start`` is only an incumbent.
    When the solver stops without proving optimality (time limit), the best of its incumbent
    (if any), ``warm_start`` and `greedy`'s solution is improved by `mixq.search.local.polish`
    (one- and two-layer exchanges on the full objective) and returned; ``gap`` is then
    re-measured against HiGHS's dual bound. A proven optimum is returned as is (or
    ``warm_start`` if it is better within the solver's absolute gap).

    Args:
        problem: The problem.
        time_limit: Seconds HiGHS may spend; None for no limit.
        warm_start: A choice per layer to fall back to; ignored (with a warning) when it
            violates a budget.

    Returns:
        A `Solution` with status ``"optimal"``, ``"time_limit"`` (best incumbent; ``gap`` from
        HiGHS's ``mip_gap`` or its dual bound, ``inf`` when no bound is known) or
        ``"feasible"``.

    Raises:
        InfeasibleBudgetError: No choice satisfies the budgets (checked one by one before solving,
            together by the solver).
        ValueError: ``time_limit`` not positive, or ``warm_start`` of the wrong length, out of
            range or forbidden.
    """
    start = time.perf_counter()
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be positive seconds or None, got {time_limit!r}")
    check_budgets(problem)
    incumbent = None
    if warm_start is not None:
        incumbent = problem.check_choices(warm_start)
        if not problem.is_feasible(incumbent):
            logger.warning("warm start violates budgets %s; ignored", problem.violations(incumbent))
            incumbent = None

    res, found = solve(problem, time_limit=time_limit)
    if res.status == 0 and found is not None:
        status = "optimal"
    elif res.status == 1:
        status = "time_limit"
    elif res.status in (0, 4):  # every answer exceeded a budget, or HiGHS stopped otherwise
        status = "feasible"
    else:
        raise RuntimeError(f"milp failed with status {res.status}: {res.message}")

    dual = getattr(res, "mip_dual_bound", None)
    dual = float(dual) if dual is not None and math.isfinite(dual) else -math.inf
    if status == "optimal":
        choices = found
        if incumbent is not None and problem.objective(incumbent) < problem.objective(found):
            choices = incumbent  # equal up to the solver's absolute gap
        value = problem.objective(choices)
        bound = min(value, dual) if math.isfinite(dual) else value
        return problem.solution(choices, status, 0.0, time.perf_counter() - start, bound=bound, note="highs")

    # Not proven optimal: polish the best incumbent on the full objective.
    pool = [c for c in (found, incumbent, greedy(problem).choices) if c is not None]
    best = min(pool, key=problem.objective)
    polished = polish(problem, best)
    value = problem.objective(polished)
    gap = getattr(res, "mip_gap", None)
    if polished != found or gap is None or not math.isfinite(gap):
        gap = relative_gap(value, dual)
    logger.info("%s: incumbent %.6g, polished %.6g", status, problem.objective(best), value)
    return problem.solution(
        polished,
        status,
        max(0.0, float(gap)),
        time.perf_counter() - start,
        bound=min(dual, value),
        note="highs",
    )
