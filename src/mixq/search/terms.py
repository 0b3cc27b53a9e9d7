"""Shared pieces of the quadratic solvers: variables, pair blocks, integer budgets, the convex form.

A `Problem` with pairs is the binary quadratic program

    min  f(x) = sᵀx + ½ xᵀHx    s.t.  Σ_{c} x[l, c] = 1 (every layer),  A x ≤ b (budgets),

over the binaries ``x[l, c]`` of the allowed candidates, with ``H[(l, c), (m, c')] = Q[l, c, m, c']``
for ``l ≠ m`` and zero diagonal blocks (``Q = ½ (P + Pᵀ)``, `mixq.search.problem`). `Terms`
holds these arrays once for `mixq.search.cpsat`, `mixq.search.scip` and the convex bound.

**Convex form** (`Terms.convex`). For binary ``x``, ``x_i² = x_i``, so adding ``d·I`` to ``H`` and
``−½d`` to ``s`` changes nothing at integer points (the classical diagonal perturbation of
quadratic convex reformulation, Hammer and Rubin 1970; Billionnet and Elloumi, Math. Program.
109, 2007). On the relaxation's affine hull (every layer's ``x`` sums to 1) only ``H`` restricted
to ``T = {z : Σ_c z[l, c] = 0 ∀l}`` matters, so ``d = max(0, −λ_min(Πᵀ H Π))`` with ``Π`` an
orthonormal basis of ``T`` — smaller than ``−λ_min(H)``. With the centre ``x0`` (``1/n_l`` per
layer), ``K = ΠΠᵀ (H + dI) ΠΠᵀ = Σ_k λ_k v_k v_kᵀ`` (``λ_k ≥ 0``) and every x on the hull:

    f(x) = c0 + gᵀx + ½ Σ_k λ_k (v_kᵀx − v_kᵀx0)²,
    g = s − ½d + (H + dI) x0,   c0 = −½ x0ᵀ (H + dI) x0.

The right side is convex in x, so its minimum over the relaxed constraints (``0 ≤ x ≤ 1``)
is a lower bound on the optimum; it is exact at every feasible integer point.

The diagonal blocks of ``H`` are free too: ``x[l, a] x[l, b] = 0`` for ``a ≠ b`` at integer points,
so any symmetric ``B_l`` may be added to block ``(l, l)`` with ``½ diag(B_l)`` taken off ``s``.
CLADO's pair matrix loses its diagonal blocks when it becomes a `Problem` (its PSD projection
with them removed is indefinite again), and a uniform ``d`` then gives a weak bound (−4.5 for
an incumbent of 0.25 on a 72 × 3 instance of bench/iqp.py). `Terms.completion` restores blocks
that make ``H + B`` near PSD with a small trace (bound 0.11 on the same instance), the rest is
taken by ``d``. [DESIGN] a heuristic (alternating projections) instead of the SDP that
maximizes the bound over all perturbations (Billionnet–Elloumi's QCR; no SDP solver here).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from mixq.search.problem import Problem, Solution, budget_tolerance, relative_gap

__all__ = ["Convex", "IntegerBudget", "Terms", "conclude"]


@dataclass(frozen=True)
class IntegerBudget:
    """A budget row with integer coefficients: ``Σ_i coef[i] x_i ≤ rhs`` over `Terms` variables.

    ``exact`` is True when the integer row accepts exactly the choices the float budget
    accepts (costs shifted by each layer's cheapest are integers up to ``2^40``); otherwise the
    costs were scaled to ``2^20`` steps and rounded down, which keeps every feasible choice
    (a relaxation: bounds stay valid) but may accept a choice that exceeds the budget by less
    than ``L`` steps; solvers re-check their answers exactly.
    """

    name: str
    coef: np.ndarray  # [n] int64
    rhs: int
    exact: bool


@dataclass(frozen=True)
class Convex:
    """``f(x) = c0 + gᵀx + ½ Σ_k lam[k] (V[:, k]ᵀ x − offset[k])²`` on the relaxation's hull."""

    c0: float
    g: np.ndarray  # [n]
    lam: np.ndarray  # [r]
    V: np.ndarray  # [n, r]
    offset: np.ndarray  # [r]
    shift: float  # d

    def value(self, x: np.ndarray) -> float:
        """Return the convex form at ``x`` (equal to ``f`` at feasible integer points)."""
        z = self.V.T @ x - self.offset
        return float(self.c0 + self.g @ x + 0.5 * (self.lam * z * z).sum())


class Terms:
    """The arrays of the binary quadratic program of a `Problem` (see the module docstring).

    Attributes:
        layer, cand: ``# [n]`` layer and candidate of each variable (allowed candidates only).
        index: ``# [L, C]`` variable of ``(l, c)``, -1 where forbidden.
        linear: ``# [n]`` ``s`` of each variable.
        blocks: ``(l, m, vars_l, vars_m, Q[l, cands_l, m, cands_m])`` for every ``l < m`` whose
            block is not all zero.
    """

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        allowed = problem.allowed
        L, C = allowed.shape
        self.num_layers = L
        self.layer, self.cand = np.nonzero(allowed)
        self.n = int(self.layer.size)
        self.index = np.full((L, C), -1, dtype=np.int64)
        self.index[self.layer, self.cand] = np.arange(self.n)
        self.layer_vars = [self.index[l_][allowed[l_]] for l_ in range(L)]
        self.linear = problem.score_array[self.layer, self.cand]
        self.blocks: list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]] = []
        q = problem.interactions
        if q is not None:
            nonzero = np.triu(np.abs(q).max(axis=(1, 3)) > 0, k=1)
            for l_, m in zip(*np.nonzero(nonzero), strict=True):
                vl, vm = self.layer_vars[l_], self.layer_vars[m]
                block = q[l_, self.cand[vl][:, None], m, self.cand[vm][None, :]]
                self.blocks.append((int(l_), int(m), vl, vm, block))

    def choices(self, x: np.ndarray) -> list[int]:
        """Return the candidate of the largest ``x`` of each layer."""
        return [int(self.cand[v[np.argmax(x[v])]]) for v in self.layer_vars]

    def vector(self, choices: list[int]) -> np.ndarray:
        """Return the 0/1 vector ``# [n]`` of ``choices``."""
        x = np.zeros(self.n)
        x[self.index[np.arange(self.num_layers), choices]] = 1.0
        return x

    @cached_property
    def hessian(self) -> np.ndarray:
        """Return ``H`` ``# [n, n]`` (zero diagonal blocks, symmetric)."""
        h = np.zeros((self.n, self.n))
        for _, _, vl, vm, block in self.blocks:
            h[np.ix_(vl, vm)] = block
            h[np.ix_(vm, vl)] = block.T
        return h

    def magnitude(self) -> float:
        """Return ``Σ_l max|s_l| + Σ_blocks max|Q_block|``, a bound on ``|f(x)|`` for every x."""
        m = sum(float(np.abs(self.linear[v]).max()) for v in self.layer_vars)
        return m + sum(float(np.abs(b).max()) for *_, b in self.blocks)

    def integer_budgets(self) -> list[IntegerBudget]:
        """Return every finite budget as an integer row (see `IntegerBudget`)."""
        out = []
        for name, budget in self.problem.budgets.items():
            if not math.isfinite(budget):
                continue
            cost = self.problem.cost_arrays[name][self.layer, self.cand]
            low = np.array([cost[v].min() for v in self.layer_vars])
            shifted = cost - low[self.layer]
            top = float(shifted.max())
            room = float(budget) + budget_tolerance(float(budget)) - float(low.sum())
            if top == 0.0:
                continue  # every choice costs the same; feasibility was checked before
            rounded = np.round(shifted)
            if np.array_equal(rounded, shifted) and top < 2.0**40:
                coef, rhs, exact = rounded.astype(np.int64), math.floor(room), True
            else:
                step = top / 2.0**20
                coef = np.floor(shifted / step).astype(np.int64)
                rhs, exact = math.floor(room / step), False
            out.append(IntegerBudget(name, coef, int(rhs), exact))
        return out

    def completion(self, iterations: int = 100, seconds: float | None = None) -> np.ndarray:
        """Return diagonal blocks ``B`` ``# [n, n]`` (zero off the blocks) making ``H + B`` near PSD.

        Alternating projections (Higham, IMA J. Numer. Anal. 22, 2002, without Dykstra's
        correction): project ``M`` onto the PSD cone, reset its off-diagonal blocks to ``H``,
        and lower its diagonal by ``μ_k = 0.05·max|H| / (k + 1)`` (a subgradient step on
        ``trace B``: a smaller trace is a tighter relaxation). Stops after ``iterations`` or
        ``seconds``. Any ``B`` is exact at integer points; `convex` adds the remaining shift.
        """
        start = time.perf_counter()
        h = self.hessian
        mask = np.zeros(h.shape, dtype=bool)
        for v in self.layer_vars:
            mask[np.ix_(v, v)] = True
        mu = 0.05 * float(np.abs(h).max()) if h.size else 0.0
        m = h.copy()
        for k in range(iterations):
            w, u = np.linalg.eigh(m)
            m = np.where(mask, (u * np.maximum(w, 0.0)) @ u.T, h)
            m[np.diag_indices_from(m)] -= mu / (k + 1)
            if seconds is not None and time.perf_counter() - start > seconds:
                break
        return np.where(mask, m, 0.0)

    def convex(self, blocks: np.ndarray | None = None) -> Convex:
        """Return the convex form of the module docstring with diagonal blocks ``blocks``.

        ``blocks`` (symmetric, zero off the layers' diagonal blocks, e.g. `completion`) are
        added to ``H`` and ``½ diag(blocks)`` taken off ``s``; None adds nothing (only ``dI``).
        """
        n = self.n
        h = self.hessian if blocks is None else self.hessian + blocks
        linear = self.linear if blocks is None else self.linear - 0.5 * np.diag(blocks)
        basis = np.zeros((n, n - self.num_layers))  # orthonormal basis Π of T
        col = 0
        x0 = np.zeros(n)
        for v in self.layer_vars:
            k = v.size
            x0[v] = 1.0 / k
            if k > 1:
                # Columns 1..k-1 of an orthonormal basis whose first column is 1/√k.
                q, _ = np.linalg.qr(np.column_stack([np.ones(k), np.eye(k)[:, : k - 1]]))
                basis[np.ix_(v, np.arange(col, col + k - 1))] = q[:, 1:]
                col += k - 1
        inner = basis.T @ h @ basis
        lam_t, vec_t = np.linalg.eigh(inner) if inner.size else (np.zeros(0), np.zeros((0, 0)))
        scale = max(1.0, float(np.abs(lam_t).max()) if lam_t.size else 0.0)
        shift = max(0.0, -float(lam_t.min()) if lam_t.size else 0.0)
        lam = np.maximum(lam_t + shift, 0.0)
        keep = lam > 1e-12 * scale
        V = basis @ vec_t[:, keep]
        hd_x0 = h @ x0 + shift * x0
        g = linear - 0.5 * shift + hd_x0
        c0 = -0.5 * float(x0 @ hd_x0)
        return Convex(c0=c0, g=g, lam=lam[keep], V=V, offset=V.T @ x0, shift=shift)


def conclude(
    problem: Problem,
    found: list[int] | None,
    hint: list[int] | None,
    bound: float,
    proven: bool,
    seconds: float,
    note: str,
) -> Solution:
    """Return the `Solution` of a solver run: the better of its answer and the warm start.

    ``found`` (the solver's answer, None if none or over a budget) and ``hint`` (the feasible
    warm start, or None) compete on the exact objective; with neither, `greedy`'s answer is
    returned. The bound is clipped to the incumbent; status "optimal" needs ``proven`` and the
    solver's own answer to be the incumbent.
    """
    pool = [c for c in (found, hint) if c is not None]
    if not pool:
        from mixq.search.greedy import greedy

        pool = [greedy(problem).choices]
    best = min(pool, key=problem.objective)
    value = problem.objective(best)
    bound = min(float(bound), value) if math.isfinite(bound) else -math.inf
    status = "optimal" if proven and best == found else "time_limit"
    return problem.solution(best, status, relative_gap(value, bound), seconds, bound=bound, note=note)
