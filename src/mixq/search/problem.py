"""The bit-allocation problem every solver in `mixq.search` answers.

Each of ``L`` layers picks exactly one of ``C`` candidates; ``x_l`` is the candidate index of
layer ``l``. With ``s = scores`` ``# [L, C]`` and ``P = pairs`` ``# [L, C, L, C]`` the objective
is

    f(x) = Σ_l s[l, x_l] + Σ_{l<m} ½ (P[l, x_l, m, x_m] + P[m, x_m, l, x_l])
         = Σ_l s[l, x_l] + ½ Σ_{l≠m} P[l, x_l, m, x_m],

and for every budget ``name`` the constraint is ``Σ_l costs[name][l, x_l] ≤ budgets[name]``.

The pairwise term is the symmetric part of ``P`` counted once per unordered layer pair. With
CLADO's symmetric storage ``P[l, s, m, s'] = P[m, s', l, s] = Ω_lm(s, s')`` (docs/methods.md §3.2)
``f`` is exactly the model ``ΔL ≈ Σ_l Ω_l(s_l) + Σ_{l<m} Ω_lm(s_l, s_m)`` (it equals
``½ xᵀ G x`` of CLADO's matrix form with ``G = diag(2·s) + P``). Interactions stored only in the
upper triangle (``l < m``, zeros below) must be symmetrized first
(``pairs + pairs.permute(2, 3, 0, 1)``). Diagonal blocks ``P[l, :, l, :]`` are ignored.

A candidate with a score or any cost of ``+inf`` is forbidden for that layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

__all__ = ["InfeasibleBudgetError", "Problem", "Solution"]


def _fmt(value: float) -> str:
    """Format a number the way every message of this package does."""
    return f"{value:.12g}"


def relative_gap(objective: float, bound: float | None) -> float:
    """Return the relative gap ``(f − bound) / |f|`` of an incumbent; inf when no bound is known.

    0 when ``bound ≥ f``; inf when ``f = 0`` with a smaller bound.
    """
    if bound is None or not math.isfinite(bound):
        return math.inf
    diff = max(0.0, objective - bound)
    if diff == 0.0:
        return 0.0
    return diff / abs(objective) if objective != 0.0 else math.inf


def budget_tolerance(budget: float) -> float:
    """Return the slack a cost sum may exceed ``budget`` by (float summation error only)."""
    return 1e-9 * max(1.0, abs(budget))


class InfeasibleBudgetError(ValueError):
    """No choice of candidates satisfies the budgets: the one error of an infeasible budget.

    Raised by the search (here), by the cost model's checks before a method runs
    (``mixq.cost.check_feasible``) and by methods; ``mixq.InfeasibleBudgetError`` and
    ``mixq.cost.InfeasibleBudgetError`` are this class. Its message names the budget and the
    smallest feasible value.

    Attributes:
        minimums: Smallest feasible value of each budget named (in the units it was given in);
            for the search, ``Σ_l min_c costs[name][l, c]`` over allowed candidates.
        violated: Names of the budgets below their own minimum; empty when each budget is
            feasible alone but their combination is not.
    """

    def __init__(
        self, message: str, minimums: dict[str, float] | None = None, violated: list[str] | None = None
    ) -> None:
        super().__init__(message)
        self.minimums = dict(minimums or {})
        self.violated = list(violated or [])


@dataclass(frozen=True)
class Solution:
    """One choice per layer and how good it is.

    Attributes:
        choices: Candidate index per layer, ``len(choices) == L``.
        objective: ``f(choices)`` as defined in `mixq.search.problem`, pairs included.
        status: ``"optimal"`` (proven), ``"time_limit"`` (best incumbent when the time limit
            hit), ``"feasible"`` (feasible, optimality not proven) or ``"greedy"``.
        gap: Relative MIP gap ``(f − bound) / |f|``; 0 when optimal, ``inf`` when no bound is
            known, ``nan`` for greedy.
        seconds: Wall-clock seconds spent by the solver call.
        costs: ``Σ_l costs[name][l, x_l]`` for every cost table of the problem.
        bound: A proven lower bound on the optimum (``objective`` when optimal, ``-inf`` when
            none is known, ``nan`` where the solver does not report one, e.g. greedy).
        note: Which solvers ran and anything the caller should know (a missing optional
            solver, a fallback); empty when there is nothing to say.
    """

    choices: list[int]
    objective: float
    status: str
    gap: float
    seconds: float
    costs: dict[str, float]
    bound: float = math.nan
    note: str = ""


def _as_array(name: str, value: object) -> np.ndarray:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype == torch.bool or value.is_complex():
        raise ValueError(f"{name} must hold real numbers, got dtype {value.dtype}")
    return value.detach().to("cpu", torch.float64).numpy()


@dataclass(frozen=True, eq=False)
class Problem:
    """Scores, costs, budgets and optional pairwise terms of one bit allocation.

    Treat the tensors as immutable once the problem is built (numpy copies are cached).

    Attributes:
        scores: ``# [L, C]`` loss increase of layer ``l`` at candidate ``c``; ``+inf`` forbids.
        costs: Name → ``# [L, C]`` cost table (``size_bits``, ``bops``, ...); ``+inf`` forbids.
        budgets: Name → upper bound on ``Σ_l costs[name][l, x_l]``; ``inf`` means none.
        pairs: ``# [L, C, L, C]`` interaction terms (only ``l ≠ m`` used), or None.

    Raises:
        TypeError: A table is not a tensor or a budget is not a number.
        ValueError: Wrong shapes, a budget without a cost table, NaN anywhere, ``-inf``
            scores or costs, non-finite pair terms between allowed candidates, or a layer
            with no allowed candidate.
    """

    scores: torch.Tensor  # [L, C]
    costs: dict[str, torch.Tensor]  # [L, C] each
    budgets: dict[str, float]
    pairs: torch.Tensor | None = None  # [L, C, L, C]

    def __post_init__(self) -> None:
        s = _as_array("scores", self.scores)
        if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
            raise ValueError(f"scores must have shape [L, C] with L, C >= 1, got {s.shape}")
        if np.isnan(s).any() or np.isneginf(s).any():
            raise ValueError("scores contain NaN or -inf")
        if not isinstance(self.costs, dict) or not isinstance(self.budgets, dict):
            raise TypeError("costs and budgets must be dicts keyed by cost name")
        for name, table in self.costs.items():
            a = _as_array(f"costs[{name!r}]", table)
            if a.shape != s.shape:
                raise ValueError(f"costs[{name!r}] has shape {a.shape}, expected {s.shape} like scores")
            if np.isnan(a).any() or np.isneginf(a).any():
                raise ValueError(f"costs[{name!r}] contains NaN or -inf")
        for name, value in self.budgets.items():
            if name not in self.costs:
                raise ValueError(f"budget {name!r} has no cost table; cost tables: {sorted(self.costs)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"budget {name!r} must be a number, got {value!r}")
            if math.isnan(value):
                raise ValueError(f"budget {name!r} is NaN")
        allowed = self.allowed
        empty = np.flatnonzero(~allowed.any(axis=1))
        if empty.size:
            raise ValueError(f"layers {empty.tolist()} have no allowed candidate (every score or cost +inf)")
        if self.pairs is not None:
            p = _as_array("pairs", self.pairs)
            L, C = s.shape
            if p.shape != (L, C, L, C):
                raise ValueError(f"pairs has shape {p.shape}, expected {(L, C, L, C)}")
            used = allowed[:, :, None, None] & allowed[None, None, :, :]
            used[np.arange(L), :, np.arange(L), :] = False  # diagonal blocks are ignored
            if not np.isfinite(p[used]).all():
                raise ValueError("pairs contain NaN or inf between allowed candidates")

    # ---- cached numpy views ---------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        """Return ``L``."""
        return int(self.scores.shape[0])

    @property
    def num_candidates(self) -> int:
        """Return ``C``."""
        return int(self.scores.shape[1])

    @cached_property
    def score_array(self) -> np.ndarray:
        """Return scores as float64 numpy ``# [L, C]``."""
        return _as_array("scores", self.scores)

    @cached_property
    def cost_arrays(self) -> dict[str, np.ndarray]:
        """Return every cost table as float64 numpy ``# [L, C]``."""
        return {name: _as_array(name, t) for name, t in self.costs.items()}

    @cached_property
    def allowed(self) -> np.ndarray:
        """Return the ``# [L, C]`` mask of candidates whose score and costs are finite."""
        mask = np.isfinite(_as_array("scores", self.scores))
        for table in self.costs.values():
            mask &= np.isfinite(_as_array("costs", table))
        return mask

    @cached_property
    def interactions(self) -> np.ndarray | None:
        """Return ``Q = ½ (P + Pᵀ)`` ``# [L, C, L, C]`` with zero diagonal and forbidden entries.

        ``f(x) = Σ_l s[l, x_l] + Σ_{l<m} Q[l, x_l, m, x_m]``; None when there are no pairs or
        every used term is 0.
        """
        if self.pairs is None:
            return None
        p = _as_array("pairs", self.pairs)
        L = self.num_layers
        used = self.allowed[:, :, None, None] & self.allowed[None, None, :, :]
        used[np.arange(L), :, np.arange(L), :] = False
        p = np.where(used, p, 0.0)
        q = 0.5 * (p + p.transpose(2, 3, 0, 1))
        return q if np.any(q) else None

    # ---- evaluation -----------------------------------------------------------------------

    def check_choices(self, choices: list[int]) -> list[int]:
        """Return ``choices`` as ints after checking length, range and allowed candidates.

        Raises:
            ValueError: Wrong length, an index out of range, or a forbidden candidate.
        """
        out = [int(c) for c in choices]
        if len(out) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} choices, got {len(out)}")
        for layer, c in enumerate(out):
            if not 0 <= c < self.num_candidates:
                raise ValueError(f"choice {c} of layer {layer} not in [0, {self.num_candidates})")
            if not self.allowed[layer, c]:
                raise ValueError(f"candidate {c} is forbidden for layer {layer}")
        return out

    def objective(self, choices: list[int]) -> float:
        """Return ``f(x) = Σ_l s[l, x_l] + Σ_{l<m} ½ (P[l,x_l,m,x_m] + P[m,x_m,l,x_l])``."""
        x = np.asarray(self.check_choices(choices))
        layers = np.arange(self.num_layers)
        value = float(self.score_array[layers, x].sum())
        q = self.interactions
        if q is not None:
            block = q[layers[:, None], x[:, None], layers[None, :], x[None, :]]  # [L, L]
            value += float(np.triu(block, k=1).sum())
        return value

    def cost(self, choices: list[int]) -> dict[str, float]:
        """Return ``Σ_l costs[name][l, x_l]`` for every cost table."""
        x = np.asarray(self.check_choices(choices))
        layers = np.arange(self.num_layers)
        return {name: float(a[layers, x].sum()) for name, a in self.cost_arrays.items()}

    def violations(self, choices: list[int]) -> dict[str, float]:
        """Return ``{name: cost − budget}`` for the budgets that ``choices`` exceeds."""
        totals = self.cost(choices)
        return {
            name: totals[name] - float(b)
            for name, b in self.budgets.items()
            if totals[name] > b + budget_tolerance(b)
        }

    def is_feasible(self, choices: list[int]) -> bool:
        """Return whether ``choices`` is allowed and within every budget."""
        try:
            return not self.violations(choices)
        except ValueError:
            return False

    def min_costs(self) -> dict[str, float]:
        """Return each budget's smallest feasible value alone, ``Σ_l min_c costs[name][l, c]``."""
        return {
            name: float(np.where(self.allowed, self.cost_arrays[name], np.inf).min(axis=1).sum())
            for name in self.budgets
        }

    def solution(
        self,
        choices: list[int],
        status: str,
        gap: float,
        seconds: float,
        bound: float = math.nan,
        note: str = "",
    ) -> Solution:
        """Return the `Solution` of ``choices`` with objective and costs evaluated here."""
        choices = self.check_choices(choices)
        return Solution(
            choices=choices,
            objective=self.objective(choices),
            status=status,
            gap=gap,
            seconds=seconds,
            costs=self.cost(choices),
            bound=bound,
            note=note,
        )


def check_budgets(problem: Problem) -> None:
    """Raise `InfeasibleBudgetError` when some budget is below its smallest feasible value.

    The smallest feasible value of budget ``k`` alone is ``Σ_l min_c costs[k][l, c]`` over the
    allowed candidates. Passing this check does not prove several budgets feasible together.
    """
    minimums = problem.min_costs()
    violated = [
        name for name, b in problem.budgets.items() if minimums[name] > b + budget_tolerance(float(b))
    ]
    if violated:
        parts = [
            f"budget {name!r} = {_fmt(problem.budgets[name])} is infeasible: the smallest "
            f"feasible value is {_fmt(minimums[name])} (every layer at its cheapest candidate)"
            for name in violated
        ]
        raise InfeasibleBudgetError("; ".join(parts), minimums, violated)


def combination_infeasible(problem: Problem) -> InfeasibleBudgetError:
    """Return the error for budgets that are each feasible alone but not together."""
    minimums = problem.min_costs()
    parts = [
        f"{name!r} = {_fmt(b)} (smallest feasible alone: {_fmt(minimums[name])})"
        for name, b in problem.budgets.items()
    ]
    return InfeasibleBudgetError(
        "budgets " + ", ".join(parts) + " are each feasible alone, but their combination is infeasible",
        minimums,
        [],
    )
