"""The int32_bias plan step on the zoo: the simulated metric with and without it, against the metric
of the deployed model (``mixq.export.emulate``, which equals ONNX Runtime's fused kernels).

Per task and plan: the plan from ``mixq.run`` without and with ``ptq=["int32_bias"]``; for each,
the simulated metric (the fake-quantized model), the emulated metric (what ONNX Runtime computes
for that model's export) and the share of validation samples whose top-1 the two share. A step
that made the simulation add the biases the deployed kernels add would bring the simulated metric
to the deployed one; whether it should be the default is read off these rows. Rows are written to
bench/results/int32_bias.json as each finishes; a row already there is kept (``--redo``).
``--full`` measures on each task's whole validation set (10,000 test images; the task's default
calibration draw), rows ``TASK/PLAN/full``: the simulated top-1 without and with the step (the
step applied to a copy of the plain run's model, what the run with the step computes), without
the emulation (see :func:`row`).

    OMP_NUM_THREADS=1 PYTHONPATH=src python -m bench.int32_bias
    OMP_NUM_THREADS=1 PYTHONPATH=src python -m bench.int32_bias --full --tasks fashion-resnet20 --plans w8a8
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch

import mixq
from bench.common import RESULTS, save_row
from bench.deploy import build_task

NAME = "int32_bias"
TASKS = {"mnist-cnn": None, "fashion-resnet20": 2000, "fashion-mobilenetv2": 2000}  # validation samples
PLANS = {"w8a8": ["w8a8"], "w7a8": ["w7a8"], "w4a8": ["w4a8"]}


@torch.no_grad()
def top1(model: torch.nn.Module, task: mixq.Task) -> tuple[float, torch.Tensor]:
    preds, right = [], 0
    for b in task.val:
        p = task.forward(model, b).argmax(1)
        preds.append(p)
        right += int((p == b[1]).sum())
    pred = torch.cat(preds)
    return 100 * right / len(pred), pred


def row(task: mixq.Task, cands: list[str], derived: bool = False) -> dict[str, Any]:
    """The plan without and with the step. ``derived`` (the ``--full`` rows): the run measures on
    one validation batch only (its own metric is not reported), the step is applied to a copy of
    its model (as ``mixq.run(..., ptq=["int32_bias"])`` applies it after the plan), and the
    emulation is left out (its integer convolutions run in float64: with it one 10,000-image row
    had not finished in 15 minutes on a loaded core): the simulated top-1 without and with the step."""
    import copy
    import dataclasses

    from mixq.ptq.int32_bias import int32_bias

    rec: dict[str, Any] = {}
    light = dataclasses.replace(task, val=task.val[:1]) if derived else task
    base = None
    for label, ptq in (("plain", []), ("int32_bias", ["int32_bias"])):
        t0 = time.perf_counter()
        if derived and base is not None:
            model = copy.deepcopy(base.model)
            records = [{"step": "int32_bias", **int32_bias(model, task)}]
        else:
            res = mixq.run(light, "uniform", cands, ptq=[] if derived else ptq)
            base, model, records = res, res.model, res.metrics.ptq
        sim, ps = top1(model, task)
        emu, pe = top1(mixq.export.emulate(model, task), task) if not derived else (None, None)
        rec[label] = {
            "simulated_top1": sim,
            "emulated_top1": emu,
            "top1_agree_simulation_emulation": None if pe is None else float((ps == pe).float().mean()),
            "ptq": records,
            "seconds": time.perf_counter() - t0,
        }
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--plans", default=",".join(PLANS))
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--full", action="store_true", help="the whole validation set (rows TASK/PLAN/full)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    path = RESULTS / f"{NAME}.json"
    for t in args.tasks.split(","):
        if t not in TASKS:
            raise SystemExit(f"unknown task {t!r}; valid: {', '.join(TASKS)}")
        task = build_task(t, None if args.full else TASKS[t])
        for p in args.plans.split(","):
            if p not in PLANS:
                raise SystemExit(f"unknown plan {p!r}; valid: {', '.join(PLANS)}")
            key = f"{t}/{p}/full" if args.full else f"{t}/{p}"
            doc = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
            if key in doc["rows"] and not args.redo:
                continue
            t0 = time.perf_counter()
            samples = sum(len(b[1]) for b in task.val)
            rec = {"task": t, "val_samples": samples, **row(task, PLANS[p], args.full)}
            rec["wall_seconds"] = time.perf_counter() - t0
            print(key, json.dumps(rec), flush=True)
            save_row(NAME, key, rec)


if __name__ == "__main__":
    main()
