"""Local search on the full objective, pairwise terms included: polishes incumbents."""

from __future__ import annotations

import numpy as np

from mixq.search.problem import Problem, budget_tolerance

__all__ = ["polish"]


def polish(problem: Problem, choices: list[int], max_moves: int = 10_000) -> list[int]:
    """Improve a feasible choice by best-improvement moves of one or two layers.

    With ``Q = ½ (P + Pᵀ)`` and ``R[l, c] = Σ_m Q[l, c, m, x_m]``, changing layer l to c changes
    the objective by ``Δ[l, c] = s[l, c] − s[l, x_l] + R[l, c] − R[l, x_l]``, and changing l to
    c and m to d together by

        Δ[l, c] + Δ[m, d] + Q[l, c, m, d] − Q[l, c, m, x_m] − Q[l, x_l, m, d] + Q[l, x_l, m, x_m].

    Two-layer moves let an upgrade pay for itself with a downgrade under a binding budget.
    Each step takes the most improving move that keeps every budget; stops at a local optimum
    or after ``max_moves`` steps.

    Args:
        problem: The problem.
        choices: A feasible choice per layer.
        max_moves: Cap on the number of moves.

    Returns:
        A feasible choice whose objective is at most that of ``choices``.
    """
    x = np.asarray(problem.check_choices(choices))
    allowed = problem.allowed
    L, C = allowed.shape
    layers = np.arange(L)
    scores = np.where(allowed, problem.score_array, np.inf)  # [L, C]
    q = problem.interactions
    if q is None:
        q = np.zeros((L, C, L, C))
    names = [k for k, b in problem.budgets.items() if np.isfinite(b)]
    limits = np.array([float(problem.budgets[k]) + budget_tolerance(problem.budgets[k]) for k in names])
    costs = np.zeros((len(names), L, C))  # [K, L, C]
    for i, name in enumerate(names):
        costs[i] = np.where(allowed, problem.cost_arrays[name], 0.0)
    pair_ok = allowed[:, :, None, None] & allowed[None, None, :, :]
    pair_ok &= (layers[:, None] != layers[None, :])[:, None, :, None]
    scale = max(1.0, float(np.abs(problem.score_array[allowed]).max()))

    for _ in range(max_moves):
        d_cost = costs - costs[:, layers, x][:, :, None]  # [K, L, C]
        slack = limits - costs[:, layers, x].sum(axis=1)  # [K]
        fits1 = (d_cost <= slack[:, None, None]).all(axis=0) & allowed
        q_cx = q[:, :, layers, x]  # [L, C, L]: Q[l, c, m, x_m]
        q_xd = q[layers, x]  # [L, L, C]: Q[l, x_l, m, d]
        r = q_cx.sum(axis=2)  # [L, C]
        single = scores - scores[layers, x][:, None] + r - r[layers, x][:, None]  # [L, C]
        pair = (  # [L, C, L, C]
            single[:, :, None, None]
            + single[None, None, :, :]
            + q
            - q_cx[:, :, :, None]
            - q_xd[:, None, :, :]
            + q_xd[:, layers, x][:, None, :, None]
        )
        fits2 = pair_ok.copy()
        for k in range(len(names)):
            fits2 &= d_cost[k][:, :, None, None] + d_cost[k][None, None, :, :] <= slack[k]
        best1 = np.where(fits1, single, np.inf)
        best2 = np.where(fits2, pair, np.inf)
        i1, i2 = int(best1.argmin()), int(best2.argmin())
        v1, v2 = best1.flat[i1], best2.flat[i2]
        if min(v1, v2) >= -1e-12 * scale:
            break
        if v1 <= v2:
            layer, cand = np.unravel_index(i1, (L, C))
            x[layer] = cand
        else:
            layer, cand, other, cand2 = np.unravel_index(i2, (L, C, L, C))
            x[layer], x[other] = cand, cand2
    return [int(c) for c in x]
