"""CLADO: mixed precision with cross-layer dependencies and an integer quadratic program.

Deng, Wang, Sharify, Orshansky, "Mixed-Precision Quantization with Cross-Layer Dependencies",
arXiv 2307.05657 (v2: "... for Deep Vision Models with Integer Quadratic Programming", DAC 2025);
docs/methods.md §3. Symbols: ``Ω_l(s)`` is ``single[l, s]``, ``Ω_lm(s, s')`` is ``pairs[l, s, m, s']``,
both measured with forward passes only (`mixq.sensitivity.pairs`). With one-hot ``x`` over
(layer, candidate) and ``N = L·C``, the matrix ``G`` ``# [N, N]`` has

    G[(l,s),(l,s)] = 2·Ω_l(s),   G[(l,s),(l,s')] = 0 (s ≠ s'),   G[(l,s),(m,s')] = Ω_lm(s, s'),

so ``½ xᵀGx = Σ_l Ω_l(s_l) + Σ_{l<m} Ω_lm(s_l, s_m)`` estimates the loss change of the plan.
The IQP ``min ½ xᵀGx`` under the budgets is solved exactly by `mixq.search.ilp` (HiGHS, the
pair products linearized), which needs no convexity, so both ``G`` and its PSD projection
``G⁺`` (eigenvalues clipped at 0, as in the paper's code) are offered (``psd``).
``clado-naive`` keeps only the diagonal (the paper's cross-layer-unaware ablation).

Deviations from the paper's code (labelled [DESIGN]):

* Solver: an exact MILP linearization with HiGHS instead of CVXPY + Gurobi; with a time limit
  the best incumbent, polished by local search, is returned with its gap.
* Loss: ``loss="kl"`` measures ``KL(softmax(fp logits) ‖ softmax(quantized logits))`` (the
  code's ``KL=True`` option), ``loss="task"`` the task's own loss (cross-entropy on labels).
  The task loss of a well-trained model can *drop* when one layer is quantized (noise on a
  training batch), and such negative, noisy estimates let the objective prefer low precision;
  the KL to the float outputs is zero only at the float model.
* Every layer is searchable (the paper keeps the first and last layer float); pass a smaller
  layer set through a custom task to mirror it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixq import search
from mixq.methods.common import Context, MethodOutput, check_choices
from mixq.sensitivity.blockwise import find_blocks
from mixq.sensitivity.pairs import pairwise
from mixq.sensitivity.table import Sensitivity
from mixq.tasks import Task, logits_of

log = logging.getLogger(__name__)

LOSSES = ("kl", "task")
SOLVERS = ("ilp", "greedy")


@dataclass(frozen=True)
class Config:
    """Settings of ``clado`` and ``clado-naive``.

    Attributes:
        batches: calibration batches of the sensitivity set (0: all of them).
        loss: "kl" (KL divergence of the outputs to the float ones) or "task" (the task loss).
        psd: solve with the PSD projection of G instead of G itself (clado only).
        solver: "ilp" (exact, with ``time_limit``) or "greedy" (ignores the pairs).
        time_limit: seconds for the ILP (None: until proven optimal).
        reuse: replay unchanged prefixes while measuring (exact; checked at run time).
        window: measure the pairs of layers at most this many apart in execution order only
            (None: all pairs, the paper's method); farther pairs count as independent. For models
            whose L(L-1)/2 layer pairs are out of reach (MiniLM: 630 pairs x 16 candidate pairs).
        samples: examples of each sensitivity batch used (0: the whole batch): the first ones.
        block_local: on a model of repeated blocks (decoder layers: ``blockwise.find_blocks``)
            measure the pairs within each block only; pairs across blocks count as independent.
            No effect on a model without such blocks.
    """

    batches: int = 0
    loss: str = "kl"
    psd: bool = False
    solver: str = "ilp"
    time_limit: float | None = 60.0
    reuse: bool = True
    window: int | None = None
    samples: int = 0
    block_local: bool = True

    def __post_init__(self) -> None:
        check_choices(("loss", self.loss, LOSSES), ("solver", self.solver, SOLVERS))
        if self.batches < 0:
            raise ValueError(f"batches must be >= 0, got {self.batches}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be at least 1 layer (or None for all pairs), got {self.window}")
        if self.samples < 0:
            raise ValueError(f"samples must be >= 0 (0: whole batches), got {self.samples}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"time_limit must be positive seconds or None, got {self.time_limit}")


# -- the quadratic model ---------------------------------------------------------------------------


def interaction_matrix(single: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Build CLADO's ``G`` ``# [L·C, L·C]`` from ``single`` [L, C] and symmetric ``pairs`` [L, C, L, C].

    >>> g = interaction_matrix(np.array([[1.0, 2.0], [3.0, 4.0]]), np.ones((2, 2, 2, 2)))
    >>> g.tolist()
    [[2.0, 0.0, 1.0, 1.0], [0.0, 4.0, 1.0, 1.0], [1.0, 1.0, 6.0, 0.0], [1.0, 1.0, 0.0, 8.0]]
    """
    L, C = single.shape
    g = pairs.astype(np.float64).copy()
    g[np.arange(L), :, np.arange(L), :] = 0.0  # mutually exclusive candidates of one layer
    g = g.reshape(L * C, L * C)
    g[np.diag_indices(L * C)] = 2.0 * single.reshape(-1)
    return g


def psd_projection(g: np.ndarray) -> np.ndarray:
    """Return the nearest PSD matrix (Frobenius): eigenvalues of the symmetric ``g`` clipped at 0.

    >>> np.round(psd_projection(np.array([[0.0, 1.0], [1.0, 0.0]])), 12).tolist()
    [[0.5, 0.5], [0.5, 0.5]]
    """
    sym = 0.5 * (g + g.T)
    values, vectors = np.linalg.eigh(sym)
    out = (vectors * np.clip(values, 0.0, None)) @ vectors.T
    return 0.5 * (out + out.T)


def objective_terms(g: np.ndarray, L: int, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``½ xᵀGx`` into `mixq.search.Problem` terms: scores [L, C] and pairs [L, C, L, C].

    For one-hot ``x``, ``½ xᵀGx = Σ_l ½G_ii + Σ_{l<m} G_ij``, the Problem's objective with
    ``scores = ½ diag(G)`` and ``pairs = G`` (its diagonal blocks are ignored).
    """
    scores = 0.5 * np.diag(g).reshape(L, C)
    pairs = g.reshape(L, C, L, C).copy()
    pairs[np.arange(L), :, np.arange(L), :] = 0.0
    return torch.from_numpy(scores), torch.from_numpy(pairs)


# -- the loss of the sensitivity set ---------------------------------------------------------------


@dataclass(frozen=True)
class KlToFloat:
    """``loss(model, (batch, fp_logits))`` = mean over rows of ``KL(softmax(fp) ‖ softmax(out))``."""

    forward: Callable[[nn.Module, Any], Any]

    def __call__(self, model: nn.Module, item: tuple[Any, torch.Tensor]) -> torch.Tensor:
        batch, target = item
        out = _logits(self.forward(model, batch))
        logp = F.log_softmax(target.float(), dim=-1)
        return (logp.exp() * (logp - F.log_softmax(out.float(), dim=-1))).sum(-1).mean()


def _logits(out: Any) -> torch.Tensor:
    """The logits of a forward's output (:func:`mixq.tasks.logits_of`), as rows [N, classes]."""
    try:
        out = logits_of(out)
    except TypeError:
        pass
    if isinstance(out, torch.Tensor) and out.dim() >= 1 and out.is_floating_point():
        return out.reshape(-1, out.shape[-1]) if out.dim() > 1 else out.reshape(1, -1)
    raise ValueError(
        f"loss='kl' needs the task's forward to return logits (a tensor or an output with "
        f".logits), got {type(out).__name__}; valid losses: {', '.join(LOSSES)}"
    )


def head(batch: Any, n: int) -> Any:
    """The first ``n`` examples of a batch (tensors sliced on their first axis, in any nesting).

    >>> head({"x": torch.arange(6).reshape(3, 2), "k": 1}, 2)["x"].tolist()
    [[0, 1], [2, 3]]
    """
    if isinstance(batch, torch.Tensor):
        return batch[:n] if batch.dim() else batch
    if isinstance(batch, dict):
        return {k: head(v, n) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(head(v, n) for v in batch)
    return batch


def sensitivity_task(task: Task, qmodel: nn.Module, batches: Sequence[Any], loss: str) -> Task:
    """Return the task whose loss and batches the sensitivities are measured with."""
    if loss == "task":
        return dataclasses.replace(task, calib=list(batches))
    items = []
    with torch.inference_mode():
        for b in batches:
            items.append((b, _logits(task.forward(qmodel, b)).clone()))
    return dataclasses.replace(task, calib=items, loss=KlToFloat(task.forward))


def measure(ctx: Context, cfg: Config, with_pairs: bool = True) -> Sensitivity:
    """Measure the single (and pairwise) terms on the sensitivity set (resumable with ``ctx.out``)."""
    calib = list(ctx.task.calib)
    batches = calib[: cfg.batches] if cfg.batches else calib
    if cfg.samples:
        batches = [head(b, cfg.samples) for b in batches]
    stask = sensitivity_task(ctx.task, ctx.qmodel, batches, cfg.loss)
    with ctx.store() as store:
        sens = pairwise(
            ctx.qmodel,
            stask,
            ctx.layers,
            ctx.candidates,
            store=store,
            reuse=cfg.reuse,
            with_pairs=with_pairs,
            executor=ctx.executor,
            window=cfg.window,
            blocks=(tuple(find_blocks(ctx.qmodel)) or None) if cfg.block_local and with_pairs else None,
        )
    sens.meta["loss"] = cfg.loss
    return sens


# -- solving ----------------------------------------------------------------------------------------


def problem(ctx: Context, sens: Sensitivity, mode: str, psd: bool) -> search.Problem:
    """Build the search problem of ``mode`` ("clado" or "naive") under the context's budgets."""
    costs = {k: ctx.costs[k] for k in ctx.limits}
    if mode == "naive" or sens.pairs is None:
        return search.Problem(scores=sens.single.double(), costs=costs, budgets=dict(ctx.limits))
    L, C = sens.single.shape
    g = interaction_matrix(sens.single.double().numpy(), sens.pairs.double().numpy())
    if psd:
        g = psd_projection(g)
    scores, pairs = objective_terms(g, L, C)
    return search.Problem(scores=scores, costs=costs, budgets=dict(ctx.limits), pairs=pairs)


def solve(prob: search.Problem, cfg: Config, warm_start: list[int] | None = None) -> search.Solution:
    """Solve with the configured solver."""
    if cfg.solver == "greedy":
        return search.greedy(prob)
    return search.ilp(prob, time_limit=cfg.time_limit, warm_start=warm_start)


def sweep(prob: search.Problem, key: str, limits: list[float], cfg: Config) -> list[search.Solution | None]:
    """Solve for each bound on cost ``key``, in increasing order, each warm-started from the last.

    The solution of a tighter budget is feasible for a looser one, so it is a valid incumbent.

    Returns:
        One Solution per value of ``limits``, in the order given; None for an infeasible one.
    """
    out: dict[float, search.Solution | None] = {}
    previous = None
    for value in sorted(set(limits)):
        sub = search.Problem(prob.scores, prob.costs, {**prob.budgets, key: value}, prob.pairs)
        try:
            sol = solve(sub, cfg, warm_start=previous)
        except search.InfeasibleBudgetError:
            out[value] = None
            continue
        out[value] = sol
        previous = sol.choices
    return [out[v] for v in limits]


def _run(ctx: Context, cfg: Config, mode: str) -> MethodOutput:
    ctx.check_feasible()
    sens = measure(ctx, cfg, with_pairs=mode == "clado")
    prob = problem(ctx, sens, mode, cfg.psd)
    sol = solve(prob, cfg)
    info = {
        "mode": mode,
        "psd": cfg.psd and mode == "clado",
        "loss": cfg.loss,
        "solver": cfg.solver,
        "status": sol.status,
        "gap": sol.gap,
        "objective": sol.objective,
        "solve_seconds": sol.seconds,
        "sensitivity_seconds": sens.meta.get("seconds"),
        "pair_evals": sens.meta.get("pair_evals"),
        "reuse": sens.meta.get("reuse"),
    }
    return MethodOutput(plan=ctx.plan_of(sol.choices), sensitivity=sens, history=[info])


def search_clado(ctx: Context, cfg: Config) -> MethodOutput:
    """The ``clado`` method: pairwise terms, IQP."""
    return _run(ctx, cfg, "clado")


def search_naive(ctx: Context, cfg: Config) -> MethodOutput:
    """The ``clado-naive`` method: the same measurements, diagonal objective only."""
    return _run(ctx, cfg, "naive")
