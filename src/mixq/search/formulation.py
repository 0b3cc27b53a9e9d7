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
the solver's absolute feasibility tolerance is relative to the per-layer cost spread. HiGHS may
still accept a choice that exceeds a budget by less than that tolerance; `solve` re-checks every
answer exactly and cuts such a choice off with a no-good row ``Σ_l x[l, choice_l] ≤ L − 1``
(which removes that one choice and nothing else) before solving again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, OptimizeResult, milp

from mixq.search.problem import Problem, combination_infeasible

__all__ = ["Formulation", "build", "solve"]

logger = logging.getLogger(__name__)

_MAX_CUTS = 10


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


def build(problem: Problem, use_pairs: bool = True, exclude: list[list[int]] | None = None) -> Formulation:
    """Build the MILP of ``problem``.

    Args:
        problem: The problem; budgets must already be checked feasible one by one.
        use_pairs: Include the pairwise terms (False gives the multiple-choice knapsack).
        exclude: Choices cut off by no-good rows ``Σ_l x[l, choice_l] ≤ L − 1``.

    Returns:
        The `Formulation`.
    """
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
        rhs = (budget - float(cost.min(axis=1).sum())) / scale
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

    # No-good rows: the solver accepted these within its tolerance, but they exceed a budget.
    for choice in exclude or []:
        rows.append(np.full(L, n_rows))
        cols.append(x_index[np.arange(L), choice])
        vals.append(np.ones(L))
        lower.append(np.array([-np.inf]))
        upper.append(np.array([L - 1.0]))
        n_rows += 1

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


def solve(
    problem: Problem, use_pairs: bool = True, time_limit: float | None = None
) -> tuple[OptimizeResult, list[int] | None]:
    """Solve the MILP with HiGHS and return its result and its exactly feasible choice.

    Every answer is re-checked against the budgets in float64; one that exceeds a budget
    (within solver tolerance) is cut off and the program solved again, up to 10 times.

    Args:
        problem: The problem; budgets must already be checked feasible one by one.
        use_pairs: Include the pairwise terms.
        time_limit: Seconds for all solves together; None for no limit.

    Returns:
        The last `OptimizeResult` and the decoded choice, or None when the solver found no
        feasible choice (time limit, or every answer exceeded a budget).

    Raises:
        InfeasibleBudgetError: The budgets cannot hold together.
    """
    start = time.perf_counter()
    cuts: list[list[int]] = []
    while True:
        form = build(problem, use_pairs=use_pairs, exclude=cuts)
        options: dict[str, float] = {"mip_rel_gap": 0.0}
        if time_limit is not None:
            options["time_limit"] = max(1e-3, time_limit - (time.perf_counter() - start))
        res = milp(
            form.c,
            integrality=form.integrality,
            bounds=form.bounds,
            constraints=form.constraints,
            options=options,
        )
        logger.info(
            "milp: %d vars, %d rows, %d pair blocks, %d cuts -> status %d (%s)",
            form.c.size,
            form.constraints.A.shape[0],
            form.num_pair_blocks,
            len(cuts),
            res.status,
            res.message,
        )
        if res.status == 2:
            raise combination_infeasible(problem)
        if res.x is None:
            return res, None
        found = form.decode(res.x)
        excess = problem.violations(found)
        if not excess:
            return res, found
        logger.warning("milp answer exceeds budgets %s within solver tolerance; cut off", excess)
        cuts.append(found)
        if len(cuts) >= _MAX_CUTS:
            return res, None
