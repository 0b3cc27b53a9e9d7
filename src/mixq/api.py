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
from mixq.cache import Cache
from mixq.cache import current as current_cache
from mixq.fold import NORMS, fold_model
from mixq.methods import METHODS
from mixq.methods.common import Context, MethodOutput
from mixq.metrics import Metrics
from mixq.options import RunOptions, check_types
from mixq.plan import FLOAT, LayerSpec, Plan, as_layer_spec
from mixq.store import fingerprint_data, fingerprint_model
from mixq.wrap import (
    ADDS,
    adds_spec,
    apply,
    calibrate,
    check_weight_only,
    excluded_layers,
    float_layers,
    sites,
    tie_plan,
    weight_only_plan,
    with_adds,
    wrap,
)

log = logging.getLogger(__name__)
EXCLUDE = "exclude"  # the plan meta key of the run's exclude patterns


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


MODEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_dtypes(model: nn.Module) -> None:
    """Raise if a floating parameter of ``model`` has a dtype mixq cannot quantize, naming it.

    Quantizers compute in float32 and return the model's dtype (bfloat16 and float16 models
    too); a float8 or complex weight cannot be requantized.
    """
    for name, t in model.named_parameters():
        if (t.is_floating_point() or t.is_complex()) and t.dtype not in MODEL_DTYPES:
            valid = ", ".join(str(d).removeprefix("torch.") for d in MODEL_DTYPES)
            raise ValueError(
                f"{name} has dtype {str(t.dtype).removeprefix('torch.')}, which mixq cannot quantize; "
                f"valid model dtypes: {valid} (cast the model, e.g. model.float())"
            )


def method_config(method: str, method_args: dict[str, Any] | None) -> Any:
    """Build a method's Config from ``method_args``, rejecting unknown methods and keys, and
    values of the wrong type (by the Config's annotations)."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    cfg_cls = METHODS[method].config
    args = dict(method_args or {})
    valid = [f.name for f in dataclasses.fields(cfg_cls)]
    unknown = sorted(set(args) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown method_args {unknown} for method {method!r}; valid: {', '.join(valid) or 'none'}"
        )
    return cfg_cls(**check_types(cfg_cls, args, f"method_args of {method!r}"))


def _prepare_key(task: tasks.Task, gram: bool, act: bool, embeddings: bool, exclude: tuple = ()) -> tuple:
    """What a prepared model depends on: weights, architecture, calibration data, forward, needs."""
    return (
        fingerprint_model(task.model),
        repr(task.model),
        fingerprint_data(task.calib),
        task.forward,
        gram,
        act,
        embeddings,
        exclude,
    )


def prepare(
    task: tasks.Task,
    candidates: list[LayerSpec],
    cache: Cache | None = None,
    embeddings: bool = False,
    exclude: list[str] | tuple[str, ...] | None = None,
) -> tuple[nn.Module, list[cost.LayerInfo]]:
    """Copy, check, wrap and calibrate the task's model; probe its layers.

    Calibration (activation statistics, and the layers' input Gram matrices for ``omse``
    ranges) is the slow part on a large model, and a budget sweep or a comparison of methods
    prepares the same model again and again. A ``cache`` (by default the cache of the run in
    progress, :func:`mixq.cache.current`) keeps the last prepared model, keyed by the
    fingerprints of the weights, the architecture and the calibration batches, and a fresh
    deep copy of it is returned when they match: the result is identical.

    ``embeddings``: wrap nn.Embedding layers too (:func:`mixq.wrap.wrap`). ``exclude``: fnmatch
    patterns of layers left float (:func:`mixq.wrap.excluded_layers`; a pattern matching none raises).
    """
    exclude = tuple(exclude or ())
    gram = any(c.weight is not None and c.weight.clip == "omse" for c in candidates)
    act = any(c.act is not None for c in candidates)
    cache = cache if cache is not None else current_cache()
    if cache is None or not task.calib:
        return _prepare(task, gram, act, embeddings, exclude)
    key = _prepare_key(task, gram, act, embeddings, exclude)
    qmodel, infos = cache.prepared(key, lambda: _prepare(task, gram, act, embeddings, exclude))
    return qmodel, list(infos)


def _prepare(
    task: tasks.Task, gram: bool, act: bool, embeddings: bool = False, exclude: tuple = ()
) -> tuple[nn.Module, list[cost.LayerInfo]]:
    model = copy.deepcopy(task.model).eval()
    check_dtypes(model)
    check_finite(model)
    excluded = excluded_layers(model, exclude, embeddings)  # a pattern matching no layer raises
    model.mixq_excluded = tuple(excluded)  # float, counted so in every budget (cost.probe)
    qmodel = wrap(model, skip=excluded, embeddings=embeddings)  # raises if nothing to quantize
    for name, m in sites(qmodel).items() if gram else ():
        if getattr(m, "weight_only", False):  # an embedding: refused before any search
            check_weight_only(name, "omse")
    if not task.calib:
        raise ValueError("calibration data is empty: pass at least one batch")
    if gram or act:
        calibrate(qmodel, task.calib, task.forward, gram=gram)
    infos = cost.probe(qmodel, task.calib[0], task.forward)
    return qmodel, infos


def run(
    task: tasks.Task | str,
    method: str = "uniform",
    candidates: list[str | LayerSpec] | str | None = None,
    budget: dict[str, float] | None = None,
    method_args: dict[str, Any] | None = None,
    *,
    options: RunOptions | None = None,
    **kwargs: Any,
) -> Result:
    """Quantize a task's model with one method under a budget and measure the result.

    Args:
        task: a Task or the name of a built-in task (see ``mixq.tasks.TASKS``).
        method: a name in ``mixq.methods.METHODS``.
        candidates: candidate names per layer, e.g. ``["w2a8", "w4a8", "w8a8"]``.
        budget: upper bounds, keys in ``mixq.cost.BUDGET_KEYS``; empty means unconstrained.
        method_args: the method's own settings (fields of its Config); also an option.
        options: a :class:`mixq.RunOptions`; keywords (its fields: ``method_args``, ``seed``,
            ``out``, ``ptq``, ``ptq_args``, ``executor``, ``executor_args``, ``adds``, ``cache``,
            ``embeddings``) set fields of it, or of the defaults.

    Returns:
        A Result with ``.plan``, ``.model`` (the quantized model) and ``.metrics``.
    """
    if method_args is not None:
        kwargs["method_args"] = method_args
    opts = RunOptions.build(options, **kwargs)
    req = Request(
        task=_task(task),
        method=method,
        cfg=method_config(method, opts.method_args),
        specs=_candidates(candidates),
        budget=cost.check_budget(budget if budget is not None else {}),
        steps=ptq_steps.resolve(ptq_steps.for_target(opts.ptq, opts.target), opts.ptq_args),
        opts=opts,
    )
    if opts.out is None:
        result, _ = _run(req, key="")
        return result
    out = rundir.check_out(opts.out)
    with rundir.writing(out, run_config(req), overwrite=opts.overwrite) as key:
        result, infos = _run(req, key=key)
        rundir.write_run(out, result, infos, key)
    return result


@dataclass(frozen=True)
class Request:
    """One run's checked settings: what :func:`run` was asked, before anything is computed."""

    task: tasks.Task
    method: str
    cfg: Any  # the method's Config
    specs: list[LayerSpec]  # the candidates
    budget: dict[str, float]
    steps: list[ptq_steps.Step]
    opts: RunOptions


def run_config(req: Request) -> dict[str, Any]:
    """Everything a run's outcome depends on, as JSON: the key of its run directory's artifacts.

    The task by name and by the fingerprints of its weights and data, the method and its
    settings, the candidates, the budget, the PTQ steps and their settings, the seed, the
    additions' spec, batch-norm folding, embeddings and mixq's version (not the executor or
    the cache: where jobs run and what is reused change no result).
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        mixq_version = version("mixq")
    except PackageNotFoundError:
        mixq_version = "unknown"
    task, opts = req.task, req.opts
    return {
        "task": task.name,
        "model": fingerprint_model(task.model),
        "calib": fingerprint_data(task.calib),
        "val": _val_fingerprint(task),
        "method": req.method,
        "method_args": dataclasses.asdict(req.cfg),
        "candidates": [c.name for c in req.specs],
        "budget": req.budget,
        "ptq": [{"step": s.name, **dataclasses.asdict(s.cfg)} for s in req.steps],
        "seed": opts.seed,
        "adds": str(opts.adds) if opts.adds is not None else None,
        "fold_bn": opts.fold_bn,
        "embeddings": opts.embeddings,
        **({"exclude": list(opts.exclude)} if opts.exclude else {}),
        "outputs": task.output_kind(),  # chooses objectives (e.g. sensitivity-ilp's kl or loss)
        "mixq": mixq_version,
    }


def _val_fingerprint(task: tasks.Task) -> str | None:
    """The validation batches' fingerprint; None for batches of elements it cannot hash (the
    metric then is the task's own affair, as before run directories were keyed)."""
    try:
        return fingerprint_data(task.val)
    except TypeError:
        return None


def _run(req: Request, key: str) -> tuple[Result, list[cost.LayerInfo]]:
    """One run after its checks (in its run directory, when ``req.opts.out`` is set)."""
    task, method, cfg, opts = req.task, req.method, req.cfg, req.opts
    specs, budget, steps = req.specs, req.budget, req.steps
    runner = _executor(opts)
    torch.manual_seed(opts.seed)
    with (opts.cache if opts.cache is not None else Cache(models=False)).active():  # prepares once
        work, ptq_records, folded = _float_steps(task, steps, opts.seed, opts.fold_bn)
        t0 = time.perf_counter()
        ctx = _context(work, specs, budget, opts, runner, key)
        output = _search(ctx, method, cfg, owned=isinstance(opts.executor, str))
        seconds = time.perf_counter() - t0
        plan = weight_only_plan(ctx.qmodel, output.plan)  # an embedding's spec without an input spec
        plan = tie_plan(ctx.qmodel, plan)  # a tied tensor: one weight spec, the leader's
        plan = plan if opts.adds is None else with_adds(plan, opts.adds)
        plan.meta.update(
            {"task": task.name, "method": method, "budget": budget, "seed": opts.seed, FOLD_BN: opts.fold_bn}
        )
        if opts.exclude:
            plan.meta[EXCLUDE] = list(opts.exclude)
        if "reference" in task.info:  # a task of one's own, rebuilt by module:function
            plan.meta["task_reference"] = task.info["reference"]
        apply(ctx.qmodel, plan)
        ptq_records += ptq_steps.apply_ptq("plan", ctx.qmodel, work, steps, opts.seed)
        t1 = time.perf_counter()
        ctx.qmodel.eval()
        metrics = measure(task, ctx.qmodel, plan, ctx.model_costs, t1)
    metrics = metrics.replace(
        method=method,
        method_args=dataclasses.asdict(cfg),
        candidates=[c.name for c in specs],
        budget=budget,
        seed=opts.seed,
        seconds=seconds,
        within=_within(metrics, budget),
        history=output.history,
        ptq=ptq_records,
        extra={
            **({"fold_bn": folded} if folded else {}),
            **({"task_reference": task.info["reference"]} if "reference" in task.info else {}),
        },
    )
    log.info(
        "%s %s: %s=%.4f avg_weight_bits=%.3f",
        task.name,
        method,
        task.metric_name,
        metrics.metric,
        metrics.avg_weight_bits,
    )
    return Result(plan, ctx.qmodel, metrics, output.sensitivity, output.history), ctx.model_costs.infos


def _search(ctx: Context, method: str, cfg: Any, owned: bool) -> MethodOutput:
    """Run the method's search; close the executor after it when the run built it (``owned``)."""
    try:
        return METHODS[method].search(ctx, cfg)
    finally:
        if owned:
            executors.close(ctx.executor)


def _within(metrics: Metrics, budget: dict[str, float]) -> dict[str, bool] | None:
    """Whether the measured costs meet each budget (float summation slack only)."""
    return {k: bool(getattr(metrics, k) <= v * (1 + 1e-9)) for k, v in budget.items()} or None


def _task(task: tasks.Task | str) -> tasks.Task:
    """A Task, or the built-in task of that name."""
    if isinstance(task, str):
        task = tasks.get(task)
    if not isinstance(task, tasks.Task):
        raise ValueError(f"task must be a mixq.Task or one of {', '.join(tasks.TASKS)}; got {task!r}")
    return task


def _candidates(candidates: list[str | LayerSpec] | str | None) -> list[LayerSpec]:
    """The candidate specs of a list of names (or a comma-separated string of them)."""
    if isinstance(candidates, str):
        candidates = [c for c in candidates.split(",") if c]
    if not candidates:
        raise ValueError("give at least one candidate, e.g. candidates=['w4a8', 'w8a8']")
    if not isinstance(candidates, (list, tuple)):
        raise ValueError(f"candidates must be a list of candidate names, got {candidates!r}")
    specs = [as_layer_spec(c) for c in candidates]
    seen: dict[str, Any] = {}
    for given, spec in zip(candidates, specs, strict=True):
        if spec.name in seen:
            raise ValueError(
                f"candidate {spec.name!r} is given twice ({seen[spec.name]!r} and {given!r}); "
                "each candidate once"
            )
        seen[spec.name] = given
    return specs


def _executor(opts: RunOptions) -> Any:
    """The executor of the methods' jobs: built from its name, or the object given."""
    if opts.executor_args and not isinstance(opts.executor, str):
        raise ValueError(f"executor_args need a named executor ({', '.join(executors.EXECUTORS)})")
    if isinstance(opts.executor, str):
        return executors.make(opts.executor, **(opts.executor_args or {}))
    return opts.executor


FOLD_BN = "fold_bn"  # the plan meta key: whether the run folded batch norm


def folded_task(task: tasks.Task, plan: Plan, fold_bn: bool | None = None) -> tasks.Task:
    """The task with batch norm folded as the run that made ``plan`` folded it (``fold_bn``
    overrides; a plan that does not say: fold, ``mixq.run``'s default), so a plan measures again
    on the model its run quantized."""
    fold = plan.meta.get(FOLD_BN, True) if fold_bn is None else fold_bn
    return _float_steps(task, [], 0, bool(fold))[0]


def _float_steps(
    task: tasks.Task, steps: list[ptq_steps.Step], seed: int, fold: bool = True
) -> tuple[tasks.Task, list[dict], dict | None]:
    """Fold batch norm (``fold``), then run the float-model PTQ steps (before calibration and
    search: see mixq.ptq), on a copy of the model; the fold's record is None without batch norm."""
    has_bn = fold and any(isinstance(m, NORMS) for m in task.model.modules())
    if not has_bn and not any(s.stage == "float" for s in steps):
        return task, [], None
    model = copy.deepcopy(task.model).eval()
    folded = fold_model(model, lambda m: task.forward(m, task.calib[0])) if has_bn else None
    records = ptq_steps.apply_ptq("float", model, task, steps, seed)
    return dataclasses.replace(task, model=model, _fp_metric=None), records, folded


def _context(
    task: tasks.Task,
    specs: list[LayerSpec],
    budget: dict[str, float],
    opts: RunOptions,
    runner: Any,
    key: str,
) -> Context:
    """Prepare the model and build what the method receives."""
    qmodel, infos = prepare(task, specs, embeddings=opts.embeddings, exclude=opts.exclude)
    mc = cost.model_costs(qmodel, infos)
    ctx = Context(
        task=task,
        qmodel=qmodel,
        layers=[i.name for i in infos],
        candidates=specs,
        costs=cost.cost_table(infos, specs),
        model_costs=mc,
        budget=budget,
        limits=cost.budget_limits(mc, budget),
        seed=opts.seed,
        out=Path(opts.out) if opts.out is not None else None,
        executor=runner,
        methods=METHODS,
        key=key,
    )
    if ctx.out is not None:
        ctx.out.mkdir(parents=True, exist_ok=True)
    return ctx


def evaluate(
    task: tasks.Task | str, plan: Plan | str | Path, cache: Cache | None = None, fold_bn: bool | None = None
) -> Result:
    """Quantize a task's model by a given plan (a Plan or a plan.json) and measure it.

    The plan may come from any run, edited by hand: e.g. one layer moved to another candidate.
    Layers the plan does not name stay float. Raises on a layer name the model does not have.

    ``cache``: a :class:`mixq.Cache` shared with other runs and evaluations of the same model
    (its prepared model and searched ranges are reused; the result is identical); by default the
    cache of the run in progress, or a fresh one.
    ``fold_bn``: fold batch norm first, as ``mixq.run`` does by default; None: as the run that
    made the plan did (its ``meta["fold_bn"]``; a plan without it: fold).

    Returns:
        A Result whose metrics hold the metric, the fp32 metric and the cost model's sizes.
    """
    if isinstance(task, str):
        task = tasks.get(task)
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    task = folded_task(task, plan, fold_bn)
    cache = cache if cache is not None else current_cache()
    with (cache if cache is not None else Cache(models=False)).active():
        qmodel, infos = prepare(
            task, list(plan.layers.values()), embeddings=names_embeddings(task, plan), exclude=excludes(plan)
        )
        plan.check_layers([i.name for i in infos])
        tie_plan(qmodel, plan, strict=True)  # tied sites at different weight specs raise
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
    report = getattr(task.metric, "report", None)  # e.g. a causal LM's perplexity beside -perplexity
    if callable(report):
        metrics.extra.update(report(value))
        metrics.extra.update({f"fp_{k}": v for k, v in report(metrics.fp_metric).items()})
    for k, v in sizes.items():
        setattr(metrics, k, v)
    metrics.eval_seconds = time.perf_counter() - t0
    metrics.layers = len(mc.infos)
    metrics.adds = plan.meta.get(ADDS)
    metrics.float_layers = float_layers(qmodel)
    return metrics


def excludes(plan: Plan) -> list[str]:
    """The exclude patterns a plan was made with (``meta["exclude"]``), else none."""
    value = plan.meta.get(EXCLUDE) or []
    return [str(p) for p in value] if isinstance(value, list) else []


def names_embeddings(task: tasks.Task, plan: Plan) -> bool:
    """Whether ``plan`` names an nn.Embedding of the task's model (it was made with embeddings=True)."""
    modules = dict(task.model.named_modules())
    return any(isinstance(modules.get(n), nn.Embedding) for n in plan.layers)
