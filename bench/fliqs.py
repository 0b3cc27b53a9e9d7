"""FLIQS (integer, floating-point and joint search) against uniform QAT and PTQ searches, on BOPs.

For each task, the BOPs targets are ``--targets`` times the BOPs of the uniform 4-bit model
(``w4a4``: 16 bit² per MAC; e.g. 1.5 → 24 and 2.5 → 40 bit² per MAC). Runs, all through
``mixq.run`` from the pretrained weights:

* ``fliqs-int``, ``fliqs-fp``, ``fliqs-joint``: QAT with the RL search over the integer
  candidates (w4a4, w8a8), the floating-point ones (fp4 e2m1, fp6 e3m2, fp8 e4m3, fp8 e5m2, each
  for weights and activations) or all of them, at each target;
* ``qat <fmt>``: uniform QAT, ``fliqs`` with one candidate: the same steps, optimizer and
  learning rate (int4, int8, fp4, fp6, fp8 e4m3);
* PTQ: ``uniform`` (best uniform candidate within the target) and ``sensitivity-ilp``
  (measured per-layer loss changes on one calibration batch + exact ILP) over the joint
  candidates at each target.

The QAT runs are short (``--steps`` batches of 128 training images); the evaluation is on the
first ``--val`` test images. Tasks run in parallel processes (``--out`` a part name each) and
are merged into ``fliqs.json`` and ``fliqs_pareto.png`` with ``--merge``:

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.fliqs --tasks mnist-cnn --out fliqs-mnist &
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.fliqs --tasks fashion-resnet20 --out fliqs-resnet20 &
    .venv/bin/python -m bench.fliqs --merge fliqs-mnist,fliqs-resnet20
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import mixq
from bench.common import RESULTS, merge_parts, part_args, run_parts, task_entry, within, write

INT = ["w4a4", "w8a8"]
FP = ["wfp4_e2m1-afp4_e2m1", "wfp6_e3m2-afp6_e3m2", "wfp8_e4m3fn-afp8_e4m3fn", "wfp8_e5m2-afp8_e5m2"]
UNIFORM_QAT = {"int4": "w4a4", "int8": "w8a8", "fp4": FP[0], "fp6": FP[1], "fp8": FP[2]}
RUNS = ("fliqs", "qat", "ptq")
QAT_ARGS = {"lr": 1e-4, "rl_lr": 0.1, "entropy": 0.02, "beta": -0.5, "warmup": 0.25, "fix_frac": 0.1}


def row(name: str, kind: str, res: mixq.Result, target: float | None) -> dict:
    """The record of one run."""
    m = res.metrics
    out = {
        "run": name,
        "kind": kind,
        "method": m.method,
        "target_bops": target,
        "metric": m.metric,
        "bops": m.bops,
        "avg_weight_bits": m.avg_weight_bits,
        "size_bytes": m.size_bytes,
        "seconds": m.seconds,
        "method_args": m.method_args,
        "candidates": m.candidates,
        "plan_summary": res.plan.summary(),
        **within(m),
    }
    h = res.history[0] if res.history and "phase" in res.history[0] else None
    if h is not None:
        keys = (
            "steps",
            "search_steps",
            "warmup_steps",
            "fixed_steps",
            "images",
            "seconds",
            "first_loss",
            "last_loss",
            "final_entropy",
            "final_argmax_mass",
            "readout",
            "changed_layers",
        )
        out["training"] = {k: h[k] for k in keys if k in h}
        out["plan"] = {n: s.name for n, s in res.plan.layers.items()}
    return out


def run_task(task_name: str, args: argparse.Namespace, results: dict) -> None:
    """Run every configuration on one task, writing partial results after each run."""
    t0 = time.perf_counter()
    task = mixq.tasks.get(task_name, val_size=args.val)
    run = functools.partial(mixq.run, task, cache=mixq.Cache())  # the task prepared once for all its runs
    fp32 = task.fp_metric()
    rows: list[dict] = []
    steps = {"steps": args.steps}
    base = run("uniform", candidates=["w4a4"])
    rows.append(row("ptq int4", "ptq-uniform", base, None))
    bops4 = base.metrics.bops
    targets = [float(f) * bops4 for f in args.targets.split(",")]

    def record(name: str, kind: str, res: mixq.Result, target: float | None) -> None:
        rows.append(row(name, kind, res, target))
        print(
            f"{task_name} {name}: {res.metrics.metric:.2f} bops/bops4={res.metrics.bops / bops4:.3f} "
            f"plan={res.plan.summary()} t={res.metrics.seconds:.0f}s",
            flush=True,
        )
        results[task_name] = task_entry(
            task,
            fp32,
            rows,
            t0,
            bops_int4=bops4,
            targets_bops=targets,
            qat_steps=args.steps,
            qat_batch=mixq.tasks.TRAIN_BATCH,
            val_images=args.val,
        )
        write(args.out, {"qat_args": QAT_ARGS, "tasks": results})

    runs = args.runs.split(",")
    for factor, target in zip(args.targets.split(","), targets, strict=True):
        for space in args.spaces.split(",") if "fliqs" in runs else ():
            res = run(
                "fliqs",
                candidates=INT + FP,
                budget={"bops": target},
                method_args={**steps, **QAT_ARGS, "space": space},
                seed=args.seed,
            )
            record(f"fliqs-{space} x{factor}", f"fliqs-{space}", res, target)
    for label in args.qat.split(",") if "qat" in runs else ():
        cand = UNIFORM_QAT[label]
        res = run("fliqs", candidates=[cand], method_args={**steps, **QAT_ARGS}, seed=args.seed)
        record(f"qat {label}", "qat-uniform", res, None)
    for factor, target in zip(args.targets.split(","), targets, strict=True) if "ptq" in runs else ():
        res = run("uniform", candidates=INT + FP, budget={"bops": target})
        record(f"ptq uniform x{factor}", "ptq-uniform", res, target)
        res = run("sensitivity-ilp", candidates=INT + FP, budget={"bops": target}, method_args={"batches": 1})
        record(f"ptq sensitivity-ilp x{factor}", "ptq-sensitivity-ilp", res, target)


def pareto_plot(tasks: dict, path: Path) -> None:
    """Plot metric against BOPs per task, one marker per kind of run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {
        "fliqs-joint": ("*", "C3"),
        "fliqs-int": ("^", "C0"),
        "fliqs-fp": ("v", "C2"),
        "qat-uniform": ("o", "k"),
        "ptq-uniform": ("s", "0.6"),
        "ptq-sensitivity-ilp": ("D", "C1"),
    }
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, (name, t) in zip(axes[0], tasks.items(), strict=True):
        for kind, (marker, color) in style.items():
            pts = [r for r in t["rows"] if r["kind"] == kind]
            if pts:
                ax.scatter(
                    [r["bops"] / 1e6 for r in pts],
                    [r["metric"] for r in pts],
                    marker=marker,
                    color=color,
                    label=kind,
                    s=60 if marker == "*" else 30,
                )
            for r in pts:
                if kind == "qat-uniform":
                    ax.annotate(r["run"].split()[-1], (r["bops"] / 1e6, r["metric"]), fontsize=7)
        for tb in t["targets_bops"]:
            ax.axvline(tb / 1e6, color="0.85", lw=0.8, zorder=0)
        ax.axhline(t["fp32"], color="0.7", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(f"{name} ({t['qat_steps']} QAT steps, {t['val_images']} test images)", fontsize=9)
        ax.set_xlabel("MBOPs (MACs × weight bits × activation bits / 1e6)")
        ax.set_ylabel(t["metric_name"])
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def merge(parts: list[str]) -> Path:
    """Combine part files (one per task) into bench/results/fliqs.json and the Pareto plot."""
    tasks, commands = merge_parts(parts, lambda r: r["run"])  # parts of one task add their rows
    png = RESULTS / "fliqs_pareto.png"
    pareto_plot(tasks, png)
    return write("fliqs", {"qat_args": QAT_ARGS, "parts": commands, "plot": png.name, "tasks": tasks})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", default="mnist-cnn,fashion-resnet20,fashion-mobilenetv2")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--targets", default="1.5,2.5", help="BOPs targets as multiples of uniform w4a4's")
    ap.add_argument("--val", type=int, default=2000, help="test images evaluated (the first ones)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default="fliqs,qat,ptq", help="groups of runs: fliqs, qat (uniform), ptq")
    ap.add_argument("--spaces", default="joint,int,fp", help="FLIQS search spaces: joint,int,fp")
    ap.add_argument("--qat", default=",".join(UNIFORM_QAT), help="uniform QAT formats: int4,int8,fp4,fp6,fp8")
    part_args(ap, "fliqs")
    args = ap.parse_args()
    bad = (
        sorted(set(args.qat.split(",")) - set(UNIFORM_QAT))
        + sorted(set(args.runs.split(",")) - set(RUNS))
        + sorted(set(args.spaces.split(",")) - {"joint", "int", "fp"})
    )
    if bad:
        raise ValueError(
            f"unknown --qat/--runs/--spaces values {bad}; valid: "
            f"{', '.join([*UNIFORM_QAT, *RUNS, 'joint', 'int', 'fp'])}"
        )
    results = run_parts(args, merge, run_task)
    if results is not None:
        print(f"wrote {write(args.out, {'qat_args': QAT_ARGS, 'tasks': results})}")


if __name__ == "__main__":
    main()
