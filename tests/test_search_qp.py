"""Quadratic solvers (CP-SAT, SCIP, the portfolio) against brute force on small pairwise problems."""

from __future__ import annotations

import itertools
import math
import sys

import numpy as np
import pytest
import torch

from mixq.search import InfeasibleBudgetError, Problem, brute_force, greedy, ilp
from mixq.search.local import polish
from mixq.search.portfolio import SOLVERS, portfolio, run_solver
from mixq.search.terms import Terms

EXACT = ("highs", "cpsat", "scip", "scip-linear", "scip-both", "portfolio")
MAIN = ("cpsat", "scip", "portfolio")


def make(L: int, C: int, seed: int, psd: bool, frac: float = 0.55, integer_costs: bool = True) -> Problem:
    """Low-rank pair matrix (PSD) or low-rank plus symmetric noise (indefinite), CLADO's layout."""
    rng = np.random.default_rng(seed)
    n = L * C
    v = rng.normal(size=(n, 3)) * np.repeat(2.0 ** -np.arange(C), 1)[np.arange(n) % C, None]
    g = v @ v.T
    if not psd:
        noise = rng.normal(size=(n, n))
        g = g + 0.3 * (noise + noise.T)
    scores = 0.5 * np.diag(g).reshape(L, C) + 0.1 * rng.normal(size=(L, C))
    pairs = g.reshape(L, C, L, C).copy()
    pairs[np.arange(L), :, np.arange(L), :] = 0.0
    size = rng.integers(1, 6, size=(L, 1)) * (2.0 + 2.0 * np.arange(C))[None, :]
    if not integer_costs:
        size = size * 1.37 + rng.uniform(0, 0.01, size=(L, C))
    budget = float(size.min(axis=1).sum() + frac * (size.max(axis=1) - size.min(axis=1)).sum())
    return Problem(
        torch.from_numpy(scores), {"size": torch.from_numpy(size)}, {"size": budget}, torch.from_numpy(pairs)
    )


def tolerance(problem: Problem) -> float:
    return 1e-7 * max(1.0, Terms(problem).magnitude())


@pytest.mark.parametrize(
    ("seed", "psd", "solvers"),
    [(0, True, EXACT), (1, False, EXACT), (2, True, MAIN), (3, False, MAIN)],
)
def test_every_solver_matches_brute_force(seed: int, psd: bool, solvers: tuple[str, ...]) -> None:
    problem = make(6, 3, seed, psd)
    best = brute_force(problem)
    tol = tolerance(problem)
    for name in solvers:
        sol = run_solver(name, problem, time_limit=30.0)
        assert problem.is_feasible(sol.choices), name
        assert sol.objective == pytest.approx(problem.objective(sol.choices), abs=1e-12)
        assert sol.objective <= best.objective + tol, name
        assert sol.bound <= best.objective + tol, name  # a lower bound
        assert sol.status == "optimal", (name, sol.note)
        assert sol.gap <= 1e-6, (name, sol.gap)


@pytest.mark.parametrize("seed", [3])
def test_forbidden_candidates_and_fractional_costs(seed: int) -> None:
    """+inf scores forbid; non-integer costs take CP-SAT's rounded-down budget row."""
    base = make(5, 4, seed, psd=False, integer_costs=False)
    scores = base.scores.clone()
    scores[1, 0] = math.inf
    scores[3, 2] = math.inf
    problem = Problem(scores, base.costs, base.budgets, base.pairs)
    best = brute_force(problem)
    tol = tolerance(problem)
    for name in ("cpsat", "scip", "scip-both"):
        sol = run_solver(name, problem, time_limit=30.0)
        assert problem.is_feasible(sol.choices)
        assert sol.choices[1] != 0 and sol.choices[3] != 2
        assert sol.objective == pytest.approx(best.objective, abs=tol), name
        assert sol.bound <= best.objective + tol


def test_convex_form_is_exact_at_integer_points_and_convex() -> None:
    """c0 + gᵀx + ½ Σ λ (vᵀx − o)² equals f at every choice and is convex on the hull."""
    problem = make(4, 3, 7, psd=False)
    t = Terms(problem)
    cv = t.convex()
    assert (cv.lam >= 0).all() and cv.shift > 0
    for choice in itertools.product(range(3), repeat=4):
        assert cv.value(t.vector(list(choice))) == pytest.approx(problem.objective(list(choice)), abs=1e-9)
    # Convex along every segment of the relaxation's hull (random points of the simplices).
    rng = np.random.default_rng(0)
    for _ in range(200):
        x, y = (rng.dirichlet(np.ones(3), size=4).reshape(-1) for _ in range(2))
        assert cv.value(0.5 * (x + y)) <= 0.5 * (cv.value(x) + cv.value(y)) + 1e-9
    # The same with completed diagonal blocks: exact at integer points, smaller shift.
    blocks = t.completion(iterations=50)
    cb = t.convex(blocks)
    assert cb.shift <= cv.shift
    for choice in itertools.product(range(3), repeat=4):
        assert cb.value(t.vector(list(choice))) == pytest.approx(problem.objective(list(choice)), abs=1e-9)


def test_bound_below_optimum_at_short_time_limits() -> None:
    """A larger problem stopped early: bound ≤ brute-force optimum ≤ incumbent, budget kept."""
    problem = make(9, 3, 11, psd=False, frac=0.4)
    best = brute_force(problem)
    tol = tolerance(problem)
    for name in ("highs", "cpsat", "scip", "portfolio"):
        sol = run_solver(name, problem, time_limit=0.5)
        assert problem.is_feasible(sol.choices)
        assert sol.bound <= best.objective + tol <= sol.objective + 2 * tol, name
        assert sol.gap >= 0.0


@pytest.mark.parametrize("seed", [0, 5])
def test_portfolio_never_worse_than_warm_start(seed: int) -> None:
    problem = make(12, 3, seed, psd=False, frac=0.3)
    warm = polish(problem, greedy(problem).choices)
    for limit in (0.05, 2.0):
        sol = portfolio(problem, time_limit=limit, warm_start=warm)
        assert problem.is_feasible(sol.choices)
        assert sol.objective <= problem.objective(warm) + 1e-12
        assert sol.bound <= sol.objective
        # QCR runs unless HiGHS, first, already proved its incumbent optimal.
        assert "qcr" in sol.note or (sol.status == "optimal" and sol.note.startswith("highs"))


def test_infeasible_budget_raises_with_smallest_budget() -> None:
    problem = make(5, 3, 0, psd=True)
    size = problem.cost_arrays["size"]
    smallest = float(size.min(axis=1).sum())
    low = Problem(problem.scores, problem.costs, {"size": smallest - 1.0}, problem.pairs)
    for name in MAIN:
        with pytest.raises(InfeasibleBudgetError, match="smallest feasible value") as info:
            run_solver(name, low, time_limit=5.0)
        assert info.value.minimums["size"] == pytest.approx(smallest)
    # Each budget feasible alone, not together: the solvers detect it.
    other = torch.flip(problem.costs["size"], dims=[1])
    both = Problem(
        problem.scores,
        {"size": problem.costs["size"], "other": other},
        {"size": smallest, "other": float(other.min(dim=1).values.sum())},
        problem.pairs,
    )
    for name in ("cpsat", "scip", "scip-linear"):
        with pytest.raises(InfeasibleBudgetError, match="combination is infeasible"):
            run_solver(name, both, time_limit=5.0)


def test_fallback_to_highs_without_optional_solvers(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ortools and pyscipopt unimportable the default (HiGHS, QCR) still proves the optimum;
    a plan naming SCIP runs HiGHS and says so."""
    for module in ("ortools", "ortools.sat.python", "pyscipopt"):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    problem = make(6, 3, 1, psd=False)
    best = brute_force(problem).objective
    sol = ilp(problem, time_limit=30.0)
    assert sol.status == "optimal" and sol.objective == pytest.approx(best, abs=tolerance(problem))
    sol = portfolio(problem, time_limit=30.0, solvers=("highs", "scip"))
    assert "HiGHS MILP fallback" in sol.note and "not installed" in sol.note
    assert sol.objective == pytest.approx(best, abs=tolerance(problem))
    assert sol.status == "optimal"


def test_bad_input_is_named() -> None:
    problem = make(3, 3, 0, psd=True)
    with pytest.raises(ValueError, match="unknown solver 'gurobi'"):
        run_solver("gurobi", problem)
    with pytest.raises(ValueError, match="unknown solvers"):
        portfolio(problem, solvers=("cpsat", "cplex"))
    with pytest.raises(ValueError, match="must be 2 positive numbers"):
        portfolio(problem, solvers=("highs", "scip"), weights=(1.0, 0.0))
    from mixq.search.scip import scip

    with pytest.raises(ValueError, match="unknown formulation 'sdp'"):
        scip(problem, formulation="sdp")
    assert set(EXACT) <= set(SOLVERS)
