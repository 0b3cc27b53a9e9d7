"""Pairwise bit allocation with OR-Tools CP-SAT on the marginal (Sherali–Adams level-1) model.

Solver: Perron and Didier, "CP-SAT", OR-Tools (Google), https://developers.google.com/optimization.
Model (the program of `mixq.search.terms`, symbols as there):

- Boolean ``x[l, c]`` per allowed candidate, ``ExactlyOne`` per layer;
- per layer pair ``l < m`` with a non-zero block, Boolean ``y[l, c, m, c']`` with the marginal rows
  ``Σ_{c'} y[l, c, m, c'] = x[l, c]`` and ``Σ_c y[l, c, m, c'] = x[m, c']`` (at 0/1 points they
  force ``y = x[l, c]·x[m, c']``; their LP relaxation is the local polytope, tighter than
  McCormick products);
- budgets as integer rows (`mixq.search.terms.IntegerBudget`);
- objective ``Σ round(σ s) x + Σ round(σ Q) y`` with ``σ = 2^36 / M`` and
  ``M = Σ_l max|s_l| + Σ_blocks max|Q_block|`` (`Terms.magnitude`).

[DESIGN] Rounding: every choice activates ``L`` linear terms and one ``y`` per block, so the
scaled objective differs from ``σ f(x)`` by at most ``E = (L + #blocks)/2`` and the reported
bound is ``(CP-SAT's bound − E)/σ``; the incumbent's objective is re-evaluated exactly.
``num_workers = 1`` by default (a shared machine); a warm start is given as a solution hint.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from mixq.search.problem import Problem, Solution, check_budgets, combination_infeasible
from mixq.search.terms import Terms, conclude

__all__ = ["cpsat"]

logger = logging.getLogger(__name__)

_SCALE_BITS = 36


def _pair_terms(model, t: Terms, x: list, sigma: float, hx: np.ndarray | None) -> tuple[list, list[int]]:  # noqa: ANN001
    """Add the ``y`` Booleans and marginal rows of every block; return their objective terms."""
    obj_vars: list = []
    obj_coef: list[int] = []
    for _, _, vl, vm, block in t.blocks:
        y = [[model.new_bool_var("") for _ in vm] for _ in vl]
        if hx is not None:  # a complete hint: y = x[l, c]·x[m, c']
            for a, i in enumerate(vl):
                for b, j in enumerate(vm):
                    model.add_hint(y[a][b], bool(hx[i] and hx[j]))
        for a, i in enumerate(vl):
            model.add(sum(y[a]) == x[i])
        for b, j in enumerate(vm):
            model.add(sum(y[a][b] for a in range(len(vl))) == x[j])
        for a in range(len(vl)):
            for b in range(len(vm)):
                coef = int(round(sigma * block[a, b]))
                if coef:
                    obj_vars.append(y[a][b])
                    obj_coef.append(coef)
    return obj_vars, obj_coef


def cpsat(
    problem: Problem,
    time_limit: float | None = None,
    warm_start: list[int] | None = None,
    workers: int = 1,
) -> Solution:
    """Minimize ``f(x)`` under the budgets with CP-SAT (see the module docstring).

    Args:
        problem: The problem.
        time_limit: Seconds for CP-SAT; None for no limit.
        warm_start: A feasible choice per layer: the solution hint, and the answer when
            CP-SAT finds nothing better in time.
        workers: CP-SAT's ``num_workers``.

    Returns:
        A `Solution` with ``bound`` and ``gap``: status ``"optimal"`` when CP-SAT proved its
        scaled optimum, else ``"time_limit"``.

    Raises:
        ImportError: OR-Tools is not installed (``pip install mixq[search]``).
        InfeasibleBudgetError: No choice satisfies the budgets.
    """
    from ortools.sat.python import cp_model

    start = time.perf_counter()
    check_budgets(problem)
    t = Terms(problem)
    model = cp_model.CpModel()
    x = [model.new_bool_var(f"x{i}") for i in range(t.n)]
    for v in t.layer_vars:
        model.add_exactly_one(x[i] for i in v)
    budgets = t.integer_budgets()
    for b in budgets:
        nz = np.flatnonzero(b.coef)
        model.add(cp_model.LinearExpr.weighted_sum([x[i] for i in nz], [int(b.coef[i]) for i in nz]) <= b.rhs)
    hint = None
    if warm_start is not None and problem.is_feasible(warm_start):
        hint = problem.check_choices(warm_start)
    hx = t.vector(hint) if hint is not None else None
    if hx is not None:
        for i in range(t.n):
            model.add_hint(x[i], bool(hx[i]))
    magnitude = t.magnitude()
    sigma = 2.0**_SCALE_BITS / magnitude if magnitude > 0 else 1.0
    obj_vars, obj_coef = list(x), [int(round(sigma * v)) for v in t.linear]
    pv, pc = _pair_terms(model, t, x, sigma, hx)
    obj_vars += pv
    obj_coef += pc
    keep = [i for i, c in enumerate(obj_coef) if c]
    model.minimize(cp_model.LinearExpr.weighted_sum([obj_vars[i] for i in keep], [obj_coef[i] for i in keep]))

    solver = cp_model.CpSolver()
    solver.parameters.num_workers = workers
    if time_limit is not None:
        solver.parameters.max_time_in_seconds = max(1e-3, time_limit - (time.perf_counter() - start))
    code = solver.solve(model)
    if code == cp_model.INFEASIBLE:
        raise combination_infeasible(problem)
    found = None
    if code in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        found = t.choices(np.array([solver.value(v) for v in x], dtype=float))
        if not problem.is_feasible(found):  # only possible with an inexact integer budget
            logger.warning("cpsat answer exceeds budgets %s; dropped", problem.violations(found))
            found = None
    error = 0.5 * (t.num_layers + len(t.blocks))
    bound = (solver.best_objective_bound - error) / sigma if code != cp_model.UNKNOWN else -np.inf
    exact = all(b.exact for b in budgets)
    note = f"cpsat: {solver.status_name(code)}, scale 2^{_SCALE_BITS}/{magnitude:.6g}"
    proven = code == cp_model.OPTIMAL and exact
    return conclude(problem, found, hint, float(bound), proven, time.perf_counter() - start, note)
