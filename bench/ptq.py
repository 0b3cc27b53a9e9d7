"""PTQ steps on the real models: uniform W2/W3/W4 (A8 on the CNNs), min/max and MSE ranges, CLE, bias
correction and AdaRound added in turn, with the time of each step.

Every row is one ``mixq.run(task, "uniform", [candidate], ptq=steps)``. Recipes: "minmax"
(symmetric weights, min/max ranges), "mse" (asymmetric, weight-space squared-error range
search) and "omse" (asymmetric, ranges searched on the layer's output error; mixq's best
rounding without reconstruction). Step sequences: none, cle, cle+bias_correction,
cle+bias_correction+adaround. AdaRound runs far fewer iterations than the paper's 20000 (2 CPU
cores); the count is recorded per task.

    .venv/bin/python -m bench.ptq --task mnist-cnn [--settings w2a8,w4a8] [--recipes mse,omse]
        [--sequences none,cle,cle+bc,cle+bc+ada] [--adaround-iters 1000] [--val 10000]

Each invocation adds (or replaces) one task's entry in bench/results/ptq.json, so tasks can run
as separate processes; every entry carries its own command and provenance.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import mixq
from bench.common import RESULTS, provenance, task_entry

SEQUENCES = {
    "none": [],
    "cle": ["cle"],
    "cle+bc": ["cle", "bias_correction"],
    "cle+bc+ada": ["cle", "bias_correction", "adaround"],
    "bc": ["bias_correction"],
    "ada": ["adaround"],
    "cle+ada": ["cle", "adaround"],
}
RECIPES = {"minmax": "", "mse": "+asym+mse", "omse": "+asym+omse"}
SETTINGS = {"w2a8": (2, 8), "w3a8": (3, 8), "w4a8": (4, 8), "w2": (2, None), "w3": (3, None), "w4": (4, None)}


def candidate(setting: str, recipe: str) -> str:
    """Build the candidate name of a setting (e.g. "w2a8") under a recipe."""
    bits, act = SETTINGS[setting]
    return f"w{bits}{RECIPES[recipe]}" + (f"-a{act}" if act else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True)
    ap.add_argument("--settings", default="w2a8,w3a8,w4a8")
    ap.add_argument("--recipes", default="minmax,mse")
    ap.add_argument("--sequences", default="none,cle,cle+bc,cle+bc+ada")
    ap.add_argument("--adaround-iters", type=int, default=1000)
    ap.add_argument("--adaround-batch", type=int, default=32)
    ap.add_argument("--extra", default="", help="more SETTING:RECIPE:SEQUENCE rows, comma-separated")
    ap.add_argument("--val", type=int, default=None, help="validation items (default: the task's all)")
    ap.add_argument("--entry", default=None, help="key of the entry in ptq.json (default: the task name)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    task = mixq.tasks.get(args.task, val_size=args.val or None)
    fp = task.fp_metric()
    grid = [
        (s, r, q)
        for s in args.settings.split(",")
        if s
        for r in args.recipes.split(",")
        for q in args.sequences.split(",")
    ]
    grid += [tuple(x.split(":")) for x in args.extra.split(",") if x]
    ptq_args = {"adaround": {"iters": args.adaround_iters, "batch_size": args.adaround_batch}}
    rows = earlier_rows(args.entry or args.task, task, ptq_args)
    done = {(r["candidate"], r["sequence"]) for r in rows}
    grid = [g for g in dict.fromkeys(grid) if (candidate(g[0], g[1]), g[2]) not in done]
    print(f"{args.task}: fp32 {fp:.4f}; {len(rows)} earlier rows kept, {len(grid)} to run", flush=True)
    total = len(rows) + len(grid)
    cache = mixq.Cache()  # the task prepared once for all its rows
    for setting, recipe, seq in grid:
        steps = SEQUENCES[seq]
        cand = candidate(setting, recipe)
        res = mixq.run(
            task,
            method="uniform",
            candidates=[cand],
            ptq=steps,
            seed=0,
            cache=cache,
            ptq_args={k: v for k, v in ptq_args.items() if k in steps},
        )
        m = res.metrics
        step_rows = [{k: r[k] for k in ("step", "stage", "seconds")} for r in m.ptq]
        detail = {
            r["step"]: {k: v for k, v in r.items() if k not in ("step", "stage", "seconds", "config")}
            for r in m.ptq
        }
        rows.append(
            {
                "setting": setting,
                "recipe": recipe,
                "sequence": seq,
                "steps": steps,
                "candidate": cand,
                "metric": m.metric,
                "delta_vs_fp32": m.metric - fp,
                "avg_weight_bits": m.avg_weight_bits,
                "ptq": step_rows,
                "ptq_detail": detail,
                "method_seconds": m.seconds,
                "eval_seconds": m.eval_seconds,
            }
        )
        times = " ".join(f"{r['step']}={r['seconds']:.1f}s" for r in step_rows)
        print(f"{args.task:20s} {cand:22s} {seq:12s} {m.metric:.4f} {times}", flush=True)
        save(args.entry or args.task, task, fp, rows, ptq_args, t0, complete=len(rows) == total)


def val_items(task: mixq.Task) -> int:
    """The number of validation examples the task evaluates."""
    return sum(len(b[1]) if isinstance(b, tuple) else len(b["input_ids"]) for b in task.val)


def earlier_rows(name: str, task: mixq.Task, ptq_args: dict) -> list[dict]:
    """Rows of the task's entry in ptq.json made with the same validation set and AdaRound settings.

    A later invocation adds the rows it is missing instead of recomputing the grid; rows made
    with other settings are dropped (the entry is rewritten with the current settings).
    """
    path = RESULTS / "ptq.json"
    old = json.loads(path.read_text()).get("tasks", {}).get(name) if path.exists() else None
    if not old or old.get("val_items") != val_items(task) or old.get("adaround") != ptq_args["adaround"]:
        return []
    for r in old["rows"]:  # which invocation made each row
        r.setdefault("command", old["provenance"]["command"])
    return list(old["rows"])


def save(
    name: str, task: mixq.Task, fp: float, rows: list, ptq_args: dict, t0: float, complete: bool
) -> None:
    """Add or replace the task's entry in bench/results/ptq.json (after every row)."""
    prov = provenance()
    for r in rows:
        r.setdefault("command", prov["command"])
    entry = {
        "provenance": prov,
        "complete": complete,
        **task_entry(task, fp, rows, t0, adaround=ptq_args["adaround"], val_items=val_items(task)),
    }
    path = RESULTS / "ptq.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("note", "each task entry is written by its own run of bench/ptq.py; see its provenance")
    data.setdefault("tasks", {})[name] = entry
    path.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
