"""The semidefinite bound (`mixq.search.sdp`): validity against brute force, its algebra, rounding."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from mixq.search import Problem, brute_force, greedy
from mixq.search.local import polish
from mixq.search.portfolio import portfolio
from mixq.search.sdp import _budget_rows, _Dual, sdp, sdp_bound
from mixq.search.terms import Terms
from tests.test_search_qp import make, tolerance


def _two_budgets(seed: int) -> Problem:
    """Indefinite pairs, a forbidden candidate and a second, crossing budget."""
    base = make(5, 3, seed, psd=False, frac=0.5)
    scores = base.scores.clone()
    scores[2, 1] = math.inf
    other = torch.flip(base.costs["size"], dims=[1]) + 1.0
    budget = float(
        other.min(dim=1).values.sum() + 0.6 * (other.max(dim=1).values - other.min(dim=1).values).sum()
    )
    return Problem(scores, {**base.costs, "other": other}, {**base.budgets, "other": budget}, base.pairs)


def _dual(problem: Problem) -> _Dual:
    t = Terms(problem)
    return _Dual(t, _budget_rows(problem, t))


def _feasible_y(problem: Problem, choice: list[int]) -> np.ndarray:
    """``Y = (1, x)(1, x)ᵀ`` of a choice, over the allowed variables."""
    t = Terms(problem)
    x = np.concatenate([[1.0], t.vector(choice)])
    return np.outer(x, x)


def test_adjoint_is_the_transpose_of_the_operator() -> None:
    """⟨A*(y), P⟩ = ⟨y, A(P)⟩ for random y and symmetric P (the gradient's algebra)."""
    d = _dual(_two_budgets(0))
    rng = np.random.default_rng(0)
    for _ in range(3):
        y = rng.normal(size=d._layout.size)
        p = rng.normal(size=(d.n + 1, d.n + 1))
        p = p + p.T
        assert float((d.operator(y) * p).sum()) == pytest.approx(float(y @ d.adjoint(p)), rel=1e-10)


def test_every_feasible_choice_satisfies_the_relaxation() -> None:
    """At Y = (1,x)(1,x)ᵀ of every feasible choice: equalities hold, inequalities are ≥ 0, f = ⟨C, Y⟩."""
    problem = _two_budgets(1)
    d = _dual(problem)
    lay = d._layout
    free = np.isinf(lay.bounds.lb)
    checked = 0
    for choice in itertools.product(range(3), repeat=5):
        choice = list(choice)
        if not problem.is_feasible(choice):
            continue
        y_mat = _feasible_y(problem, choice)
        residual = d.adjoint(y_mat) - lay.b  # ⟨A_k, Y⟩ − b_k
        assert np.abs(residual[free]).max() < 1e-9
        assert residual[~free].min() > -1e-9
        assert float((d.c * y_mat).sum()) * d.scale == pytest.approx(problem.objective(choice), abs=1e-9)
        checked += 1
    assert checked > 20


def test_smoothed_gradient_matches_finite_differences() -> None:
    d = _dual(make(4, 3, 2, psd=True))
    rng = np.random.default_rng(1)
    y = 0.1 * rng.normal(size=d._layout.size)
    value, grad = d(y, 1e-2)
    for i in rng.choice(y.size, size=8, replace=False):
        e = np.zeros_like(y)
        e[i] = 1e-6
        numeric = (d(y + e, 1e-2)[0] - d(y - e, 1e-2)[0]) / 2e-6
        assert numeric == pytest.approx(grad[i], rel=1e-4, abs=1e-6)
    del value


@pytest.mark.parametrize(("seed", "psd"), [(0, True), (1, False), (4, True)])
def test_bound_below_brute_force_and_tighter_than_the_convex_qp(seed: int, psd: bool) -> None:
    """bound ≤ optimum; on PSD problems it closes most of the gap of the convex form's root (SCIP's)."""
    problem = make(6, 3, seed, psd)
    best = brute_force(problem).objective
    res = sdp_bound(problem)
    assert res.bound <= best + tolerance(problem)
    assert res.bound > -math.inf and res.evaluations > 0
    if psd:  # the convex QP relaxation's value at its own minimizer is ≤ its value at x̂
        t = Terms(problem)
        cv = t.convex(t.completion(iterations=100))
        qp_root = _qp_bound(problem, cv, t)
        assert res.bound >= qp_root - 1e-9
        # At least half of the convex root's gap closed (measured: 66 % and 94 % on these two).
        assert best - res.bound <= 0.5 * (best - qp_root), (best, res.bound, qp_root)


def _qp_bound(problem: Problem, cv, t: Terms) -> float:  # noqa: ANN001
    """The continuous minimum of the convex form over the simplices and the budget (SLSQP)."""
    from scipy.optimize import Bounds, LinearConstraint, minimize

    a = np.zeros((t.num_layers, t.n))
    a[t.layer, np.arange(t.n)] = 1.0
    ((cost, room),) = _budget_rows(problem, t)
    res = minimize(
        cv.value,
        np.full(t.n, 1.0 / 3.0),
        jac=lambda x: cv.g + cv.V @ (cv.lam * (cv.V.T @ x - cv.offset)),
        method="SLSQP",
        bounds=Bounds(0.0, 1.0),
        constraints=[LinearConstraint(a, 1.0, 1.0), LinearConstraint(cost[None, :], -np.inf, room)],
        options={"maxiter": 500, "ftol": 1e-14},
    )
    return float(res.fun)


def test_two_budgets_and_forbidden_candidates() -> None:
    problem = _two_budgets(3)
    best = brute_force(problem).objective
    sol = sdp(problem, time_limit=20.0)
    assert problem.is_feasible(sol.choices) and sol.choices[2] != 1
    assert sol.bound <= best + tolerance(problem) <= sol.objective + 2 * tolerance(problem)


@pytest.mark.parametrize("seed", [0, 5])
def test_solver_never_worse_than_warm_start_and_time_limited(seed: int) -> None:
    problem = make(12, 3, seed, psd=False, frac=0.3)
    warm = polish(problem, greedy(problem).choices)
    sol = sdp(problem, time_limit=0.3, warm_start=warm)
    assert problem.is_feasible(sol.choices)
    assert sol.objective <= problem.objective(warm) + 1e-12
    assert sol.bound <= sol.objective and sol.gap >= 0.0
    assert sol.seconds < 20.0  # the limit stops the bound (rounding and polish add a little)


def test_portfolio_runs_the_sdp_bound_and_keeps_the_best() -> None:
    problem = make(9, 3, 11, psd=True, frac=0.4)
    best = brute_force(problem).objective
    sol = portfolio(problem, time_limit=10.0, solvers=("sdp", "highs"))
    assert "sdp" in sol.note
    assert sol.objective == pytest.approx(best, abs=tolerance(problem))
    assert sol.bound <= best + tolerance(problem)


def test_dual_cut_is_a_convex_minorant_above_the_bound() -> None:
    """q(x) ≤ f(x) at every feasible choice, q ≥ the bound on the relaxation, q convex; SCIP takes it."""
    from mixq.search.scip import scip

    problem = make(5, 3, 1, psd=False)
    res = sdp_bound(problem)
    t = Terms(problem)
    cut = res.cut
    assert cut is not None and (cut.lam >= 0).all()
    for choice in itertools.product(range(3), repeat=5):
        if problem.is_feasible(list(choice)):
            assert cut.value(t.vector(list(choice))) <= problem.objective(list(choice)) + 1e-9
    rng = np.random.default_rng(0)
    for _ in range(300):
        assert cut.value(rng.dirichlet(np.ones(3), size=5).reshape(-1)) >= res.bound - 1e-9
    best = brute_force(problem).objective
    sol = scip(problem, time_limit=30.0, cuts=[cut])
    assert sol.status == "optimal" and sol.objective == pytest.approx(best, abs=tolerance(problem))
    branched = sdp(problem, time_limit=20.0, branch=0.5)
    assert "cuts" in branched.note and branched.bound <= best + tolerance(problem)


def test_default_plan_by_size() -> None:
    """Small problems run HiGHS and QCR half each; large ones give QCR (SDP root) most of the time."""
    from mixq.search.portfolio import DEFAULT, LARGE, LARGE_WEIGHTS, SMALL, SMALL_WEIGHTS, default_plan

    small, large = make(5, 3, 0, psd=True), make(LARGE // 3 + 1, 3, 0, psd=True)
    assert default_plan(small) == (SMALL, SMALL_WEIGHTS) and default_plan(large) == (DEFAULT, LARGE_WEIGHTS)
    assert "qcr" in DEFAULT and LARGE_WEIGHTS[DEFAULT.index("qcr")] > 0.5
    sol = portfolio(large, time_limit=3.0)
    assert "qcr: sdp bound" in sol.note and large.is_feasible(sol.choices) and sol.bound <= sol.objective
