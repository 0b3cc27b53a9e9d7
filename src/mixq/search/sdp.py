"""A lower bound from the semidefinite relaxation of the pairwise problem, and incumbents from it.

The binary quadratic program of `mixq.search.terms` (``f(x) = sᵀx + ½ xᵀHx``, one-hot rows,
budget rows) is relaxed to the matrix ``Y = [1 xᵀ; x X] ⪰ 0`` that stands for ``(1, x)(1, x)ᵀ``
(Shor, "Quadratic optimization problems", Soviet J. Comput. Syst. Sci. 25, 1987), tightened by
the products of the constraints with the variables (the reformulation-linearization technique:
Sherali and Adams, SIAM J. Discrete Math. 3, 1990) and by ``X ≥ 0`` (a doubly nonnegative
relaxation). With budget ``k``'s costs shifted by each layer's cheapest and scaled, ``c_k ≥ 0``
and room ``r_k``, the relaxation is

    min ⟨C, Y⟩ = sᵀx + ½⟨H, X⟩   s.t.  Y ⪰ 0,  Y_00 = 1,  X_ii = x_i,  X_(l,a),(l,b) = 0 (a ≠ b),
        Σ_a x_(l,a) = 1,   Σ_a X_(l,a),j = x_j  (every layer l and variable j),   X ≥ 0,
        r_k − c_kᵀx ≥ 0,   r_k x_i − (X c_k)_i ≥ 0   (the budget times x_i).

Every ``Y`` of a feasible choice satisfies these, and has trace ``a = 1 + L``. Writing the
constraints as ``⟨A_k, Y⟩ = b_k`` or ``≥ b_k``, for *any* multipliers ``y`` (``y_k ≥ 0`` on the
inequalities) weak duality with the trace gives

    f(x) ≥ bᵀy + a · λ_min(C − Σ_k y_k A_k)          for every feasible choice x,

the eigenvalue form of the dual (Helmberg and Rendl, "A spectral bundle method for semidefinite
programming", SIAM J. Optim. 10, 2000). `sdp_bound` maximizes the right side over ``y`` with
L-BFGS-B (Byrd, Lu, Nocedal, Zhu, SIAM J. Sci. Comput. 16, 1995) on the smoothed minimum
eigenvalue ``λ_μ(S) = −μ log Σ_i exp(−λ_i/μ)`` (Nesterov, "Smoothing technique and its
applications in semidefinite optimization", Math. Program. 110, 2007) for decreasing ``μ``. The
exact value of the right side is computed at every evaluated ``y`` (its eigenvalues are at hand)
and the largest is the bound: valid whatever the optimizer's progress, so a time limit only
loosens it.

Incumbents: ``∂λ_μ/∂S = P`` (the softmax-weighted eigenvectors) approximates ``Y / a`` of the
relaxation's optimum; from ``Ŷ = P / P_00`` and ``x̂ = Ŷ_0,1:`` choices are rounded (`_round`:
the nearest plan, a Frank–Wolfe step, Gaussian roundings), each made feasible by the
multiple-choice knapsack (`mixq.search.highs` without pairs) and polished by
`mixq.search.local.polish`; the best of them and the warm start is returned.

Symbols: ``C`` ``# [N, N]`` with ``N = n + 1`` (row 0 the constant); ``y`` the multipliers in the
groups of `_Layout`; ``S = C − A*(y)``; ``a = 1 + L``.

[DESIGN] A first-order method on the dual instead of an interior-point SDP solver (none is
installed): its bound is below the relaxation's optimum by how far the optimizer got in the
time given. No branching: the bound is the root's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import Bounds, minimize

from mixq.search.local import polish
from mixq.search.problem import Problem, Solution, budget_tolerance, check_budgets, relative_gap
from mixq.search.terms import Convex, Terms

__all__ = ["SdpBound", "Slack", "sdp", "sdp_bound", "slack_terms"]

# (μ relative to max|C|, L-BFGS-B iterations): the smoothing stages, each started from the last.
STAGES = ((1e-3, 300), (1e-4, 300), (3e-5, 300), (1e-5, 300))
BRANCH = 0.0  # share of sdp's time for SCIP's branch-and-bound with the dual cut (no gain measured in 60 s)
MAX_VARIABLES = 1200  # larger problems: no bound (one eigendecomposition of N² entries per step)


@dataclass
class SdpBound:
    """The result of `sdp_bound`: the best bound, the relaxation's ``x̂`` and the work done."""

    bound: float
    x: np.ndarray | None  # [n] x̂ of the last stage (None when nothing ran)
    evaluations: int
    seconds: float
    stages: list[dict]
    cut: Convex | None = None  # q(x) ≤ f(x) at every feasible choice, convex, min ≥ bound (`dual_cut`)
    y: np.ndarray | None = None  # [N, N] Ŷ = P / P_00 of the last stage (the relaxation's Y)
    slack: Slack | None = None  # f − cut at the feasible choices, term by term (`slack_terms`)


@dataclass(frozen=True)
class Slack:
    """What the inequality multipliers take off ``f`` in `dual_cut`, in the problem's units.

    At every feasible choice ``x`` (over `Terms`' variables), with ``s_k(x) = room[k] − cost[k]ᵀx``,

        f(x) − cut(x) = Σ_{i<j} z[i, j] x_i x_j + Σ_k (beta[k] + rho[k]ᵀx) s_k(x) + rounding,

    each term ``≥ 0`` (``z, beta, rho ≥ 0``) and ``rounding ≥ 0`` (taken off the cut's constant).
    """

    z: np.ndarray  # [n, n] symmetric, zero on the diagonal and within layers
    beta: np.ndarray  # [K]
    rho: np.ndarray  # [K, n]
    cost: np.ndarray  # [K, n] the budget rows of `_budget_rows` (shifted, scaled)
    room: np.ndarray  # [K]


class _Layout:
    """The multiplier groups: name -> (start, stop), bounds and the right-hand sides ``b``."""

    def __init__(self, t: Terms, budgets: list[tuple[np.ndarray, float]], exact: bool = False) -> None:
        n, L = t.n, t.num_layers
        self.same = np.triu((t.layer[:, None] == t.layer[None, :]), 1)
        self.same_idx = np.nonzero(self.same)
        self.diff_idx = np.nonzero(np.triu(t.layer[:, None] != t.layer[None, :], 1))
        sizes = {"y0": 1, "u": n, "v": L, "r": L * n, "w": len(self.same_idx[0]), "z": len(self.diff_idx[0])}
        for k in range(len(budgets)):
            sizes |= {f"beta{k}": 1, f"rho{k}": n}
        self.slices: dict[str, slice] = {}
        start = 0
        for name, size in sizes.items():
            self.slices[name] = slice(start, start + size)
            start += size
        self.size = start
        lo, hi = np.full(start, -np.inf), np.full(start, np.inf)
        for name in self.slices:
            if name == "z" or name.startswith(("beta", "rho")):
                lo[self.slices[name]] = 0.0
                if exact:  # only the equalities: the dual cut is then exact at every choice
                    hi[self.slices[name]] = 0.0
        self.bounds = Bounds(lo, hi)
        self.b = np.zeros(start)
        self.b[self.slices["y0"]] = 1.0
        self.b[self.slices["v"]] = 1.0


def _budget_rows(problem: Problem, t: Terms) -> list[tuple[np.ndarray, float]]:
    """Each finite budget as ``(c, r)``: costs shifted by each layer's cheapest, scaled to max 1."""
    out = []
    for name, budget in problem.budgets.items():
        if not math.isfinite(budget):
            continue
        cost = problem.cost_arrays[name][t.layer, t.cand]
        low = np.array([cost[v].min() for v in t.layer_vars])
        shifted = cost - low[t.layer]
        top = float(shifted.max())
        if top > 0:
            room = float(budget) + budget_tolerance(float(budget)) - float(low.sum())
            out.append((shifted / top, room / top))
    return out


class _Dual:
    """``y -> (bᵀy + a λ(C − A*(y)))`` and its gradient; ``A*`` and its adjoint by group."""

    def __init__(self, t: Terms, budgets: list[tuple[np.ndarray, float]], exact: bool = False) -> None:
        n, L = t.n, t.num_layers
        self.t, self.budgets, self.n, self.L = t, budgets, n, L
        self._layout = _Layout(t, budgets, exact)
        c = np.zeros((n + 1, n + 1))
        c[0, 1:] = c[1:, 0] = 0.5 * t.linear
        c[1:, 1:] = 0.5 * t.hessian
        self.scale = max(1e-300, float(np.abs(c).max()))
        self.c = c / self.scale
        self.a = 1.0 + L
        self.member = np.zeros((L, n))  # [L, n] one-hot membership
        self.member[t.layer, np.arange(n)] = 1.0
        self.best = -math.inf
        self.best_y: np.ndarray | None = None
        self.evaluations = 0

    def operator(self, y: np.ndarray) -> np.ndarray:
        """``A*(y) = Σ_k y_k A_k`` ``# [N, N]``."""
        s, n = self._layout.slices, self.n
        out = np.zeros((n + 1, n + 1))
        row = np.zeros(n)  # coefficients of Y_0i (the symmetric pair counted once: half each side)
        x_part = np.zeros((n, n))  # coefficients of X (symmetrized at the end)
        out[0, 0] = y[s["y0"]][0]
        u = y[s["u"]]
        x_part[np.diag_indices(n)] += u
        row -= u
        row += y[s["v"]][self.t.layer]
        r = y[s["r"]].reshape(self.L, n)
        x_part += r[self.t.layer, :]  # X_ij from the product of layer(i)'s one-hot row with x_j
        row -= r.sum(axis=0)
        w = np.zeros((n, n))
        w[self._layout.same_idx] = y[s["w"]]
        w[self._layout.diff_idx] = y[s["z"]]
        x_part += w
        for k, (cost, room) in enumerate(self.budgets):
            beta = y[s[f"beta{k}"]][0]
            rho = y[s[f"rho{k}"]]
            out[0, 0] += room * beta
            row += -beta * cost + room * rho
            x_part -= rho[:, None] * cost[None, :]
        out[1:, 1:] = 0.5 * (x_part + x_part.T)
        out[0, 1:] = out[1:, 0] = 0.5 * row
        return out

    def adjoint(self, p: np.ndarray) -> np.ndarray:
        """``(⟨A_k, P⟩)_k`` for a symmetric ``P`` ``# [N, N]``."""
        s = self._layout.slices
        g = np.zeros(self._layout.size)
        x, p0 = p[1:, 1:], p[0, 1:]
        g[s["y0"]] = p[0, 0]
        g[s["u"]] = np.diag(x) - p0
        g[s["v"]] = self.member @ p0
        g[s["r"]] = (self.member @ x - p0[None, :]).reshape(-1)
        g[s["w"]] = x[self._layout.same_idx]
        g[s["z"]] = x[self._layout.diff_idx]
        for k, (cost, room) in enumerate(self.budgets):
            xc = x @ cost
            g[s[f"beta{k}"]] = room * p[0, 0] - cost @ p0
            g[s[f"rho{k}"]] = room * p0 - xc
        return g

    def __call__(self, y: np.ndarray, mu: float) -> tuple[float, np.ndarray]:
        """The negated smoothed dual value and gradient (for minimization); records the exact bound."""
        values, vectors = np.linalg.eigh(self.c - self.operator(y))
        by = float(self._layout.b @ y)
        exact = by + self.a * float(values[0])
        self.evaluations += 1
        self.last_y = y.copy()
        if exact > self.best:
            self.best, self.best_y = exact, y.copy()
        z = -(values - values[0]) / mu
        weights = np.exp(z)
        total = weights.sum()
        smooth = values[0] - mu * math.log(total)
        self.p = (vectors * (weights / total)) @ vectors.T  # ∂λ_μ/∂S
        grad = self._layout.b - self.a * self.adjoint(self.p)
        return -(by + self.a * smooth), -grad


class _Stop(Exception):
    pass


def sdp_bound(
    problem: Problem,
    time_limit: float | None = None,
    stages: tuple[tuple[float, int], ...] = STAGES,
    exact: bool = False,
) -> SdpBound:
    """Return the lower bound of the module docstring on ``min f`` under the budgets.

    Args:
        problem: The problem (pairs optional).
        time_limit: Seconds; the bound of the multipliers reached so far is returned at the limit.
        stages: ``(μ, iterations)`` of each smoothing stage (μ relative to ``max|C|``); with a
            time limit each stage also stops at its share of the time left.
        exact: Keep only the multipliers of the equalities (``z``, ``beta``, ``rho`` held at
            0): a weaker bound whose `dual_cut` equals ``f`` at every feasible choice (the
            quadratic convex reformulation, `mixq.search.qcr`).

    Returns:
        An `SdpBound`; ``bound`` is ``-inf`` for problems of more than `MAX_VARIABLES` variables.
    """
    start = time.perf_counter()
    t = Terms(problem)
    if t.n > MAX_VARIABLES:
        return SdpBound(-math.inf, None, 0, time.perf_counter() - start, [])
    dual = _Dual(t, _budget_rows(problem, t), exact)
    y = np.zeros(dual._layout.size)
    record: list[dict] = []
    x_hat = y_hat = None
    deadline = math.inf

    def check(_: object) -> None:
        if time.perf_counter() > deadline:
            raise _Stop

    for i, (mu, iterations) in enumerate(stages):
        if time_limit is not None:
            left = time_limit - (time.perf_counter() - start)
            if left <= 0:
                break
            deadline = time.perf_counter() + left / (len(stages) - i)
        try:
            res = minimize(
                dual,
                y,
                args=(mu,),
                jac=True,
                method="L-BFGS-B",
                bounds=dual._layout.bounds,
                callback=check,
                options={"maxiter": iterations, "maxcor": 10, "ftol": 1e-13, "gtol": 1e-9},
            )
            y = res.x
        except _Stop:
            y = dual.last_y
        p = dual.p
        if p[0, 0] > 1e-12:
            x_hat = np.clip(p[0, 1:] / p[0, 0], 0.0, 1.0)
            y_hat = p / p[0, 0]
        record.append({"mu": mu, "bound": dual.best * dual.scale, "seconds": time.perf_counter() - start})
    bound = dual.best * dual.scale if math.isfinite(dual.best) else -math.inf
    cut = slack = None
    if dual.best_y is not None:
        cut, slack = dual_cut(dual, dual.best_y), slack_terms(dual, dual.best_y)
    return SdpBound(bound, x_hat, dual.evaluations, time.perf_counter() - start, record, cut, y_hat, slack)


def slack_terms(dual: _Dual, y: np.ndarray) -> Slack:
    """The `Slack` of `dual_cut` at the multipliers ``y`` (the inequality groups, scaled back)."""
    s, n, K = dual._layout.slices, dual.n, len(dual.budgets)
    z = np.zeros((n, n))
    z[dual._layout.diff_idx] = y[s["z"]] * dual.scale
    return Slack(
        z=z + z.T,
        beta=np.array([y[s[f"beta{k}"]][0] for k in range(K)]) * dual.scale,
        rho=np.array([y[s[f"rho{k}"]] for k in range(K)]).reshape(K, n) * dual.scale,
        cost=np.array([c for c, _ in dual.budgets]).reshape(K, n),
        room=np.array([r for _, r in dual.budgets]),
    )


def dual_cut(dual: _Dual, y: np.ndarray) -> Convex:
    """The convex minorant of ``f`` that the multipliers ``y`` certify (for branch-and-bound).

    With ``S = C − A*(y)`` and ``λ = λ_min(S)``, every feasible choice has
    ``f(x) ≥ (1, x)ᵀ S (1, x) + bᵀy = (1, x)ᵀ (S − λI) (1, x) + λa + bᵀy =: q(x)`` (``|x|² = L``
    at a choice). ``S − λI ⪰ 0``, so ``q`` is convex and ``q ≥ λa + bᵀy`` everywhere: a solver
    that bounds its nodes by ``q``'s relaxation starts from the semidefinite bound and lifts it
    by branching (the quadratic convex reformulation of Billionnet and Elloumi, Math. Program.
    109, 2007, with the multipliers of this relaxation).
    """
    values, vectors = np.linalg.eigh(dual.c - dual.operator(y))
    m = (vectors * (values - values[0])) @ vectors.T  # S − λI
    mu, u = np.linalg.eigh(m[1:, 1:])
    negative = float(-mu[mu < 0].sum())  # rounding: keep q ≤ f by taking it off the constant
    keep = mu > 1e-12 * max(1.0, float(np.abs(mu).max(initial=0.0)))
    c0 = float(m[0, 0]) + dual.a * float(values[0]) + float(dual._layout.b @ y) - negative * dual.L
    return Convex(
        c0=c0 * dual.scale,
        g=2.0 * m[0, 1:] * dual.scale,
        lam=2.0 * mu[keep] * dual.scale,
        V=u[:, keep],
        offset=np.zeros(int(keep.sum())),
        shift=0.0,
    )


def _has_scip() -> bool:
    try:
        import pyscipopt  # noqa: F401
    except ImportError:
        return False
    return True


def _round(
    problem: Problem,
    t: Terms,
    x_hat: np.ndarray,
    y_hat: np.ndarray | None,
    samples: int = 32,
    seed: int = 0,
    deadline: float = math.inf,
) -> list[list[int]]:
    """Feasible choices rounded from the relaxation, each polished by local search (none begun
    after ``deadline``, a `time.perf_counter` time).

    The nearest plan to ``x̂`` and a Frank–Wolfe step (the knapsack on the gradient ``s + Hx̂``),
    then ``samples`` Gaussian roundings (Goemans and Williamson, J. ACM 42, 1995, in the
    one-hot form): ``ξ ~ N(x̂, X̂ − x̂x̂ᵀ)`` from the relaxation's ``Ŷ``, each layer at its largest
    ``ξ``, made feasible by the knapsack on the scores ``−(onehot + ½x̂)`` (the nearest feasible
    plan). Without ``Ŷ`` the draws are independent per layer from ``x̂``.
    """
    from mixq.search.highs import highs

    rng = np.random.default_rng(seed)
    guides = [-x_hat, t.linear + t.hessian @ x_hat]
    root = None
    if y_hat is not None:
        cov = y_hat[1:, 1:] - np.outer(x_hat, x_hat)
        w, v = np.linalg.eigh(0.5 * (cov + cov.T))
        root = v * np.sqrt(np.clip(w, 0.0, None))
    for _ in range(samples):
        draw = np.zeros(t.n)
        xi = x_hat + root @ rng.normal(size=t.n) if root is not None else None
        for v in t.layer_vars:
            if xi is not None:
                draw[v[np.argmax(xi[v])]] = 1.0
            else:
                p = x_hat[v] + 1e-12
                draw[v[rng.choice(v.size, p=p / p.sum())]] = 1.0
        guides.append(-(draw + 0.5 * x_hat))
    out: list[list[int]] = []
    for guide in guides:
        if time.perf_counter() > deadline:
            break
        scores = np.full(problem.allowed.shape, np.inf)
        scores[t.layer, t.cand] = guide
        sub = Problem(torch.from_numpy(scores), problem.costs, problem.budgets)
        try:
            choice = highs(sub, time_limit=5.0).choices
        except ValueError:  # infeasible in the rounding's own terms: skip it
            continue
        if problem.is_feasible(choice) and choice not in out:
            out.append(polish(problem, choice))
    return out


def sdp(
    problem: Problem,
    time_limit: float | None = None,
    warm_start: list[int] | None = None,
    branch: float = BRANCH,
) -> Solution:
    """Bound ``min f`` by the semidefinite relaxation, round incumbents from it, then branch.

    The bound gets ``1 − branch`` of ``time_limit`` (it may end sooner); the time left goes to
    SCIP's branch-and-bound (`mixq.search.scip`, when PySCIPOpt is installed) with the
    relaxation's `dual_cut` as an extra row, warm-started from the best incumbent. Without a
    time limit there is no branching.

    Args:
        problem: The problem.
        time_limit: Seconds for everything (the rounding takes a little more).
        warm_start: A feasible choice per layer, kept when nothing better is found.
        branch: The share of ``time_limit`` reserved for the branch-and-bound (0: none).

    Returns:
        A `Solution` with ``bound`` and ``gap``: status "optimal" when the bound meets the
        incumbent (relative gap ≤ 1e-9), else "time_limit".

    Raises:
        InfeasibleBudgetError: Some budget is below its smallest feasible value.
    """
    start = time.perf_counter()
    check_budgets(problem)
    if not 0.0 <= branch < 1.0:
        raise ValueError(f"branch must be a share of the time in [0, 1), got {branch!r}")
    result = sdp_bound(problem, None if time_limit is None else (1.0 - branch) * time_limit)
    t = Terms(problem)
    pool = []
    if warm_start is not None and problem.is_feasible(warm_start):
        pool.append(problem.check_choices(warm_start))
    if result.x is not None:
        pool += _round(problem, t, result.x, result.y)
    if not pool:
        from mixq.search.greedy import greedy

        pool.append(polish(problem, greedy(problem).choices))
    best = min(pool, key=problem.objective)
    bound = result.bound
    stage = result.stages[-1]["mu"] if result.stages else None  # the last smoothing stage reached
    note = f"sdp: bound {result.bound:.6g} after {result.evaluations} evaluations (last mu {stage})"
    left = None if time_limit is None else time_limit - (time.perf_counter() - start)
    if left is not None and branch > 0 and left > 0.5 and result.cut is not None and _has_scip():
        from mixq.search.scip import scip

        sol = scip(problem, time_limit=left, warm_start=best, cuts=[result.cut])
        if sol.objective < problem.objective(best):
            best = sol.choices
        if math.isfinite(sol.bound):
            bound = max(bound, sol.bound)
        note += f"; then {sol.note} ({left:.3g} s): bound {sol.bound:.6g}"
    value = problem.objective(best)
    bound = min(bound, value) if math.isfinite(bound) else -math.inf
    gap = relative_gap(value, bound)
    status = "optimal" if gap <= 1e-9 else "time_limit"
    return problem.solution(best, status, gap, time.perf_counter() - start, bound=bound, note=note)
