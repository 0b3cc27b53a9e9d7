"""Mixed-integer linear program of a `Problem`, in the form `scipy.optimize.milp` takes.

Variables: binary ``x[l, c]`` for every allowed candidate (forbidden ones get no variable) and,
for every layer pair ``l < m`` whose interaction block ``Q[l, :, m, :]`` is not all zero,
continuous ``y[l, c, m, c'] ∈ [0, 1]`` for every allowed ``(c, c')``:

    min   Σ_{l,c} s[l, c] x[l, c] + Σ_{l<m} Σ_{c,c'} Q[l, c, m, c'] y[l, c, m, c']
    s.t.  Σ_c x[l, c] = 1                                    for every layer l
          Σ_{l,c} costs[k][l, c] x[l, c] ≤ budgets[k]         for every finite budget k
          Σ_{c'} y[l, c, m, c'] = x[l, c]                    for every kept pair, every c
          Σ_c  y[l, c, m, c'] = x[m, c']                     for every kept pair, every c'

The pair rows are the aggregated (Sherali–Adams level-1, "marginal") linearization: with
one-hot binary ``x`` selecting ``a`` for layer l and ``b`` for layer m, the rows of every
``c ≠ a`` and the columns of every ``c' ≠ b`` force those ``y`` to 0, so ``y[l, a, m, b] = 1``
and ``y = x[l, c]·x[m, c']`` exactly. It needs ``2C`` rows per layer pair instead of the
``3C²`` of the per-term McCormick rows (``y ≥ x + x' − 1``, ``y ≤ x``, ``y ≤ x'``), and its LP
relaxation is at least as tight. A block can only be skipped whole: every ``y`` of a kept
block is needed for the equalities to hold.

Budget rows are shifted by each layer's cheapest cost and scaled to coefficients in [0, 1], so
the solver's absolute feasibility tolerance is relative to the per-layer cost spread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint

from mixq.search.problem import Problem

__all__ = ["Formulation", "build"]


@dataclass(frozen=True, eq=False)
class Formulation:
    """Arrays for `scipy.optimize.milp` and the map back to choices.

    Attributes:
        c: Objective coefficients ``# [n_vars]``.
        integrality: 1 for ``x`` variables, 0 for ``y`` ``# [n_vars]``.
        bounds: ``[0, 1]`` for every variable.
        constraints: One `LinearConstraint` with a sparse CSR matrix.
        x_index: ``# [L, C]`` variable index of ``x[l, c]``, -1 where forbidden.
        num_pair_blocks: Layer pairs that got ``y`` variables.
    """

    c: np.ndarray
    integrality: np.ndarray
    bounds: Bounds
    constraints: LinearConstraint
    x_index: np.ndarray
    num_pair_blocks: int

    def decode(self, values: np.ndarray) -> list[int]:
        """Return the candidate with the largest ``x`` value of each layer."""
        scores = np.where(self.x_index >= 0, values[np.maximum(self.x_index, 0)], -np.inf)
        return [int(c) for c in scores.argmax(axis=1)]


def build(
    problem: Problem, use_pairs: bool = True, shrink: dict[str, float] | None = None
) -> Formulation:
    """Build the MILP of ``problem``.

    Args:
        problem: The problem; budgets must already be checked feasible one by one.
        use_pairs: Include the pairwise terms (False gives the multiple-choice knapsack).
        shrink: Amount to subtract from each named budget (used to absorb solver tolerance).

    Returns:
        The `Formulation`.
    """
    shrink = shrink or {}
    allowed = problem.allowed  # [L, C]
    L, C = allowed.shape
    x_index = np.full((L, C), -1, dtype=np.int64)
    x_layer, x_cand = np.nonzero(allowed)
    n_x = x_layer.size
    x_index[x_layer, x_cand] = np.arange(n_x)
    c_parts = [problem.score_array[x_layer, x_cand]]

    # One-hot rows.
    rows, cols, vals = [x_layer], [np.arange(n_x)], [np.ones(n_x)]
    lower, upper = [np.ones(L)], [np.ones(L)]
    n_rows = L

    # Budget rows, shifted by the cheapest cost of each layer and scaled to [0, 1].
    for name, budget in problem.budgets.items():
        if not np.isfinite(budget):
            continue
        cost = np.where(allowed, problem.cost_arrays[name], np.inf)
        shifted = cost - cost.min(axis=1, keepdims=True)
        scale = float(shifted[allowed].max())
        if scale == 0.0:
            continue  # every choice costs the same; feasibility was checked before
        rhs = (budget - shrink.get(name, 0.0) - float(cost.min(axis=1).sum())) / scale
        coef = shifted[x_layer, x_cand] / scale
        keep = coef != 0.0
        rows.append(np.full(int(keep.sum()), n_rows))
        cols.append(np.arange(n_x)[keep])
        vals.append(coef[keep])
        lower.append(np.array([-np.inf]))
        upper.append(np.array([rhs]))
        n_rows += 1

    # Pair blocks, aggregated linearization (see the module docstring).
    q = problem.interactions if use_pairs else None
    n_y = 0
    num_blocks = 0
    if q is not None:
        block_nonzero = np.triu(np.abs(q).max(axis=(1, 3)) > 0, k=1)  # [L, L], l < m only
        num_blocks = int(block_nonzero.sum())
        mask = allowed[:, :, None, None] & allowed[None, None, :, :]
        mask &= block_nonzero[:, None, :, None]
        yl, yc, ym, yd = np.nonzero(mask)
        n_y = yl.size
        y_ids = n_x + np.arange(n_y)
        c_parts.append(q[yl, yc, ym, yd])
        # Row "Σ_{c'} y[l, c, m, c'] = x[l, c]" keyed by (l, m, c); column rows by (l, m, c').
        row_key = (yl * L + ym) * C + yc
        col_key = (yl * L + ym) * C + yd + L * L * C
        keys, inverse = np.unique(np.concatenate([row_key, col_key]), return_inverse=True)
        n_pair_rows = keys.size
        rows.append(n_rows + inverse)
        cols.append(np.concatenate([y_ids, y_ids]))
        vals.append(np.ones(2 * n_y))
        # The x term of each pair row: x[l, c] for row keys, x[m, c'] for column keys.
        is_col = keys >= L * L * C
        k = np.where(is_col, keys - L * L * C, keys)
        kl, rest = np.divmod(k, L * C)
        km, kc = np.divmod(rest, C)
        x_of_row = np.where(is_col, x_index[km, kc], x_index[kl, kc])
        rows.append(n_rows + np.arange(n_pair_rows))
        cols.append(x_of_row)
        vals.append(-np.ones(n_pair_rows))
        lower.append(np.zeros(n_pair_rows))
        upper.append(np.zeros(n_pair_rows))
        n_rows += n_pair_rows

    n_vars = n_x + n_y
    matrix = sp.csr_array(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n_rows, n_vars),
    )
    integrality = np.concatenate([np.ones(n_x), np.zeros(n_y)])
    return Formulation(
        c=np.concatenate(c_parts),
        integrality=integrality,
        bounds=Bounds(np.zeros(n_vars), np.ones(n_vars)),
        constraints=LinearConstraint(matrix, np.concatenate(lower), np.concatenate(upper)),
        x_index=x_index,
        num_pair_blocks=num_blocks,
    )
