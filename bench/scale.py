"""CLADO pairwise sensitivity in-process and on Ray (1 and 2 local workers), and a projection.

For each task a subset of layers (evenly spread in module order) and one sensitivity batch are
measured with every row job of ``mixq.sensitivity.pairs.pairwise``: the float loss and, per
(layer, candidate), its single loss and its pair losses with every later layer of the subset.
The same jobs run

* in-process (``InProcessExecutor``): the reference compute time;
* on a local Ray cluster with 1 and with 2 worker CPUs (``RayExecutor``), each map into a fresh
  result store, after a warm-up that starts the worker processes (timed on its own).

Per configuration: wall time, jobs per second, pair evaluations per second, and the overhead
per job ``(workers * wall - in-process wall) / jobs`` in worker-seconds: everything a job
costs on Ray beyond its computation (shipping the context, scheduling, results, and on this
shared 2-core machine the contention of workers with each other and with the driver); and the
same run's overhead ``(workers * wall - the jobs' seconds inside the workers) / jobs``, which
does not compare two runs made under different load. Trivial jobs (200 no-ops, one task each
and chunked) give Ray's own cost per task.

The projection (labelled as such in the JSON) estimates the wall time of the full pairwise
measurement of a 200-layer model with 3 candidates on 8, 64 and 512 workers from the measured
per-pair-evaluation cost, per-row single cost and per-job overhead; its assumptions are
written next to it.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.scale            # both tasks, ~12 min
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.scale --tasks fashion-resnet20 --layers 6
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import write
from mixq import tasks
from mixq.api import prepare
from mixq.executor import InProcessExecutor, Job
from mixq.plan import as_layer_spec
from mixq.ray_executor import RayExecutor
from mixq.sensitivity.pairs import pairwise
from mixq.store import Store

SUITES: dict[str, dict[str, Any]] = {
    # activations 8-bit with min/max ranges (calibrated once), weights per channel asymmetric
    "fashion-resnet20": {"candidates": [f"w{b}+asym-a8" for b in (2, 4, 8)], "items": 64},
    # weight-only, as in bench/search.py (without the slower MSE range search)
    "minilm": {"candidates": [f"w{b}+asym" for b in (2, 4, 8)], "items": 4},
}
# MiniLM's smaller validation and calibration sets here (the other tasks: their defaults)
SIZES: dict[str, dict[str, int]] = {"minilm": {"val_size": 64, "calib_size": 64}}
PROJECT_LAYERS, PROJECT_CANDIDATES, PROJECT_WORKERS = 200, 3, (8, 64, 512)


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages of this machine."""
    return [round(v, 2) for v in os.getloadavg()]


def autogroup() -> str | None:
    """The kernel's sched_autogroup_enabled setting (None where unreadable)."""
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip()
    except OSError:
        return None


def first_items(batch: Any, n: int) -> Any:
    """The first ``n`` items of a batch (a tuple/list of tensors or a dict of tensors)."""
    if isinstance(batch, dict):
        return {k: v[:n] for k, v in batch.items()}
    return type(batch)(t[:n] for t in batch)


def setup(name: str, n_layers: int) -> dict[str, Any]:
    """Load the task, wrap and calibrate the model, pick the layers and the sensitivity batch."""
    suite = SUITES[name]
    task = tasks.get(name, **SIZES.get(name, {}))
    specs = [as_layer_spec(c) for c in suite["candidates"]]
    t0 = time.perf_counter()
    qmodel, infos = prepare(task, specs)
    every = [i.name for i in infos]
    idx = sorted({round(k * (len(every) - 1) / max(1, n_layers - 1)) for k in range(n_layers)})
    batch = first_items(task.calib[0], suite["items"])
    return {
        "task": task,
        "qmodel": qmodel,
        "layers": [every[i] for i in idx],
        "all_layers": every,
        "candidates": suite["candidates"],
        "batches": [batch],
        "items": suite["items"],
        "prepare_seconds": time.perf_counter() - t0,
    }


def measure(
    s: dict[str, Any], executor: Any, folder: Path, label: str, repeats: int
) -> tuple[dict[str, Any], Any]:
    """The fastest of ``repeats`` runs of :func:`measure_once`, with every run's map seconds."""
    runs = [measure_once(s, executor, folder, f"{label}-{r}") for r in range(repeats)]
    best = min(runs, key=lambda r: r[0]["map_seconds"])
    best[0]["map_seconds_all_repeats"] = [r[0]["map_seconds"] for r in runs]
    return best


def measure_once(s: dict[str, Any], executor: Any, folder: Path, label: str) -> tuple[dict[str, Any], Any]:
    """Run every pairwise job through ``executor`` into a fresh store; return timings and the table."""
    with Store(folder / f"{s['task'].name}-{label}.sqlite") as store:
        l0 = load()
        t0 = time.perf_counter()
        sens = pairwise(
            s["qmodel"],
            s["task"],
            s["layers"],
            s["candidates"],
            batches=s["batches"],
            executor=executor,
            store=store,
            progress=False,
        )
        wall = time.perf_counter() - t0
    m = sens.meta
    jobs = m["row_evals"] + 1
    row = {
        "wall_seconds": wall,
        "map_seconds": m["seconds"],
        "jobs": jobs,
        "jobs_per_second": jobs / m["seconds"],
        "pair_evals": m["pair_evals"],
        "pair_evals_per_second": m["pair_evals"] / m["seconds"],
        "job_seconds": m["job_seconds"],
        "pair_seconds": m["pair_seconds"],
        "reuse": m["reuse"],
        "job_cpu_seconds": m["job_cpu_seconds"],
        "pair_cpu_seconds": m["pair_cpu_seconds"],
        "load_before": l0,
        "load_after": load(),
    }
    if isinstance(executor, RayExecutor):
        row["chunks"] = executor.stats["chunks"]
        row["job_seconds_in_workers"] = executor.stats["job_seconds"]
        row["job_cpu_seconds_in_workers"] = executor.stats["job_cpu_seconds"]
        w = executor.workers or 1
        # the same run's time not spent computing jobs, per job (worker-seconds)
        row["overhead_per_job_in_run_seconds"] = (w * m["seconds"] - executor.stats["job_seconds"]) / jobs
    return row, sens


def trivial_overhead(ex: RayExecutor, n: int = 200) -> dict[str, Any]:
    """Ray's own cost per job on jobs that do nothing: one task per job, and chunked (default)."""
    out: dict[str, Any] = {"jobs": n}
    for label, size in (("one_task_per_job", 1), ("chunked", None)):
        ex.chunk_size = size
        t0 = time.perf_counter()
        ex.map([Job(f"noop/{i}", len, ()) for i in range(n)], [], progress=False)
        wall = time.perf_counter() - t0
        out[label] = {
            "seconds": wall,
            "chunks": ex.stats["chunks"],
            "seconds_per_job": wall / n,
            "jobs_per_second": n / wall,
        }
    ex.chunk_size = None
    return out


def compare(row: dict[str, Any], ref: dict[str, Any], workers: int, sens: Any, table: Any) -> None:
    """Add the overhead per job, the speed-up and the check against the in-process table to ``row``."""
    row["overhead_per_job_seconds"] = (workers * row["map_seconds"] - ref["map_seconds"]) / row["jobs"]
    row["speedup_vs_inprocess"] = ref["map_seconds"] / row["map_seconds"]
    same = torch.equal(sens.single, table.single) and torch.equal(sens.pairs, table.pairs)
    row["same_results_as_inprocess"] = bool(same)


def projection(ref: dict[str, Any], ray_rows: dict[int, dict[str, Any]], model_layers: int) -> dict[str, Any]:
    """Projected wall time of the full pairwise measurement of a 200-layer, 3-candidate model."""
    L, C = PROJECT_LAYERS, PROJECT_CANDIDATES
    # CPU seconds: what a worker with a core of its own takes; wall seconds here include the load
    pair_cost = ref["pair_cpu_seconds"] / ref["pair_evals"]  # one pair evaluation on one batch
    single_cost = (ref["job_cpu_seconds"] - ref["pair_cpu_seconds"]) / (ref["jobs"] - 1)  # a row's own pass
    # one local worker: its overhead is Ray's own; two workers on this shared 2-core machine also
    # pay for contending with each other and the driver, which a cluster with a core per worker does not
    basis = 1 if 1 in ray_rows else min(ray_rows)
    overhead = ray_rows[basis]["overhead_per_job_in_run_seconds"]
    depth = L / model_layers  # a 200-layer model of such layers: each pass ~depth times longer
    n_pairs_brief = (L * C) ** 2 / 2
    n_pairs = C * C * L * (L - 1) // 2
    rows = L * C
    out: dict[str, Any] = {
        "label": "PROJECTION, not a measurement: estimated from the measured costs below",
        "model": f"{L} layers x {C} candidates, layers costing like this task's (depth factor {depth:.2f})",
        "pair_evaluations": n_pairs,
        "pair_evaluations_(LC)^2/2": n_pairs_brief,
        "row_jobs": rows + 1,
        "per_pair_evaluation_cpu_seconds_measured": pair_cost,
        "per_pair_evaluation_wall_seconds_measured_under_load": ref["pair_seconds"] / ref["pair_evals"],
        "per_row_single_cpu_seconds_measured": single_cost,
        "overhead_per_job_seconds_measured": overhead,
        "overhead_measured_with_workers": basis,
        "assumptions": [
            "per-pair and per-single costs are the in-process CPU seconds measured here (a dedicated "
            "core per worker), scaled with depth (200 / this model's layer count); one batch",
            "jobs are whole rows (layer, candidate): the row of the first layer holds "
            f"{(L - 1) * C} pair evaluations and bounds the wall time from below",
            f"per-job overhead: Ray wall time minus the jobs' compute time in the same run, per job, "
            f"with {basis} local worker(s) (the difference to the separate in-process run is "
            "dominated by this machine's load); paid in parallel by the workers",
            "no cluster start-up, no network transfer of the context beyond what was measured locally",
        ],
        "workers": {},
    }
    compute = (n_pairs * pair_cost + rows * single_cost) * depth
    longest = ((L - 1) * C * pair_cost + single_cost) * depth
    for w in PROJECT_WORKERS:
        wall = max(compute / w, longest) + overhead * (rows + 1) / w
        out["workers"][str(w)] = {
            "wall_seconds": wall,
            "wall_hours": wall / 3600,
            "bound_by_longest_row": longest > compute / w,
        }
    out["compute_seconds_one_worker"] = compute
    out["longest_row_seconds"] = longest
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="fashion-resnet20,minilm")
    ap.add_argument("--layers", type=int, default=8, help="layers per task (a subset, evenly spread)")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--name", default="scale", help="results file bench/results/NAME.json")
    ap.add_argument("--repeats", type=int, default=2, help="runs per configuration (the fastest is kept)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = [t for t in args.tasks.split(",") if t]
    counts = [int(w) for w in args.workers.split(",") if w]
    setups = {n: setup(n, args.layers) for n in names}
    results: dict[str, Any] = {}
    tables: dict[str, Any] = {}
    trivial: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for n, s in setups.items():
            row, tables[n] = measure(s, InProcessExecutor(), folder, "inprocess", args.repeats)
            results[n] = {
                "layers_measured": s["layers"],
                "layers_in_model": len(s["all_layers"]),
                "subset": f"{len(s['layers'])} of {len(s['all_layers'])} layers, evenly spread; "
                f"1 batch of {s['items']} items",
                "candidates": s["candidates"],
                "prepare_seconds": s["prepare_seconds"],
                "inprocess": row,
                "ray": {},
            }
            print(f"{n}: in-process {row['jobs']} jobs in {row['map_seconds']:.1f} s", flush=True)
        for w in counts:
            t0 = time.perf_counter()
            ex = RayExecutor(workers=w, desc="scale")
            ex.cluster_cpus()
            start = time.perf_counter() - t0
            t0 = time.perf_counter()
            ex.map([Job(f"warm/{i}", time.sleep, ()) for i in range(2 * w)], 0.5, progress=False)
            warm = time.perf_counter() - t0 - 0.5 * 2  # the sleeps run in parallel over w workers
            try:
                trivial[str(w)] = trivial_overhead(ex)
                for n, s in setups.items():
                    row, sens = measure(s, ex, folder, f"ray{w}", args.repeats)
                    compare(row, results[n]["inprocess"], w, sens, tables[n])
                    row["cluster_start_seconds"] = start
                    row["worker_warmup_seconds"] = warm
                    results[n]["ray"][str(w)] = row
                    print(
                        f"{n}: ray x{w} {row['map_seconds']:.1f} s, overhead/job "
                        f"{row['overhead_per_job_seconds']:.3f} s (in run "
                        f"{row['overhead_per_job_in_run_seconds']:.3f} s), "
                        f"same={row['same_results_as_inprocess']}",
                        flush=True,
                    )
            finally:
                ex.close()
    for n, r in results.items():
        r["projection_200_layers"] = projection(
            r["inprocess"], {int(k): v for k, v in r["ray"].items()}, r["layers_in_model"]
        )
        for w, p in r["projection_200_layers"]["workers"].items():
            print(f"{n}: PROJECTED 200-layer model on {w} workers: {p['wall_hours']:.2f} h", flush=True)
    payload = {
        "what": "CLADO pairwise sensitivity jobs: in-process vs Ray (local cluster) on this machine",
        "machine_note": "2 cores shared with other jobs (see the load averages): Ray workers and the "
        "driver compete with them for the same cores, so 2 workers cannot reach 2x "
        "here, and wall times between configurations differ by the load of the "
        "moment and the kernel's per-session CPU share (sched_autogroup); CPU "
        "seconds are the comparable measure of compute",
        "sched_autogroup_enabled": autogroup(),
        "cpus": os.cpu_count(),
        "load_start": LOAD_START,
        "load_end": load(),
        "repeats": args.repeats,
        "trivial_jobs_on_ray": trivial,
        "tasks": results,
    }
    path = write(args.name, payload)
    print(f"wrote {path}")


LOAD_START = load()

if __name__ == "__main__":
    main()
