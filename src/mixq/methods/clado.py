"""CLADO: mixed precision with cross-layer dependencies and an integer quadratic program.

Deng, Wang, Sharify, Orshansky, "Mixed-Precision Quantization with Cross-Layer Dependencies",
arXiv 2307.05657 (v2: "... for Deep Vision Models with Integer Quadratic Programming", DAC 2025);
docs/methods.md §3. Symbols: ``Ω_l(s)`` is ``single[l, s]``, ``Ω_lm(s, s')`` is ``pairs[l, s, m, s']``,
both measured with forward passes only (`mixq.sensitivity.pairs`). With one-hot ``x`` over
(layer, candidate) and ``N = L·C``, the matrix ``G`` ``# [N, N]`` has

    G[(l,s),(l,s)] = 2·Ω_l(s),   G[(l,s),(l,s')] = 0 (s ≠ s'),   G[(l,s),(m,s')] = Ω_lm(s, s'),

so ``½ xᵀGx = Σ_l Ω_l(s_l) + Σ_{l<m} Ω_lm(s_l, s_m)`` estimates the loss change of the plan.
The IQP ``min ½ xᵀGx`` under the budgets is solved exactly by `mixq.search.ilp` (HiGHS, the
pair products linearized), which needs no convexity. ``clado-naive`` keeps only the diagonal
(the paper's cross-layer-unaware ablation).

The measured ``G`` is repaired before solving (``repair``, ``snr``, ``splits``): every term is
measured on ``splits`` parts of the sensitivity set, a pair term within ``snr`` standard errors
of 0 is set to 0 (most measured pair terms are noise), and the matrix is replaced by its PSD
projection ``G⁺`` (eigenvalues clipped at 0, as in the paper's code; "psd-diag": the nearest PSD
matrix that keeps the measured singles). bench/exhaustive.py measures which repair works.

Deviations from the paper's code (labelled [DESIGN]):

* Pair terms within noise are set to 0 (``snr``); the paper keeps every measured term.
* Solver: an exact MILP linearization with HiGHS instead of CVXPY + Gurobi; with a time limit
  the best incumbent, polished by local search, is returned with its gap.
* Loss: ``loss="kl"`` measures ``KL(softmax(fp logits) ‖ softmax(quantized logits))`` (the
  code's ``KL=True`` option), ``loss="task"`` the task's own loss (cross-entropy on labels).
  The task loss of a well-trained model can *drop* when one layer is quantized (noise on a
  training batch), and such negative, noisy estimates let the objective prefer low precision;
  the KL to the float outputs is zero only at the float model.
* Every layer is searchable (the paper keeps the first and last layer float); pass a smaller
  layer set through a custom task to mirror it.
* On a causal LM (``blockwise="auto"``) the terms are the second-order (Fisher) estimates of the
  output KL, measured block by block (`mixq.sensitivity.blockwise`, objective "fisher"): one
  forward of the layer's block per single term, and ``Ω_lm = E[v_l v_m]/N`` from the same
  measurements for the pairs (:func:`mixq.sensitivity.blockwise.fisher_pairs`), no forward at
  all; within a block (``block_local``) or between any two layers of the blocks. Measured
  pairs on SmolLM2 would take ~10⁴ model forwards even block-local. The KL's second-order
  model has exactly CLADO's structure (the paper derives its pair terms from the cross-layer
  Hessian blocks); the blocks' output changes add to first order, so an interaction inside a
  block beyond that is not seen.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixq import search
from mixq.methods import refine as refining
from mixq.methods.common import Context, MethodOutput, check_choices, fisher_sensitivity
from mixq.plan import as_layer_spec
from mixq.sensitivity.blockwise import find_blocks, is_causal_lm
from mixq.sensitivity.pairs import pairwise
from mixq.sensitivity.perturb import warn_few_batches
from mixq.sensitivity.table import Sensitivity
from mixq.tasks import Task, logits_of

log = logging.getLogger(__name__)

LOSSES = ("kl", "task")
SOLVERS = ("ilp", "greedy")
REPAIRS = ("none", "psd", "psd-diag")
BLOCKWISE = ("auto", "off", "fisher")


@dataclass(frozen=True)
class Config:
    """Settings of ``clado`` and ``clado-naive``.

    Attributes:
        batches: calibration batches of the sensitivity set (0: all of them).
        loss: "kl" (KL divergence of the outputs to the float ones) or "task" (the task loss).
        repair: how the measured ``G`` is repaired before solving (clado only): "none" (as
            measured), "psd" (eigenvalues clipped at 0, the paper's code) or "psd-diag" (the
            nearest PSD matrix that keeps the measured singles on its diagonal).
        snr: a pair term ``Ω_lm(s, s')`` is kept only when ``|Ω| ≥ snr · SE(Ω)``, its standard
            error over ``splits`` parts of the sensitivity set; smaller terms are noise and set
            to 0 (0: keep every term).
        splits: parts of the sensitivity set (each batch cut into equal slices of rows) over
            which the standard errors are estimated (1: no estimate, ``snr`` unused).
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
        refine: after the solver, measure at most this many plans (the solver's and its
            neighbours', `mixq.methods.refine`) on the calibration batches with ``loss`` and keep
            the best (0: off).
        top_pairs: measure the pairs of the most precise candidate (the most weight bits; ties:
            the last) too. False takes them as independent (Ω = 0): a near-lossless candidate
            (8-bit weights) interacts with nothing measurable, and ``(C−1)²/C²`` of the pair
            passes remain (4/9 with three candidates), for large models.
        blockwise: "fisher" (the KL's second-order terms block by block, the pairs from the same
            measurements: `mixq.sensitivity.blockwise.fisher_pairs`; ``loss`` must be "kl"; the
            standard errors are over the calibration batches, not ``splits``, and one batch gives
            none: every pair is kept; ``reuse``, ``window``, ``samples`` and ``top_pairs``
            unused), "off" (measured terms) or "auto" ("fisher" for
            a causal-LM task with ``loss="kl"`` on a model with repeated blocks, else "off").
        fisher_samples: sampled label sets (backward passes) per batch for "fisher".
    """

    batches: int = 0
    loss: str = "kl"
    repair: str = "psd"
    snr: float = 2.0
    splits: int = 8
    solver: str = "ilp"
    time_limit: float | None = 60.0
    reuse: bool = True
    window: int | None = None
    samples: int = 0
    block_local: bool = True
    refine: int = 0
    top_pairs: bool = True
    blockwise: str = "auto"
    fisher_samples: int = 4

    def __post_init__(self) -> None:
        check_choices(
            ("loss", self.loss, LOSSES),
            ("solver", self.solver, SOLVERS),
            ("repair", self.repair, REPAIRS),
            ("blockwise", self.blockwise, BLOCKWISE),
        )
        if self.blockwise == "fisher" and self.loss != "kl":
            raise ValueError(f"blockwise='fisher' estimates the KL; it needs loss='kl', got {self.loss!r}")
        if self.fisher_samples < 1:
            raise ValueError(f"fisher_samples must be >= 1, got {self.fisher_samples}")
        if self.batches < 0:
            raise ValueError(f"batches must be >= 0, got {self.batches}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be at least 1 layer (or None for all pairs), got {self.window}")
        if self.samples < 0:
            raise ValueError(f"samples must be >= 0 (0: whole batches), got {self.samples}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"time_limit must be positive seconds or None, got {self.time_limit}")
        if self.snr < 0 or self.splits < 1:
            raise ValueError(f"snr must be >= 0 and splits >= 1, got snr={self.snr}, splits={self.splits}")
        refining.check_refine(self.refine)


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


def psd_keep_diagonal(g: np.ndarray, iters: int = 200, tol: float = 1e-10) -> np.ndarray:
    """Return the nearest PSD matrix to ``g`` whose diagonal is ``g``'s (negative entries as 0).

    Dykstra's alternating projections between the PSD cone and the matrices with that diagonal
    (Higham's method for the nearest correlation matrix, with the measured diagonal in place of
    ones). The diagonal is kept exactly; the smallest eigenvalue is ≥ −``tol``·scale on convergence.

    >>> out = psd_keep_diagonal(np.array([[1.0, 2.0], [2.0, 1.0]]))
    >>> np.round(out, 6).tolist(), bool(np.linalg.eigvalsh(out).min() > -1e-8)
    ([[1.0, 1.0], [1.0, 1.0]], True)
    """
    d = np.clip(np.diag(g), 0.0, None)
    y = 0.5 * (g + g.T)
    correction = np.zeros_like(y)
    scale = max(1.0, float(np.abs(y).max()))
    for _ in range(iters):
        r = y - correction
        x = psd_projection(r)
        correction = x - r
        y = x.copy()
        y[np.diag_indices_from(y)] = d
        if np.linalg.norm(y - x) <= tol * scale:
            break
    return y


def shrink_pairs(pairs: np.ndarray, se: np.ndarray, snr: float) -> np.ndarray:
    """Set to 0 the pair terms within noise: ``|Ω| < snr · SE(Ω)`` (``snr`` = 0 keeps them all).
    A term without a standard error (NaN: one batch) cannot be tested and is kept.

    >>> shrink_pairs(np.array([1.0, -0.1, 0.3, 0.2]), np.array([0.1, 0.1, 0.2, np.nan]), 2.0).tolist()
    [1.0, 0.0, 0.0, 0.2]
    """
    return np.where(np.isnan(se) | (np.abs(pairs) >= snr * se), pairs, 0.0)


def repaired(g: np.ndarray, repair: str | bool) -> np.ndarray:
    """``g`` repaired: "none" (or False), "psd" (or True) or "psd-diag" (see :class:`Config`).

    Both repairs act on each block of a block-diagonal ``g`` alone (the connected components of
    its nonzero off-diagonal entries): the nearest PSD matrix of a block-diagonal matrix is the
    block-diagonal matrix of each block's, so pairs that were not measured (CLADO's block-local
    pairs) stay exactly 0 and the problem stays sparse.

    >>> g = np.diag([2.0, -1.0, 4.0]); g[0, 2] = g[2, 0] = 1.0
    >>> out = repaired(g, "psd"); bool(out[1, 1] == 0 and out[0, 1] == 0 and out[1, 2] == 0)
    True
    """
    repair = {False: "none", True: "psd"}.get(repair, repair) if isinstance(repair, bool) else repair
    check_choices(("repair", repair, REPAIRS))
    if repair == "none":
        return g
    fn = psd_projection if repair == "psd" else psd_keep_diagonal
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    n, labels = connected_components(csr_matrix(g != 0), directed=False)
    if n == 1:
        return fn(g)
    out = np.zeros_like(g, dtype=np.float64)
    for k in range(n):
        idx = np.flatnonzero(labels == k)
        out[np.ix_(idx, idx)] = fn(g[np.ix_(idx, idx)])
    return out


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


def n_rows(batch: Any) -> int:
    """The number of examples of a batch: the length of its first tensor (any nesting)."""
    if isinstance(batch, torch.Tensor):
        return len(batch)
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for v in items:
        n = n_rows(v)
        if n:
            return n
    return 0


def rows(batch: Any, start: int, stop: int) -> Any:
    """Examples ``start:stop`` of a batch (tensors sliced on their first axis, in any nesting).

    >>> rows((torch.arange(6), 1), 2, 4)[0].tolist()
    [2, 3]
    """
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() else batch
    if isinstance(batch, dict):
        return {k: rows(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(rows(v, start, stop) for v in batch)
    return batch


def split(batches: Sequence[Any], parts: int) -> list[list[Any]]:
    """Cut every batch into ``ceil(parts / len(batches))`` equal slices of rows: the parts.

    >>> [[len(b[0]) for b in p] for p in split([(torch.zeros(8),), (torch.zeros(8),)], 4)]
    [[4], [4], [4], [4]]
    """
    per = max(1, -(-parts // len(batches)))
    out = []
    for b in batches:
        n = n_rows(b)
        cuts = [round(i * n / per) for i in range(per + 1)]
        out += [[rows(b, lo, hi)] for lo, hi in itertools.pairwise(cuts) if hi > lo]
    return out


def measure(ctx: Context, cfg: Config, with_pairs: bool = True) -> Sensitivity:
    """Measure the single (and pairwise) terms on the sensitivity set (resumable with ``ctx.out``)."""
    return measure_with_noise(ctx, cfg, with_pairs)[0]


def measure_with_noise(
    ctx: Context, cfg: Config, with_pairs: bool = True
) -> tuple[Sensitivity, torch.Tensor | None, torch.Tensor | None]:
    """Measure the terms and their standard errors over ``cfg.splits`` parts of the sensitivity set.

    Returns:
        The Sensitivity (its terms the means over the parts: equal-sized parts give the same
        terms as one measurement on the whole set), and the standard errors of ``single``
        [L, C] and ``pairs`` [L, C, L, C] (None with ``splits`` = 1, or a single part).
    """
    calib = list(ctx.task.calib)
    batches = calib[: cfg.batches] if cfg.batches else calib
    if uses_fisher(ctx, cfg):
        return _fisher_terms(ctx, cfg, batches, with_pairs)
    if cfg.samples:
        batches = [head(b, cfg.samples) for b in batches]
    stask = sensitivity_task(ctx.task, ctx.qmodel, batches, cfg.loss)
    parts = split(stask.calib, cfg.splits) if cfg.splits > 1 else [list(stask.calib)]
    if len(parts) > 1:
        warn_few_batches(len(parts))  # the errors are over the parts
    found = []
    blocks = (tuple(find_blocks(ctx.qmodel)) or None) if cfg.block_local and with_pairs else None
    pair_names = (
        None if cfg.top_pairs else tuple(n for n in _names(ctx.candidates) if n != _top(ctx.candidates))
    )
    with ctx.store() as store:
        for part in parts:
            found.append(
                pairwise(
                    ctx.qmodel,
                    stask,
                    ctx.layers,
                    ctx.candidates,
                    batches=part,
                    store=store,
                    reuse=cfg.reuse,
                    with_pairs=with_pairs,
                    executor=ctx.executor,
                    window=cfg.window,
                    blocks=blocks,
                    pair_names=pair_names,
                    progress=len(parts) == 1,
                    **({"min_batches": 1} if len(parts) > 1 else {}),
                )
            )
    sens = found[0]
    single_se = pair_se = None
    if len(found) > 1:
        weights = torch.tensor([float(n_rows(p[0])) for p in parts], dtype=torch.float64)
        weights = weights / weights.sum()
        singles = torch.stack([f.single.double() for f in found])  # [K, L, C]
        single_se = singles.std(0) / len(found) ** 0.5
        pairs = None
        if with_pairs:
            stack = torch.stack([f.pairs.double() for f in found])  # [K, L, C, L, C]
            pairs = torch.einsum("k,k...->...", weights, stack)
            pair_se = stack.std(0) / len(found) ** 0.5
        meta = {
            **sens.meta,
            "splits": len(found),
            "fp_loss": float(sum(w * f.meta["fp_loss"] for w, f in zip(weights, found, strict=True))),
            "seconds": sum(f.meta["seconds"] for f in found),
        }
        for k in ("pair_evals", "row_evals"):
            if k in sens.meta:
                meta[k] = sum(f.meta[k] for f in found)
        sens = Sensitivity(
            sens.layers,
            sens.candidates,
            torch.einsum("k,k...->...", weights, singles),
            kind=sens.kind,
            pairs=pairs,
            meta=meta,
            se=single_se.float(),
            pairs_se=None if pair_se is None else pair_se.float(),
        )
    else:  # one part: the standard errors over its batches (pairwise's own)
        single_se, pair_se = sens.se, sens.pairs_se
    sens.meta["loss"] = cfg.loss
    return sens, single_se, pair_se


def _names(candidates: Sequence[Any]) -> list[str]:
    return [as_layer_spec(c).name for c in candidates]


def _top(candidates: Sequence[Any]) -> str:
    """The most precise candidate: the most weight bits, then the most activation bits (float most),
    the last on ties.

    >>> _top(["w8a8", "w4a8", "w8a4"]), _top(["w8a4", "w8a8", "w4"]), _top(["w8a8", "w8", "w2"])
    ('w8a8', 'w8a8', 'w8')
    """

    def bits(q: Any) -> float:
        return math.inf if q is None else float(getattr(q, "bits", math.inf))

    specs = [as_layer_spec(c) for c in candidates]
    keys = [(bits(s.weight), bits(s.act)) for s in specs]
    best = max(keys)
    return [s.name for s, k in zip(specs, keys, strict=True) if k == best][-1]


def uses_fisher(ctx: Context, cfg: Config) -> bool:
    """Whether the terms are the block-wise Fisher estimates (``cfg.blockwise`` resolved)."""
    if cfg.blockwise == "auto":
        return cfg.loss == "kl" and is_causal_lm(ctx.task) and bool(find_blocks(ctx.qmodel))
    return cfg.blockwise == "fisher"


def _fisher_terms(
    ctx: Context, cfg: Config, batches: list[Any], with_pairs: bool
) -> tuple[Sensitivity, torch.Tensor | None, torch.Tensor | None]:
    pairs = ("block" if cfg.block_local else "all") if with_pairs else "none"
    sens = fisher_sensitivity(ctx, batches, cfg.fisher_samples, pairs=pairs, min_batches=cfg.splits)
    sens.meta["loss"] = cfg.loss
    if sens.pairs_se is not None and bool(torch.isnan(sens.pairs_se).all()):  # one batch: no noise test
        return sens, None, None
    return sens, sens.se, sens.pairs_se


# -- solving ----------------------------------------------------------------------------------------


def problem(
    ctx: Context,
    sens: Sensitivity,
    mode: str,
    psd: str | bool,
    pair_se: torch.Tensor | None = None,
    snr: float = 0.0,
) -> search.Problem:
    """Build the search problem of ``mode`` ("clado" or "naive") under the context's budgets.

    ``psd`` is the repair of ``G`` ("none", "psd", "psd-diag"; False and True for the first two);
    with ``pair_se``, the pair terms within ``snr`` standard errors are set to 0 first.
    """
    costs = {k: ctx.costs[k] for k in ctx.limits}
    if mode == "naive" or sens.pairs is None:
        return search.Problem(scores=sens.single.double(), costs=costs, budgets=dict(ctx.limits))
    L, C = sens.single.shape
    pairs = sens.pairs.double().numpy()
    if pair_se is not None and snr > 0:
        pairs = shrink_pairs(pairs, pair_se.double().numpy(), snr)
    g = repaired(interaction_matrix(sens.single.double().numpy(), pairs), psd)
    scores, pair_terms = objective_terms(g, L, C)
    return search.Problem(scores=scores, costs=costs, budgets=dict(ctx.limits), pairs=pair_terms)


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
    sens, _, pair_se = measure_with_noise(ctx, cfg, with_pairs=mode == "clado")
    prob = problem(ctx, sens, mode, cfg.repair, pair_se, cfg.snr)
    sol = solve(prob, cfg)
    info = {
        "mode": mode,
        "repair": cfg.repair if mode == "clado" else "none",
        "loss": cfg.loss,
        "solver": cfg.solver,
        "status": sol.status,
        "gap": sol.gap,
        "objective": sol.objective,
        "solve_seconds": sol.seconds,
        "sensitivity_seconds": sens.meta.get("seconds"),
        "pair_evals": sens.meta.get("pair_evals"),
        "reuse": sens.meta.get("reuse"),
        "splits": sens.meta.get("splits", 1),
    }
    if mode == "clado" and pair_se is not None and sens.pairs is not None:
        measured = sens.pairs.double().numpy() != 0
        kept = shrink_pairs(sens.pairs.double().numpy(), pair_se.double().numpy(), cfg.snr) != 0
        info["pairs_measured"] = int(measured.sum()) // 2
        info["pairs_kept"] = int(kept.sum()) // 2
    choices = list(sol.choices)
    if cfg.refine:
        measure_plan = refining.calib_objective(ctx, cfg.loss)
        choices, info["refined"] = refining.refine(ctx, prob, choices, cfg.refine, measure_plan)
    return MethodOutput(plan=ctx.plan_of(choices), sensitivity=sens, history=[info])


def search_clado(ctx: Context, cfg: Config) -> MethodOutput:
    """The ``clado`` method: pairwise terms, IQP."""
    return _run(ctx, cfg, "clado")


def search_naive(ctx: Context, cfg: Config) -> MethodOutput:
    """The ``clado-naive`` method: the same measurements, diagonal objective only."""
    return _run(ctx, cfg, "naive")
