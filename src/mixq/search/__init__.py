"""Solvers that pick one candidate per layer under cost budgets.

The objective and constraints are defined once in `mixq.search.problem`:
``f(x) = Σ_l scores[l, x_l] + Σ_{l<m} ½ (pairs[l, x_l, m, x_m] + pairs[m, x_m, l, x_l])``
subject to ``Σ_l costs[k][l, x_l] ≤ budgets[k]``.

- `ilp`: the exact solver the methods call: `highs` without pairs, `portfolio` with them.
- `highs`: MILP with HiGHS (`scipy.optimize.milp`), pairs linearized.
- `portfolio`: warm start (greedy + local search), then HiGHS and QCR (HiGHS and SCIP on small
  problems); best incumbent and best proven bound (`Solution.bound`, `gap`, `note`). The solvers
  it draws on: `qcr.qcr` (branch-and-bound on the convex minorant of the semidefinite
  relaxation, numpy/scipy), `sdp.sdp` (the relaxation's bound and roundings), `scip.scip`
  (convex form of the quadratic objective, PySCIPOpt) and `cpsat.cpsat` (OR-Tools CP-SAT), the
  last two in the optional ``search`` extra, imported only when run.
- `greedy`: fast, ignores pairs, always feasible.
- `brute_force`: enumerates every choice; the test oracle.
- `pareto_sweep`: `ilp` over a list of values of one budget, non-dominated results.
"""

from mixq.search.brute import brute_force
from mixq.search.greedy import greedy
from mixq.search.ilp import highs, ilp, pareto_sweep
from mixq.search.portfolio import portfolio
from mixq.search.problem import InfeasibleBudgetError, Problem, Solution

__all__ = [
    "InfeasibleBudgetError",
    "Problem",
    "Solution",
    "brute_force",
    "greedy",
    "highs",
    "ilp",
    "pareto_sweep",
    "portfolio",
]
