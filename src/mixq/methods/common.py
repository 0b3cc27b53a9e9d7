"""What every method receives (a Context) and returns (a MethodOutput)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixq import cost
from mixq.plan import LayerSpec, Plan
from mixq.sensitivity.blockwise import blockwise
from mixq.sensitivity.table import Sensitivity
from mixq.store import Store
from mixq.tasks import Task
from mixq.wrap import applied, tie_plan, tied_sites


def check_choices(*checks: tuple[str, Any, Collection[str]]) -> None:
    """Raise on the first ``(name, value, valid)`` whose value is not one of its valid choices.

    >>> check_choices(("loss", "kl", ("kl", "task")), ("solver", "lp", ("ilp", "greedy")))
    Traceback (most recent call last):
    ...
    ValueError: unknown solver 'lp'; valid: ilp, greedy
    """
    for name, value, valid in checks:
        if value not in valid:
            raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def check_length(steps: int, epochs: int) -> None:
    """Raise unless a training method is given a length: ``steps`` > 0, or ``epochs`` > 0 with 0 steps."""
    if steps < 0 or (steps == 0 and epochs <= 0):
        raise ValueError(f"need steps > 0 or epochs > 0, got steps={steps}, epochs={epochs}")


@dataclass
class Context:
    """The shared state of one run: wrapped model, candidates, cost tables and budget.

    Attributes:
        task: the task (its model is not the one quantized: ``qmodel`` is a wrapped copy).
        qmodel: the wrapped, calibrated copy of the model; methods set plans on it.
        layers: exact names of the quantizable layers (the L axis).
        candidates: the candidate specs (the C axis).
        costs: per-layer costs [L, C] by name (cost.COST_KEYS).
        model_costs: fixed costs for budget conversions.
        budget: the user's budget; limits: the same as bounds on sums of ``costs``.
        seed: random seed; out: the run directory or None.
        key: the key of the run's configuration (:func:`mixq.rundir.config_key`) when it
            writes a run directory: what its resumable artifacts (QAT checkpoints) record.
        executor: runs the methods' sensitivity jobs (``mixq.executor``); None: in-process.
        methods: the registry of methods (``mixq.methods.METHODS``), for a method that runs
            another (multipoint's base method).
    """

    task: Task
    qmodel: nn.Module
    layers: list[str]
    candidates: list[LayerSpec]
    costs: dict[str, torch.Tensor]
    model_costs: cost.ModelCosts
    budget: dict[str, float]
    limits: dict[str, float]
    seed: int = 0
    out: Path | None = None
    executor: Any = None
    methods: Mapping[str, Any] = field(default_factory=dict)
    key: str = ""

    def store(self) -> contextlib.AbstractContextManager[Store | None]:
        """The run's resumable job store (``out/store.sqlite``), closed on leaving; None without ``out``."""
        return Store(self.out / "store.sqlite") if self.out is not None else contextlib.nullcontext()

    def check_feasible(self, uniform: bool = False) -> None:
        """Raise if no (uniform) choice of candidates meets the budget."""
        cost.check_feasible(self.model_costs, self.costs, self.budget, uniform=uniform)

    def within_limits(self, choices: list[int]) -> bool:
        """Whether per-layer candidate indices ``choices`` meet every budget."""
        rows = torch.arange(len(self.layers))
        return all(
            float(self.costs[k][rows, torch.tensor(choices)].sum()) <= v * (1 + 1e-9)
            for k, v in self.limits.items()
        )

    def plan_of(self, choices: list[int]) -> Plan:
        """Build the plan of per-layer candidate indices, tied sites at their leader's weight spec
        (:func:`mixq.wrap.tie_plan`): every plan a method measures or returns is one it can deploy."""
        plan = Plan({n: self.candidates[j] for n, j in zip(self.layers, choices, strict=True)})
        return tie_plan(self.qmodel, plan)

    def tied_pairs(self) -> list[tuple[int, int]]:
        """(follower, leader) indices into ``layers`` of tied sites (:func:`mixq.wrap.tied_sites`)."""
        at = {n: i for i, n in enumerate(self.layers)}
        return [(at[f], at[ld]) for f, ld in tied_sites(self.qmodel).items() if f in at and ld in at]

    def tie_choices(self, choices: list[int], pairs: list[tuple[int, int]] | None = None) -> list[int]:
        """``choices`` with each tied follower at its leader's candidate (``pairs``: :meth:`tied_pairs`)."""
        out = list(choices)
        for f, ld in self.tied_pairs() if pairs is None else pairs:
            out[f] = out[ld]
        return out


def fisher_sensitivity(
    ctx: Context,
    batches: list[Any],
    fisher_samples: int,
    pairs: str = "none",
    min_batches: int | None = None,
) -> Sensitivity:
    """The output KL's second-order (Fisher) terms measured block by block with the run's store and
    seed (`mixq.sensitivity.blockwise`, objective "fisher"): sensitivity-ilp's block-wise "fisher"
    scores and CLADO's single and pair terms on a causal LM (``pairs`` "all" or "block")."""
    extra = {} if min_batches is None else {"min_batches": min_batches}
    with ctx.store() as store:
        return blockwise(
            ctx.qmodel,
            ctx.task,
            ctx.layers,
            ctx.candidates,
            batches=batches,
            store=store,
            objective="fisher",
            pairs=pairs,
            fisher_samples=fisher_samples,
            seed=ctx.seed,
            **extra,
        )


@dataclass(frozen=True)
class Method:
    """A method in the registry (``mixq.methods.METHODS``).

    Attributes:
        config: its Config dataclass (``method_args`` are its fields).
        search: ``search(ctx, cfg) -> MethodOutput``.
        trains: whether it trains the weights (quantization-aware training): it then searches
            min/max integer grids, whose ranges it learns itself.
        demo_args: settings that keep ``mixq demo`` (every method on the MNIST CNN) to minutes.
    """

    config: type
    search: Callable[[Context, Any], MethodOutput]
    trains: bool = False
    demo_args: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class MethodOutput:
    """What a method returns: a plan, and optionally a sensitivity table and a history."""

    plan: Plan
    sensitivity: Any = None
    history: list[dict[str, Any]] = field(default_factory=list)


def uniform_plan(ctx: Context, j: int) -> Plan:
    """The plan with candidate ``j`` on every layer."""
    return ctx.plan_of([j] * len(ctx.layers))


def calib_loss(ctx: Context, plan: Plan) -> float:
    """Mean task loss over the calibration batches with ``plan`` applied."""
    total = 0.0
    with applied(ctx.qmodel, plan), torch.inference_mode():
        for b in ctx.task.calib:
            total += float(ctx.task.loss(ctx.qmodel, b))
    return total / len(ctx.task.calib)
