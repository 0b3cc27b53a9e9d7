"""DDQ against uniform QAT with a learned step (LSQ-style) and PTQ methods, at the size of 4-bit weights.

For each task and activation width A (8 and 4): the budget is the average weight bits of the
uniform 4-bit model (per-channel scales included). Runs, all through ``mixq.run``:

* ``uniform``: PTQ, every layer w4aA (min/max ranges);
* ``sensitivity-ilp``: PTQ, measured per-layer loss changes + exact ILP over w2/w4/w8;
* ``ddq``: QAT, bits learned over w2/w3/w4/w6/w8 (half of the steps), ILP projection onto the
  budget, then fine-tuning of the chosen integer grids;
* ``lsq``: QAT, ``ddq`` with ``learn_bits=False``: every layer w4aA with learned ranges, the same
  number of steps, optimizer and learning rates.

The QAT runs are short (``--steps`` batches of 128 training images from the pretrained weights);
the evaluation is on the first ``--val`` test images. Tasks can run in parallel processes
(``--out`` a part name each) and be merged into ``ddq.json`` with ``--merge``:

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.ddq --tasks fashion-mobilenetv2 --out ddq-mbv2 &
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.ddq --tasks fashion-resnet20 --out ddq-resnet20 &
    .venv/bin/python -m bench.ddq --merge ddq-mbv2,ddq-resnet20

``--runs`` picks the QAT runs (``--runs "" --sensitivity 1`` adds only the PTQ rows); parts that
cover the same task are merged row by row.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mixq
from bench.common import measures, merge_parts, part_args, run_parts, task_entry, within, write

QAT_ARGS = {"lr": 1e-4, "lr_range": 3e-3, "lr_bits": 0.2}


def row(name: str, res: mixq.Result) -> dict:
    """The record of one run."""
    m = res.metrics
    out = {
        "run": name,
        "method": m.method,
        **measures(m),
        "method_args": m.method_args,
        "plan": {n: s.name for n, s in res.plan.layers.items()},
        **within(m),
    }
    train = [h for h in res.history if "phase" in h]
    if train:
        out["training"] = [
            {k: h[k] for k in ("phase", "steps", "images", "seconds", "first_loss", "last_loss")}
            for h in train
        ]
        out["train_images"] = sum(h["images"] for h in train)
        out["train_seconds"] = sum(h["seconds"] for h in train)
        if "learned_bits" in train[0]:
            out["learned_bits"] = train[0]["learned_bits"]
    return out


def merge(parts: list[str]) -> Path:
    """Combine part files (one per task, run in parallel) into bench/results/ddq.json.

    A later part may add runs to the same task (e.g. ``--runs sensitivity-ilp``): its new rows and
    its wall time join the task's.
    """
    tasks, commands = merge_parts(parts, lambda r: (r["run"], r["acts"]), add=("wall_seconds",))
    return write("ddq", {"qat_args": QAT_ARGS, "parts": commands, "tasks": tasks})


def run_task(task_name: str, args: argparse.Namespace, results: dict) -> None:
    """Every run on one task at each activation width, writing partial results after each run."""
    t0 = time.perf_counter()
    task = mixq.tasks.get(task_name, val_size=args.val)
    cache = mixq.Cache()  # the task prepared once for all its runs
    fp = task.fp_metric()
    rows = []
    for a in [int(v) for v in args.acts.split(",")]:
        w4 = mixq.run(task, "uniform", candidates=[f"w4a{a}"], cache=cache)
        budget = {"avg_weight_bits": w4.metrics.avg_weight_bits}
        rows.append({**row(f"uniform w4a{a} (PTQ)", w4), "acts": a})
        print(f"{task_name} a{a} uniform {w4.metrics.metric:.2f}", flush=True)
        cands = [f"w{b}a{a}" for b in (2, 3, 4, 6, 8)]
        runs = [
            ("lsq", "ddq", [f"w4a{a}"], {"steps": args.steps, "learn_bits": False, **QAT_ARGS}),
            ("ddq", "ddq", cands, {"steps": args.steps, **QAT_ARGS}),
        ]
        runs = [r for r in runs if r[0] in args.runs.split(",")]
        if args.sensitivity:
            runs.append(
                ("sensitivity-ilp", "sensitivity-ilp", [f"w{b}a{a}" for b in (2, 4, 8)], {"batches": 1})
            )
        for name, method, cs, margs in runs:
            res = mixq.run(task, method, candidates=cs, budget=budget, method_args=margs, cache=cache)
            rows.append({**row(name, res), "acts": a})
            print(
                f"{task_name} a{a} {name} {res.metrics.metric:.2f} "
                f"bits={res.metrics.avg_weight_bits:.3f} t={res.metrics.seconds:.0f}s",
                flush=True,
            )
            results[task_name] = task_entry(
                task, fp, rows, t0, qat_steps=args.steps, qat_batch=mixq.tasks.TRAIN_BATCH
            )
            write(args.out, {"qat_args": QAT_ARGS, "tasks": results})  # partial results kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", default="fashion-mobilenetv2,fashion-resnet20")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--acts", default="8,4")
    ap.add_argument("--val", type=int, default=10_000, help="test images evaluated (the first ones)")
    ap.add_argument("--sensitivity", type=int, default=1, help="also run sensitivity-ilp (PTQ): 1 or 0")
    ap.add_argument("--runs", default="lsq,ddq", help="QAT runs besides uniform PTQ (lsq,ddq; none: '')")
    part_args(ap, "ddq")
    args = ap.parse_args()
    results = run_parts(args, merge, run_task)
    if results is not None:
        print(f"wrote {write(args.out, {'qat_args': QAT_ARGS, 'tasks': results})}")


if __name__ == "__main__":
    main()
