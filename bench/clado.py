"""CLADO against cross-layer-unaware methods on the real CNNs, over a sweep of size budgets.

For each task and candidate set (weights {2, 4, 8} or {2, 3, 4, 8} bits, asymmetric, output-MSE
ranges; activations 8-bit) every method shares one wrapped, calibrated model, one sensitivity
set and the same quantizers:

* clado (unprojected G), clado-psd (G's PSD projection), clado-naive (diagonal only), all on
  the KL-to-float loss; on mnist-cnn also on the task loss (cross-entropy);
* sensitivity-ilp (the real method through ``mixq.run``, one run per budget: measured
  single-layer change of its default objective, the KL to the float outputs on classifiers,
  on its own ``--ilp-batches`` calibration batches; its jobs are stored, so later budgets
  reuse them), hawq (Hessian trace, traces stored per task), uniform;
* on mnist-cnn, the exhaustive optimum of the same quantizers (bench/exhaustive.py).

Each budget is solved by `mixq.search.ilp` (warm-started from the next tighter budget) and
its plan evaluated on validation data. The pair cost is the mean CPU time of one pair loss
evaluation over the CPU time of one full float forward and loss on the same batch, both in
this process with one thread (CPU time, not wall-clock: other processes on a shared machine
slow wall-clock timings unevenly); wall-clock fractions are recorded too. Results are merged
into bench/results/clado.json per task and candidate set, so the tasks can run one by one:

    .venv/bin/python -m bench.clado --tasks mnist-cnn --sets 248,2348 --hutchinson 16
    .venv/bin/python -m bench.clado --tasks fashion-resnet20 --sets 248 --sens-images 64 --val-images 2000 \
        --ilp-batches 1 --hutchinson 16           # --time-limit 20 for {2,3,4,8} and fashion-mobilenetv2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mixq
from bench.common import RESULTS, provenance, write
from mixq import cost, search, sensitivity
from mixq.api import prepare
from mixq.methods import clado, uniform
from mixq.methods.common import Context
from mixq.plan import as_layer_spec
from mixq.store import Store
from mixq.wrap import applied, current_plan

SETS = {"248": (2, 4, 8), "2348": (2, 3, 4, 8)}
BUDGETS = {"248": [2.5, 3.0, 3.5, 4.0, 5.0, 6.0], "2348": [2.5, 3.0, 3.5, 4.0, 5.0, 6.0]}


def candidates(bits: tuple[int, ...]) -> list[str]:
    """The candidate names: asymmetric output-MSE weights at each width, 8-bit activations."""
    return [f"w{b}+asym+omse-a8" for b in bits]


def sub_batches(batches: list, images: int) -> list:
    """The first ``images`` images of the batches, in batches no larger than the originals."""
    out, left = [], images
    for x, y in batches:
        if left <= 0:
            break
        out.append((x[:left], y[:left]))
        left -= len(y[:left])
    return out


def forward_seconds(ctx: Context, batch: Any, repeats: int = 7) -> tuple[float, float]:
    """Median (CPU, wall-clock) seconds of one full float forward pass and loss on ``batch``."""
    cpu, wall = [], []
    with applied(ctx.qmodel, {}), torch.inference_mode():
        ctx.task.loss(ctx.qmodel, batch)
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            ctx.task.loss(ctx.qmodel, batch)
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - t0)
    return statistics.median(cpu), statistics.median(wall)


def run_sensitivity_ilp(
    task: mixq.Task,
    cands: list[str],
    layers: list[str],
    budgets: list[float],
    table: dict | None,
    args: argparse.Namespace,
    out: Path,
    cache: mixq.Cache,
) -> tuple[list[dict[str, Any]], float]:
    """The real ``sensitivity-ilp`` method through ``mixq.run`` at every budget.

    Returns the rows and the seconds of the first run (sensitivity and solve; later runs reuse
    the stored sensitivity jobs). With an exhaustive ``table`` (the same quantizers and
    validation images) the first run evaluates its plan directly and is checked against the
    table; later runs read their plan's metric from the table (``metric_from``). ``cache``: the
    task's, shared with the other runs.
    """
    rows, first = [], None
    method_args = {"batches": args.ilp_batches, "time_limit": args.time_limit}
    lookup = None
    if table is not None:

        def lookup(model: torch.nn.Module, batches: Any) -> float:
            plan = current_plan(model).layers
            return evaluate_table(table, len(cands), [cands.index(plan[n].name) for n in layers])

    for b in budgets:
        run_task = task if lookup is None or not rows else dataclasses.replace(task, metric=lookup)
        try:
            res = mixq.run(
                run_task,
                "sensitivity-ilp",
                cands,
                {"avg_weight_bits": b},
                method_args=method_args,
                out=out,
                overwrite=True,  # the last budget's run; its store is kept (jobs keyed per job)
                cache=cache,
            )
        except ValueError as e:  # an infeasible budget
            print(f"sensitivity-ilp {b}: {e}", flush=True)
            continue
        if first is None:
            first = res.metrics.seconds
        info = res.history[0]
        choices = [cands.index(res.plan.layers[n].name) for n in layers]
        row = {
            "method": "sensitivity-ilp",
            "budget": b,
            "choices": choices,
            "metric": res.metrics.metric,
            "avg_weight_bits": res.metrics.avg_weight_bits,
            "status": info["status"],
            "gap": info["gap"],
            "solve_seconds": info["solve_seconds"],
            "objective": info["objective"],
            "via": "mixq.run",
            "method_args": method_args,
            "metric_from": "direct" if run_task is task else "exhaustive table",
        }
        if table is not None:
            row["table_metric"] = evaluate_table(table, len(cands), choices)
        rows.append(row)
    return rows, first if first is not None else float("nan")


def evaluate_table(table: dict, n_cands: int, choices: list[int]) -> float:
    """The exhaustive table's metric of a plan."""
    index = 0
    for c in choices:
        index = index * n_cands + c
    return table["metric"][index]


def evaluate(ctx: Context, choices: list[int], cache: dict, table: dict | None) -> float:
    """Metric of a plan on the validation batches (from the exhaustive table when given)."""
    key = tuple(choices)
    if key not in cache:
        if table is not None:
            index = 0
            for c in choices:
                index = index * len(ctx.candidates) + c
            cache[key] = table["metric"][index]
        else:
            with applied(ctx.qmodel, ctx.plan_of(choices)):
                ctx.qmodel.eval()
                cache[key] = float(ctx.task.metric(ctx.qmodel, ctx.task.val))
    return cache[key]


def warm_start_study(prob: search.Problem, limits: list[float], time_limit: float) -> dict[str, Any]:
    """Time a budget sweep three ways: cold, warm (previous plan as incumbent), objective cutoff.

    ``scipy.optimize.milp`` takes no starting point; the cutoff variant adds the row
    ``objective ≤ f(previous plan)`` (valid: the previous plan stays feasible) to each MILP.
    """
    import scipy.sparse as sp
    from scipy.optimize import LinearConstraint, milp

    from mixq.search.formulation import build

    out: dict[str, Any] = {"cold": [], "warm": [], "cutoff": []}
    previous = None
    for limit in sorted(limits):
        sub = search.Problem(prob.scores, prob.costs, {"weight_bits": limit}, prob.pairs)
        try:
            cold = search.ilp(sub, time_limit=time_limit)
        except search.InfeasibleBudgetError:
            continue
        warm = search.ilp(sub, time_limit=time_limit, warm_start=previous)
        out["cold"].append({"seconds": cold.seconds, "status": cold.status, "objective": cold.objective})
        out["warm"].append({"seconds": warm.seconds, "status": warm.status, "objective": warm.objective})
        if previous is not None:
            form = build(sub)
            a = form.constraints.A
            rows = sp.vstack([a, sp.csr_array(form.c[None, :])]).tocsr()
            cut = sub.objective(previous) + 1e-9 * max(1.0, abs(sub.objective(previous)))
            lower, upper = np.append(form.constraints.lb, -np.inf), np.append(form.constraints.ub, cut)
            lc = LinearConstraint(rows, lower, upper)
            t0 = time.perf_counter()
            res = milp(
                form.c,
                integrality=form.integrality,
                bounds=form.bounds,
                constraints=lc,
                options={"mip_rel_gap": 0.0, "time_limit": time_limit},
            )
            out["cutoff"].append(
                {
                    "seconds": time.perf_counter() - t0,
                    "status": int(res.status),
                    "objective": float(res.fun) if res.fun is not None else None,
                }
            )
        previous = warm.choices
    for k in ("cold", "warm", "cutoff"):
        out[f"{k}_seconds_total"] = sum(r["seconds"] for r in out[k])
    return out


def run_set(task: mixq.Task, set_name: str, args: argparse.Namespace, cache: mixq.Cache) -> dict[str, Any]:
    """Every method at every budget for one candidate set (``cache``: the task's, shared by its runs)."""
    cands = candidates(SETS[set_name])
    specs = [as_layer_spec(c) for c in cands]
    t0 = time.perf_counter()
    qmodel, infos = prepare(task, specs, cache)
    mc = cost.model_costs(qmodel, infos)
    layers = [i.name for i in infos]
    sens_batches = sub_batches(list(task.calib), args.sens_images)
    ctx = Context(
        task=dataclasses.replace(task, calib=sens_batches),
        qmodel=qmodel,
        layers=layers,
        candidates=specs,
        costs=cost.cost_table(infos, specs),
        model_costs=mc,
        budget={},
        limits={},
        out=Path(args.store) / task.name / set_name,
    )
    prepare_seconds = time.perf_counter() - t0
    out: dict[str, Any] = {
        "candidates": cands,
        "layers": layers,
        "sens_images": args.sens_images,
        "sens_batches": [len(b[1]) for b in sens_batches],
        "calib_images": sum(len(b[1]) for b in task.calib),
        "hutchinson_samples": args.hutchinson,
        "ilp_batches": args.ilp_batches,
        "time_limit": args.time_limit,
        "threads": torch.get_num_threads(),
        "prepare_seconds": prepare_seconds,
    }

    # Sensitivities (each timed).
    sens: dict[str, sensitivity.Sensitivity] = {}
    times: dict[str, float] = {}
    losses = ["kl", "task"] if task.name == "mnist-cnn" else ["kl"]
    for loss in losses:
        t1 = time.perf_counter()
        sens[f"clado-{loss}"] = clado.measure(ctx, clado.Config(loss=loss))
        times[f"clado-{loss}"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    # The traces do not depend on the candidates: one store per task serves both sets.
    with Store(Path(args.store) / task.name / "store-hawq.sqlite") as store:
        sens["hawq"] = sensitivity.hawq(
            qmodel, ctx.task, layers, specs, n_samples=args.hutchinson, store=store
        )
    times["hawq"] = time.perf_counter() - t1
    meta = sens["clado-kl"].meta
    full_cpu, full_wall = forward_seconds(ctx, sens_batches[0])
    n_batches = len(sens_batches)
    all_evals = meta["pair_evals"] + meta["row_evals"] * n_batches
    out["pair_cost"] = {
        "full_forward_cpu_seconds": full_cpu,
        "full_forward_seconds": full_wall,
        "batch_images": len(sens_batches[0][1]),
        "pair_evals": meta["pair_evals"],
        "pair_cpu_seconds": meta["pair_cpu_seconds"],
        "pair_seconds": meta["pair_seconds"],
        "fraction_per_pair": meta["pair_cpu_seconds"] / meta["pair_evals"] / full_cpu,
        "fraction_amortized": meta["job_cpu_seconds"] / all_evals / full_cpu,
        "fraction_per_pair_wall": meta["pair_seconds"] / meta["pair_evals"] / full_wall,
        "reuse": meta["reuse"],
        "copy_replays": meta.get("copy_replays"),
        "note": "fraction = mean CPU time of one pair loss evaluation / CPU time of one full float "
        "forward+loss on the same batch (median of 7), one thread; amortized includes the (l, s) passes "
        "that record the reused prefixes; *_wall: the same with wall-clock time, disturbed by the "
        "other processes of a shared machine",
    }
    out["sensitivity_seconds"] = times

    # Problems.
    problems: dict[str, search.Problem] = {}
    for loss in losses:
        s = sens[f"clado-{loss}"]
        suffix = "" if loss == "kl" else "-ce"
        problems[f"clado{suffix}"] = clado.problem(ctx, s, "clado", psd=False)
        problems[f"clado-psd{suffix}"] = clado.problem(ctx, s, "clado", psd=True)
        problems[f"clado-naive{suffix}"] = clado.problem(ctx, s, "naive", psd=False)
    problems["hawq"] = search.Problem(sens["hawq"].single.double(), {}, {})

    table = None
    if task.name == "mnist-cnn":
        from bench import exhaustive

        table = exhaustive.enumerate_plans(task.name, cands)
        best = exhaustive.best_by_budget(task.name, cands, BUDGETS[set_name])
        out["exhaustive"] = {str(b): v for b, v in best.items()}
        out["exhaustive_seconds"] = table["seconds"]
    cache: dict = {}
    if table is not None:  # the table is the same quantizers: check one plan against mixq itself
        probe = [len(specs) - 1] + [0] * (len(layers) - 1)
        direct = evaluate(ctx, probe, {}, None)
        out["exhaustive_check"] = {"choices": probe, "table": evaluate(ctx, probe, {}, table), "mixq": direct}

    budgets = BUDGETS[set_name]
    t1 = time.perf_counter()
    ilp_rows, times["sensitivity-ilp"] = run_sensitivity_ilp(
        task, cands, layers, budgets, table, args, ctx.out / "sensitivity-ilp", cache
    )
    out["sensitivity_ilp_seconds_all_budgets"] = time.perf_counter() - t1
    print(
        f"{task.name} {set_name} sensitivity-ilp: "
        + " ".join(f"{r['budget']}:{r['metric']:.2f}" for r in ilp_rows),
        flush=True,
    )
    limits = [cost.to_limit(mc, "avg_weight_bits", b) for b in budgets]
    wb = {"weight_bits": ctx.costs["weight_bits"]}
    rows = []
    cfg = clado.Config(time_limit=args.time_limit)
    for name, prob in problems.items():
        base = search.Problem(prob.scores, wb, {}, prob.pairs)
        t1 = time.perf_counter()
        sols = clado.sweep(base, "weight_bits", limits, cfg)
        sweep_seconds = time.perf_counter() - t1
        for b, sol in zip(budgets, sols, strict=True):
            if sol is None:
                continue
            rows.append(
                {
                    "method": name,
                    "budget": b,
                    "choices": sol.choices,
                    "metric": evaluate(ctx, sol.choices, cache, table),
                    "avg_weight_bits": cost.from_limit(mc, "avg_weight_bits", sol.costs["weight_bits"]),
                    "status": sol.status,
                    "gap": sol.gap,
                    "solve_seconds": sol.seconds,
                    "objective": sol.objective,
                }
            )
        out.setdefault("sweep_seconds", {})[name] = sweep_seconds
        print(
            f"{task.name} {set_name} {name}: "
            + " ".join(f"{r['budget']}:{r['metric']:.2f}" for r in rows if r["method"] == name),
            flush=True,
        )
    if args.warm_study:
        clado_prob = problems["clado"]
        out["warm_start_study"] = warm_start_study(
            search.Problem(clado_prob.scores, wb, {}, clado_prob.pairs), limits, args.time_limit
        )
    for b, limit in zip(budgets, limits, strict=True):
        bctx = dataclasses.replace(ctx, budget={"avg_weight_bits": b}, limits={"weight_bits": limit})
        try:
            plan = uniform.search(bctx, uniform.Config()).plan
        except ValueError:
            continue
        choices = [cands.index(plan.layers[n].name) for n in layers]
        bits = cost.metrics_of(mc, [specs[c] for c in choices])["avg_weight_bits"]
        rows.append(
            {
                "method": "uniform",
                "budget": b,
                "choices": choices,
                "metric": evaluate(ctx, choices, cache, table),
                "avg_weight_bits": bits,
            }
        )
    out["rows"] = rows + ilp_rows
    out["seconds"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="mnist-cnn")
    ap.add_argument("--sets", default="248,2348")
    ap.add_argument("--sens-images", type=int, default=512, help="images of the sensitivity set")
    ap.add_argument("--val-images", type=int, default=0, help="validation images (0: all)")
    ap.add_argument("--hutchinson", type=int, default=32, help="Hutchinson samples per batch (hawq)")
    ap.add_argument(
        "--ilp-batches",
        type=int,
        default=0,
        help="calibration batches of sensitivity-ilp's own measurement (0: all)",
    )
    ap.add_argument("--time-limit", type=float, default=60.0, help="ILP seconds per budget")
    ap.add_argument("--warm-study", action="store_true", help="time cold, warm and cutoff sweeps")
    ap.add_argument("--store", default="/tmp/mixq-bench-clado", help="result stores (resumable)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = RESULTS / "clado.json"
    for task_name in args.tasks.split(","):
        task = mixq.tasks.get(task_name)
        if args.val_images:
            val = sub_batches(list(task.val), args.val_images)
            task = dataclasses.replace(task, val=val, _fp_metric=None)
        head = {
            "metric_name": task.metric_name,
            "fp32": task.fp_metric(),
            "info": task.info,
            "val_images": sum(len(b[1]) for b in task.val),
        }
        cache = mixq.Cache()  # the task prepared once for all its sets and runs
        for set_name in args.sets.split(","):
            result = run_set(task, set_name, args, cache)
            result["provenance"] = provenance()
            # Re-read right before writing: other tasks may run in parallel processes.
            results = json.loads(path.read_text())["tasks"] if path.exists() else {}
            entry = results.setdefault(task_name, {})
            entry.update(head)
            entry[set_name] = result
            write("clado", {"tasks": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
