"""Branch-and-bound on a quadratic convex reformulation of the pairwise problem (QCR).

Papers: A. Billionnet and S. Elloumi, "Using a mixed integer quadratic programming solver for
the unconstrained quadratic 0-1 problem", Math. Program. 109 (2007) 55-68; A. Billionnet,
S. Elloumi and A. Lambert, "Extending the QCR method to general mixed-integer programs", Math.
Program. 131 (2012) 381-401.

The binary quadratic program of `mixq.search.terms` (``f(x) = sᵀx + ½ xᵀHx``, one-hot rows,
budget rows) is perturbed by terms that vanish on every feasible choice: ``u_i (x_i² − x_i)``,
the products ``x_j (Σ_a x_(l,a) − 1)`` of the one-hot rows with the variables, and the
within-layer products ``x_(l,a) x_(l,b)`` (``a ≠ b``). QCR picks the perturbation from the dual
of the semidefinite relaxation so that the perturbed quadratic is convex and its continuous
minimum equals the relaxation's bound; branch-and-bound on the convex quadratic then lifts that
bound by fixing layers. Here the multipliers come from `mixq.search.sdp.sdp_bound` (the
relaxation's dual at the best multipliers found) and the convex function is
`mixq.search.sdp.dual_cut`: ``q(x) = k0 + gᵀx + ½ xᵀMx`` with ``M ⪰ 0`` and ``q ≤ f`` at every
feasible choice.

Branch-and-bound (best first): a node fixes some layers to one candidate each; its relaxation is
``min q(x) + k + hᵀx`` over ``x ≥ 0``, ``Σ_a x_(l,a) = 1`` (the node's allowed candidates),
``cᵀx ≤ r`` for every budget, where ``k + hᵀx`` gives back the part of ``f − q`` that is linear
once the node's layers are fixed (`_Restore`, from `mixq.search.sdp.Slack`): the bound then
rises with depth and equals ``f`` when every layer is fixed. `_Relaxation` solves it with one
budget exactly by active sets: a primal-dual active-set guess from the parent's solution
(`_Relaxation._pdas`: Hintermüller, Ito and Kunisch, SIAM J. Optim. 13, 2002), which usually
settles in a few KKT solves, else a primal active-set method from the parent's solution
projected on the node (`_Relaxation._face`: Nocedal and Wright, Numerical Optimization, 2006,
Alg. 16.3); layers with one free variable are eliminated from each KKT system. When neither
finishes, FISTA (Beck and Teboulle, SIAM J. Imaging Sci. 2, 2009, with the first budget in an
exact projection and gradient restarts, O'Donoghue and Candès, Found. Comput. Math. 15, 2015)
continues with an active-set search every `FACE` iterations. Any point ``x̄`` and multipliers
``λ ≥ 0`` give an exact bound: convexity gives

    min q ≥ q(x̄) − ∇q(x̄)ᵀx̄ + Σ_l min_a (∇q(x̄) + Σ_k λ_k c_k)_(l,a) − Σ_k λ_k r_k,

(the last terms: the multiple-choice knapsack LP by its Lagrangian, maximized over λ), so a
node's bound never depends on how far the solve got. The node is pruned when this bound reaches
the incumbent. Otherwise the same inequality with a layer held at one candidate drops every
candidate whose bound reaches the incumbent from the node's subtree (reduced-cost fixing,
`_Relaxation.fixing`), and the node branches on its free layer whose relaxed ``x`` is the most
fractional (`BRANCHING`), one child per allowed candidate that keeps the budgets reachable.
Each node's ``x̄`` rounded to the largest entry per layer is tried as an incumbent (polished by
`mixq.search.local.polish` when it improves). The bound returned is the smallest bound of the
open nodes (the largest of it and the semidefinite bound).

Symbol map (paper -> mixq): ``x`` -> ``x[l, c]`` (padded to ``# [L, C]``, zero where forbidden);
``q(x) = xᵀQx + cᵀx`` -> ``f`` (`Terms.linear`, `Terms.hessian`); the multipliers ``(α, β)`` of
the perturbation -> the groups ``u`` (``x_i² = x_i``), ``r`` (one-hot rows times ``x_j``) and
``w`` (within-layer products) of `mixq.search.sdp`'s dual ``y``; ``q_{α,β}`` -> `Convex` of
`dual_cut`; the "QCR bound" -> ``SdpBound.bound``.

[DESIGN] The multipliers of the relaxation's inequalities (``X ≥ 0`` and the budget products)
are kept in ``q``: ``q`` is then a convex *minorant* of ``f`` on the feasible choices (not
equal to it), whose root bound is the doubly nonnegative bound, stronger than QCR's. The
branch-and-bound needs only ``q ≤ f`` (leaves are evaluated on ``f``), so nothing is lost.
[DESIGN] The multipliers are those the first-order dual method reached in its share of the time
(no interior-point SDP solver is installed), computed once at the root (as in QCR; no re-solve
at the nodes); the node bounds are certified by the inequality above. With several budgets
the node solves are FISTA alone with the first budget projected on exactly, the others entering
by their multipliers: bounds stay valid but the solves do not reach the node's optimum.
[DESIGN] Problems too large for the semidefinite bound (`mixq.search.sdp.MAX_VARIABLES`) use
the convex form `Terms.convex` (uniform shift after `Terms.completion`), exact at every choice.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from mixq.search.local import polish
from mixq.search.problem import Problem, Solution, budget_tolerance, check_budgets, relative_gap
from mixq.search.sdp import Slack, sdp_bound
from mixq.search.sdp import _round as _round_sdp
from mixq.search.terms import Convex, Terms

__all__ = ["ROOT_SHARE", "qcr"]

logger = logging.getLogger(__name__)

ROOT_SHARE = 0.75  # share of the time for the semidefinite multipliers at most; the rest branches
CHECK = 10  # FISTA iterations between two node bounds
MAX_ITERATIONS = 2000  # FISTA iterations per node at most
FACE = 10  # FISTA iterations between two active-set searches of the node's minimizer
ACTIVE = 12  # active-set rounds per search (`_Relaxation._face`)
START = 40  # ... in the search from the parent's solution, before any FISTA iteration
PDAS = 8  # primal-dual active-set rounds from the parent's face (`_Relaxation._pdas`)
ROUNDINGS = 8  # Gaussian roundings of the relaxation's solution at the root (`mixq.search.sdp`)
PRECISION = 1e-6  # a node's relaxation is solved to this share of |incumbent|
COARSE = 1e-4  # ... or to this share when it cannot be pruned (it branches)
BRANCHING = "fractional"  # the layer to branch on (`_branch_layer`): "fractional" or "cost"
FIXING = True  # reduced-cost fixing at every node (`_Relaxation.fixing`)
PROBES = 16  # slopes evaluated at once in the search for the best budget multiplier


@dataclass
class _Quadratic:
    """``q(x) = k0 + gᵀx + ½ xᵀMx`` over the padded ``x`` ``# [L·C]`` (zero where forbidden)."""

    k0: float
    g: np.ndarray  # [L*C]
    m: np.ndarray  # [L*C, L*C], PSD
    lipschitz: float  # largest eigenvalue of m

    @classmethod
    def of(cls, cv: Convex, t: Terms) -> _Quadratic:
        """Pad ``cv`` (over `Terms`' variables) to every (layer, candidate)."""
        L, C = t.problem.allowed.shape
        vl = cv.V * cv.lam  # [n, r]
        m_n = vl @ cv.V.T
        g_n = cv.g - vl @ cv.offset
        k0 = cv.c0 + 0.5 * float((cv.lam * cv.offset**2).sum())
        idx = t.layer * C + t.cand
        g = np.zeros(L * C)
        g[idx] = g_n
        m = np.zeros((L * C, L * C))
        m[np.ix_(idx, idx)] = 0.5 * (m_n + m_n.T)
        top = float(cv.lam.max()) if cv.lam.size else 0.0
        return cls(k0=float(k0), g=g, m=m, lipschitz=max(top, 1e-300))

    def value(self, x: np.ndarray) -> float:
        return float(self.k0 + self.g @ x + 0.5 * x @ (self.m @ x))


def _simplex(y: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row of ``y`` ``# [L, C]`` onto the simplex of its ``mask``.

    Sorted row ``u``, ``ρ = #{k : k·u_k > Σ_{j≤k} u_j − 1}`` (a prefix), ``θ = (Σ_{j≤ρ} u_j − 1)/ρ``,
    ``x = max(y − θ, 0)``; forbidden entries are ``−∞`` throughout (no NaN) and end at 0.
    """
    v = np.where(mask, y, -np.inf)
    u = np.sort(v, axis=1)[:, ::-1]
    css = np.cumsum(u, axis=1)
    css -= 1.0
    rho = (u * np.arange(1, y.shape[1] + 1) > css).sum(axis=1)
    theta = css[np.arange(y.shape[0]), rho - 1] / rho
    return np.maximum(v - theta[:, None], 0.0)


def _project(
    y: np.ndarray, mask: np.ndarray, cost: np.ndarray | None, room: float, lam: float
) -> tuple[np.ndarray, float]:
    """Projection onto the simplices of ``mask`` and ``Σ cost·x ≤ room`` (``cost ≥ 0``); and its λ.

    ``x(λ) = simplex(y − λ·cost)``; λ is the root of ``cost·x(λ) = room`` (0 when the budget is
    slack), found by Newton steps on the support of ``x(λ)`` (the function is piecewise linear)
    kept inside a bracket, warm-started from ``lam``.
    """
    if lam <= 0.0 or cost is None:
        x = _simplex(y, mask)
        if cost is None or float((cost * x).sum()) <= room:
            return x, 0.0
    lo, hi = 0.0, math.inf
    lam = max(lam, 0.0)
    for _ in range(60):
        x = _simplex(y - lam * cost, mask)
        excess = float((cost * x).sum()) - room
        if abs(excess) <= 1e-12 * (1.0 + abs(room)):
            break
        if excess > 0:
            lo = lam
        elif lam == 0.0:
            break  # slack at λ = 0
        else:
            hi = lam
        support = x > 0
        count = np.maximum(support.sum(axis=1), 1)
        on = cost * support
        row = on.sum(axis=1)
        slope = float((on * cost).sum() - (row * row / count).sum())
        step = lam + excess / slope if slope > 1e-15 else math.nan
        if not lo < step < hi:
            if lo == 0.0 and step <= 0.0:
                step = 0.0  # the root may be below 0: the budget may be slack
            else:
                step = 0.5 * (lo + hi) if math.isfinite(hi) else 2.0 * lam + 1.0
        lam = step
    return x, lam


class _Relaxation:
    """Node relaxations of ``min q`` over the one-hot simplices and the budget rows."""

    def __init__(self, problem: Problem, t: Terms, quad: _Quadratic) -> None:
        self.problem, self.t, self.quad = problem, t, quad
        L, C = problem.allowed.shape
        self.shape = (L, C)
        rows, rhs = [], []
        for name, budget in problem.budgets.items():
            if not math.isfinite(budget):
                continue
            cost = np.where(problem.allowed, problem.cost_arrays[name], 0.0)
            low = np.where(problem.allowed, cost, np.inf).min(axis=1)
            shifted = np.where(problem.allowed, cost - low[:, None], 0.0)
            top = float(shifted.max())
            if top > 0:
                room = float(budget) + budget_tolerance(float(budget)) - float(low.sum())
                rows.append(shifted / top)
                rhs.append(room / top)
        self.iterations = 0  # FISTA iterations of every solve
        self.layer_of = np.arange(L * C) // C  # [L·C] each variable's layer
        self.costs = np.array(rows).reshape(len(rows), L, C)  # [K, L, C]
        self.rhs = np.array(rhs)  # [K]

    def reachable(self, mask: np.ndarray) -> bool:
        """Whether every budget alone admits a choice within ``mask``."""
        big = np.where(mask[None], self.costs, np.inf)
        return bool((big.min(axis=2).sum(axis=1) <= self.rhs + 1e-12).all())

    def _h(self, d: np.ndarray, mask: np.ndarray, lam: np.ndarray) -> tuple[float, np.ndarray]:
        """``Σ_l min_a (d + Σ_k λ_k c_k) − λᵀr`` and its supergradient in λ."""
        z = np.where(mask, d + np.tensordot(lam, self.costs, axes=1), np.inf)
        a = z.argmin(axis=1)
        rows = np.arange(z.shape[0])
        used = self.costs[:, rows, a].sum(axis=1)  # [K]
        return float(z[rows, a].sum() - lam @ self.rhs), used - self.rhs

    def _best_lambda(self, d: np.ndarray, mask: np.ndarray, lam: np.ndarray) -> tuple[float, np.ndarray]:
        """``max_λ≥0 h(λ)``: exactly over the breakpoints for one budget, else by coordinate bisection.

        Any λ gives a valid bound; the maximum gives the linear program's value.
        """
        if len(self.rhs) == 1:
            return self._one_budget(d, mask)
        lam = lam.copy()
        for _ in range(2):
            for k in range(len(self.rhs)):
                lam[k] = 0.0
                if self._h(d, mask, lam)[1][k] <= 0:
                    continue  # the budget does not bind at λ_k = 0
                lo, hi = 0.0, 1.0
                for _ in range(60):
                    lam[k] = hi
                    if self._h(d, mask, lam)[1][k] <= 0:
                        break
                    lo, hi = hi, 2.0 * hi
                for _ in range(40):
                    lam[k] = 0.5 * (lo + hi)
                    if self._h(d, mask, lam)[1][k] > 0:
                        lo = lam[k]
                    else:
                        hi = lam[k]
                lam[k] = lo
                at_lo = self._h(d, mask, lam)[0]
                lam[k] = hi
                if self._h(d, mask, lam)[0] < at_lo:
                    lam[k] = lo
        return self._h(d, mask, lam)[0], lam

    def _one_budget(self, d: np.ndarray, mask: np.ndarray) -> tuple[float, np.ndarray]:
        """``max_λ≥0 h(λ)`` for one budget.

        ``h`` is concave piecewise linear with its kinks among 0 and the breakpoints
        ``λ = (d_a − d_b) / (c_b − c_a)`` of each layer; its slope between two consecutive
        breakpoints (the cost of each layer's cheapest entry at their midpoint, minus the room)
        does not increase, so the maximum is at the first breakpoint after which the slope is
        ``≤ 0``: found by a search over the sorted breakpoints in rounds of `PROBES` slopes, and
        ``h`` evaluated there and at its two neighbours (any λ gives a valid bound).
        """
        c = self.costs[0]
        dm = np.where(mask, d, np.inf)
        cm = np.where(mask, c, np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            points = (dm[:, :, None] - dm[:, None, :]) / (cm[:, None, :] - cm[:, :, None])  # [L, C, C]
        points = np.unique(points[np.isfinite(points) & (points > 0)])
        lams = np.concatenate([[0.0], points])  # [P + 1]
        ends = np.concatenate([lams[1:], [2.0 * lams[-1] + 1.0]])
        mids = 0.5 * (lams + ends)  # slope of h on (lams[i], ends[i]) is its slope at mids[i]
        rows = np.arange(c.shape[0])
        lo, hi = 0, lams.size - 1  # the first interval of slope ≤ 0 is in [lo, hi] (hi: none, or the last)
        while lo < hi:
            probe = np.unique(np.linspace(lo, hi, min(PROBES, hi - lo + 1)).astype(int))
            z = dm[None] + mids[probe, None, None] * c[None]  # [p, L, C]
            slope = c[rows, z.argmin(axis=2)].sum(axis=1) - self.rhs[0]  # [p]
            down = np.flatnonzero(slope <= 0)
            if down.size == 0:  # slope > 0 everywhere: the budget is out of reach (not at a node)
                lo = hi
                break
            first = int(down[0])
            hi = int(probe[first])
            lo = int(probe[first - 1]) + 1 if first > 0 else lo
        near = lams[max(lo - 1, 0) : lo + 2]
        values = (dm[None] + near[:, None, None] * c[None]).min(axis=2).sum(axis=1) - near * self.rhs[0]
        best = int(np.argmax(values))
        return float(values[best]), near[best : best + 1].copy()

    def bound(
        self, x: np.ndarray, mask: np.ndarray, lam: np.ndarray, shift: tuple[float, np.ndarray]
    ) -> tuple[float, float, np.ndarray]:
        """The certified bound of the module docstring at ``x`` ``# [L·C]``; ``q(x)`` and the best λ.

        ``shift = (k, h)`` adds ``k + hᵀx`` to ``q`` (the node's restored slack).
        """
        q = self.quad
        grad = q.g + shift[1] + q.m @ x
        value = q.k0 + shift[0] + float((q.g + shift[1]) @ x) + 0.5 * float(x @ (grad - q.g - shift[1]))
        h, lam = self._best_lambda(grad.reshape(self.shape), mask, lam)
        return value - float(grad @ x) + h, value, lam

    def fixing(
        self, x: np.ndarray, mask: np.ndarray, lam: np.ndarray, shift: tuple[float, np.ndarray], cutoff: float
    ) -> np.ndarray:
        """The node's ``mask`` less the candidates whose choice cannot go below ``cutoff`` (reduced costs).

        The bound of the module docstring at ``x`` and ``λ`` with layer ``l`` held at candidate
        ``a`` is that bound plus ``d_(l,a) = z_(l,a) − min_b z_(l,b)``, ``z = ∇q(x) + Σ_k λ_k
        c_k``: every choice of the node's subtree with ``x_(l,a) = 1`` has ``f ≥ bound + d_(l,a)``
        (``q`` plus the restored slack is below ``f`` there), so the candidates with
        ``bound + d ≥ cutoff`` are dropped.
        """
        bound, _, lam = self.bound(x, mask, lam, shift)
        grad = self.quad.g + shift[1] + self.quad.m @ x
        z = np.where(mask, grad.reshape(self.shape) + np.tensordot(lam, self.costs, axes=1), np.inf)
        d = z - z.min(axis=1, keepdims=True)
        return mask & (bound + d < cutoff)

    def solve(
        self,
        mask: np.ndarray,
        x0: np.ndarray,
        lam: np.ndarray,
        shift: tuple[float, np.ndarray],
        stop: float,
        deadline: float,
        precision: float = 0.0,
        coarse: float = 0.0,
    ) -> tuple[float, np.ndarray, np.ndarray]:
        """FISTA with the first budget in the projection, the others on their multipliers.

        Returns (best bound, x, λ). Stops at ``stop`` (the bound reaches the incumbent), when
        ``q(x) − bound ≤ precision``, when ``q(x) − bound ≤ coarse`` at a feasible ``x`` with
        ``q(x) < stop`` (the node cannot be pruned: it branches), after `MAX_ITERATIONS` or at
        ``deadline``.
        """

        def done(best: float, value: float) -> bool:
            if best >= stop or value - best <= precision:
                return True
            return len(self.rhs) <= 1 and value < stop and value - best <= coarse

        q = self.quad
        step = 1.0 / q.lipschitz
        L, C = self.shape
        first = self.costs[0] if len(self.rhs) else None
        room = float(self.rhs[0]) if len(self.rhs) else 0.0
        lin = q.g + shift[1]
        pl = float(lam[0]) if len(lam) else 0.0
        guess = self._pdas(x0, mask, lin) if len(self.rhs) <= 1 else None
        if guess is None:
            x, pl = _project(x0.reshape(L, C), mask, first, room, pl)
            x = x.reshape(-1)
        else:
            x = guess
        best, value, lam = self.bound(x, mask, lam, shift)
        it = 0
        if len(self.rhs) <= 1 and not done(best, value):  # from the parent's face: often a few rounds
            face = self._face(x, mask, lin, START)
            bound, on_face, lam_face = self.bound(face, mask, lam, shift)
            if on_face <= value:
                x, lam, value = face, lam_face, on_face
            best = max(best, bound)
        y, tk = x.copy(), 1.0
        while it < MAX_ITERATIONS and not done(best, value):
            it += 1
            grad = lin + q.m @ y
            if len(lam) > 1:
                grad = grad + np.tensordot(lam[1:], self.costs[1:], axes=1).reshape(-1)
            x_new, pl = _project((y - step * grad).reshape(L, C), mask, first, room, pl)
            x_new = x_new.reshape(-1)
            if float((y - x_new) @ (x_new - x)) > 0:  # gradient restart (O'Donoghue and Candès 2015)
                y, tk = x_new, 1.0
            else:
                t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * tk * tk))
                y = x_new + ((tk - 1.0) / t_new) * (x_new - x)
                tk = t_new
            x = x_new
            if it % CHECK:
                continue
            bound, value, lam = self.bound(x, mask, lam, shift)
            best = max(best, bound)
            if done(best, value) or time.perf_counter() > deadline:
                break
            if len(self.rhs) <= 1 and it % FACE == 0:
                face = self._face(x, mask, lin)
                bound, on_face, lam_face = self.bound(face, mask, lam, shift)
                if on_face <= value:
                    x, y, tk, lam, value = face, face.copy(), 1.0, lam_face, on_face
                best = max(best, bound)
        self.iterations += it
        return best, x, lam

    def _face_kkt(
        self, free: np.ndarray, lin: np.ndarray, cost: np.ndarray | None, room: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """The minimizer of ``q`` on a face, its gradient and the multipliers of its rows.

        The face: the variables of ``free`` ``# [L·C]`` (one at least per layer), the others 0,
        each layer's row summing to 1, and ``costᵀx = room`` unless ``cost`` is None. A layer
        of one free variable has it at 1; the others solve the KKT system
        ``[M_FF Aᵀ; A 0] [x_F; w] = [−lin_F − M_F1·1; b]`` (``b`` the rows' right sides less the
        fixed part). A fixed layer's ``w_l`` makes its variable's multiplier 0. Returns ``x``,
        ``∇q(x)``, ``w`` ``# [L]`` and the budget's ``w_b`` (0 when ``cost`` is None or no
        variable of the face can move).
        """
        L, C = self.shape
        m = self.quad.m
        counts = free.reshape(L, C).sum(axis=1)
        single = free & (counts[self.layer_of] == 1)
        ones = np.flatnonzero(single)
        support = np.flatnonzero(free & ~single)
        x = np.zeros(free.size)
        x[ones] = 1.0
        w = np.zeros(L)
        w_budget = 0.0
        if support.size:
            present, row = np.unique(self.layer_of[support], return_inverse=True)
            a = np.zeros((present.size, support.size))  # [rows, |F|]
            a[row, np.arange(support.size)] = 1.0
            b = np.ones(present.size)
            if cost is not None:
                a = np.vstack([a, cost[support]])
                b = np.append(b, room - float(cost[ones].sum()))
            k = support.size
            kkt = np.zeros((k + a.shape[0], k + a.shape[0]))
            kkt[:k, :k] = m[np.ix_(support, support)]
            kkt[:k, k:] = a.T
            kkt[k:, :k] = a
            rhs = np.concatenate([-lin[support] - m[np.ix_(support, ones)].sum(axis=1), b])
            sol = _kkt_solve(kkt, rhs)
            x[support] = sol[:k]
            w[present] = sol[k : k + present.size]
            if cost is not None:
                w_budget = float(sol[-1])
        grad = lin + m @ x
        w[self.layer_of[ones]] = -grad[ones] - (w_budget * cost[ones] if cost is not None else 0.0)
        return x, grad, w, w_budget

    def _sigma(self, grad: np.ndarray, w: np.ndarray, w_budget: float, cost: np.ndarray | None) -> np.ndarray:
        """The bounds' multipliers ``σ = ∇q + w_(layer) + w_b c`` (0 on the face)."""
        sigma = grad + w[self.layer_of]
        return sigma + w_budget * cost if cost is not None else sigma

    def _pdas(
        self, x0: np.ndarray, mask: np.ndarray, lin: np.ndarray, rounds: int = PDAS
    ) -> np.ndarray | None:
        """The node's minimizer by a primal-dual active-set method guessed from the parent's ``x0``.

        Hintermüller, Ito and Kunisch, "The primal-dual active set strategy as a semismooth
        Newton method", SIAM J. Optim. 13 (2002). The face: the support of ``x0`` within
        ``mask`` (a layer without one: all its allowed candidates) and the budget if ``x0``
        makes it tight. Each round solves the face's KKT system (`_face_kkt`), then drops the
        face's negative variables (a layer keeps its largest), adds the variables of negative
        multiplier, and sets the budget by its multiplier's sign or its excess. Returns the
        (feasible, optimal) ``x`` when the face no longer changes, None otherwise (it may
        cycle: the caller falls back to `_face`).
        """
        allowed = mask.reshape(-1)
        free = (x0 > 1e-12) & allowed
        empty = ~free.reshape(self.shape).any(axis=1)
        free |= (mask & empty[:, None]).reshape(-1)
        cost = self.costs[0].reshape(-1) if len(self.rhs) == 1 else None
        room = float(self.rhs[0]) if cost is not None else math.inf
        tol_room = 1e-9 * (1.0 + abs(room))
        tight = cost is not None and float(cost @ x0) >= room - tol_room
        tol = 1e-10 * (1.0 + float(np.abs(lin).max()))
        rows = np.arange(self.shape[0]) * self.shape[1]
        for _ in range(rounds):
            x, grad, w, w_budget = self._face_kkt(free, lin, cost if tight else None, room)
            sigma = self._sigma(grad, w, w_budget, cost if tight else None)
            drop = free & (x < -1e-12)
            drop[rows + np.where(free, x, -np.inf).reshape(self.shape).argmax(axis=1)] = False
            add = allowed & ~free & (sigma < -tol)
            over = cost is not None and not tight and float(cost @ x) > room + tol_room
            release = tight and w_budget < -tol
            if not (drop.any() or add.any() or over or release):
                return None if (x < -1e-9).any() else np.maximum(x, 0.0)
            free = (free & ~drop) | add
            tight = (tight and not release) or over
        return None

    def _face(self, x: np.ndarray, mask: np.ndarray, lin: np.ndarray, rounds: int = ACTIVE) -> np.ndarray:
        """The node's minimizer by a primal active-set method from a feasible ``x``, ``rounds`` steps at most.

        Nocedal and Wright, "Numerical Optimization" (2006), Algorithm 16.3. The working face:
        the free variables (the support of ``x`` at the start), each layer's row summing to 1,
        the budget as an equality when it is tight. Each round solves the face's KKT system
        (`_face_kkt`) and moves toward its solution as far as ``x ≥ 0`` and the budget allow (a
        blocking variable leaves the face, a blocking budget joins it); at the face's minimizer
        the multipliers ``σ_i = ∇q_i + w_(layer i) + w_b c_i`` of the variables at 0 (and
        ``w_b`` of the budget) are checked, and the most negative one's variable joins the face
        (the budget leaves it); none negative: the node's optimum. ``q`` never increases, and
        every ``x`` is feasible. A singular system (a face on which ``q`` is flat) is solved by
        least squares.
        """
        allowed = mask.reshape(-1)
        free = (x > 1e-12) & allowed
        cost = self.costs[0].reshape(-1) if len(self.rhs) == 1 else None
        room = float(self.rhs[0]) if cost is not None else math.inf
        tight = cost is not None and float(cost @ x) >= room - 1e-9 * (1.0 + abs(room))
        tol = 1e-10 * (1.0 + float(np.abs(lin).max()))
        x = x.copy()
        for _ in range(rounds):
            target, grad, w, w_budget = self._face_kkt(free, lin, cost if tight else None, room)
            step = target - x
            down = free & (step < 0)
            t, block = 1.0, -1
            if down.any():
                ratio = np.where(down, x / np.where(down, -step, 1.0), np.inf)
                block = int(np.argmin(ratio))
                t = min(1.0, float(ratio[block]))
            rise = float(cost @ step) if cost is not None and not tight else 0.0
            if rise > 0 and (room - float(cost @ x)) / rise < t:
                t, block = max((room - float(cost @ x)) / rise, 0.0), -2
            x = np.maximum(x + t * step, 0.0)
            if t < 1.0:
                if block == -2:
                    tight = True
                elif block >= 0:
                    x[block] = 0.0
                    free[block] = False
                continue
            sigma = np.where(allowed & ~free, self._sigma(grad, w, w_budget, cost if tight else None), np.inf)
            worst = int(np.argmin(sigma))
            if w_budget < min(-tol, float(sigma[worst])):
                tight = False
            elif sigma[worst] < -tol:
                free[worst] = True
            else:
                break
        return x


def _kkt_solve(kkt: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``kkt⁻¹ rhs``; the least-squares solution when ``kkt`` is singular (an SVD, ten times the cost)."""
    try:
        sol = np.linalg.solve(kkt, rhs)
        if float(np.abs(kkt @ sol - rhs).max()) <= 1e-9 * (1.0 + float(np.abs(rhs).max())):
            return sol
    except np.linalg.LinAlgError:
        pass
    return np.linalg.lstsq(kkt, rhs, rcond=None)[0]


@dataclass(order=True)
class _Node:
    bound: float
    depth: int  # negated: deeper first among equal bounds
    order: int
    mask: np.ndarray
    x: np.ndarray
    lam: np.ndarray


class _Restore:
    """The slack terms a node can give back to ``q``: those of its fixed layers (`Slack`).

    With ``F`` the variables fixed at 1 (each layer of one allowed candidate), the terms
    ``z_ij x_i x_j`` with ``i ∈ F`` are ``z_ij x_j`` (linear), and ``(beta_k + Σ_{i∈F} rho_ki)
    s_k(x)`` is linear: adding them to ``q`` keeps it convex and below ``f`` on the node's
    choices (the terms left are ``≥ 0`` there), and equal to ``f`` once every layer is fixed.
    """

    def __init__(self, slack: Slack | None, t: Terms) -> None:
        L, C = t.problem.allowed.shape
        self.size = L * C
        self.slack = slack
        if slack is None:
            return
        idx = t.layer * C + t.cand
        self.z = np.zeros((L * C, L * C))
        self.z[np.ix_(idx, idx)] = slack.z
        self.rho = np.zeros((len(slack.room), L * C))
        self.rho[:, idx] = slack.rho
        self.cost = np.zeros((len(slack.room), L * C))
        self.cost[:, idx] = slack.cost

    def shift(self, mask: np.ndarray) -> tuple[float, np.ndarray]:
        """``(k, h)``: the restored terms are ``k + hᵀx`` on the node of ``mask``."""
        if self.slack is None:
            return 0.0, np.zeros(self.size)
        fixed = np.flatnonzero(mask.sum(axis=1) == 1)
        ones = fixed * mask.shape[1] + mask[fixed].argmax(axis=1)
        h = self.z[ones].sum(axis=0)
        h[ones] = 0.0
        weight = self.slack.beta + self.rho[:, ones].sum(axis=1)  # [K]
        h -= weight @ self.cost
        k = 0.5 * float(self.z[np.ix_(ones, ones)].sum()) + float(weight @ self.slack.room)
        return k, h


def _root(
    problem: Problem, t: Terms, seconds: float | None, deadline: float = math.inf
) -> tuple[Convex, Slack | None, float, list[list[int]], str]:
    """The semidefinite dual cut, its slack, bound and roundings (none begun after ``deadline``);
    the exact convex form without."""
    root = sdp_bound(problem, seconds)
    if root.cut is not None:
        pool = []
        if root.x is not None:
            pool = _round_sdp(problem, t, root.x, root.y, samples=ROUNDINGS, deadline=deadline)
        note = f"sdp bound {root.bound:.6g} ({root.evaluations} evaluations, {root.seconds:.1f} s)"
        return root.cut, root.slack, root.bound, pool, note
    cv = t.convex(t.completion(seconds=None if seconds is None else 0.2 * seconds))
    return cv, None, -math.inf, [], "convex form (no sdp multipliers)"


def qcr(
    problem: Problem,
    time_limit: float | None = None,
    warm_start: list[int] | None = None,
    root_share: float = ROOT_SHARE,
    max_nodes: int | None = None,
) -> Solution:
    """Minimize ``f(x)`` under the budgets by branch-and-bound on the convexified objective.

    Args:
        problem: The problem (pairs optional).
        time_limit: Seconds for everything; None runs to proven optimality.
        warm_start: A feasible choice per layer, the first incumbent (greedy + local search
            otherwise).
        root_share: Share of ``time_limit`` for the semidefinite multipliers, in (0, 1).
        max_nodes: Stop after this many nodes (None: no limit).

    Returns:
        A `Solution`: status "optimal" when every node was pruned, else "time_limit"; the
        bound is the smallest open node's, at least the semidefinite bound.

    Raises:
        ValueError: ``root_share`` not in (0, 1).
        InfeasibleBudgetError: Some budget is below its smallest feasible value.
    """
    start = time.perf_counter()
    if not 0.0 < root_share < 1.0:
        raise ValueError(f"root_share must be in (0, 1), got {root_share!r}")
    check_budgets(problem)
    deadline = math.inf if time_limit is None else start + time_limit
    t = Terms(problem)
    incumbent = _first_incumbent(problem, warm_start)
    value = problem.objective(incumbent)
    seconds = None if time_limit is None else root_share * time_limit
    cv, slack, sdp_value, pool, note = _root(problem, t, seconds, deadline)
    incumbent = min([incumbent, *pool], key=problem.objective)
    value = problem.objective(incumbent)
    relax = _Relaxation(problem, t, _Quadratic.of(cv, t))
    restore = _Restore(slack, t)
    L, C = problem.allowed.shape
    counter = itertools.count()
    x0 = np.where(problem.allowed, 1.0, 0.0).reshape(-1)
    heap = [_Node(-math.inf, 0, next(counter), problem.allowed.copy(), x0, np.zeros(len(relax.rhs)))]
    pruned = math.inf  # the smallest bound of a pruned node
    nodes = fixed = 0
    floor = 1e-6 * t.magnitude()  # the scale of the precisions when the incumbent is near 0

    def tol(v: float) -> float:
        return 1e-9 * max(abs(v), 1e-12)

    while heap and time.perf_counter() < deadline and (max_nodes is None or nodes < max_nodes):
        node = heapq.heappop(heap)
        if node.bound >= value - tol(value):
            pruned = min(pruned, node.bound)
            continue
        nodes += 1
        if nodes % 100 == 0:
            logger.debug(
                "%d nodes, %.2f s: incumbent %.6g, bound %.6g",
                nodes,
                time.perf_counter() - start,
                value,
                min(node.bound, pruned),
            )
        shift = restore.shift(node.mask)
        bound, x, lam = relax.solve(
            node.mask,
            node.x,
            node.lam,
            shift,
            value - tol(value),
            deadline,
            PRECISION * max(abs(value), floor),
            COARSE * max(abs(value), floor),
        )
        bound = max(bound, node.bound)
        choice = _round(x.reshape(L, C), node.mask)
        if problem.is_feasible(choice) and problem.objective(choice) < value:
            incumbent = polish(problem, choice)
            value = problem.objective(incumbent)
        if bound >= value - tol(value):
            pruned = min(pruned, bound)
            continue
        kept = relax.fixing(x, node.mask, lam, shift, value - tol(value)) if FIXING else node.mask
        if not kept.any(axis=1).all() or not relax.reachable(kept):
            pruned = min(pruned, value - tol(value))  # every choice of the node reaches the cutoff
            continue
        if not np.array_equal(kept, node.mask):
            fixed += int(node.mask.sum() - kept.sum())
            node.mask = kept
        free = np.flatnonzero(node.mask.sum(axis=1) > 1)
        if free.size == 0:  # a single choice: rounded above (an incumbent if feasible and better)
            continue
        xs = x.reshape(L, C)
        layer = _branch_layer(xs, node.mask, free, relax.costs)
        for cand in np.argsort(-xs[layer]):
            if not node.mask[layer, cand]:
                continue
            mask = node.mask.copy()
            mask[layer] = False
            mask[layer, cand] = True
            if relax.reachable(mask):
                heapq.heappush(heap, _Node(bound, node.depth - 1, next(counter), mask, x, lam))
    if heap:
        bound = min(min(n.bound for n in heap), pruned)
    else:
        bound = min(pruned, value)
    bound = min(max(bound, sdp_value), value)
    gap = relative_gap(value, bound)
    status = "optimal" if not heap or gap <= 1e-9 else "time_limit"
    note = f"qcr: {note}; {nodes} nodes, {len(heap)} open, {fixed} fixed, {relax.iterations} iterations"
    return problem.solution(
        incumbent,
        status,
        0.0 if status == "optimal" else gap,
        time.perf_counter() - start,
        bound=bound,
        note=note,
    )


def _branch_layer(xs: np.ndarray, mask: np.ndarray, free: np.ndarray, costs: np.ndarray) -> int:
    """The free layer to branch on: the most fractional (``1 − max_a x``), times the spread of
    the first budget's costs over its candidates with `BRANCHING` "cost"; the first on ties."""
    score = 1.0 - xs[free].max(axis=1)
    if BRANCHING == "cost" and len(costs):
        spread = np.where(mask[free], costs[0][free], np.nan)
        score = score * (np.nanmax(spread, axis=1) - np.nanmin(spread, axis=1) + 1e-3)
    return int(free[np.argmax(score + 1e-12 * np.arange(free.size)[::-1])])


def _round(x: np.ndarray, mask: np.ndarray) -> list[int]:
    """The largest allowed entry of each layer."""
    return [int(a) for a in np.where(mask, x, -np.inf).argmax(axis=1)]


def _first_incumbent(problem: Problem, warm_start: list[int] | None) -> list[int]:
    from mixq.search.greedy import greedy

    pool = [greedy(problem).choices]
    if warm_start is not None and problem.is_feasible(warm_start):
        pool.append(problem.check_choices(warm_start))
    return polish(problem, min(pool, key=problem.objective))
