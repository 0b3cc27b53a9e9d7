"""The one-call API: ``mixq.run(task, method, candidates, budget, ...)`` -> Result."""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixq import cost, rundir, tasks
from mixq import executor as executors
from mixq import ptq as ptq_steps
from mixq.methods import METHODS
from mixq.methods.common import Context
from mixq.metrics import Metrics
from mixq.plan import FLOAT, LayerSpec, Plan, QSpec, as_layer_spec
from mixq.store import fingerprint_data, fingerprint_model
from mixq.wrap import ADDS, adds_spec, apply, calibrate, sites, with_adds, wrap

log = logging.getLogger(__name__)


@dataclass
class Result:
    """The outcome of a run: the plan, the quantized model, its measured metrics."""

    plan: Plan
    model: nn.Module
    metrics: Metrics
    sensitivity: Any = None
    history: list[dict[str, Any]] = field(default_factory=list)


def check_finite(model: nn.Module) -> None:
    """Raise if any parameter or buffer of ``model`` holds NaN or Inf, naming it."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{name} holds {bad} NaN or Inf values; quantization needs finite weights")


def method_config(method: str, method_args: dict[str, Any] | None) -> Any:
    """Build a method's Config from ``method_args``, rejecting unknown methods and keys."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    cfg_cls = METHODS[method].config
    args = dict(method_args or {})
    valid = [f.name for f in dataclasses.fields(cfg_cls)]
    unknown = sorted(set(args) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown method_args {unknown} for method {method!r}; valid: {', '.join(valid) or 'none'}"
        )
    return cfg_cls(**args)


_PREPARED: dict[tuple, tuple[nn.Module, list[cost.LayerInfo]]] = {}  # the last prepared model


def _prepare_key(task: tasks.Task, gram: bool, act: bool) -> tuple:
    """What a prepared model depends on: weights, architecture, calibration data, forward, needs."""
    return (fingerprint_model(task.model), repr(task.model), fingerprint_data(task.calib),
            task.forward, gram, act)  # fmt: skip


def prepare(
    task: tasks.Task, candidates: list[LayerSpec], cache: bool = True
) -> tuple[nn.Module, list[cost.LayerInfo]]:
    """Copy, check, wrap and calibrate the task's model; probe its layers.

    Calibration (activation statistics, and the layers' input Gram matrices for ``omse``
    ranges) is the slow part on a large model, and a budget sweep or a comparison of methods
    prepares the same model again and again. With ``cache`` the last prepared model is kept,
    keyed by the fingerprints of the weights, the architecture and the calibration batches,
    and a fresh deep copy of it is returned when they match: the result is identical.
    """
    gram = any(c.weight is not None and c.weight.clip == "omse" for c in candidates)
    act = any(c.act is not None for c in candidates)
    key = _prepare_key(task, gram, act) if cache and task.calib else None
    if key is not None and key in _PREPARED:
        qmodel, infos = _PREPARED[key]
        return copy.deepcopy(qmodel), list(infos)
    qmodel, infos = _prepare(task, gram, act)
    if key is not None:
        _PREPARED.clear()
        _PREPARED[key] = (copy.deepcopy(qmodel), list(infos))
    return qmodel, infos


def _prepare(task: tasks.Task, gram: bool, act: bool) -> tuple[nn.Module, list[cost.LayerInfo]]:
    model = copy.deepcopy(task.model).eval()
    check_finite(model)
    qmodel = wrap(model)
    if not sites(qmodel):
        raise ValueError("the model has no nn.Linear or nn.Conv2d layer to quantize")
    if not task.calib:
        raise ValueError("calibration data is empty: pass at least one batch")
    if gram or act:
        calibrate(qmodel, task.calib, task.forward, gram=gram)
    infos = cost.probe(qmodel, task.calib[0], task.forward)
    return qmodel, infos


def run(
    task: tasks.Task | str,
    method: str = "uniform",
    candidates: list[str | LayerSpec] | None = None,
    budget: dict[str, float] | None = None,
    method_args: dict[str, Any] | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    ptq: list[str] | None = None,
    ptq_args: dict[str, dict[str, Any]] | None = None,
    executor: str | Any | None = None,
    executor_args: dict[str, Any] | None = None,
    adds: str | QSpec | None = None,
) -> Result:
    """Quantize a task's model with one method under a budget and measure the result.

    Args:
        task: a Task or the name of a built-in task (see ``mixq.tasks.TASKS``).
        method: a name in ``mixq.methods.METHODS``.
        candidates: candidate names per layer, e.g. ``["w2a8", "w4a8", "w8a8"]``.
        budget: upper bounds, keys in ``mixq.cost.BUDGET_KEYS``; empty means unconstrained.
        method_args: the method's own settings (fields of its Config).
        seed: random seed.
        ptq: PTQ steps from ``mixq.ptq.STEPS`` applied in order, e.g. ``["cle",
            "bias_correction", "adaround"]``: float-model steps (cle) before calibration and the
            method's search, plan steps after the plan is applied; recorded in ``metrics["ptq"]``.
        ptq_args: per-step settings, e.g. ``{"adaround": {"iters": 2000}}``.
        out: a run directory to write plan.json, metrics.json, layers.csv and report.md to.
        executor: runs the methods' sensitivity jobs: "inprocess" (the default), "ray"
            (``pip install mixq[ray]``), or an executor object (``mixq.executor``).
        executor_args: settings of a named executor, e.g. ``{"address": "HOST:PORT",
            "workers": 8}`` for "ray"; an executor built here is closed when the run ends.
        adds: quantize both operands of every residual addition (:class:`mixq.nn.Add` modules,
            as in the zoo's ResNet and MobileNetV2) with this input spec or the input spec of
            this candidate (e.g. "a8"); recorded as the plan's ``meta["adds"]``. The method's
            search sees float additions; the returned model and its metric have them quantized.
            With quantized additions ONNX Runtime runs residual networks in integers throughout.

    Returns:
        A Result with ``.plan``, ``.model`` (the quantized model) and ``.metrics``.
    """
    if isinstance(task, str):
        task = tasks.get(task)
    if not isinstance(task, tasks.Task):
        raise ValueError(f"task must be a mixq.Task or one of {', '.join(tasks.TASKS)}; got {task!r}")
    if method_args is not None and not isinstance(method_args, dict):
        raise ValueError(f"method_args must be a dict of the method's settings, got {method_args!r}")
    cfg = method_config(method, method_args)
    if isinstance(candidates, str):
        candidates = [c for c in candidates.split(",") if c]
    if not candidates:
        raise ValueError("give at least one candidate, e.g. candidates=['w4a8', 'w8a8']")
    specs = [as_layer_spec(c) for c in candidates]
    budget = cost.check_budget(budget if budget is not None else {})
    steps = ptq_steps.resolve(ptq, ptq_args)
    if executor_args and not isinstance(executor, str):
        raise ValueError(f"executor_args need a named executor ({', '.join(executors.EXECUTORS)})")
    runner = executors.make(executor, **(executor_args or {})) if isinstance(executor, str) else executor
    torch.manual_seed(seed)
    work, ptq_records = task, []
    if any(s.stage == "float" for s in steps):  # before calibration and search: see mixq.ptq
        model = copy.deepcopy(task.model).eval()
        ptq_records = ptq_steps.apply_ptq("float", model, task, steps, seed)
        work = dataclasses.replace(task, model=model, _fp_metric=None)
    t0 = time.perf_counter()
    qmodel, infos = prepare(work, specs)
    mc = cost.model_costs(qmodel, infos)
    ctx = Context(
        task=work,
        qmodel=qmodel,
        layers=[i.name for i in infos],
        candidates=specs,
        costs=cost.cost_table(infos, specs),
        model_costs=mc,
        budget=budget,
        limits=cost.budget_limits(mc, budget),
        seed=seed,
        out=Path(out) if out is not None else None,
        executor=runner,
        methods=METHODS,
    )
    if ctx.out is not None:
        ctx.out.mkdir(parents=True, exist_ok=True)
    try:
        output = METHODS[method].search(ctx, cfg)
    finally:
        if isinstance(executor, str):
            executors.close(runner)
    seconds = time.perf_counter() - t0
    plan = output.plan if adds is None else with_adds(output.plan, adds)
    plan.meta.update({"task": task.name, "method": method, "budget": budget, "seed": seed})
    apply(qmodel, plan)
    ptq_records += ptq_steps.apply_ptq("plan", qmodel, work, steps, seed)
    t1 = time.perf_counter()
    qmodel.eval()
    metrics = measure(task, qmodel, plan, mc, t1).replace(
        method=method, method_args=dataclasses.asdict(cfg), candidates=[c.name for c in specs],
        budget=budget, seed=seed, seconds=seconds, history=output.history, ptq=ptq_records)  # fmt: skip
    metrics.within = {k: bool(getattr(metrics, k) <= v * (1 + 1e-9)) for k, v in budget.items()} or None
    result = Result(plan, qmodel, metrics, output.sensitivity, output.history)
    if ctx.out is not None:
        rundir.write_run(ctx.out, result, infos)
        if output.sensitivity is not None:
            output.sensitivity.save(ctx.out / rundir.SENSITIVITY)
    log.info("%s %s: %s=%.4f avg_weight_bits=%.3f", task.name, method, task.metric_name,
             metrics.metric, metrics.avg_weight_bits)  # fmt: skip
    return result


def evaluate(task: tasks.Task | str, plan: Plan | str | Path) -> Result:
    """Quantize a task's model by a given plan (a Plan or a plan.json) and measure it.

    The plan may come from any run, edited by hand: e.g. one layer moved to another candidate.
    Layers the plan does not name stay float. Raises on a layer name the model does not have.

    Returns:
        A Result whose metrics hold the metric, the fp32 metric and the cost model's sizes.
    """
    if isinstance(task, str):
        task = tasks.get(task)
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    qmodel, infos = prepare(task, list(plan.layers.values()))
    plan.check_layers([i.name for i in infos])
    apply(qmodel, plan)
    qmodel.eval()
    metrics = measure(task, qmodel, plan, cost.model_costs(qmodel, infos), time.perf_counter())
    return Result(plan, qmodel, metrics.replace(method=plan.meta.get("method", "plan")))


def measure(task: tasks.Task, qmodel: nn.Module, plan: Plan, mc: cost.ModelCosts, t0: float) -> Metrics:
    """Measure a quantized model: its metric, the float metric and the cost model's numbers of ``plan``.

    ``t0``: when the measurement began (``eval_seconds`` counts from it).
    """
    value = float(task.metric(qmodel, task.val))
    sizes = cost.metrics_of(mc, [plan.layers.get(i.name, FLOAT) for i in mc.infos], adds_spec(plan))
    metrics = Metrics(task.name, "", metric_name=task.metric_name, metric=value, fp_metric=task.fp_metric())
    for k, v in sizes.items():
        setattr(metrics, k, v)
    metrics.eval_seconds = time.perf_counter() - t0
    metrics.layers = len(mc.infos)
    metrics.adds = plan.meta.get(ADDS)
    return metrics
