"""Post-training quantization steps that refine any plan: ``mixq.run(..., ptq=[...])``.

Each step has a stage:

* ``"float"``: transforms the float model before calibration and before the method chooses
  its plan (``cle``), so ranges and sensitivities are measured on the weights that end up
  quantized.
* ``"plan"``: refines the quantized layers of the chosen plan, after it is applied
  (``bias_correction``, ``adaround``, ``awq``, ``gptq``; ``int32_bias`` last).

Steps run in the order listed; every float step must come before every plan step. Each step is
deterministic for a seed and reports a record (its stage, seconds and what it did).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import nn

from mixq.options import check_types
from mixq.ptq import adaround, awq, bias_correction, cle, gptq, int32_bias
from mixq.tasks import Task

STAGES = ("float", "plan")


def _cle(model: nn.Module, task: Task, cfg: cle.Config, seed: int) -> dict:
    del seed  # data-free and deterministic; one calibration batch checks the function
    return cle.equalize(model, cfg, example=lambda m: task.forward(m, task.calib[0]))


class StepKind(NamedTuple):
    """A PTQ step in the registry: its stage, Config class and ``fn(model, task, cfg, seed) -> record``."""

    stage: str
    config: type
    fn: Callable[..., dict]


STEPS: dict[str, StepKind] = {
    "cle": StepKind("float", cle.Config, _cle),
    "bias_correction": StepKind("plan", bias_correction.Config, bias_correction.correct),
    "adaround": StepKind("plan", adaround.Config, adaround.adaround),
    "awq": StepKind("plan", awq.Config, awq.awq),
    "gptq": StepKind("plan", gptq.Config, gptq.gptq),
    "int32_bias": StepKind("plan", int32_bias.Config, int32_bias.int32_bias),
}
LAST = ("int32_bias",)  # steps that must come last (a later step would undo them)
# the runtimes a plan can target, and the plan steps its simulation needs to compute what that
# runtime computes (appended when the run does not list them)
TARGETS: dict[str, tuple[str, ...]] = {"onnx": ("int32_bias",)}


def for_target(ptq: list[str] | str | None, target: str | None) -> list[str]:
    """The step names ``ptq`` with the steps of runtime ``target`` (:data:`TARGETS`) appended.

    ``target="onnx"`` (ONNX Runtime's integer kernels) appends ``int32_bias`` unless ``ptq``
    lists it: the simulated metric is then the deployed one (docs/export.md). None adds nothing.

    >>> for_target("bias_correction", "onnx")
    ['bias_correction', 'int32_bias']
    """
    names = [p for p in ptq.split(",") if p] if isinstance(ptq, str) else list(ptq or [])
    if target is None:
        return names
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; valid: {', '.join(TARGETS)} (or None: no runtime)")
    return names + [p for p in TARGETS[target] if p not in names]


@dataclass(frozen=True)
class Step:
    """One resolved PTQ step: its name, stage and settings."""

    name: str
    stage: str
    cfg: Any


def resolve(ptq: list[str] | str | None, ptq_args: dict[str, dict[str, Any]] | None = None) -> list[Step]:
    """Validate step names (and their settings) and return them in order.

    Args:
        ptq: step names from ``STEPS``, or a comma-separated string of them.
        ptq_args: per-step settings, e.g. ``{"adaround": {"iters": 2000}}``.

    Raises:
        ValueError: an unknown, repeated or misplaced step, or unknown settings.
    """
    if ptq is None:
        ptq = []
    if isinstance(ptq, str):
        ptq = [p for p in ptq.split(",") if p]
    if not isinstance(ptq, (list, tuple)) or not all(isinstance(p, str) for p in ptq):
        raise ValueError(f"ptq must be a list of step names from {', '.join(STEPS)}; got {ptq!r}")
    for p in ptq:
        if p not in STEPS:
            raise ValueError(f"unknown PTQ step {p!r}; valid: {', '.join(STEPS)}")
    if len(set(ptq)) != len(ptq):
        raise ValueError(f"a PTQ step is listed twice in {list(ptq)}")
    stages = [STEPS[p].stage for p in ptq]
    if stages != sorted(stages, key=STAGES.index):
        floats = ", ".join(p for p in ptq if STEPS[p].stage == "float")
        raise ValueError(f"float-model steps ({floats}) must come before plan steps in {list(ptq)}")
    for p in LAST:
        if p in ptq and ptq[-1] != p:
            raise ValueError(f"PTQ step {p!r} must be the last one; got {list(ptq)}")
    if not isinstance(ptq_args, (dict, type(None))):
        raise ValueError(f"ptq_args must map step names to settings, got {ptq_args!r}")
    args = dict(ptq_args or {})
    extra = sorted(set(args) - set(ptq))
    if extra:
        raise ValueError(f"ptq_args for steps not in ptq: {extra}; steps: {', '.join(ptq) or 'none'}")
    steps = []
    for p in ptq:
        stage, cfg_cls = STEPS[p].stage, STEPS[p].config
        kw = args.get(p) or {}
        if not isinstance(kw, dict):
            raise ValueError(f"ptq_args[{p!r}] must be a dict of settings, got {kw!r}")
        valid = [f.name for f in dataclasses.fields(cfg_cls)]
        unknown = sorted(set(kw) - set(valid))
        if unknown:
            raise ValueError(f"unknown settings {unknown} for PTQ step {p!r}; valid: {', '.join(valid)}")
        steps.append(Step(p, stage, cfg_cls(**check_types(cfg_cls, kw, f"ptq_args of {p!r}"))))
    return steps


def apply_ptq(stage: str, model: nn.Module, task: Task, steps: list[Step], seed: int = 0) -> list[dict]:
    """Run the steps of one stage on ``model`` in place, in order, and return their records.

    Args:
        stage: "float" (``model`` is the float model) or "plan" (the wrapped model, plan applied).
        model: the model to transform.
        task: the calibration batches, forward function and (plan stage) the float reference model.
        steps: from :func:`resolve`.
        seed: random seed of the steps that sample.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown PTQ stage {stage!r}; valid: {', '.join(STAGES)}")
    records = []
    for step in steps:
        if step.stage != stage:
            continue
        t0 = time.perf_counter()
        info = STEPS[step.name].fn(model, task, step.cfg, seed)
        records.append(
            {
                "step": step.name,
                "stage": stage,
                "seconds": time.perf_counter() - t0,
                "config": dataclasses.asdict(step.cfg),
                **info,
            }
        )
    return records
