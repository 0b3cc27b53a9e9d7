"""Multipoint PTQ vs per-channel PTQ on the same grid vs mixed precision at the same size.

For each task, weight bit-width b and range method r (``minmax``: ``w{b}``; ``mse``:
``w{b}+mse``; ``asym``: ``w{b}+asym``, asymmetric per channel), weights only (activations
float), on the task's full validation set (10,000 test images for the image tasks):

* ``uniform``: per-channel PTQ ``w{b}{r}`` (a);
* ``multipoint``: points on top of ``w{b}{r}`` (``base_method="uniform"``), ``ratio`` extra points
  per layer; its first point is the base quantizer itself, so a channel with one point is exactly
  ``w{b}{r}``; it uses B bits per weight (points and float32 steps counted);
* ``sensitivity-ilp``: mixed precision over ``w{b}{r}, w{b+1}{r}, w{b+2}{r}`` at
  ``avg_weight_bits = B`` (b), the same size;
* ``multipoint auto``: the same candidates and budget B, ``base_method="auto"`` (uniform or
  sensitivity-ilp at B less the points' bits, chosen by calibration loss; the choice recorded).

Every row carries the metric's standard error (accuracy: sqrt(p (1 − p) / N); minilm: the standard
deviation of the per-sentence cosine over sqrt(N)) and is written to bench/results/multipoint.json
as soon as it is measured, keyed ``task|w{b}{r}|label``; a rerun skips the rows already there::

    OMP_NUM_THREADS=1 python -m bench.multipoint --tasks mnist-cnn,fashion-resnet20 --bits 3,4
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import tempfile
import time
from typing import Any

import torch

import mixq
from bench.common import RESULTS, provenance, write
from mixq import tasks

PATH = RESULTS / "multipoint.json"
PROVENANCE: dict[str, Any] = {}


def std_error(task: tasks.Task, metric: float, n: int) -> float | None:
    """One standard error of the metric: binomial for an accuracy in %, else None."""
    if "top1" in task.metric_name or "acc" in task.metric_name:
        p = metric / 100.0
        return 100.0 * math.sqrt(max(p * (1 - p), 0.0) / n)
    return None


def row(label: str, res: mixq.Result, task: tasks.Task, n: int, wall: float) -> dict[str, Any]:
    """The numbers of one run."""
    m = res.metrics
    pts = [s.weight.points for s in res.plan.layers.values() if s.weight is not None and s.weight.points]
    points = sum(sum(p) for p in pts)
    channels = sum(len(p) for p in pts)
    meta = res.plan.meta.get("multipoint", {})
    out = {
        "label": label,
        "method": m.method,
        "candidates": m.candidates,
        "budget": m.budget,
        "method_args": {k: v for k, v in m.method_args.items() if v is not None},
        "metric": m.metric,
        "std_error": std_error(task, m.metric, n),
        "val_examples": n,
        "avg_weight_bits": m.avg_weight_bits,
        "size_bytes": m.size_bytes,
        "avg_points": points / channels if channels else 1.0,
        "base": meta.get("base"),
        "base_choice": meta.get("base_choice"),
        "plan": res.plan.summary() if not pts else None,
        "seconds": m.seconds,
        "eval_seconds": m.eval_seconds,
        "wall_seconds": wall,
        "provenance": PROVENANCE,  # of the command's start (the tree may move on while it runs)
    }
    se = out["std_error"]
    print(
        f"  {label:40s} {m.metric:.3f} ± {se if se is not None else float('nan'):.3f} "
        f"bits={m.avg_weight_bits:.4f} points={out['avg_points']:.3f} t={wall:.0f}s",
        flush=True,
    )
    return out


def load() -> dict[str, Any]:
    return json.loads(PATH.read_text()) if PATH.exists() else {}


def save(key: str, value: dict[str, Any], task_info: dict[str, Any]) -> None:
    """Add one row, re-reading the file under a lock (several commands may run at once)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "multipoint.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = load()
        rows = data.get("rows", {})
        rows[key] = value
        infos = {**data.get("tasks", {}), **task_info}
        write("multipoint", {"notes": NOTES, "tasks": infos, "rows": rows})


def bench_task(name: str, args: argparse.Namespace) -> None:
    task = tasks.get(name, val_size=args.val or None)
    n = sum(len(b[-1]) if isinstance(b, (tuple, list)) else 1 for b in task.val)
    info = {name: {"metric_name": task.metric_name, "fp32": task.fp_metric(), "val_examples": n}}
    cache = mixq.Cache()
    store = tempfile.mkdtemp(prefix=f"mixq-mp-{name}-")  # one store: sensitivities measured once

    def run(key: str, label: str, *a: Any, **kw: Any) -> dict[str, Any]:
        done = load().get("rows", {})
        if key in done:
            print(f"  {label:40s} (done)", flush=True)
            return done[key]
        t0 = time.perf_counter()
        res = mixq.run(task, *a, cache=cache, **kw)
        out = row(label, res, task, n, time.perf_counter() - t0)
        save(key, out, info)
        return out

    for bits in [int(b) for b in args.bits.split(",")]:
        for rng in args.ranges.split(","):
            suffix = "" if rng == "minmax" else f"+{rng}"
            grid = f"w{bits}{suffix}"
            pre = f"{name}|{grid}|"
            print(f"{name} {grid} (val {n})", flush=True)
            run(pre + "uniform", f"uniform {grid}", "uniform", [grid])
            margs = {"ratio": args.ratio, "base_method": "uniform", "gram_batches": args.gram_batches}
            mpr = run(
                pre + "multipoint",
                f"multipoint {grid} ratio={args.ratio:g}",
                "multipoint",
                [grid],
                method_args=margs,
            )
            cands = [f"w{b}{suffix}" for b in (bits, bits + 1, bits + 2)]
            budget = {"avg_weight_bits": mpr["avg_weight_bits"]}
            ilp_args = {"batches": args.ilp_batches}
            run(
                pre + "sensitivity-ilp",
                "sensitivity-ilp same size",
                "sensitivity-ilp",
                cands,
                budget=budget,
                method_args=ilp_args,
                out=store + "/ilp",
                overwrite=True,
            )
            if args.auto:
                aargs = {"ratio": args.ratio, "base_method": "auto", "gram_batches": args.gram_batches}
                run(
                    pre + "multipoint-auto",
                    "multipoint auto same size",
                    "multipoint",
                    cands,
                    budget=budget,
                    method_args=aargs,
                    out=store + "/auto",
                    overwrite=True,
                )


def step_check(names: list[str]) -> None:
    """ℓ2 of two points per channel with float32 vs float16 extra steps on every layer's weights."""
    from mixq.formats import Int
    from mixq.plan import QSpec
    from mixq.quant import multipoint as mp

    path = RESULTS / "multipoint_steps.json"
    out = json.loads(path.read_text()).get("layers_l2", {}) if path.exists() else {}
    for name in names:
        model = tasks.get(name, val_size=10).model
        for bits in (3, 4):
            e = {"float32": 0.0, "float16": 0.0, "one_point": 0.0}
            for m in model.modules():
                w = getattr(m, "weight", None)
                if not isinstance(w, torch.Tensor) or w.dim() < 2:
                    continue
                w = w.detach().double().reshape(w.shape[0], -1)
                start = mp.base_start(w, QSpec(Int(bits)))
                e["one_point"] += float(mp.sq_error(w, start.steps[:, None], start.codes[:, None]).sum())
                for key, dt in (("float32", None), ("float16", torch.float16)):
                    p = mp.decompose(w, bits, [2] * w.shape[0], "best", "channel", start, dt)
                    e[key] += float(mp.sq_error(w, p.steps, p.codes).sum())
            e["relative_increase"] = e["float16"] / e["float32"] - 1
            out[f"{name}|w{bits}"] = e
            print(f"  steps {name} w{bits}: {e}", flush=True)
            write("multipoint_steps", {"notes": STEP_NOTES, "layers_l2": out})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="mnist-cnn")
    ap.add_argument("--bits", default="3,4")
    ap.add_argument(
        "--ranges", default="minmax,mse", help="range methods of the grids: minmax, mse, asym, asym+mse, ..."
    )
    ap.add_argument("--ratio", type=float, default=0.25, help="extra points per layer / output channels")
    ap.add_argument("--val", type=int, default=0, help="validation examples (0: the task's full set)")
    ap.add_argument("--ilp-batches", type=int, default=0, help="sensitivity calibration batches (0: all)")
    ap.add_argument("--gram-batches", type=int, default=1, help="multipoint Gram batches (0: all)")
    ap.add_argument("--no-auto", dest="auto", action="store_false", help="skip multipoint auto")
    ap.add_argument(
        "--step-check", action="store_true", help="only the float16-step ℓ2 check (multipoint_steps.json)"
    )
    args = ap.parse_args()
    PROVENANCE.update(provenance())
    if args.step_check:
        step_check(args.tasks.split(","))
        return
    torch.set_num_threads(1)
    for name in args.tasks.split(","):
        t0 = time.perf_counter()
        bench_task(name, args)
        print(f"{name}: {time.perf_counter() - t0:.0f}s", flush=True)
    print(f"wrote {PATH}")


NOTES = (
    "Weights only (activations float). Rows keyed task|grid|label: uniform (per-channel PTQ on the "
    "grid), multipoint (points on that uniform base), sensitivity-ilp (mixed precision over b, b+1, "
    "b+2 bits at the multipoint row's avg_weight_bits), multipoint-auto (base chosen among uniform "
    "and sensitivity-ilp at the same budget). Grids: w{b} (min/max), w{b}+mse, w{b}+asym (asymmetric "
    "per channel: the first point keeps the base's zero point, extra points are symmetric). The first "
    "point's step is float32, the extra points' float16; all counted in avg_weight_bits. std_error: one "
    "binomial standard error of the accuracy (%)."
)

STEP_NOTES = (
    "Summed squared weight error over every layer (weights [C, d]) with one point (the per-channel "
    "min/max quantizer) and with two points per channel, the extra step float32 or float16."
)

if __name__ == "__main__":
    main()
