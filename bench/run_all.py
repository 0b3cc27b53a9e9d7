"""Every benchmarked method on every benchmark task over a budget sweep (``make bench``).

For each task of :data:`SWEEPS` and each method of :data:`METHODS`, ``mixq.run`` quantizes the
task's real model at every average-weight-bit budget of the sweep, on the same candidates and
quantizers (the QAT methods on :data:`QAT_CANDIDATES`, multipoint on the symmetric
:data:`MULTIPOINT_CANDIDATES` its points need), and measures the metric on the first
:data:`VAL` validation examples. A new method joins the benchmark by adding its name to
:data:`METHODS` (and, if its defaults are too slow on two cores, its settings to
:data:`METHOD_ARGS`).

* Results: ``bench/results/run_all.json`` (one row per task, method and budget, with the
  provenance of every session that produced rows: command, git commit, package versions) and
  ``bench/results/summary.md`` with the comparison tables and one Pareto plot per task
  (``bench/results/run_all/*.png``, drawn by ``mixq.report``).
* Run directories: ``runs/bench/{task}/{method}/avg{budget}`` (git-ignored), readable by
  ``mixq report``.
* Resuming: the JSON is rewritten after every finished run, and finished (task, method,
  budget) rows with the same settings are not recomputed, so an interrupted ``make bench``
  continues where it stopped.
* Reused sensitivity: before each budget after the first, the jobs of the result store
  (``store.sqlite``) of the previous budget of the same task and method are added to the new
  run directory's store (an interrupted run keeps its own store, so its finished jobs count
  too). Jobs are keyed by the fingerprints of the calibrated model and of the data, which do
  not depend on the budget, so a sensitivity (measured losses, Hutchinson traces) is computed
  once per task and method; each row records the stored jobs before and after its run.

Usage::

    .venv/bin/python -m bench.run_all                    # everything, resuming
    .venv/bin/python -m bench.run_all --tasks mnist-cnn --methods uniform,hawq
    .venv/bin/python -m bench.run_all --summary-only     # redraw summary.md and the plots
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shutil
import sqlite3
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import mixq
from bench.common import RESULTS, provenance, section, write
from mixq.cost import BUDGET_KEYS, InfeasibleBudgetError
from mixq.methods import METHODS as REGISTERED
from mixq.progress import Bar
from mixq.store import Store

TRAINED = tuple(m for m, r in REGISTERED.items() if r.trains)  # the methods that train the weights

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "bench"
NAME = "run_all"
PLOTS = RESULTS / NAME

# The methods benchmarked, in table order. A new method joins by adding its name here.
METHODS = [
    "uniform",
    "sensitivity-ilp",
    "hawq",
    "clado",
    "clado-naive",
    "multipoint",
    "sparq",
    "ddq",
    "fliqs",
]

# Settings of a method on a task where its defaults do not fit two CPU cores: (method, task) -> args.
# Hutchinson needs one batched Hessian-vector product per layer and sample, and measured
# sensitivity one forward pass over the calibration batches per (layer, candidate): on a shared
# two-core machine, one calibration batch and a few samples.
METHOD_ARGS: dict[tuple[str, str], dict[str, Any]] = {
    ("hawq", "mnist-cnn"): {"batches": 1, "hutchinson_samples": 16},
    ("hawq", "fashion-resnet20"): {"batches": 1, "hutchinson_samples": 8},
    ("hawq", "fashion-mobilenetv2"): {"batches": 1, "hutchinson_samples": 8},
    ("sensitivity-ilp", "minilm"): {"batches": 1},
    # MiniLM: one Rademacher vector over all layers per Hessian-vector product (joint mode), and
    # CLADO's pairs within 6 layers (one encoder layer's linears) on the first 8 sentences of a
    # batch: all 630 layer pairs x 16 candidate pairs on 64 sentences are hours on one core.
    ("hawq", "minilm"): {"batches": 1, "hutchinson_samples": 16, "hutchinson_mode": "joint"},
    ("clado", "fashion-resnet20"): {"batches": 1},
    ("clado", "fashion-mobilenetv2"): {"batches": 1},
    ("clado", "minilm"): {"batches": 1, "samples": 8, "window": 6},
    ("clado-naive", "fashion-resnet20"): {"batches": 1},
    ("clado-naive", "fashion-mobilenetv2"): {"batches": 1},
    ("clado-naive", "minilm"): {"batches": 1, "samples": 8},
    # QAT: short runs from the pretrained weights (batches of 128 training images; minilm trains
    # on its calibration sentences).
    **{
        ("multipoint", t): {"ratio": None}
        for t in ("mnist-cnn", "fashion-resnet20", "fashion-mobilenetv2", "minilm")
    },
    **{
        (m, t): {"steps": 40}
        for m in TRAINED
        for t in ("mnist-cnn", "fashion-resnet20", "fashion-mobilenetv2", "minilm")
    },
}

# Validation examples evaluated per task (the first ones of its usual set): the Fashion-MNIST
# models and MiniLM on subsets so the whole sweep fits two CPU cores; recorded with every row.
VAL: dict[str, int] = {
    "mnist-cnn": 10_000,
    "fashion-resnet20": 2_000,
    "fashion-mobilenetv2": 2_000,
    "minilm": 256,
}

# Candidates of the QAT methods where the sweep's differ: the output-error range search (omse) is
# a post-training calibration; QAT learns its ranges from min/max starting points.
QAT_CANDIDATES: dict[str, tuple[str, ...]] = {
    "cnn": ("w2+asym-a8", "w3+asym-a8", "w4+asym-a8", "w8+asym-a8"),
    "minilm": ("w2g128+asym", "w3g128+asym", "w4g128+asym", "w8+asym"),
}


@dataclass(frozen=True)
class Sweep:
    """The candidates of one task and the average-weight-bit budgets to solve for."""

    candidates: tuple[str, ...]
    budgets: tuple[float, ...]


_CNN = ("w2+asym+omse-a8", "w3+asym+omse-a8", "w4+asym+omse-a8", "w8+asym+omse-a8")
_CNN_BUDGETS = (2.5, 3.0, 4.0, 5.0)
SWEEPS: dict[str, Sweep] = {
    "mnist-cnn": Sweep(_CNN, _CNN_BUDGETS),
    "fashion-resnet20": Sweep(_CNN, _CNN_BUDGETS),
    "fashion-mobilenetv2": Sweep(_CNN, _CNN_BUDGETS),
    "minilm": Sweep(
        ("w2g128+asym+omse", "w3g128+asym+omse", "w4g128+asym+omse", "w8+asym+omse"), (3.0, 4.0, 5.0)
    ),
}

ROW_KEYS = (
    "metric",
    "fp_metric",
    "metric_name",
    *BUDGET_KEYS,  # avg_weight_bits, size_bytes, size_ratio, bops
    "seconds",
    "eval_seconds",
    "layers",
)

log = logging.getLogger("run_all")


def row_key(task: str, method: str, budget: float) -> str:
    """Return the key of one (task, method, budget) row."""
    return f"{task}|{method}|{budget:g}"


def run_dir(runs: Path, task: str, method: str, budget: float) -> Path:
    """Return the run directory of one (task, method, budget)."""
    return runs / task / method / f"avg{budget:g}"


# DDQ learns one step per tensor or per output channel (no groups): per-channel weights on MiniLM.
DDQ_MINILM_CANDIDATES = ("w2+asym", "w3+asym", "w4+asym", "w8+asym")

# Multipoint puts its extra points on signed symmetric integer weights (the sum of symmetric
# vectors), with least-squares ranges; it fills the budget its base plan leaves (ratio None).
MULTIPOINT_CANDIDATES: dict[str, tuple[str, ...]] = {
    "cnn": ("w2+mse-a8", "w3+mse-a8", "w4+mse-a8", "w8+mse-a8"),
    "minilm": ("w2+mse", "w3+mse", "w4+mse", "w8+mse"),
}


def candidates_of(task: str, method: str) -> list[str]:
    """Return the candidates ``method`` searches on ``task``."""
    kind = "minilm" if task == "minilm" else "cnn"
    if method == "ddq" and task == "minilm":
        return list(DDQ_MINILM_CANDIDATES)
    if method in TRAINED:
        return list(QAT_CANDIDATES[kind])
    if method == "multipoint":
        return list(MULTIPOINT_CANDIDATES[kind])
    return list(SWEEPS[task].candidates)


# A method whose code changed what its rows measure: its rows made before carry no (or an older)
# revision and run again. DDQ 2: the measured-loss read-out into the ILP and weights at lr 1e-4.
REVISIONS: dict[str, int] = {"ddq": 2}


def settings(task: str, method: str) -> dict[str, Any]:
    """Return what must match for a stored row to count as finished."""
    out = {
        "candidates": candidates_of(task, method),
        "method_args": METHOD_ARGS.get((method, task), {}),
        "val": VAL[task],
    }
    if method in REVISIONS:
        out["revision"] = REVISIONS[method]
    return out


def pick(items: list[str], valid: list[str], what: str) -> list[str]:
    """Check a user's selection against the valid names, keeping the order given."""
    bad = [i for i in items if i not in valid]
    if bad:
        raise SystemExit(f"run_all: unknown {what} {bad}; valid: {', '.join(valid)}")
    return items


def check_methods() -> list[str]:
    """Fail on listed methods that are not registered; return the registered ones not listed."""
    missing = [m for m in METHODS if m not in REGISTERED]
    if missing:
        raise SystemExit(
            f"run_all: METHODS lists {missing}, not in mixq.methods.METHODS ({', '.join(REGISTERED)})"
        )
    return [m for m in REGISTERED if m not in METHODS]


def load_results(path: Path) -> dict[str, Any]:
    """Load the rows and sessions of an earlier (possibly interrupted) run, or start empty."""
    if not path.is_file():
        return {"rows": {}, "sessions": [], "tasks": {}, "mine": set()}
    data = json.loads(path.read_text())
    out = {k: data.get(k, default) for k, default in (("rows", {}), ("sessions", []), ("tasks", {}))}
    return {**out, "mine": set()}


def merge_store(src: Path, dst: Path) -> None:
    """Add the jobs of result store ``src`` to store ``dst`` (created if missing); jobs in ``dst`` stay."""
    Store(dst).close()  # creates the file and its table
    conn = sqlite3.connect(dst, timeout=60.0)
    try:
        conn.execute("ATTACH DATABASE ? AS prev", (str(src),))
        with conn:
            conn.execute("INSERT OR IGNORE INTO jobs SELECT * FROM prev.jobs")
    finally:
        conn.close()


def clear_run_dir(out: Path) -> None:
    """Empty an unfinished run directory, keeping its result store (finished jobs stay valid)."""
    for p in out.iterdir() if out.is_dir() else ():
        if not p.name.startswith("store.sqlite"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def store_jobs(path: Path) -> int:
    """Return the number of jobs in a run directory's store (0 when it has none)."""
    if not path.is_file():
        return 0
    with Store(path) as s:
        return len(s)


def run_one(
    task: mixq.Task, method: str, budget: float, out: Path, previous: Path | None, cache: Any = None
) -> dict[str, Any]:
    """Quantize ``task`` with ``method`` at one budget; return the row to record.

    ``cache``: a ``mixq.Cache`` shared by the runs of one task (prepared once, ranges searched once).
    """
    store = out / "store.sqlite"
    clear_run_dir(out)
    if previous is not None and (previous / "store.sqlite").is_file():
        merge_store(previous / "store.sqlite", store)
    before = store_jobs(store)
    t0 = time.perf_counter()
    res = mixq.run(
        task,
        method=method,
        candidates=candidates_of(task.name, method),
        budget={"avg_weight_bits": budget},
        method_args=METHOD_ARGS.get((method, task.name)),
        out=out,
        overwrite=True,  # cleared above but for its store, which mixq.run keeps (jobs keyed per job)
        cache=cache,
    )
    wall = time.perf_counter() - t0
    m = res.metrics
    row = {k: getattr(m, k) for k in ROW_KEYS}
    row.update(
        {
            "task": task.name,
            "method": method,
            "budget": {"avg_weight_bits": budget},
            "within_budget": m.within["avg_weight_bits"],
            "plan": res.plan.summary(),
            "wall_seconds": wall,
            "store_jobs_before": before,
            "store_jobs_after": store_jobs(store),
            "run_dir": str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out),
        }
    )
    return row


def sweep(args: argparse.Namespace, results: dict[str, Any], session: str) -> int:
    """Run every selected (task, method, budget) not finished yet; return the number of failures."""
    grid = [(t, m, b) for t in args.tasks for m in args.methods for b in budgets_of(args, t)]
    todo = [g for g in grid if not finished(results, *g)]
    print(
        f"run_all: {len(grid)} runs, {len(grid) - len(todo)} already finished, {len(todo)} to run", flush=True
    )
    failures = 0
    current: mixq.Task | None = None
    with Bar(len(todo), "bench", unit="run") as bar:
        for task_name, method, budget in todo:
            if current is None or current.name != task_name:
                current = mixq.tasks.get(task_name, val_size=VAL[task_name])
                cache = mixq.Cache()  # the task's prepared model and searched ranges, for all its runs
                results["tasks"][task_name] = {
                    "metric_name": current.metric_name,
                    "fp_metric": current.fp_metric(),
                    "info": current.info,
                }
            bs = budgets_of(args, task_name)
            prev = (
                run_dir(args.runs, task_name, method, bs[bs.index(budget) - 1]) if bs.index(budget) else None
            )
            key = row_key(task_name, method, budget)
            try:
                out = run_dir(args.runs, task_name, method, budget)
                row = run_one(current, method, budget, out, prev, cache)
            except Exception as e:  # recorded in the results and the summary, never hidden
                infeasible = isinstance(e, InfeasibleBudgetError)  # an answer about the model, not a failure
                failures += not infeasible
                row = {
                    "task": task_name,
                    "method": method,
                    "budget": {"avg_weight_bits": budget},
                    "error": f"{type(e).__name__}: {e}",
                    "infeasible": infeasible,
                }
                if not infeasible:
                    traceback.print_exc()
            row.update(settings(task_name, method), session=session)
            results["rows"][key] = row
            results["mine"].add(key)
            save(results)
            bar.update()
            print(describe(row), flush=True)
    return failures


def budgets_of(args: argparse.Namespace, task: str) -> list[float]:
    """Return the budgets to run on ``task``: ``--budgets`` or the task's sweep, ascending."""
    return sorted(args.budgets if args.budgets else SWEEPS[task].budgets)


def finished(results: dict[str, Any], task: str, method: str, budget: float) -> bool:
    """Whether a successful row with the current settings exists."""
    row = results["rows"].get(row_key(task, method, budget))
    if row is None or ("error" in row and not row.get("infeasible")):
        return False
    return all(row.get(k) == v for k, v in settings(task, method).items())


def describe(row: dict[str, Any]) -> str:
    """One line about a finished row."""
    head = f"{row['task']:20s} {row['method']:16s} avg<={row['budget']['avg_weight_bits']:g}"
    if "error" in row:
        return f"{head}  FAILED {row['error']}"
    return (
        f"{head}  {row['metric']:.4f} (fp {row['fp_metric']:.4f}) bits={row['avg_weight_bits']:.3f} "
        f"wall={row['wall_seconds']:.0f}s store {row['store_jobs_before']}->{row['store_jobs_after']}"
    )


def merge(results: dict[str, Any], disk: dict[str, Any]) -> dict[str, Any]:
    """Merge this process's rows, session and task notes into what another process may have saved."""
    rows = {**disk["rows"], **{k: results["rows"][k] for k in results["mine"]}}
    mine = {s["id"]: s for s in results["sessions"] if s.get("id") == results.get("session")}
    sessions = [mine.pop(s.get("id"), s) for s in disk["sessions"]] + list(mine.values())
    return {
        "rows": rows,
        "sessions": sessions,
        "tasks": {**disk["tasks"], **results["tasks"]},
        "mine": results["mine"],
        "session": results.get("session"),
    }


def save(results: dict[str, Any]) -> Path:
    """Merge into bench/results/run_all.json under a lock (parallel sweeps may share it) and write it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    RUNS.mkdir(parents=True, exist_ok=True)
    with open(RUNS / f"{NAME}.lock", "w") as lock:  # under git-ignored runs/
        fcntl.flock(lock, fcntl.LOCK_EX)
        results.update(merge(results, load_results(RESULTS / f"{NAME}.json")))
        return _write(results)


def _write(results: dict[str, Any]) -> Path:
    order = {t: i for i, t in enumerate(SWEEPS)}
    morder = {m: i for i, m in enumerate(METHODS)}

    def sort_key(item: tuple[str, dict]) -> tuple:
        r = item[1]
        return (order.get(r["task"], 99), morder.get(r["method"], 99), r["budget"]["avg_weight_bits"])

    rows = dict(sorted(results["rows"].items(), key=sort_key))
    payload = {
        "methods": METHODS,
        "sweeps": {
            t: {"candidates": list(s.candidates), "budgets": list(s.budgets)} for t, s in SWEEPS.items()
        },
        "method_args": {f"{m}|{t}": a for (m, t), a in METHOD_ARGS.items()},
        "tasks": results["tasks"],
        "sessions": results["sessions"],
        "rows": rows,
    }
    return write(NAME, payload)


def cell(row: dict[str, Any] | None) -> str:
    """One cell of the method x budget table: metric (avg weight bits), or why there is none."""
    if row is None:
        return "not run"
    if "error" in row:
        return "failed"
    return f"{row['metric']:.4g} ({row['avg_weight_bits']:.2f})"


def task_summary(task: str, rows: list[dict[str, Any]], info: dict[str, Any]) -> list[str]:
    """The Markdown section of one task: Pareto plot, method x budget table, detailed rows."""
    from mixq.report import pareto_plot

    done = [r for r in rows if "error" not in r]
    budgets = sorted({r["budget"]["avg_weight_bits"] for r in rows} | set(SWEEPS[task].budgets))
    methods = list(dict.fromkeys([*METHODS, *(r["method"] for r in rows)]))  # "not run" cells show
    fp = info.get("fp_metric", done[0]["fp_metric"] if done else float("nan"))
    name = info.get("metric_name", done[0]["metric_name"] if done else "metric")
    out = [
        f"## {task}",
        "",
        f"Metric: {name}; fp32 {fp:.4f}. Candidates: {', '.join(f'`{c}`' for c in SWEEPS[task].candidates)}"
        " ("
        + "; ".join(
            f"{m}: {', '.join(f'`{c}`' for c in candidates_of(task, m))}" for m in (*TRAINED, "multipoint")
        )
        + ").",
        "",
    ]
    if info.get("info"):
        out += ["Model and data: " + "; ".join(f"{k} {v}" for k, v in info["info"].items()) + ".", ""]
    args = {
        f"{r['method']} {json.dumps(r['method_args'], sort_keys=True)}" for r in rows if r.get("method_args")
    }
    if args:
        out += ["Method settings other than the defaults: " + "; ".join(sorted(args)) + ".", ""]
    if done:
        PLOTS.mkdir(parents=True, exist_ok=True)
        png = pareto_plot(done, PLOTS / f"{task}.png", f"{task}: metric vs size, every method")
        out += [f"![Pareto plot of {task}]({png.relative_to(RESULTS).as_posix()})", ""]
    by = {(r["method"], r["budget"]["avg_weight_bits"]): r for r in rows}
    out += [
        "Metric (achieved avg weight bits) per budget on avg weight bits:",
        "",
        "| method | " + " | ".join(f"<= {b:g}" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    out += [f"| {m} | " + " | ".join(cell(by.get((m, b))) for b in budgets) + " |" for m in methods]
    out += [
        "",
        "| method | budget | metric | vs fp32 | avg w bits | size KiB | plan | wall s | store jobs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = f"<= {r['budget']['avg_weight_bits']:g}"
        if "error" in r:
            out.append(f"| {r['method']} | {b} | failed: {r['error'][:120]} | | | | | | |")
            continue
        plan = ", ".join(f"{k}: {v}" for k, v in r["plan"].items())
        out.append(
            f"| {r['method']} | {b} | {r['metric']:.4f} | {r['metric'] - r['fp_metric']:+.4f} | "
            f"{r['avg_weight_bits']:.3f} | {r['size_bytes'] / 1024:.1f} | {plan} | {r['wall_seconds']:.0f} | "
            f"{r['store_jobs_before']} -> {r['store_jobs_after']} |"
        )
    return [*out, ""]


def write_summary(results: dict[str, Any], unlisted: list[str]) -> Path:
    """Write bench/results/summary.md (tables and Pareto plots) from the recorded rows."""
    rows = (
        list(json.loads((RESULTS / f"{NAME}.json").read_text())["rows"].values())
        if (RESULTS / f"{NAME}.json").is_file()
        else list(results["rows"].values())
    )
    out = [
        "# mixq benchmark: every method on every task",
        "",
        f"Written by `bench/run_all.py` (`make bench`) from `{NAME}.json`, which holds every number "
        "below with the command, git commit, package versions and wall times of each session. "
        "Cells: the task's metric on its first `VAL` validation examples (see each task; achieved "
        "average weight bits, scales included). Wall s: quantization (calibration, sensitivity, "
        "search) plus evaluation. Store jobs: sensitivity jobs found in the run's result store "
        "before and after the run (equal numbers: the sensitivity was reused from the previous "
        "budget, nothing recomputed).",
        "",
    ]
    out += [
        f"Methods: {', '.join(METHODS)}. "
        + (
            f"Registered but not benchmarked: {', '.join(unlisted)}."
            if unlisted
            else "Every registered method is benchmarked."
        ),
        "",
    ]
    out += ["Sessions:", ""]
    for i, s in enumerate(results["sessions"]):
        wall = f", {s['wall_seconds'] / 60:.1f} min" if "wall_seconds" in s else " (interrupted or running)"
        out.append(
            f"{i}. `{s['command']}` at {s['git_commit'][:10]}{' (src modified)' if s['src_dirty'] else ''}"
            f", {s['date']}, {s['machine']}, {s['threads']} thread(s){wall}"
        )
    out.append("")
    for task in SWEEPS:
        task_rows = [r for r in rows if r["task"] == task]
        if not task_rows:
            out += [f"## {task}", "", "Not run yet.", ""]
            continue
        out += task_summary(task, task_rows, results["tasks"].get(task, {}))
    path = RESULTS / "summary.md"
    peers = section(path.read_text(), "peers") if path.exists() else ""  # bench/compare_peers.py's block
    path.write_text("\n".join(out) + (f"\n{peers}\n" if peers else ""))
    return path


def main(argv: list[str] | None = None) -> int:
    """Run the sweep (resuming) and write the summary."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tasks", default=",".join(SWEEPS), help="comma-separated tasks")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    ap.add_argument("--budgets", default="", help="override every task's sweep, e.g. 3,4")
    ap.add_argument("--runs", type=Path, default=RUNS, help="where run directories go")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--summary-only", action="store_true", help="only redraw summary.md and plots")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    unlisted = check_methods()
    args.tasks = pick([t for t in args.tasks.split(",") if t], list(SWEEPS), "tasks")
    args.methods = pick([m for m in args.methods.split(",") if m], METHODS, "methods")
    args.budgets = [float(b) for b in args.budgets.split(",") if b]
    path = RESULTS / f"{NAME}.json"
    results = load_results(path)
    for i, s in enumerate(results["sessions"]):  # sessions of files written before sessions had ids
        s.setdefault("id", f"{s['date']} session {i}")
    failures = 0
    if not args.summary_only:
        if unlisted:
            print(
                f"run_all: registered but not benchmarked (add to METHODS): {', '.join(unlisted)}", flush=True
            )
        prov = provenance()
        session = f"{prov['date']} pid {os.getpid()}"
        results["session"] = session
        results["sessions"].append(
            {
                "id": session,
                **prov,
                "tasks": args.tasks,
                "methods": args.methods,
                "budgets": args.budgets or "sweep",
                "threads": args.threads,
            }
        )
        t0 = time.perf_counter()
        failures = sweep(args, results, session)
        next(s for s in results["sessions"] if s.get("id") == session)["wall_seconds"] = (
            time.perf_counter() - t0
        )
        print(f"wrote {save(results)}")
    print(f"wrote {write_summary(results, unlisted)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
