"""Greedy bit allocation: a fast fallback that ignores pairwise terms."""

from __future__ import annotations

import logging
import time

import numpy as np

from mixq.search.formulation import solve
from mixq.search.problem import (
    Problem,
    Solution,
    budget_tolerance,
    check_budgets,
)

__all__ = ["greedy"]

logger = logging.getLogger(__name__)


def greedy(problem: Problem) -> Solution:
    """Allocate candidates by marginal score per unit of budget, ignoring ``pairs``.

    With ``s = scores``, totals ``T_k(x) = Σ_l costs[k][l, x_l]`` and the normalized excess
    ``E(x) = Σ_k max(0, T_k(x) − B_k) / span_k`` (``span_k = Σ_l (max_c − min_c) costs[k][l, c]``
    over allowed candidates):

    1. Start at ``x_l = argmin_c s[l, c]`` (highest precision; ties go to the cheaper).
    2. While ``E(x) > 0``: over single-layer moves ``x_l → c`` with ``ΔE < 0``, take the one
       with the smallest ``Δs / (−ΔE)``. With one budget a move always exists until the budget
       holds (each move makes one layer strictly cheaper). With several budgets the descent can
       stall; the pair-free MILP (`mixq.search.formulation`) then supplies a feasible point,
       so a feasible solution is returned whenever one exists.
    3. Upgrade: while some move has ``Δs < 0`` and keeps every budget, take the one with the
       largest ``−Δs / Σ_k max(0, ΔT_k) / span_k`` (moves that add no cost first).

    The pairwise terms are ignored while choosing; the returned ``objective`` includes them.

    Args:
        problem: The problem.

    Returns:
        A feasible `Solution` with status ``"greedy"`` and ``gap = nan`` (no bound is known).

    Raises:
        InfeasibleBudgetError: No choice satisfies the budgets.
    """
    start = time.perf_counter()
    check_budgets(problem)
    allowed = problem.allowed
    L = problem.num_layers
    layers = np.arange(L)
    scores = np.where(allowed, problem.score_array, np.inf)  # [L, C]
    names = [k for k, b in problem.budgets.items() if np.isfinite(b)]
    budgets = np.array([float(problem.budgets[k]) for k in names])  # [K]
    tol = np.array([budget_tolerance(b) for b in budgets])
    costs = np.zeros((len(names), *allowed.shape))  # [K, L, C], 0 where forbidden
    for i, name in enumerate(names):
        costs[i] = np.where(allowed, problem.cost_arrays[name], 0.0)
    low = np.where(allowed, costs, np.inf).min(axis=2)
    high = np.where(allowed, costs, -np.inf).max(axis=2)
    span = (high - low).sum(axis=1)
    span = np.where(span > 0, span, 1.0)[:, None, None]  # [K, 1, 1]

    # Step 1: best score per layer, cheapest (normalized) among ties.
    tie = np.where(scores == scores.min(axis=1, keepdims=True), (costs / span).sum(axis=0), np.inf)
    x = tie.argmin(axis=1)

    def excess(totals: np.ndarray) -> np.ndarray:
        return (np.maximum(0.0, totals - budgets[:, None, None] - tol[:, None, None]) / span).sum(axis=0)

    # Step 2: descend until every budget holds.
    while True:
        current = costs[:, layers, x]  # [K, L]
        totals = current.sum(axis=1)  # [K]
        e_now = float(excess(totals[:, None, None]).item()) if names else 0.0
        if e_now <= 0.0:
            break
        moved = totals[:, None, None] + (costs - current[:, :, None])  # [K, L, C]
        gain = e_now - excess(moved)  # [L, C]; the threshold keeps rounding from cycling
        valid = allowed & (gain > 1e-12)
        if not valid.any():
            logger.info("greedy descent stalled with several budgets; using the pair-free MILP")
            x = np.asarray(_pair_free_feasible(problem))
            break
        delta_score = scores - scores[layers, x][:, None]
        ratio = np.where(valid, delta_score / np.where(valid, gain, 1.0), np.inf)
        layer, cand = np.unravel_index(int(ratio.argmin()), ratio.shape)
        x[layer] = cand

    # Step 3: upgrade while the budgets allow.
    while True:
        current = costs[:, layers, x]
        totals = current.sum(axis=1)
        delta_cost = costs - current[:, :, None]  # [K, L, C]
        fits = (totals[:, None, None] + delta_cost <= (budgets + tol)[:, None, None]).all(axis=0)
        delta_score = scores - scores[layers, x][:, None]
        valid = allowed & fits & (delta_score < 0)
        if not valid.any():
            break
        use = (np.maximum(0.0, delta_cost) / span).sum(axis=0)
        free = valid & (use == 0)
        if free.any():
            priority = np.where(free, -delta_score, -np.inf)
        else:
            priority = np.where(valid, -delta_score / np.where(valid, use, 1), -np.inf)
        layer, cand = np.unravel_index(int(priority.argmax()), priority.shape)
        x[layer] = cand

    return problem.solution([int(c) for c in x], "greedy", float("nan"), time.perf_counter() - start)


def _pair_free_feasible(problem: Problem) -> list[int]:
    """Return the optimum of the pair-free MILP (`solve` raises `InfeasibleBudgetError` if none)."""
    res, found = solve(problem, use_pairs=False)
    if found is None:
        raise RuntimeError(f"pair-free MILP found no feasible choice: {res.message}")
    return found
