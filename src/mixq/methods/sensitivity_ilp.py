"""Sensitivity + integer program: ``sensitivity-ilp`` (measured Δloss) and ``hawq`` (HAWQ-V3).

Both score every (layer, candidate) independently and pick one candidate per layer by
minimizing the summed score under the budgets with an exact integer program (scipy's HiGHS):

* ``sensitivity-ilp``: score = the measured change of quantizing that layer alone on the
  calibration batches (forward passes only; jobs persisted in ``store.sqlite`` of the run
  directory, so an interrupted run resumes). For classifiers the change is measured as the
  KL divergence of the output distribution from the float model's (``objective="auto"``):
  the cross-entropy of a model that fits its calibration data moves by less than its noise,
  and often downwards, so Δloss scores made the plan ignore the budget.
* ``hawq``: score = tr(H_l)/n_l · ‖Q(W_l) − W_l‖² with a Hutchinson estimate of the Hessian
  trace (HAWQ-V2, Dong et al., 2020; HAWQ-V3's ILP, Yao et al., 2021). Deviation: HAWQ-V3
  also fine-tunes afterwards; here the plan is applied as post-training quantization, on the
  same quantizers as every other method. [DESIGN] On a causal LM (``trace="auto"``) the trace
  is that of the output KL's Hessian, the Fisher information, from sampled-label gradients
  (`mixq.sensitivity.hessian.fisher_trace_samples`): one backward pass per sample for all
  layers instead of one double-backward pass per layer and vector (SmolLM2: minutes, not the
  ~30 h of the Hutchinson default).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mixq import search, sensitivity
from mixq.methods import refine as refining
from mixq.methods.common import Context, MethodOutput, check_choices, fisher_sensitivity
from mixq.sensitivity.blockwise import find_blocks, is_causal_lm
from mixq.tasks import Task

SOLVERS = ("ilp", "greedy")
OBJECTIVES = ("auto", "loss", "kl")
BLOCKWISE = ("auto", "off", "kl", "fisher", "mse")
TRACES = ("auto", "hutchinson", "fisher")


def resolve_objective(task: Task, objective: str) -> str:
    """ "auto" is "kl" when the task's outputs are logits (``Task.output_kind``), else "loss"."""
    if objective != "auto":
        return objective
    return "kl" if task.output_kind() == "logits" else "loss"


@dataclass(frozen=True)
class Config:
    """Settings of the sensitivity + ILP methods.

    Attributes:
        batches: calibration batches used for the sensitivity (0: all of them).
        solver: "ilp" (exact) or "greedy" (fast fallback).
        time_limit: seconds for the ILP (None: until proven optimal).
        hutchinson_samples: Rademacher vectors per batch (hawq only).
        hutchinson_mode: "block" (a vector per layer) or "joint" (one vector over all layers:
            L times fewer Hessian-vector products, more variance; hawq only).
        objective: what the measured sensitivity measures (sensitivity-ilp only): "loss" (the
            task's loss), "kl" (a classifier's output KL divergence from the float model) or
            "auto" ("kl" when the task's outputs are logits, ``Task.outputs``, else "loss").
        blockwise: measure block by block on a model of repeated blocks
            (`mixq.sensitivity.blockwise`): "kl" (the same scores as full passes, the prefix's
            blocks not recomputed: about half a model forward per score), "fisher" (the KL's
            second-order estimate at one block forward per score), "mse" (block-local output
            error, not comparable across blocks), "off" (full forwards), or "auto" ("fisher"
            for a causal-LM task (`mixq.tasks.causal_lm`) when the objective is "kl" and the model
            has repeated blocks, else "off"): on
            SmolLM2 it ranks the layers like the measured KL (Spearman 0.94) at a twentieth of
            its cost (bench/results/llm_sensitivity.json).
        refine: after the solver, measure at most this many plans (the solver's and its
            neighbours', `mixq.methods.refine`) on the calibration batches and keep the best
            (0: off). The objective measured is ``objective`` resolved ("auto" for hawq).
        caps: before refining, solve again with at most k layers at the cheapest candidates (and
            at most k below each higher weight-bit level), for every k, measure each distinct plan
            on the calibration batches (the same objective as ``refine``) and keep the best
            (`mixq.methods.refine.capped_start`): a sum of single scores misses how errors
            compound over many low-precision layers.
        select: which measured plan (of ``caps`` and ``refine``) is kept: "objective" (the lowest
            measured objective) or "top1" (the highest top-1 on the labelled calibration batches,
            ties by the objective: `mixq.methods.refine.select_top1`); "top1" needs ``caps`` or
            ``refine`` and class labels.
        trace: hawq's Hessian trace estimator: "hutchinson" (the task loss's Hessian,
            ``hutchinson_samples`` double-backward products per layer and batch), "fisher" (the
            output KL's Hessian, the Fisher information, ``fisher_samples`` backward passes per
            batch for all layers; the forward must return logits) or "auto" ("fisher" for a
            causal-LM task, else "hutchinson").
        fisher_samples: sampled label sets (backward passes) per batch of the Fisher estimates
            (hawq's "fisher" trace, sensitivity-ilp's block-wise "fisher").
    """

    batches: int = 0
    solver: str = "ilp"
    time_limit: float | None = None
    hutchinson_samples: int = 64
    hutchinson_mode: str = "block"
    objective: str = "auto"
    blockwise: str = "auto"
    refine: int = 0
    caps: bool = False
    select: str = "objective"
    trace: str = "auto"
    fisher_samples: int = 4

    def __post_init__(self) -> None:
        check_choices(
            ("solver", self.solver, SOLVERS),
            ("objective", self.objective, OBJECTIVES),
            ("blockwise", self.blockwise, BLOCKWISE),
            ("hutchinson_mode", self.hutchinson_mode, ("block", "joint")),
            ("trace", self.trace, TRACES),
            ("select", self.select, refining.SELECTS),
        )
        if self.select == "top1" and not (self.caps or self.refine):
            raise ValueError("select='top1' chooses among measured plans: it needs caps=True or refine > 0")
        if self.batches < 0 or self.hutchinson_samples < 1 or self.fisher_samples < 1:
            raise ValueError(
                "batches must be >= 0, hutchinson_samples and fisher_samples >= 1; got "
                f"{self.batches}, {self.hutchinson_samples}, {self.fisher_samples}"
            )
        refining.check_refine(self.refine)


def solve(ctx: Context, scores: sensitivity.Sensitivity, cfg: Config) -> tuple[list[int], dict]:
    """Pick one candidate per layer minimizing the summed scores within the budget (then refine)."""
    problem = search.Problem(
        scores=scores.single.double(),
        costs={k: ctx.costs[k] for k in ctx.limits},
        budgets=dict(ctx.limits),
    )
    sol = search.ilp(problem, time_limit=cfg.time_limit) if cfg.solver == "ilp" else search.greedy(problem)
    info = {
        "solver": cfg.solver,
        "status": sol.status,
        "gap": sol.gap,
        "objective": sol.objective,
        "solve_seconds": sol.seconds,
    }
    choices = list(sol.choices)
    if cfg.refine or cfg.caps:
        loss = "kl" if resolve_objective(ctx.task, cfg.objective) == "kl" else "task"
        measure = refining.memoized(refining.calib_objective(ctx, loss))
        if cfg.caps:
            choices, info["capped"] = refining.capped_start(
                ctx, problem, choices, measure, time_limit=cfg.time_limit
            )
        if cfg.refine:
            choices, info["refined"] = refining.refine(ctx, problem, choices, cfg.refine, measure)
        if cfg.select == "top1":
            logs = [r for k in ("capped", "refined") for r in info.get(k, {}).get("measured", [])]
            choices, info["selected"] = refining.select_top1(ctx, logs)
    return choices, info


def _batches(ctx: Context, cfg: Config) -> list:
    calib = list(ctx.task.calib)
    return calib[: cfg.batches] if cfg.batches else calib


def _measure_and_solve(
    ctx: Context, cfg: Config, measure: Callable[..., Any], **options: Any
) -> MethodOutput:
    """Check the budget, measure the sensitivity with ``measure`` (with the run's store) and solve."""
    ctx.check_feasible()
    with ctx.store() as store:
        sens = measure(
            ctx.qmodel,
            ctx.task,
            ctx.layers,
            ctx.candidates,
            batches=_batches(ctx, cfg),
            store=store,
            **options,
        )
    return _solved(ctx, cfg, sens)


def _solved(ctx: Context, cfg: Config, sens: sensitivity.Sensitivity) -> MethodOutput:
    choices, info = solve(ctx, sens, cfg)
    return MethodOutput(plan=ctx.plan_of(choices), sensitivity=sens, history=[info])


def search_measured(ctx: Context, cfg: Config) -> MethodOutput:
    """The ``sensitivity-ilp`` method."""
    objective = resolve_objective(ctx.task, cfg.objective)
    mode = cfg.blockwise
    if mode == "auto":  # the Fisher estimate where full forwards per score are out of reach: LMs
        lm = is_causal_lm(ctx.task)
        mode = "fisher" if lm and objective == "kl" and find_blocks(ctx.qmodel) else "off"
    if mode == "fisher":  # the same measurement as CLADO's on a causal LM, without pairs
        ctx.check_feasible()
        return _solved(ctx, cfg, fisher_sensitivity(ctx, _batches(ctx, cfg), cfg.fisher_samples))
    if mode != "off":
        return _measure_and_solve(ctx, cfg, sensitivity.blockwise, objective=mode)
    return _measure_and_solve(ctx, cfg, sensitivity.measured, executor=ctx.executor, objective=objective)


def search_hawq(ctx: Context, cfg: Config) -> MethodOutput:
    """The ``hawq`` method."""
    trace = cfg.trace
    if trace == "auto":
        trace = "fisher" if is_causal_lm(ctx.task) else "hutchinson"
    n = cfg.fisher_samples if trace == "fisher" else cfg.hutchinson_samples
    options = {"n_samples": n, "seed": ctx.seed, "mode": cfg.hutchinson_mode, "estimator": trace}
    return _measure_and_solve(ctx, cfg, sensitivity.hawq, **options)
