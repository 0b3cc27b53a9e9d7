"""Multipoint PTQ vs per-channel PTQ vs mixed precision at the same size, on the real models.

For each task and weight bit-width b (weights only; activations float):

* ``uniform``: per-channel PTQ at b bits, min/max ranges (``w{b}``) and MSE-searched ranges
  (``w{b}+mse``);
* ``multipoint``: on top of ``w{b}``, extra points for ``ratio`` of each layer's output channels
  with the greedy least-squares step a and with a = max|r| (``absmax``; at ratio 0 it is exactly
  ``w{b}``), channel variant, and the layer variant at one ratio;
* ``sensitivity-ilp``: mixed precision over ``w{b}, w{b+1}, w{b+2}`` (``--ilp-quant``: min/max or
  MSE ranges) with the
  budget ``avg_weight_bits`` equal to what each multipoint run used (points and steps counted),
  i.e. at the same total weight bits.

Results merge into bench/results/multipoint.json by (task, bits), so tasks can run as separate
commands (each under ~15 minutes on one thread)::

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.multipoint --tasks mnist-cnn --bits 3,4
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import mixq
from bench.common import RESULTS, provenance, write
from mixq import tasks

# Validation subsets keep each command under ~15 minutes on one busy thread (recorded per task).
VAL = {"mnist-cnn": 2_000, "fashion-resnet20": 2_000, "fashion-mobilenetv2": 2_000, "minilm": 256}


def row(label: str, res: mixq.Result) -> dict[str, Any]:
    """The numbers of one run."""
    m = res.metrics
    pts = [s.weight.points for s in res.plan.layers.values() if s.weight is not None and s.weight.points]
    points = sum(sum(p) for p in pts)
    channels = sum(len(p) for p in pts)
    out = {
        "label": label,
        "method": m.method,
        "candidates": m.candidates,
        "budget": m.budget,
        "method_args": {k: v for k, v in m.method_args.items() if v is not None},
        "metric": m.metric,
        "avg_weight_bits": m.avg_weight_bits,
        "size_bytes": m.size_bytes,
        "bops": m.bops,
        "avg_points": points / channels if channels else 1.0,
        "plan": res.plan.summary() if not pts else None,
        "seconds": m.seconds,
        "eval_seconds": m.eval_seconds,
    }
    print(
        f"  {label:32s} {m.metric:.4f} bits={m.avg_weight_bits:.4f} points={out['avg_points']:.3f} "
        f"t={m.seconds:.1f}+{m.eval_seconds:.1f}s",
        flush=True,
    )
    return out


def bench_bits(task: tasks.Task, bits: int, args: argparse.Namespace, cache: mixq.Cache) -> dict:
    """All runs of one task at one bit-width (``cache``: the task's, shared by its runs)."""
    run = functools.partial(mixq.run, cache=cache)
    ratios = [float(r) for r in args.ratios.split(",")]
    layer_ratio, ilp_batches, gram = args.layer_ratio, args.ilp_batches, args.gram_batches
    rows = [
        row(f"uniform w{bits}", run(task, "uniform", [f"w{bits}"])),
        row(f"uniform w{bits}+mse", run(task, "uniform", [f"w{bits}+mse"])),
    ]
    mp_rows = []
    for a_search in args.a_search.split(","):
        for r in ratios:
            if a_search == "absmax" and r == 0:
                continue  # one absmax point per channel is exactly ``uniform w{bits}``
            margs = {"ratio": r, "a_search": a_search, "gram_batches": gram}
            res = run(task, "multipoint", [f"w{bits}"], method_args=margs)
            mp_rows.append(row(f"multipoint {a_search} ratio={r:g}", res))
    rows += mp_rows
    if layer_ratio >= 0:  # the per-layer variant and its per-layer (per-tensor) baseline
        rows.append(
            row(
                f"multipoint layer ratio={layer_ratio:g}",
                run(
                    task,
                    "multipoint",
                    [f"w{bits}"],
                    method_args={"ratio": layer_ratio, "variant": "layer", "gram_batches": gram},
                ),
            )
        )
        rows.append(row(f"uniform w{bits}+tensor", run(task, "uniform", [f"w{bits}+tensor"])))
    cands = [f"w{b}" + ("+mse" if args.ilp_quant == "mse" else "") for b in (bits, bits + 1, bits + 2)]
    with tempfile.TemporaryDirectory() as d:  # one store: the sensitivity is measured once
        for mpr in mp_rows:
            if mpr["method_args"]["ratio"] == 0:
                continue
            budget = {"avg_weight_bits": mpr["avg_weight_bits"]}
            res = run(
                task,
                "sensitivity-ilp",
                cands,
                budget=budget,
                out=d,
                overwrite=True,  # the last budget's run; its store is kept (jobs keyed per job)
                method_args={"batches": ilp_batches},
            )
            rows.append(row(f"sensitivity-ilp @ {mpr['label']}", res))
    return {"rows": rows, "summary": summarize(rows, bits)}


def summarize(rows: list[dict], bits: int) -> dict[str, Any]:
    """Differences in the metric against the baselines, per multipoint run."""
    by = {r["label"]: r for r in rows}
    base, mse = by[f"uniform w{bits}"], by[f"uniform w{bits}+mse"]
    out = {}
    for r in rows:
        if r["method"] != "multipoint":
            continue
        ilp = by.get(f"sensitivity-ilp @ {r['label']}")
        out[r["label"]] = {
            "avg_weight_bits": r["avg_weight_bits"],
            "bits_overhead_vs_uniform": r["avg_weight_bits"] - base["avg_weight_bits"],
            "metric_minus_uniform_minmax": r["metric"] - base["metric"],
            "metric_minus_uniform_mse": r["metric"] - mse["metric"],
            "metric_minus_ilp_same_bits": None if ilp is None else r["metric"] - ilp["metric"],
        }
    return out


def load(path: Path) -> dict[str, Any]:
    """The tasks already in the results file."""
    return json.loads(path.read_text()).get("tasks", {}) if path.exists() else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="mnist-cnn")
    ap.add_argument("--bits", default="3,4")
    ap.add_argument("--ratios", default="0,0.05,0.25")
    ap.add_argument("--layer-ratio", type=float, default=0.05, help="ratio of the layer variant (<0: skip)")
    ap.add_argument("--val", type=int, default=0, help="validation examples (0: the VAL default per task)")
    ap.add_argument("--ilp-batches", type=int, default=0, help="sensitivity calibration batches (0: all)")
    ap.add_argument("--gram-batches", type=int, default=1, help="multipoint Gram batches (0: all)")
    ap.add_argument("--ilp-quant", default="minmax", choices=("minmax", "mse"), help="ILP candidates' ranges")
    ap.add_argument("--a-search", default="greedy,absmax", help="multipoint step searches to run")
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = RESULTS / "multipoint.json"
    for name in args.tasks.split(","):
        t0 = time.perf_counter()
        val = args.val or VAL[name]
        task = tasks.get(name, val_size=val)
        entry = load(path).get(name, {"metric_name": task.metric_name, "bits": {}})
        entry.update({"fp32": task.fp_metric(), "val_examples": val, "info": task.info})
        cache = mixq.Cache()  # the task prepared once for all its bit-widths and runs
        for bits in [int(b) for b in args.bits.split(",")]:
            print(f"{name} w{bits} (val {val})", flush=True)
            tb = time.perf_counter()
            res = bench_bits(task, bits, args, cache)
            res["wall_seconds"] = time.perf_counter() - tb
            res["provenance"] = provenance()
            entry["bits"][str(bits)] = res
            results = load(path)  # re-read: other commands may have added tasks or bit-widths meanwhile
            entry["bits"] = {**results.get(name, {}).get("bits", {}), **entry["bits"]}
            results[name] = entry
            write("multipoint", {"tasks": results, "notes": NOTES})  # after every bit-width
        print(f"{name}: {time.perf_counter() - t0:.0f}s", flush=True)
    print(f"wrote {path}")


NOTES = (
    "Weights only (activations float). Multipoint steps are float32 and counted in avg_weight_bits "
    "(every point's codes and every step); sensitivity-ilp runs at the avg_weight_bits each multipoint "
    "run used. Validation subsets: the first val_examples of each task's usual validation set."
)

if __name__ == "__main__":
    main()
