"""Branch-and-bound on the convexified objective (`mixq.search.qcr`): against brute force and LPs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.optimize import linprog, minimize

from mixq.search import InfeasibleBudgetError, Problem, brute_force
from mixq.search import qcr as qcr_module
from mixq.search.qcr import _project, _Quadratic, _Relaxation, _Restore, qcr
from mixq.search.sdp import _round as _round_sdp
from mixq.search.sdp import sdp_bound
from mixq.search.terms import Terms
from tests.test_search_qp import make, tolerance
from tests.test_search_sdp import _two_budgets


def _choices(problem: Problem) -> list[list[int]]:
    L, C = problem.allowed.shape
    return [list(c) for c in itertools.product(range(C), repeat=L) if problem.is_feasible(list(c))]


def _setup(problem: Problem) -> tuple[Terms, _Relaxation, _Restore, float]:
    t = Terms(problem)
    root = sdp_bound(problem, stages=((1e-3, 200), (1e-4, 200)))
    relax = _Relaxation(problem, t, _Quadratic.of(root.cut, t))
    return t, relax, _Restore(root.slack, t), root.bound


def _node_minimum(relax: _Relaxation, mask: np.ndarray, shift: tuple[float, np.ndarray]) -> float:
    """``min q + shift`` over the node's relaxation by SLSQP (an independent solver)."""
    q = relax.quad
    free = np.flatnonzero(mask.reshape(-1))
    L = mask.shape[0]
    layer = free // mask.shape[1]

    def full(z: np.ndarray) -> np.ndarray:
        x = np.zeros(mask.size)
        x[free] = z
        return x

    def fun(z: np.ndarray) -> tuple[float, np.ndarray]:
        x = full(z)
        grad = q.g + shift[1] + q.m @ x
        return q.k0 + shift[0] + float((q.g + shift[1]) @ x) + 0.5 * float(x @ q.m @ x), grad[free]

    cons = [{"type": "eq", "fun": lambda z, l_=l_: z[layer == l_].sum() - 1.0} for l_ in range(L)]
    for k in range(len(relax.rhs)):
        c = relax.costs[k].reshape(-1)[free]
        cons.append({"type": "ineq", "fun": lambda z, c=c, r=relax.rhs[k]: r - c @ z})
    z0 = np.array([1.0 / (layer == l_).sum() for l_ in layer])
    res = minimize(
        fun,
        z0,
        jac=True,
        method="SLSQP",
        bounds=[(0, 1)] * free.size,
        constraints=cons,
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    return float(res.fun)


@pytest.mark.parametrize(
    "problem",
    [make(6, 3, 0, psd=True), make(6, 3, 1, psd=False), make(6, 3, 2, False, 0.35, False), _two_budgets(3)],
    ids=["psd", "indefinite", "float-costs", "two-budgets"],
)
@pytest.mark.parametrize("rules", [("fractional", True), ("cost", True), ("fractional", False)])
def test_qcr_proves_the_brute_force_optimum(
    problem: Problem, rules: tuple[str, bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every node pruned: the optimum of brute force, status optimal, bound ≤ optimum (each
    branching rule, with and without reduced-cost fixing)."""
    monkeypatch.setattr(qcr_module, "BRANCHING", rules[0])
    monkeypatch.setattr(qcr_module, "FIXING", rules[1])
    best = brute_force(problem)
    sol = qcr(problem)
    tol = tolerance(problem)
    assert sol.status == "optimal" and sol.gap == 0.0, sol.note
    assert sol.objective == pytest.approx(best.objective, abs=tol)
    assert sol.bound <= best.objective + tol
    assert problem.is_feasible(sol.choices)


@pytest.mark.parametrize("seed", [4, 5])
def test_bound_after_few_nodes_is_valid(seed: int) -> None:
    """Stopped after 1 or 3 nodes (and a short root), the bound stays below the optimum."""
    problem = make(7, 3, seed, psd=seed % 2 == 0)
    best = brute_force(problem).objective
    for nodes in (1, 3):
        sol = qcr(problem, time_limit=1.0, max_nodes=nodes)
        assert sol.bound <= best + tolerance(problem)
        assert sol.objective >= best - tolerance(problem) and problem.is_feasible(sol.choices)


def test_restored_function_is_below_f_and_exact_when_every_layer_is_fixed() -> None:
    """q + shift ≤ f on every choice of a node; = f on a node of one choice; slack terms ≥ 0."""
    problem = _two_budgets(7)
    t, relax, restore, _ = _setup(problem)
    rng = np.random.default_rng(0)
    for choice in _choices(problem):
        x = t.vector(choice)
        for fixed in (0, 2, 5):
            layers = rng.choice(5, size=fixed, replace=False)
            mask = problem.allowed.copy()
            mask[layers] = False
            mask[layers, np.asarray(choice)[layers]] = True
            k, h = restore.shift(mask)
            xp = np.zeros(mask.size)
            xp[t.layer * mask.shape[1] + t.cand] = x
            value = relax.quad.value(xp) + k + h @ xp
            if fixed == 5:
                assert value == pytest.approx(problem.objective(choice), abs=tolerance(problem))
            else:
                assert value <= problem.objective(choice) + tolerance(problem)


def test_slack_is_f_minus_the_cut_term_by_term() -> None:
    """f − cut = Σ z x_i x_j + Σ (β + ρᵀx) s(x) at every feasible choice, every term ≥ 0."""
    problem = make(5, 3, 8, psd=False)
    t = Terms(problem)
    root = sdp_bound(problem, stages=((1e-3, 100),))
    sl = root.slack
    assert (sl.z >= 0).all() and (sl.beta >= 0).all() and (sl.rho >= 0).all()
    for choice in _choices(problem):
        x = t.vector(choice)
        s = sl.room - sl.cost @ x
        assert (s >= -1e-12).all()
        terms = 0.5 * x @ sl.z @ x + float(((sl.beta + sl.rho @ x) * s).sum())
        gap = problem.objective(choice) - root.cut.value(x)
        assert gap == pytest.approx(terms, abs=1e-9) or gap >= terms  # rounding is kept off the cut


@pytest.mark.parametrize("problem", [make(5, 3, 9, psd=False), _two_budgets(10)], ids=["one", "two"])
def test_node_bounds_are_certified_and_tight(problem: Problem, monkeypatch: pytest.MonkeyPatch) -> None:
    """At any x the node bound is ≤ the node's QP minimum (SLSQP); with one budget (in the
    projection) the solve's bound is within 1e-6 of it."""
    t, relax, restore, _ = _setup(problem)
    if len(relax.rhs) > 1:  # not driven to the node's optimum: validity only, fewer iterations
        monkeypatch.setattr(qcr_module, "MAX_ITERATIONS", 200)
    rng = np.random.default_rng(1)
    L, C = problem.allowed.shape
    for trial in range(4):
        mask = problem.allowed.copy()
        layer = int(rng.integers(L))
        cand = int(rng.choice(np.flatnonzero(mask[layer])))
        if trial:
            mask[layer] = False
            mask[layer, cand] = True
        if not relax.reachable(mask):
            continue
        shift = restore.shift(mask)
        exact = _node_minimum(relax, mask, shift)
        lam = np.zeros(len(relax.rhs))
        for _ in range(3):
            x = rng.normal(size=L * C)
            assert relax.bound(x, mask, lam, shift)[0] <= exact + 1e-8
        bound, x, _ = relax.solve(mask, np.ones(L * C), lam, shift, math.inf, math.inf, 1e-9)
        assert bound <= exact + 1e-8
        if len(relax.rhs) == 1:
            assert bound >= exact - 1e-6 * max(1.0, abs(exact))


def test_best_lambda_is_the_linear_program() -> None:
    """max_λ h(λ) (the breakpoints) equals min dᵀx over the node's polytope (HiGHS LP)."""
    problem = make(6, 4, 11, psd=False)
    _, relax, _, _ = _setup(problem)
    rng = np.random.default_rng(2)
    L, C = problem.allowed.shape
    for trial in range(12):
        d = rng.normal(size=(L, C)) * 10.0 ** rng.uniform(-2, 2)
        mask = problem.allowed.copy()
        if trial % 2:  # a node: two layers fixed
            for layer in rng.choice(L, size=2, replace=False):
                mask[layer] = False
                mask[layer, rng.integers(C)] = True
            if not relax.reachable(mask):
                continue
        value, lam = relax._best_lambda(d, mask, np.zeros(1))
        a_eq = np.kron(np.eye(L), np.ones((1, C)))
        lp = linprog(
            d.reshape(-1),
            A_ub=relax.costs[0].reshape(1, -1),
            b_ub=relax.rhs,
            A_eq=a_eq,
            b_eq=np.ones(L),
            bounds=[(0, 1) if m else (0, 0) for m in mask.reshape(-1)],
            method="highs",
        )
        assert value == pytest.approx(lp.fun, abs=1e-9)
        assert lam[0] >= 0


def test_projection_matches_a_generic_solver() -> None:
    """The simplices-and-budget projection equals SLSQP's and respects the budget."""
    rng = np.random.default_rng(3)
    L, C = 4, 3
    mask = np.ones((L, C), dtype=bool)
    mask[1, 2] = False
    cost = rng.uniform(0, 1, size=(L, C)) * mask
    room = 0.6
    free = np.flatnonzero(mask.reshape(-1))
    layer = free // C
    cons = [{"type": "eq", "fun": lambda z, l_=l_: z[layer == l_].sum() - 1} for l_ in range(L)]
    cons.append({"type": "ineq", "fun": lambda z: room - cost.reshape(-1)[free] @ z})
    for _ in range(5):
        y = rng.normal(size=(L, C))
        x, lam = _project(y, mask, cost, room, 0.0)
        for start in (0.5 * lam, 3.0 * lam + 1.0):  # warm starts from either side of λ
            again, lam_again = _project(y, mask, cost, room, start)
            assert np.allclose(again, x, atol=1e-9) and lam_again == pytest.approx(lam, abs=1e-9)
        assert (x >= 0).all() and np.allclose(x.sum(axis=1), 1) and (x[~mask] == 0).all()
        assert float((cost * x).sum()) <= room + 1e-9 and lam >= 0
        target = y.reshape(-1)[free]
        ref = minimize(
            lambda z, target=target: ((z - target) ** 2).sum(),
            np.full(free.size, 0.3),
            method="SLSQP",
            bounds=[(0, 1)] * free.size,
            constraints=cons,
            options={"ftol": 1e-14, "maxiter": 500},
        )
        assert np.allclose(x.reshape(-1)[free], ref.x, atol=1e-5)


def test_bad_input() -> None:
    problem = make(4, 3, 12, psd=True)
    with pytest.raises(ValueError, match=r"root_share must be in \(0, 1\), got 1.5"):
        qcr(problem, root_share=1.5)
    tight = Problem(problem.scores, problem.costs, {"size": 1.0}, problem.pairs)
    with pytest.raises(InfeasibleBudgetError, match="smallest feasible value"):
        qcr(tight)


def test_equalities_alone_give_an_exact_reformulation() -> None:
    """With only the equalities' multipliers (QCR proper) the cut equals f at every feasible choice."""
    problem = make(5, 3, 13, psd=False)
    t = Terms(problem)
    root = sdp_bound(problem, stages=((1e-3, 100),), exact=True)
    assert not root.slack.z.any() and not root.slack.rho.any() and not root.slack.beta.any()
    for choice in _choices(problem):
        value = root.cut.value(t.vector(choice))
        assert value == pytest.approx(problem.objective(choice), abs=1e-6 * max(1.0, abs(value)))
        assert value <= problem.objective(choice) + 1e-12


@pytest.mark.parametrize("seed", [14, 15])
def test_active_set_methods_reach_the_node_minimum(seed: int) -> None:
    """From a parent's solution, the primal-dual guess (when it converges) and the primal active
    set reach the node's QP minimum (SLSQP), at feasible points, with q never above the start."""
    problem = make(6, 3, seed, psd=seed % 2 == 0)
    _, relax, restore, _ = _setup(problem)
    rng = np.random.default_rng(seed)
    L, C = problem.allowed.shape
    cost, room = relax.costs[0], float(relax.rhs[0])
    parent = problem.allowed.copy()
    shift0 = restore.shift(parent)
    _, x_parent, _ = relax.solve(parent, np.ones(L * C), np.zeros(1), shift0, math.inf, math.inf, 1e-12)
    converged = 0
    for _ in range(6):
        mask = parent.copy()
        for layer in rng.choice(L, size=int(rng.integers(1, 3)), replace=False):
            mask[layer] = False
            mask[layer, rng.integers(C)] = True
        if not relax.reachable(mask):
            continue
        shift = restore.shift(mask)
        lin = relax.quad.g + shift[1]
        exact = _node_minimum(relax, mask, shift)

        def value(x: np.ndarray, shift: tuple[float, np.ndarray] = shift) -> float:
            return relax.quad.value(x) + shift[0] + float(shift[1] @ x)

        def feasible(x: np.ndarray, mask: np.ndarray = mask) -> bool:
            xs = x.reshape(L, C)
            return bool(
                (x >= 0).all()
                and (xs[~mask] == 0).all()
                and np.allclose(xs.sum(axis=1), 1.0)
                and float((cost * xs).sum()) <= room + 1e-9
            )

        guess = relax._pdas(x_parent, mask, lin)
        if guess is not None:
            converged += 1
            assert feasible(guess) and value(guess) == pytest.approx(exact, abs=1e-7)
        start = _project(x_parent.reshape(L, C), mask, cost, room, 0.0)[0].reshape(-1)
        x = relax._face(start, mask, lin, rounds=200)
        assert feasible(x) and value(x) <= value(start) + 1e-12
        assert value(x) == pytest.approx(exact, abs=1e-7)
        assert relax.bound(x, mask, np.zeros(1), shift)[0] == pytest.approx(exact, abs=1e-7)
    assert converged >= 1


@pytest.mark.parametrize("problem", [make(5, 3, 16, psd=True), _two_budgets(17)], ids=["one", "two"])
def test_fixing_drops_only_candidates_that_cannot_beat_the_cutoff(
    problem: Problem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every candidate that reduced-cost fixing drops has, over the node's choices that take it
    (brute force), an objective at least the cutoff; at some cutoff something is dropped."""
    monkeypatch.setattr(qcr_module, "MAX_ITERATIONS", 200)
    t, relax, restore, _ = _setup(problem)
    rng = np.random.default_rng(18)
    L, C = problem.allowed.shape
    choices = _choices(problem)
    dropped = 0
    for trial in range(6):
        mask = problem.allowed.copy()
        if trial % 2:
            layer = int(rng.integers(L))
            mask[layer] = False
            mask[layer, rng.integers(C)] = True
        inside = [c for c in choices if all(mask[l_, a] for l_, a in enumerate(c))]
        if not inside or not relax.reachable(mask):
            continue
        shift = restore.shift(mask)
        lam = np.zeros(len(relax.rhs))
        x = relax.solve(mask, np.ones(L * C), lam, shift, math.inf, math.inf, 1e-12)[1]
        if trial >= 4:  # any point gives valid fixings
            x = np.abs(rng.normal(size=L * C))
        for layer, cand in zip(*np.nonzero(mask), strict=True):  # the implied bound ≤ the child's QP
            if trial >= 2:
                break
            child = mask.copy()
            child[layer] = False
            child[layer, cand] = True
            if relax.reachable(child):
                cutoff = _node_minimum(relax, child, shift) + 1e-7
                assert relax.fixing(x, mask, lam, shift, cutoff)[layer, cand]
        best = min(problem.objective(c) for c in inside)
        for cutoff in (best, best + 0.5 * abs(best) + 1e-3):
            kept = relax.fixing(x, mask, lam, shift, cutoff)
            assert (kept <= mask).all()
            for layer, cand in zip(*np.nonzero(mask & ~kept), strict=True):
                dropped += 1
                values = [problem.objective(c) for c in inside if c[layer] == cand]
                assert min(values, default=math.inf) >= cutoff - tolerance(problem)
    assert dropped > 0


def test_roundings_stop_at_the_deadline() -> None:
    """No rounding is begun after the deadline; without one they give feasible choices."""
    problem = make(5, 3, 19, psd=True)
    t = Terms(problem)
    root = sdp_bound(problem, stages=((1e-3, 100),))
    assert _round_sdp(problem, t, root.x, root.y, samples=4, deadline=-math.inf) == []
    pool = _round_sdp(problem, t, root.x, root.y, samples=4)
    assert pool and all(problem.is_feasible(c) for c in pool)
