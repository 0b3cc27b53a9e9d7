"""Export a quantized model: packed safetensors checkpoints and ONNX QDQ models.

```python
res = mixq.run("mnist-cnn", candidates=["w4a8", "w8a8"], budget={"avg_weight_bits": 6})
mixq.export.save(res, "model.safetensors")                 # bit-packed codes + scales + plan
model = mixq.export.load("model.safetensors")              # outputs equal res.model's, bit for bit
mixq.export.save(res, "model.onnx", format="onnx")         # QuantizeLinear/DequantizeLinear
mixq.export.save(res, "model-dir", format="hf")            # transformers + compressed-tensors
emu = mixq.export.emulate(res, task)                       # ONNX Runtime's integer kernels, in PyTorch
```

The package's layers, each importing only those above it in this list:

* :mod:`~mixq.export.codes`, :mod:`~mixq.export.modules`: a weight's codes, the deployed modules;
* :mod:`~mixq.export.deploy`: the deploy-model builder (``LayerExport`` records, deployed models);
* :mod:`~mixq.export.packed`: the packed safetensors file format;
* :mod:`~mixq.export.ort`: ONNX Runtime's graph surgery (where the QDQ nodes go, in which form);
* :mod:`~mixq.export.hf`: transformers model directories in the compressed-tensors format;
* :mod:`~mixq.export.qdq`: the generic QDQ writer (graph builder, tracing, ``save_onnx``);
* :mod:`~mixq.export.integer`: ONNX Runtime's integer kernels emulated in PyTorch.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

from mixq import cost, rundir, tasks
from mixq.api import Result, excludes, folded_task, names_embeddings, prepare
from mixq.export.deploy import deploy_model
from mixq.export.hf import save_hf
from mixq.export.integer import emulate
from mixq.export.packed import deployed, load_safetensors, read_safetensors, save_safetensors
from mixq.export.qdq import save_onnx
from mixq.metrics import Metrics
from mixq.plan import FLOAT, LayerSpec, Plan, QSpec, as_layer_spec
from mixq.wrap import adds_spec, apply, excluded_layers, tied_sites, wrap

FORMATS = ("safetensors", "onnx", "hf")
RUN_MODEL = rundir.MODEL  # the quantized model a run directory holds (mixq.rundir)

__all__ = [
    "FORMATS",
    "RUN_MODEL",
    "deploy_model",
    "emulate",
    "load",
    "load_safetensors",
    "read_safetensors",
    "rebuild",
    "save",
    "save_hf",
    "save_onnx",
    "save_safetensors",
]


def _task_of(result: Any, task: Any) -> Any:
    if task is not None:
        return tasks.get(task) if isinstance(task, str) else task
    name = result.plan.meta.get("task_reference") or result.plan.meta.get("task")
    if name not in tasks.TASKS and not tasks.is_reference(name):
        raise ValueError(
            f"ONNX export needs example inputs: pass task= (the run's task {name!r} is not "
            f"built-in nor module:function; built-in: {', '.join(tasks.TASKS)})"
        )
    return tasks.get(name)


def save(
    result: Any,
    path: str | Path,
    format: str = "safetensors",
    task: Any = None,
    int4_as_int8: bool = False,
    exporter: str = "dynamo",
) -> Path:
    """Write a run's quantized model to ``path``.

    Args:
        result: a :class:`mixq.Result` (``result.model`` the wrapped model with its plan applied,
            or a deployed model from :func:`load` / :func:`rebuild`).
        path: the file to write (format "hf": the model directory).
        format: "safetensors" (packed codes, scales and the plan), "onnx" (QDQ graph) or "hf"
            (a transformers model directory in the compressed-tensors format, weight-only integer
            plans: :mod:`mixq.export.hf`).
        task: ONNX only: the Task (or its name) whose calibration batch gives example inputs;
            by default the run's own task, rebuilt by name.
        int4_as_int8: ONNX only: store 2- to 4-bit integer weight codes as INT8/UINT8 (the same
            codes, scales and values) instead of INT4/UINT4. ONNX Runtime has no 4-bit conv or
            per-channel 4-bit matmul kernel on the CPU: it dequantizes 4-bit weights on every run
            and computes in float, while with 8-bit storage it fuses the layer into its integer
            kernels (a mixed plan then runs at int8 speed; the file holds 8 bits per weight).
        exporter: ONNX only: "dynamo" (``torch.onnx.export(..., dynamo=True)`` on ``torch.export``,
            the maintained exporter) or "torchscript" (the legacy exporter PyTorch deprecates, a
            fallback; the same graph after mixq's rewrite).

    Returns:
        The path written.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; valid: {', '.join(FORMATS)}")
    if format == "hf":
        if int4_as_int8:
            raise ValueError("int4_as_int8 applies to format='onnx'; hf packs the codes at their width")
        return save_hf(result.model, path)
    if format == "safetensors":
        if int4_as_int8:
            raise ValueError("int4_as_int8 applies to format='onnx'; safetensors always packs the codes")
        return save_safetensors(result.model, result.plan, path)
    return save_onnx(result.model, _task_of(result, task), path, int4_as_int8=int4_as_int8, exporter=exporter)


def load(
    path: str | Path, model: nn.Module | None = None, plan: Plan | str | Path | None = None
) -> nn.Module:
    """Rebuild the deployed model from a packed safetensors export, verified.

    The file records a checksum of its payload and the hash of its plan: both are checked
    (a file altered or damaged after it was written is refused, naming what differs), and with
    ``plan`` (a Plan or a plan.json) the file must hold that plan's model.

    Args:
        path: a file written by ``save(..., format="safetensors")``.
        model: the float model the export came from (its architecture is reused, its weights
            replaced); by default the built-in task named in the file is rebuilt.
        plan: the plan the file must hold (e.g. the run's plan.json); None: not compared.

    Returns:
        A model whose outputs equal the fake-quantized model's bit for bit.
    """
    if plan is not None and not isinstance(plan, Plan):
        plan = Plan.load(plan)
    return load_safetensors(path, model, plan)


def rebuild(run_dir: str | Path, check: bool = True, task: Any = None) -> tuple[Any, Any]:
    """Rebuild the quantized model of a run directory (plan.json, metrics.json) and its task.

    A run directory holds its quantized model as a packed export (``model.safetensors``, written
    by ``mixq.run(..., out=)``): the deployed model is loaded from it, so weights that PTQ steps
    (CLE, bias correction, AdaRound) or QAT (ddq, fliqs) changed come back exactly. A run
    directory without it (or whose plan had no packed form) is rebuilt from its plan: the
    built-in task is prepared again (copied, wrapped and calibrated on the same batches, which
    is deterministic) and the plan applied. With ``check``, the model's metric must equal the
    one in metrics.json, or a ValueError says why it cannot.

    The task is the one the run recorded: a built-in task's name, or the ``module:function`` of a
    task of one's own (a run given ``task="module:function"``). ``task`` (a Task, a name or a
    reference) replaces it, e.g. for a run made from Python with a Task object.

    Returns:
        ``(result, task)``: a :class:`mixq.Result` holding the plan and the model (deployed
        when loaded from the run's file, else wrapped with the plan applied).
    """
    run_dir = Path(run_dir)
    metrics = rundir.read_metrics(run_dir, required=())
    plan = rundir.read_plan(run_dir)
    name = metrics.get("task_reference") or metrics.get("task")
    if task is None and name not in tasks.TASKS and not tasks.is_reference(name):
        raise ValueError(
            f"run {run_dir} is of task {name!r}, not a built-in one: name it as module:function (a "
            f"function returning the Task; --task on the command line, task= in Python); built-in "
            f"tasks: {', '.join(tasks.TASKS)}"
        )
    task = tasks.get(name if task is None else task) if not isinstance(task, tasks.Task) else task
    folded = folded_task(task, plan)  # the model the run quantized: batch norm folded as it was
    recorded = metrics.get("metric")
    file = rundir.listed(run_dir, RUN_MODEL)
    if file is not None:
        read = read_safetensors(file, plan)  # checksum and plan hash verified
        sizes = file_costs(file, read[0], plan, folded)
        model = deployed(file, *read, task.model)
        value = float(task.metric(model, task.val))
        if check and value != recorded:
            raise ValueError(
                f"the model loaded from {file} scores {value!r}, the run recorded "
                f"{recorded!r}: the file does not hold this run's model"
            )
        return Result(plan, model, _rebuilt({**metrics, **sizes}, value, recorded)), task
    specs = list(plan.layers.values()) + _candidates(metrics)
    qmodel, infos = prepare(folded, specs, embeddings=names_embeddings(folded, plan), exclude=excludes(plan))
    plan.check_layers([i.name for i in infos])
    apply(qmodel, plan)
    qmodel.eval()
    value = float(task.metric(qmodel, task.val))
    sizes = cost.metrics_of(
        cost.model_costs(qmodel, infos), [plan.layers.get(i.name, FLOAT) for i in infos], adds_spec(plan)
    )
    if check and value != recorded:
        raise ValueError(
            f"the model rebuilt from {run_dir / rundir.PLAN} scores {value!r}, the run "
            f"recorded {recorded!r}: this run cannot be rebuilt from its plan (its "
            f"weights were changed by PTQ steps or training, and the directory has no {RUN_MODEL})"
        )
    return Result(plan, qmodel, _rebuilt({**metrics, **sizes}, value, recorded)), task


def file_costs(path: Path, meta: dict[str, Any], plan: Plan, task: Any) -> dict[str, float]:
    """``avg_weight_bits``, ``size_bytes``, ``size_ratio`` and ``bops`` of the specs a packed file
    holds (its layers' metadata) on the task's layers, each layer checked against ``plan``.

    Raises:
        ValueError: a layer of the file has another shape than the model's, or another spec
            than the plan's (naming the file, the layer and both).
    """
    model = copy.deepcopy(task.model).eval()
    embeddings = names_embeddings(task, plan)
    excluded = excluded_layers(model, excludes(plan), embeddings)  # float, as in the run
    model.mixq_excluded = tuple(excluded)
    qmodel = wrap(model, skip=excluded, embeddings=embeddings)
    infos = cost.probe(qmodel, task.calib[0], task.forward)
    layers = meta.get("layers") or {}
    tied = tied_sites(qmodel)  # an embedding tied to a layer is stored as that layer's weight
    specs = []
    for info in infos:
        m = layers.get(info.name)
        if m is None and tied.get(info.name) in layers:
            specs.append(plan.layers.get(info.name, FLOAT))  # the leader's weight spec (wrap.tie_plan)
            continue
        if m is None:
            raise ValueError(f"{path} has no layer {info.name!r} of the task's model")
        if tuple(m["shape"]) != tuple(info.weight_shape):
            raise ValueError(
                f"{path}: layer {info.name!r} has shape {m['shape']}, the model's {info.weight_shape}"
            )
        spec = LayerSpec(
            QSpec.from_dict(m["weight"]) if m["weight"] is not None else None,
            QSpec.from_dict(m["act"]) if m["act"] is not None else None,
        )
        planned = plan.layers.get(info.name, FLOAT)
        if spec != planned:
            raise ValueError(
                f"{path}: layer {info.name!r} holds {spec.name}, the run's plan says {planned.name}"
            )
        specs.append(spec)
    sizes = cost.metrics_of(cost.model_costs(qmodel, infos), specs, adds_spec(plan))
    return {k: sizes[k] for k in ("avg_weight_bits", "size_bytes", "size_ratio", "bops") if k in sizes}


def _rebuilt(metrics: dict[str, Any], value: float, recorded: Any) -> Any:
    """The run's metrics with the rebuilt model's metric, and the recorded one beside it."""
    return Metrics.from_dict({**metrics, "metric": value, "recorded_metric": recorded})


def _candidates(metrics: dict[str, Any]) -> list[Any]:
    """The run's candidate specs (they decide what calibration collects, as in the run)."""
    cands = metrics.get("candidates") or []
    if not isinstance(cands, list):
        raise ValueError(f"metrics.json 'candidates' must be a list of names, got {cands!r}")
    return [as_layer_spec(c) for c in cands]
