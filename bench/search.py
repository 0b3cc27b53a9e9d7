"""Search under budgets: uniform, hawq, sensitivity-ilp and greedy against the exhaustive optimum.

* mnist-cnn: weight candidates w2/w3/w4/w8 per channel (asymmetric, output-MSE ranges),
  activations float, average weight bits 2.5/3/3.5/4. The model has 5 layers, so all 4^5
  plans are evaluated on the 10,000 test images (bench/exhaustive.py) and each method's
  accuracy is set beside the best plan within the same budget.
* minilm: weight-only candidates w2/w3/w4/w8 (+asym+mse), per channel and in groups of 128,
  average weight bits 3/4/5; metric mean cosine to fp32.

Each (task, candidate set, method) shares one run directory (runs/bench-search/) across its
budgets, so measured sensitivities and Hessian traces are computed once (the SQLite store)
and later budgets only solve and evaluate: ``seconds`` of the first budget includes the
sensitivity unless ``sensitivity_from_earlier_run`` says a previous run had stored it
(``--fresh`` recomputes).

    .venv/bin/python -m bench.search [--tasks mnist-cnn,minilm]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

import mixq
from bench.common import RESULTS, write
from bench.exhaustive import best_by_budget, enumerate_plans

RUNS = Path(__file__).resolve().parent.parent / "runs" / "bench-search"
METHODS: dict[str, tuple[str, dict[str, Any]]] = {  # label -> (method, method_args)
    "uniform": ("uniform", {}),
    "hawq": ("hawq", {}),
    "sensitivity-ilp": ("sensitivity-ilp", {}),
    "greedy": ("sensitivity-ilp", {"solver": "greedy"}),
}
SUITES: dict[str, dict[str, Any]] = {
    "mnist-cnn": {
        "sets": {"ch": [f"w{b}+asym+omse" for b in (2, 3, 4, 8)]},
        "budgets": [2.5, 3.0, 3.5, 4.0],
        "args": {},
        "exhaustive": True,
    },
    "minilm": {
        # Weight-space MSE ranges: the output-error search (omse) is the better quantizer on
        # MiniLM (bench/results/uniform.json) but takes minutes per candidate on 2 cores.
        "sets": {
            "ch": [f"w{b}+asym+mse" for b in (2, 3, 4, 8)],
            "g128": [f"w{b}g128+asym+mse" for b in (2, 3, 4, 8)],
        },
        "budgets": [3.0, 4.0, 5.0],
        # 36 transformer layers on 2 cores: measured sensitivities on 1 of the 4 calibration
        # batches (64 sentences); Hessian traces on 2 batches with 16 whole-model vectors each
        # (the joint estimator: one Hessian-vector product per vector instead of one per layer
        # and vector); the metric on the first 256 validation sentences.
        "val": 256,
        "args": {
            "hawq": {"batches": 2, "hutchinson_samples": 16, "hutchinson_mode": "joint"},
            "sensitivity-ilp": {"batches": 1},
            "greedy": {"batches": 1},
        },
        "exhaustive": False,
    },
}


def run_set(
    task: mixq.Task,
    label: str,
    cands: list[str],
    budgets: list[float],
    args: dict,
    fresh: bool,
    cache: mixq.Cache,
) -> list[dict]:
    """Run every method at every budget on one candidate set (``cache``: the task's, shared by its runs)."""
    rows = []
    for name, (method, margs) in METHODS.items():
        out = RUNS / task.name / label / method  # greedy shares sensitivity-ilp's store
        if fresh:  # a fresh store: the first budget pays the sensitivity
            shutil.rmtree(out, ignore_errors=True)
        reused = (out / "store.sqlite").exists()
        for b in budgets:
            res = mixq.run(
                task,
                method=method,
                candidates=cands,
                budget={"avg_weight_bits": b},
                method_args={**margs, **args.get(name, {})},
                out=out,
                overwrite=True,  # the last budget's run; its store is kept (jobs keyed per job)
                cache=cache,
            )
            m = res.metrics
            hist = m.history[0] if m.history and "solve_seconds" in m.history[0] else {}
            row = {
                "set": label,
                "method": name,
                "budget": b,
                "metric": m.metric,
                "avg_weight_bits": m.avg_weight_bits,
                "size_bytes": m.size_bytes,
                "within_budget": m.within["avg_weight_bits"],
                "seconds": m.seconds,
                "solve_seconds": hist.get("solve_seconds"),
                "solver_status": hist.get("status"),
                "plan": {k: v.name for k, v in res.plan.layers.items()},
                "sensitivity_from_earlier_run": reused,
            }
            rows.append(row)
            print(
                f"{task.name:9s} {label:5s} {name:16s} b={b:<4} {m.metric:.4f} "
                f"bits={m.avg_weight_bits:.3f} t={m.seconds:.1f}s",
                flush=True,
            )
    return rows


def summarize(rows: list[dict], best: dict[float, dict] | None, budgets: list[float]) -> list[dict]:
    """Per budget: each method's metric, the best method, and its gap to the exhaustive optimum."""
    out = []
    for b in budgets:
        at = {r["method"]: r["metric"] for r in rows if r["budget"] == b}
        top = max(at, key=at.get)
        entry = {"budget": b, "methods": at, "best_method": top, "best_metric": at[top]}
        if best is not None:
            entry["exhaustive"] = best[b]["metric"]
            entry["exhaustive_bits"] = best[b]["avg_weight_bits"]
            entry["gap_best_method"] = best[b]["metric"] - at[top]
        out.append(entry)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="mnist-cnn,minilm")
    ap.add_argument("--fresh", action="store_true", help="recompute sensitivities stored by earlier runs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = RESULTS / "search.json"
    results = json.loads(path.read_text())["tasks"] if path.exists() else {}
    for task_name in args.tasks.split(","):
        suite = SUITES[task_name]
        t0 = time.perf_counter()
        task = mixq.tasks.get(task_name, val_size=suite.get("val"))
        entry: dict[str, Any] = {
            "metric_name": task.metric_name,
            "fp32": task.fp_metric(),
            "info": task.info,
            "budgets": suite["budgets"],
            "method_args": suite["args"],
            "sets": {},
        }
        cache = mixq.Cache()  # the task prepared once for all its sets and methods
        for label, cands in suite["sets"].items():
            rows = run_set(task, label, cands, suite["budgets"], suite["args"], args.fresh, cache)
            best = None
            if suite["exhaustive"]:
                table = enumerate_plans(task_name, cands)
                best = best_by_budget(task_name, cands, suite["budgets"])
                entry["exhaustive_seconds"] = table["seconds"]
                entry["exhaustive_plans"] = table["plans"]
            entry["sets"][label] = {
                "candidates": cands,
                "rows": rows,
                "summary": summarize(rows, best, suite["budgets"]),
                "exhaustive": {str(b): v for b, v in best.items()} if best else None,
            }
            results[task_name] = {**entry, "complete": False}
            write("search", {"tasks": results})  # after each set: an interrupted run keeps it
        entry["wall_seconds"] = time.perf_counter() - t0
        results[task_name] = {**entry, "complete": True}
        write("search", {"tasks": results})  # after each task: an interrupted run keeps what finished
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
