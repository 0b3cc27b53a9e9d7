"""Exhaustive search over every choice: the oracle the other solvers are tested against."""

from __future__ import annotations

import math
import time

import numpy as np

from mixq.search.problem import (
    Problem,
    Solution,
    budget_tolerance,
    check_budgets,
    combination_infeasible,
)

__all__ = ["brute_force"]

_CHUNK = 1 << 16


def brute_force(problem: Problem, max_choices: int = 1 << 20) -> Solution:
    """Evaluate every allowed choice and return the best feasible one.

    Enumerates all ``Π_l n_l ≤ C^L`` choices (``n_l`` allowed candidates of layer l) in chunks,
    computing ``f(x) = Σ_l s[l, x_l] + Σ_{l<m} Q[l, x_l, m, x_m]`` with
    ``Q = ½ (P + Pᵀ)`` (the definition of `mixq.search.problem`) and every budget sum
    vectorized. Ties go to the first choice in lexicographic order of candidate indices.

    Args:
        problem: The problem.
        max_choices: Refuse problems with more choices than this.

    Returns:
        The optimal `Solution`, status ``"optimal"``, gap 0.

    Raises:
        ValueError: More than ``max_choices`` choices (``Σ_l log2 n_l`` too large).
        InfeasibleBudgetError: No choice satisfies the budgets.
    """
    start = time.perf_counter()
    check_budgets(problem)
    allowed = problem.allowed
    L = problem.num_layers
    cands = [np.flatnonzero(allowed[layer]) for layer in range(L)]
    sizes = np.array([c.size for c in cands], dtype=np.int64)
    log2_total = float(np.log2(sizes).sum())
    if log2_total > math.log2(max_choices):
        raise ValueError(
            f"brute force over {L} layers needs 2^{log2_total:.1f} choices, more than "
            f"max_choices = {max_choices}"
        )
    total = int(np.prod(sizes))
    strides = np.concatenate([np.cumprod(sizes[::-1])[::-1][1:], [1]])  # last layer fastest
    score_rows = [problem.score_array[layer, cands[layer]] for layer in range(L)]
    budgets = {k: float(b) for k, b in problem.budgets.items() if np.isfinite(b)}
    cost_rows = {k: [problem.cost_arrays[k][layer, cands[layer]] for layer in range(L)] for k in budgets}
    q = problem.interactions
    blocks = {}  # (l, m) with l < m → Q[l, cands_l, m, cands_m]  # [n_l, n_m]
    if q is not None:
        for layer in range(L):
            for other in range(layer + 1, L):
                block = q[layer, cands[layer][:, None], other, cands[other][None, :]]
                if block.any():
                    blocks[layer, other] = block
    best_value, best_index = np.inf, -1
    for lo in range(0, total, _CHUNK):
        flat = np.arange(lo, min(lo + _CHUNK, total), dtype=np.int64)
        idx = (flat[:, None] // strides[None, :]) % sizes[None, :]  # [N, L] into cands
        value = np.zeros(flat.size)
        for layer in range(L):
            value += score_rows[layer][idx[:, layer]]
        for (layer, other), block in blocks.items():
            value += block[idx[:, layer], idx[:, other]]
        feasible = np.ones(flat.size, dtype=bool)
        for name, b in budgets.items():
            spent = np.zeros(flat.size)
            for layer in range(L):
                spent += cost_rows[name][layer][idx[:, layer]]
            feasible &= spent <= b + budget_tolerance(b)
        if feasible.any():
            value = np.where(feasible, value, np.inf)
            i = int(value.argmin())
            if value[i] < best_value:
                best_value, best_index = float(value[i]), int(flat[i])
    if best_index < 0:
        raise combination_infeasible(problem)
    digits = (best_index // strides) % sizes
    choices = [int(cands[layer][d]) for layer, d in enumerate(digits)]
    return problem.solution(choices, "optimal", 0.0, time.perf_counter() - start)
