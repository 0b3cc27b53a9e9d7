"""Pairwise bit allocation with SCIP (PySCIPOpt), the quadratic objective kept as a convex term.

Solver: Bestuzheva et al., "The SCIP Optimization Suite 8.0" (2021); PySCIPOpt, Maher et al.,
ICMS 2016. Binary ``x``, one-hot rows and budget rows as in `mixq.search.formulation`; the
objective in one of two forms (symbols of `mixq.search.terms`):

- ``"convex"``: ``min c0 + gᵀx + t`` with ``z_k = v_kᵀx − v_kᵀx0`` and the convex quadratic row
  ``t ≥ ½ Σ_k λ_k z_k²`` (`Terms.convex`). SCIP's branch-and-bound then bounds every node by
  the convex QP relaxation (outer approximation of a convex row), which sees the quadratic
  objective, unlike any linearization.
- ``"linear"``: the marginal linearization of `mixq.search.formulation` (continuous ``y``).
- ``"both"``: ``min w`` with ``w ≥`` each of the two forms (both exact at integer points), so
  every node bound is the larger of the two relaxations.

Single-threaded (SCIP's default). Budget rows use float coefficients; an answer that exceeds a
budget within SCIP's feasibility tolerance is dropped (the warm start is kept instead).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import numpy as np

from mixq.search.problem import Problem, Solution, check_budgets, combination_infeasible
from mixq.search.terms import Convex, Terms, conclude

__all__ = ["FORMULATIONS", "scip"]

logger = logging.getLogger(__name__)

FORMULATIONS = ("convex", "linear", "both")


def _linear_objective(model, t: Terms, x: list) -> object:  # noqa: ANN001
    """Add the marginal ``y`` variables and rows; return the linear objective expression."""
    from pyscipopt import quicksum

    terms = [quicksum(float(t.linear[i]) * x[i] for i in range(t.n))]
    for _, _, vl, vm, block in t.blocks:
        y = [[model.addVar(lb=0.0, ub=1.0) for _ in vm] for _ in vl]
        for a, i in enumerate(vl):
            model.addCons(quicksum(y[a]) == x[i])
        for b, j in enumerate(vm):
            model.addCons(quicksum(y[a][b] for a in range(len(vl))) == x[j])
        terms.append(
            quicksum(
                float(block[a, b]) * y[a][b] for a in range(len(vl)) for b in range(len(vm)) if block[a, b]
            )
        )
    return quicksum(terms)


def _convex_objective(model, t: Terms, x: list, seconds: float | None) -> object:  # noqa: ANN001
    """Add ``z`` and the convex row of `Terms.convex`; return ``c0 + gᵀx + t`` (`_cut_row`)."""
    return _cut_row(model, t.convex(t.completion(seconds=seconds)), x)


def _cut_row(model, cut: Convex, x: list) -> object:  # noqa: ANN001
    """``c0 + gᵀx + s`` with ``s ≥ ½ Σ_k λ_k (v_kᵀx − o_k)²`` added as a convex row."""
    from pyscipopt import quicksum

    z = []
    for k in range(cut.lam.size):
        col = cut.V[:, k]
        zk = model.addVar(lb=None, ub=None)
        nz = np.flatnonzero(np.abs(col) > 1e-15)
        model.addCons(zk == quicksum(float(col[i]) * x[i] for i in nz) - float(cut.offset[k]))
        z.append(zk)
    s = model.addVar(lb=0.0, ub=None)
    if z:
        model.addCons(quicksum(0.5 * float(cut.lam[k]) * z[k] * z[k] for k in range(len(z))) <= s)
    return cut.c0 + quicksum(float(cut.g[i]) * x[i] for i in range(len(x)) if cut.g[i]) + s


def _budget_rows(model, problem: Problem, t: Terms, x: list) -> None:  # noqa: ANN001
    """Add every finite budget, shifted by each layer's cheapest cost and scaled to [0, 1]."""
    from pyscipopt import quicksum

    for budget in (b for b in problem.budgets.items() if math.isfinite(b[1])):
        cost = problem.cost_arrays[budget[0]][t.layer, t.cand]
        low = np.array([cost[v].min() for v in t.layer_vars])
        shifted = cost - low[t.layer]
        top = float(shifted.max())
        if top > 0:
            room = (float(budget[1]) - float(low.sum())) / top
            model.addCons(quicksum(float(shifted[i] / top) * x[i] for i in range(t.n) if shifted[i]) <= room)


def scip(
    problem: Problem,
    time_limit: float | None = None,
    warm_start: list[int] | None = None,
    formulation: str = "convex",
    cuts: Sequence[Convex] = (),
) -> Solution:
    """Minimize ``f(x)`` under the budgets with SCIP (see the module docstring).

    Args:
        problem: The problem.
        time_limit: Seconds for SCIP (model building included); None for no limit.
        warm_start: A feasible choice per layer, given to SCIP as a starting solution and
            returned when SCIP finds nothing better.
        formulation: ``"convex"``, ``"linear"`` or ``"both"``.
        cuts: convex functions (`mixq.search.terms.Convex`, over `Terms`' variables) that are
            at most ``f`` at every feasible choice, added as ``w ≥ cut(x)`` rows: every node
            bound is then at least each cut's relaxed minimum (`mixq.search.sdp`'s dual cut
            lifts the root bound to the semidefinite bound).

    Returns:
        A `Solution` with ``bound`` and ``gap``: status ``"optimal"`` when SCIP proved
        optimality, else ``"time_limit"``.

    Raises:
        ImportError: PySCIPOpt is not installed (``pip install mixq[search]``).
        ValueError: Unknown ``formulation``.
        InfeasibleBudgetError: No choice satisfies the budgets.
    """
    if formulation not in FORMULATIONS:
        raise ValueError(f"unknown formulation {formulation!r}; valid: {list(FORMULATIONS)}")
    from pyscipopt import Model, quicksum

    start = time.perf_counter()
    check_budgets(problem)
    t = Terms(problem)
    completion = None if time_limit is None else 0.1 * time_limit
    model = Model()
    model.hideOutput()
    model.setParam("parallel/maxnthreads", 1)
    x = [model.addVar(vtype="B") for _ in range(t.n)]
    for v in t.layer_vars:
        model.addCons(quicksum(x[i] for i in v) == 1)
    _budget_rows(model, problem, t, x)
    if formulation == "linear" and not cuts:
        model.setObjective(_linear_objective(model, t, x), "minimize")
    else:
        w = model.addVar(lb=None, ub=None)
        if formulation in ("convex", "both"):
            model.addCons(w >= _convex_objective(model, t, x, completion))
        if formulation in ("linear", "both"):
            model.addCons(w >= _linear_objective(model, t, x))
        for cut in cuts:
            model.addCons(w >= _cut_row(model, cut, x))
        model.setObjective(w, "minimize")
    hint = None
    if warm_start is not None and problem.is_feasible(warm_start):
        hint = problem.check_choices(warm_start)
        hx = t.vector(hint)
        sol = model.createPartialSol()
        for i in range(t.n):
            model.setSolVal(sol, x[i], float(hx[i]))
        model.addSol(sol)
    if time_limit is not None:
        model.setParam("limits/time", max(1e-3, time_limit - (time.perf_counter() - start)))
    model.optimize()
    code = model.getStatus()
    if code == "infeasible":
        raise combination_infeasible(problem)
    found = None
    if model.getNSols() > 0:
        best_sol = model.getBestSol()
        found = t.choices(np.array([model.getSolVal(best_sol, v) for v in x]))
        if not problem.is_feasible(found):
            logger.warning("scip answer exceeds budgets %s; dropped", problem.violations(found))
            found = None
    bound = float(model.getDualbound())
    if not math.isfinite(bound) or bound <= -model.infinity():  # no bound yet
        bound = -math.inf
    note = f"scip ({formulation}{' + cuts' if cuts else ''}): {code}"
    return conclude(problem, found, hint, bound, code == "optimal", time.perf_counter() - start, note)
