"""Refinement of a searched plan by measuring real plans: ``refine=N`` of the ILP methods.

A score-based search (sensitivity-ilp, hawq, clado, clado-naive) optimizes a model of the loss:
a sum of single-layer scores, plus pair terms for CLADO. Where layers interact, or the scores
are noisy, the model's optimum is not the best plan. The refinement checks it: starting from the
solver's plan it measures the calibration objective of neighbouring plans and keeps the best
one measured, with at most ``N`` measurements (each a forward pass over the calibration batches).

Neighbours of a plan: every plan that changes one layer's candidate, or two layers' candidates,
within the run's budgets (a move that only lowers precision is one too: measured interactions can
make a lower-precision layer better, as fc2 at W3 instead of W8 on mnist-cnn at 2.25 bits).
Neighbours are measured in
the order of the search problem's own prediction (most promising first), first improvement: the
first neighbour that measures better than the current plan becomes the current plan and its
neighbours are ranked anew. It stops after ``N`` measurements or when no neighbour is better.

The objective is the one the method's scores estimate, measured on the calibration batches:
"kl" (the mean KL divergence of the outputs to the float model's, for logits) or "task" (the
task's loss). The solver's plan is measured first and counts as one of the ``N``; ``N = 0`` measures
nothing and returns the solver's plan unchanged.

Capped starts (``caps=True`` of sensitivity-ilp and hawq, :func:`capped_start`): a sum of
single-layer scores misses how errors compound. At a tight budget it spreads the cheapest
candidate over many small layers whose scores add up to little, where the measured loss grows far
faster than the sum (fashion-resnet20 with ``w2, w4, w8`` at 3 bits: six W2 layers, predicted KL
0.21, measured 0.71; four larger W2 layers, predicted 0.23, measured 0.55). The same problem is
solved again with at most ``k`` layers at the cheapest candidate (the one of fewest weight bits
summed over the layers), for every ``k`` from 0 to L (a tensor shared by tied layers counts once),
and likewise for the candidates up to each higher weight-bit level (at most ``k`` layers below
the most precise candidates): an extra budget row, so the solver stays the exact one. Each
distinct plan is measured on the calibration batches and the best becomes the start (the solver's
own plan is one of them: never worse than it).

[DESIGN] The neighbourhood, its ranking by the search problem's prediction, first improvement and
the capped starts are mixq's choices; the refinement is not part of the CLADO or HAWQ papers.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.nn.functional as F

from mixq import search
from mixq.methods.common import Context
from mixq.tasks import has_class_labels, labels_of, logits_of
from mixq.wrap import applied

LOSSES = ("kl", "task")
SELECTS = ("objective", "top1")
IMPROVE_RTOL = 1e-9  # a neighbour replaces the current plan only when better by more than this


def check_refine(refine: int) -> None:
    """Raise unless ``refine`` (the number of measured plans) is a non-negative integer."""
    if not isinstance(refine, int) or isinstance(refine, bool) or refine < 0:
        raise ValueError(f"refine must be a non-negative integer (measured plans; 0: off), got {refine!r}")


def calib_objective(ctx: Context, loss: str) -> Callable[[list[int]], float]:
    """Return ``f(choices)``: the plan's mean ``loss`` ("kl" or "task") over the calibration batches."""
    if loss not in LOSSES:
        raise ValueError(f"unknown refine loss {loss!r}; valid: {', '.join(LOSSES)}")
    batches = list(ctx.task.calib)
    targets: list[torch.Tensor] = []
    if loss == "kl":
        with applied(ctx.qmodel, {}), torch.inference_mode():
            targets = [F.log_softmax(_rows(ctx.task.forward(ctx.qmodel, b)), dim=-1) for b in batches]

    def measure(choices: list[int]) -> float:
        total = 0.0
        with applied(ctx.qmodel, ctx.plan_of(choices)), torch.inference_mode():
            for i, b in enumerate(batches):
                if loss == "task":
                    total += float(ctx.task.loss(ctx.qmodel, b))
                    continue
                logq = F.log_softmax(_rows(ctx.task.forward(ctx.qmodel, b)), dim=-1)
                logp = targets[i]
                total += float((logp.exp() * (logp - logq)).sum(-1).mean())
        return total / len(batches)

    return measure


def memoized(measure: Callable[[list[int]], float]) -> Callable[[list[int]], float]:
    """``measure`` measuring each plan once (the capped starts and the refinement share plans)."""
    seen: dict[tuple[int, ...], float] = {}

    def once(choices: list[int]) -> float:
        key = tuple(choices)
        if key not in seen:
            seen[key] = measure(list(choices))
        return seen[key]

    return once


def _rows(out: Any) -> torch.Tensor:
    out = logits_of(out).float()
    return out.reshape(-1, out.shape[-1])


def neighbours(ctx: Context, choices: list[int]) -> list[list[int]]:
    """Plans that change one or two layers' candidates and stay within the budgets.

    A tied follower (:meth:`Context.tied_pairs`) moves with its leader: it is not a layer of its own.
    """
    L, C = len(ctx.layers), len(ctx.candidates)
    pairs = ctx.tied_pairs()
    followers = {f for f, _ in pairs}
    out = []
    for k in (1, 2):
        for ls in itertools.combinations(range(L), k):
            for js in itertools.product(range(C), repeat=k):
                if any(j == choices[layer] for layer, j in zip(ls, js, strict=True)):
                    continue
                if followers.intersection(ls):
                    continue
                new = list(choices)
                for layer, j in zip(ls, js, strict=True):
                    new[layer] = j
                new = ctx.tie_choices(new, pairs)
                if ctx.within_limits(new):
                    out.append(new)
    return out


CAP_KEY = "capped_layers"  # the extra budget row of the capped problems


def levels(ctx: Context) -> list[list[int]]:
    """The candidate groups a cap may bound: for each weight-bit total below the largest (summed
    over the layers), the candidates at or below it, cheapest level first."""
    bits = ctx.costs["weight_bits"].sum(0)
    values = sorted({float(b) for b in bits})[:-1]
    return [[j for j in range(len(bits)) if float(bits[j]) <= v] for v in values]


def capped_problem(
    prob: search.Problem, group: list[int], k: int, followers: Collection[int] = ()
) -> search.Problem:
    """``prob`` with at most ``k`` layers at the candidates ``group`` (an extra budget row ``CAP_KEY``).

    ``followers`` (tied followers, :meth:`Context.tied_pairs`) are not counted: a tensor shared by
    several layers is one layer at one precision, counted at its leader.
    """
    count = torch.zeros_like(prob.scores, dtype=torch.float64)
    count[:, group] = 1.0
    count[list(followers), :] = 0.0
    return search.Problem(
        scores=prob.scores,
        costs={**prob.costs, CAP_KEY: count},
        budgets={**prob.budgets, CAP_KEY: float(k)},
        pairs=prob.pairs,
    )


def capped_start(
    ctx: Context,
    prob: search.Problem,
    choices: list[int],
    measure: Callable[[list[int]], float],
    solve: Callable[[search.Problem], list[int]] | None = None,
    time_limit: float | None = None,
) -> tuple[list[int], dict[str, Any]]:
    """The best measured of ``choices`` and the optima of ``prob`` with capped low-precision layers.

    For each group of :func:`levels` (the cheapest candidates, then those up to the next weight-bit
    level, ...) and each ``k`` from 0 to L, the problem is solved with at most ``k`` layers in the
    group; each distinct plan is measured once.

    Args:
        ctx: the run's context (layers, candidates, costs).
        prob: the search problem (its optimum is ``choices``).
        choices: the solver's plan, per-layer candidate indices.
        measure: the calibration objective of a plan, lower is better.
        solve: the exact solver of a problem (default: :func:`mixq.search.ilp` with ``time_limit``).
        time_limit: seconds for each capped problem of the default solver (the method's own
            ``time_limit``; None: until proven optimal).

    Returns:
        The plan of lowest measured objective (ties: the one found first, the solver's plan first)
        and a record: per distinct plan, the caps that gave it (group index, k), its measured and
        predicted objective.
    """
    solve = solve or (lambda p: list(search.ilp(p, time_limit=time_limit).choices))
    start = tuple(ctx.tie_choices(choices))
    plans: dict[tuple[int, ...], list[list[int]]] = {start: []}
    groups = levels(ctx)
    followers = {f for f, _ in ctx.tied_pairs()}
    for g, group in enumerate(groups):
        for k in range(len(ctx.layers) - len(followers) + 1):  # caps count tensors, not tied layers
            try:
                cand = tuple(ctx.tie_choices(solve(capped_problem(prob, group, k, followers))))
            except search.InfeasibleBudgetError:
                continue
            plans.setdefault(cand, []).append([g, k])
    log = [
        {"choices": list(p), "caps": caps, "loss": measure(list(p)), "predicted": prob.objective(list(p))}
        for p, caps in plans.items()
    ]
    best = min(log, key=lambda r: r["loss"])  # the first of equal losses
    groups_named = [[ctx.candidates[j].name for j in group] for group in groups]
    return list(best["choices"]), {"groups": groups_named, "measured": log, "chosen": best["choices"]}


def refine(
    ctx: Context,
    prob: search.Problem,
    choices: list[int],
    n: int,
    measure: Callable[[list[int]], float],
) -> tuple[list[int], dict[str, Any]]:
    """Improve ``choices`` by measuring at most ``n`` plans (first improvement over neighbours).

    Args:
        ctx: the run's context (layers, candidates, costs and limits).
        prob: the search problem whose objective ranks the neighbours (its prediction).
        choices: the solver's plan, per-layer candidate indices.
        n: the most plans measured, the solver's plan included (0: return ``choices``).
        measure: the calibration objective of a plan (:func:`calib_objective`), lower is better.

    Returns:
        The best measured plan and a record: every measured plan (choices, measured loss,
        predicted objective), the start's and the chosen plan's losses.
    """
    check_refine(n)
    if n == 0:
        return list(choices), {"refine": 0}
    current = ctx.tie_choices(choices)  # a tied follower at its leader's candidate (the plan measured)
    seen = {tuple(current): measure(current)}
    log = [{"choices": current, "loss": seen[tuple(current)], "predicted": prob.objective(current)}]
    best = seen[tuple(current)]
    improved = True
    while improved and len(seen) < n:
        improved = False
        ranked = sorted(neighbours(ctx, current), key=lambda c: (prob.objective(c), c))
        for cand in ranked:
            if tuple(cand) in seen:
                continue
            if len(seen) >= n:
                break
            value = measure(cand)
            seen[tuple(cand)] = value
            log.append({"choices": cand, "loss": value, "predicted": prob.objective(cand)})
            if value < best - IMPROVE_RTOL * abs(best):
                current, best, improved = cand, value, True
                break
    record = {
        "refine": n,
        "measured": log,
        "start_loss": log[0]["loss"],
        "chosen": current,
        "chosen_loss": best,
        "improved": current != ctx.tie_choices(choices),
    }
    return current, record


def calib_top1(ctx: Context) -> Callable[[list[int]], float]:
    """Return ``f(choices)``: the plan's top-1 (%) on the labelled calibration batches."""
    batches = list(ctx.task.calib)
    if not batches or not all(has_class_labels(b) for b in batches):
        raise ValueError("select='top1' needs calibration batches with integer class labels; use 'objective'")

    def top1(choices: list[int]) -> float:
        hit = total = 0
        with applied(ctx.qmodel, ctx.plan_of(choices)), torch.inference_mode():
            for b in batches:
                y = labels_of(b)
                hit += int((_rows(ctx.task.forward(ctx.qmodel, b)).argmax(-1) == y.reshape(-1)).sum())
                total += int(y.numel())
        return 100.0 * hit / total

    return top1


def select_top1(ctx: Context, records: list[dict[str, Any]]) -> tuple[list[int], dict[str, Any]]:
    """Among the measured plans of ``records`` (the capped starts' and the refinement's logs: dicts
    with ``choices`` and ``loss``), the one of highest calibration top-1; ties: the lower loss, then
    the first. Returns it and a record of every distinct plan's top-1 and loss.

    [DESIGN] mixq's: where the measured objective (the KL to the float outputs) ranks close plans
    unlike top-1, a labelled calibration accuracy is the other calibration-only judge. On 512 images
    it resolves differences of a few points, not tenths.
    """
    top1 = calib_top1(ctx)
    seen: dict[tuple[int, ...], dict[str, Any]] = {}
    for r in records:
        key = tuple(r["choices"])
        if key not in seen:
            seen[key] = {"choices": list(key), "loss": r["loss"], "top1": top1(list(key))}
    log = list(seen.values())
    best = max(log, key=lambda r: (r["top1"], -r["loss"]))  # max keeps the first of equal keys
    return list(best["choices"]), {"select": "top1", "measured": log, "chosen": best["choices"]}
