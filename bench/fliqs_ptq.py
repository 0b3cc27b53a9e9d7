"""FLIQS's chosen plans before and after its training, per test image: bench/results/fliqs_ptq.json.

The claims table (bench/claims.py) asks why FLIQS's joint integer + floating-point search does not
beat its integer-only search or uniform QAT at equal BOPs. This script measures, on all 10,000
test images of each Fashion task:

* ``ptq|ROW``: the plan FLIQS chose in claims row ROW (bench/results/claims_rows/fliqs-*.json)
  applied to the *pretrained* weights without any training: batch norm folded, ranges
  calibrated on the task's 512 calibration images (``mixq.evaluate``). So the formats the joint
  controller chose are compared with the integer plan's at equal BOPs before fine-tuning;
* ``ptq|uniform-w6a6``: uniform w6a6, the BOPs target, the same way;
* ``trained|ROW`` (with ``--runs DIR``): the trained model of the row's run directory
  (``DIR/ROW/model.safetensors``, the packed export, loaded by ``mixq.export.load``), for the
  FLIQS rows and the uniform w6a6 QAT row ``lsq-S-w6a6``; its top-1 is checked against the
  row's recorded metric.

Every row keeps the indices of the test images it gets wrong (``wrong``), so any two rows of a
task have a paired standard error of their difference (``bench.sparq.paired_stderr``). Each row
is written as soon as it is measured and a rerun skips the rows present (resumable)::

    OMP_NUM_THREADS=1 python -m bench.fliqs_ptq [--tasks fashion-resnet20,...] [--runs DIR] [--rows-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import mixq
from bench.common import RESULTS, provenance, write_rows
from bench.sparq import predictions

ROWS_DIR = RESULTS / "claims_rows"
NAME = "fliqs_ptq"
SHORT = {"fashion-resnet20": "r20", "fashion-mobilenetv2": "mbv2"}


def plans(task: str, rows_dir: Path = ROWS_DIR) -> dict[str, dict[str, str]]:
    """The FLIQS rows' plans of ``task`` present under ``rows_dir`` (row id -> layer -> candidate),
    and uniform w6a6 over the same layers (``uniform-w6a6``)."""
    out: dict[str, dict[str, str]] = {}
    for space in ("joint", "int", "fp"):
        path = rows_dir / f"fliqs-{space}-{SHORT[task]}.json"
        if path.exists():
            out[path.stem] = json.loads(path.read_text())["plan"]
    if out:
        out["uniform-w6a6"] = dict.fromkeys(next(iter(out.values())), "w6a6")
    return out


def wrong_of(model: torch.nn.Module, batches: list) -> tuple[float, list[int]]:
    """Top-1 in % and the indices of the images ``model`` gets wrong."""
    pred, labels = predictions(model.eval(), batches)
    wrong = torch.nonzero(pred != labels).flatten()
    return 100.0 * (1.0 - len(wrong) / len(labels)), [int(i) for i in wrong]


def ptq_row(task: mixq.tasks.Task, plan: dict[str, str]) -> dict[str, Any]:
    """The plan on the pretrained weights (``mixq.evaluate`` on one test batch, then all of them)."""
    import dataclasses

    from mixq.plan import Plan, parse_candidate

    t0 = time.perf_counter()
    small = dataclasses.replace(task, val=task.val[:1], _fp_metric=None)
    res = mixq.evaluate(small, Plan({n: parse_candidate(c) for n, c in plan.items()}))
    top1, wrong = wrong_of(res.model, task.val)
    m = res.metrics
    return {
        "top1": top1,
        "wrong": wrong,
        "bops": m.bops,
        "avg_weight_bits": m.avg_weight_bits,
        "plan_counts": {c: list(plan.values()).count(c) for c in sorted(set(plan.values()))},
        "seconds": time.perf_counter() - t0,
    }


def trained_row(task: mixq.tasks.Task, run_dir: Path, recorded: float) -> dict[str, Any]:
    """The trained model of a run directory, and whether it reproduces the recorded top-1."""
    from mixq.export import load

    t0 = time.perf_counter()
    model = load(run_dir / "model.safetensors", model=task.model)
    top1, wrong = wrong_of(model, task.val)
    return {
        "top1": top1,
        "wrong": wrong,
        "recorded_top1": recorded,
        "reproduced": abs(top1 - recorded) < 0.005,
        "run_dir": str(run_dir),
        "seconds": time.perf_counter() - t0,
    }


def todo(task: mixq.tasks.Task, runs: Path | None, rows_dir: Path = ROWS_DIR) -> list[tuple[str, Any]]:
    """(row key, measurement) of every row of ``task``: each plan's PTQ, and with ``runs`` the
    trained model of each FLIQS row and of its uniform w6a6 QAT baseline (``lsq-S-w6a6``)."""
    out: list[tuple[str, Any]] = []
    for row_id, plan in plans(task.name, rows_dir).items():
        out.append((f"ptq|{row_id}", lambda p=plan: ptq_row(task, p)))
        if row_id == "uniform-w6a6":
            row_id = f"lsq-{SHORT[task.name]}-w6a6"
        row_file, run_dir = rows_dir / f"{row_id}.json", (runs / row_id) if runs else None
        if run_dir is not None and (run_dir / "model.safetensors").exists() and row_file.exists():
            recorded = json.loads(row_file.read_text())["metric"]
            out.append((f"trained|{row_id}", lambda d=run_dir, r=recorded: trained_row(task, d, r)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="fashion-resnet20,fashion-mobilenetv2")
    ap.add_argument("--val", type=int, default=10_000, help="test images per task (first N)")
    ap.add_argument("--runs", default="", help="run directories of the claims rows (trained models)")
    ap.add_argument("--rows-dir", default=str(ROWS_DIR), help="the claims rows whose plans are measured")
    ap.add_argument("--out", default=NAME, help="result name under bench/results/")
    args = ap.parse_args()
    bad = [t for t in args.tasks.split(",") if t not in SHORT]
    if bad:
        raise SystemExit(f"unknown tasks {bad}; valid: {', '.join(SHORT)}")
    torch.set_num_threads(1)
    path = RESULTS / f"{args.out}.json"
    doc = json.loads(path.read_text()) if path.exists() else {"tasks": {}}
    doc["provenance"] = provenance()
    for name in args.tasks.split(","):
        task = mixq.tasks.get(name, val_size=args.val)
        entry = doc["tasks"].setdefault(name, {"val_images": args.val, "rows": {}})
        if entry["val_images"] != args.val:
            entry.update({"val_images": args.val, "rows": {}})  # another test set: measure again
        for key, measure in todo(task, Path(args.runs) if args.runs else None, Path(args.rows_dir)):
            if key in entry["rows"]:
                continue
            entry["rows"][key] = {**measure(), "command": doc["provenance"]["command"]}
            write_rows(args.out, doc)
            print(f"{name} {key}: {entry['rows'][key]['top1']:.2f}", flush=True)
    write_rows(args.out, doc)


if __name__ == "__main__":
    main()
