"""The mixq side of a peer row: charge and re-measure a peer result with mixq.

The peer's plan is counted by mixq's cost model and applied with mixq's quantizers, and mixq's own
search (and methods, PTQ steps) run under the peer's mixq-counted size.
"""

from __future__ import annotations

import re
import time
from typing import Any

import torch

from bench.common import ROOT
from bench.peers.jobs import PEERS, Job
from bench.peers.translate import to_candidate, to_plan

_TASKS: dict[tuple[str, int], Any] = {}
_CACHE: dict[str, Any] = {}  # the last task measured and its mixq.Cache


def get_task(name: str, val: int) -> Any:
    """Build (once) mixq's task, with the same validation subset as the drivers."""
    from mixq import tasks

    if (name, val) not in _TASKS:
        _TASKS.clear()
        torch.manual_seed(0)
        _TASKS[name, val] = tasks.get(name, val_size=val or None)
    return _TASKS[name, val]


def cache_of(task: Any) -> Any:
    """The ``mixq.Cache`` shared by the evaluations and searches of ``task`` (the last task's only)."""
    import mixq

    if _CACHE.get("task") is not task:
        _CACHE.update(task=task, cache=mixq.Cache())
    return _CACHE["cache"]


def evaluate(task: Any, plan: Any) -> dict[str, Any]:
    """Apply a plan with mixq's quantizers (``mixq.evaluate``): the metric, mixq's cost counts, seconds."""
    import mixq

    t0 = time.perf_counter()
    m = mixq.evaluate(task, plan, cache_of(task)).metrics
    return {
        "metric": m.metric,
        "avg_weight_bits": m.avg_weight_bits,
        "size_bytes": m.size_bytes,
        "size_ratio": m.size_ratio,
        "bops": m.bops,
        "seconds": time.perf_counter() - t0,
    }


def mixq_search(
    task: Any,
    candidates: list[str],
    size_bytes: float,
    ptq: list[str] | None = None,
    ptq_args: dict[str, dict[str, Any]] | None = None,
    method: str = "sensitivity-ilp",
    method_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """mixq's ``method`` (default sensitivity-ilp) with ``candidates``, under the peer's mixq-counted size.

    The run directory (``runs/peers/<task>/<candidates>``, git-ignored) keeps the result store, so
    the measured sensitivity is computed once per task and candidate set, not once per budget.
    ``ptq``: mixq's PTQ steps applied to the plan found (a run directory of its own).
    """
    import mixq

    if method_args is None:
        method_args = {"batches": 1} if task.name == "minilm" else {}
    name = (f"{method}:" if method != "sensitivity-ilp" else "") + ",".join(candidates)
    name += f"+ptq={','.join(ptq)}" if ptq else ""
    out = ROOT / "runs" / "peers" / task.name / re.sub(r"[^A-Za-z0-9_.+=-]+", "_", name)
    budget = {"size_bytes": size_bytes * (1 + 1e-9)}
    res = mixq.run(
        task,
        method=method,
        candidates=candidates,
        ptq=ptq,
        ptq_args=ptq_args,
        budget=budget,
        method_args=method_args,
        out=out,
        cache=cache_of(task),
    )
    m = res.metrics
    return {
        "metric": m.metric,
        "avg_weight_bits": m.avg_weight_bits,
        "size_bytes": m.size_bytes,
        "seconds": m.seconds,
        "plan": res.plan.summary(),
        "candidates": candidates,
        "method": method,
        "method_args": method_args,
        "ptq": ptq or [],
        **({"ptq_args": ptq_args} if ptq_args else {}),
        "run_dir": str(out.relative_to(ROOT)),
    }


def process(job: Job, res: dict[str, Any], val: int, search: bool) -> dict[str, Any]:
    """Charge and re-measure one peer result with mixq."""
    row: dict[str, Any] = {
        "tool": job.tool,
        "task": job.task,
        "budget": job.budget,
        "settings": job.settings,
        "knob": PEERS[job.tool].knob,
        "val_items": val or None,
    }
    keep = (
        "ok",
        "error",
        "version",
        "metric",
        "metric_name",
        "fp_metric",
        "tool_bits",
        "tool_bits_name",
        "search_seconds",
        "driver_seconds",
        "wall_seconds",
        "eval_seconds",
        "tool_settings",
        "recipe",
        "log_tail",
        "pick",
        "pareto",
        "note",
    )
    row.update({f"tool_{k}" if k in ("metric", "version") else k: res[k] for k in keep if k in res})
    if not res.get("ok"):
        return row
    task = get_task(job.task, val)
    row["layers"] = {n: d.get("tool_format", "") for n, d in res["layers"].items()}
    for grid in ("same", "mixq"):
        plan = to_plan(res["layers"], grid)
        row[f"plan_{grid}"] = {n: to_candidate(d, grid) for n, d in res["layers"].items()}
        row[f"mixq_{grid}"] = evaluate(task, plan)
    row["val_items"] = sum(
        len(b[1]) if isinstance(b, (tuple, list)) else len(b["input_ids"]) for b in task.val
    )
    if search:
        cands = sorted({c for c in row["plan_same"].values()})
        row["mixq_search"] = mixq_search(task, cands, row["mixq_same"]["size_bytes"])
        own_grid(row, task)
    return row


def own_grid(row: dict[str, Any], task: Any) -> None:
    """mixq at its best at the peer's size: its search over the peer's bit widths on mixq's own
    ``+asym+omse`` weights (zero points charged), under the peer's mixq-counted size."""
    from mixq.cost import InfeasibleBudgetError

    cands = sorted({c for c in row["plan_mixq"].values() if c != "float"})
    try:
        row["mixq_search_mixq"] = mixq_search(task, cands, row["mixq_same"]["size_bytes"])
    except InfeasibleBudgetError as e:  # zero points make the peer's plan itself too large
        row["mixq_search_mixq"] = {"infeasible": str(e), "candidates": cands}


# The tools calibrate beyond range setting: MCT corrects every layer's bias by default
# (weights_bias_correction), AIMET's and NNCF's pipelines offer it too. mixq's counterpart.
# ``--ptq-steps cle,bias_correction,adaround`` runs mixq's whole PTQ pipeline instead (AdaRound with
# ADAROUND_ITERS steps per layer, the setting of bench/ptq.py's grid).
PTQ_STEPS = ["bias_correction"]
ADAROUND_ITERS = 500


def ptq_args_for(steps: list[str], adaround_iters: int = ADAROUND_ITERS) -> dict[str, dict[str, Any]]:
    return {"adaround": {"iters": adaround_iters}} if "adaround" in steps else {}


def own_grid_ptq(
    row: dict[str, Any], task: Any, steps: list[str] | None = None, adaround_iters: int = ADAROUND_ITERS
) -> None:
    """``own_grid`` plus mixq's PTQ ``steps`` on the plan found (default: bias correction, as MCT's
    default pipeline does). An earlier result with other steps is kept in ``..._ptq_earlier``."""
    from mixq.cost import InfeasibleBudgetError

    steps = list(steps or PTQ_STEPS)
    cands = sorted({c for c in row["plan_mixq"].values() if c != "float"})
    if "mixq_search_mixq_ptq" in row:
        row.setdefault("mixq_search_mixq_ptq_earlier", []).append(row.pop("mixq_search_mixq_ptq"))
    args = ptq_args_for(steps, adaround_iters)
    try:
        row["mixq_search_mixq_ptq"] = mixq_search(task, cands, row["mixq_same"]["size_bytes"], steps, args)
    except InfeasibleBudgetError as e:
        row["mixq_search_mixq_ptq"] = {"infeasible": str(e), "candidates": cands, "ptq": steps}


def methods_label(method: str, steps: list[str]) -> str:
    return method + "".join(f"+{x}" for x in steps)


def own_methods(
    row: dict[str, Any],
    task: Any,
    methods: list[str],
    steps: list[str] | None = None,
    adaround_iters: int = ADAROUND_ITERS,
    candidates: list[str] | None = None,
) -> None:
    """mixq's own methods at the peer's mixq-counted size, on the row's validation items: each of
    ``methods`` with the candidates and settings of mixq's sweep (bench/run_all.py) for the task
    (or ``candidates``), then the PTQ ``steps``. Results go to ``row["mixq_methods"][label]``."""
    from bench.run_all import METHOD_ARGS, candidates_of
    from mixq.cost import InfeasibleBudgetError

    steps = list(steps or [])
    args = ptq_args_for(steps, adaround_iters)
    for method in methods:
        cands = list(candidates) if candidates else candidates_of(row["task"], method)
        margs = METHOD_ARGS.get((method, row["task"]), {})
        size = row["mixq_same"]["size_bytes"]
        try:
            got = mixq_search(task, cands, size, steps or None, args or None, method, margs)
        except InfeasibleBudgetError as e:
            got = {"infeasible": str(e), "candidates": cands, "method": method, "ptq": steps}
        row.setdefault("mixq_methods", {})[methods_label(method, steps)] = got
