"""Run exported ONNX models on the CPU one deploys to: metric against the simulation, and latency.

``bench/deploy.py --export-dir DIR`` writes each plan's ONNX file, the validation data, mixq's
simulated outputs and metrics, and the latency batches into DIR. This script needs only numpy
and onnxruntime (no torch, no mixq), so the same files can be checked on any other machine:
another CPU has other integer instructions (AVX-512 VNNI, AMX), and its ONNX Runtime other
kernels. For each task and plan it records, on that machine:

- the metric computed from ONNX Runtime's outputs on the whole validation set, with full graph
  optimization (fused integer kernels) and with none (the QDQ reference semantics), against the
  simulated metric, and the largest output difference and top-1 agreement with the simulation;
  the fused outputs also against mixq's emulation of ONNX Runtime's integer kernels
  (``mixq.export.emulate``, computed where the folder was written);
- the median latency at each exported batch size, all plans timed interleaved, and the paired
  speed-up over fp32 (the median over rounds of fp32's time / the plan's time in that round).

    python -m bench.deploy_target DIR [--repeats 61] [--threads 1] [--out deploy_target_NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.common import write

MANIFEST = "manifest.json"
# CPU features that decide which integer kernels ONNX Runtime's MLAS can use
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")
VAL_BATCH = 256  # validation inputs per ONNX Runtime call


def sim_key(plan: str, kind: str = "sim") -> str:
    """The npz key of a plan's simulated ("sim") or emulated ("emu", mixq.export.emulate) outputs.

    Plan names may hold a '/'.
    """
    return f"{kind}:" + plan.replace("/", "_")


def session(path: Path, optimize: bool, threads: int = 1) -> ort.InferenceSession:
    """An ONNX Runtime CPU session: ``threads`` intra-op threads, one inter-op (the graphs are chains).

    ``optimize``: ORT_ENABLE_ALL (the deployment setting: fused integer kernels), else
    ORT_DISABLE_ALL (each QDQ node run as written: the reference semantics).
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def cpu_info() -> dict[str, Any]:
    """This machine's CPU: model name, logical cores and the integer-kernel flags it has."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), "flags": [f for f in CPU_FLAGS if f in flags]}


def time_plans(
    runs: dict[str, Callable[[], Any]], repeats: int, baseline: str = "fp32", suffix: str = ""
) -> dict[str, dict[str, Any]]:
    """Time each plan's run interleaved (one run of each in turn, ``repeats`` rounds, one warm-up).

    Returns per plan: the median wall and process-CPU milliseconds, all wall times, the speed-up
    over ``baseline`` as a ratio of medians, and the paired speed-up: the median over rounds of
    the baseline's time over the plan's time in the same round (which cancels the machine's slow
    drifts that a ratio of two medians keeps), with its quartiles. Each key ends with ``suffix``
    (all wall times: ``latency_ms{suffix}_all``).
    """
    if baseline not in runs:
        raise ValueError(f"baseline {baseline!r} is not among the plans: {', '.join(runs)}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    wall: dict[str, list[float]] = {p: [] for p in runs}
    cpu: dict[str, list[float]] = {p: [] for p in runs}  # this process's CPU time: less
    for run in runs.values():  # warm-up                  # sensitive to other jobs
        run()
    for _ in range(repeats):
        for p, run in runs.items():
            t, c = time.perf_counter(), time.process_time()
            run()
            wall[p].append(time.perf_counter() - t)
            cpu[p].append(time.process_time() - c)
    rows: dict[str, dict[str, Any]] = {}
    base, base_cpu = statistics.median(wall[baseline]), statistics.median(cpu[baseline])
    for p in runs:
        ratios = [a / b for a, b in zip(wall[baseline], wall[p], strict=True)]
        row = {
            f"latency_ms{suffix}": 1000 * statistics.median(wall[p]),
            f"latency_ms{suffix}_all": [1000 * t for t in wall[p]],
            f"cpu_ms{suffix}": 1000 * statistics.median(cpu[p]),
            f"speedup_vs_fp32{suffix}": base / statistics.median(wall[p]),
            f"paired_speedup_vs_fp32{suffix}": statistics.median(ratios),
            f"cpu_speedup_vs_fp32{suffix}": base_cpu / statistics.median(cpu[p]),
        }
        if len(ratios) >= 4:
            q1, _, q3 = statistics.quantiles(ratios, n=4)
            row[f"paired_speedup_quartiles{suffix}"] = [q1, q3]
        rows[p] = row
    return rows


def time_batch(
    name: str,
    sessions: dict[str, ort.InferenceSession],
    feed: dict[str, np.ndarray],
    bs: int,
    repeats: int,
    rows: dict[str, dict[str, Any]],
    detail: Callable[[dict[str, float]], str],
) -> None:
    """Time every plan's session on one batch (:func:`time_plans`), add the times to the plan's row
    and print them, each latency followed by ``detail`` of the plan's times in brackets."""
    timed = time_plans(
        {p: (lambda s=s: s.run(None, feed)) for p, s in sessions.items()}, repeats, suffix=f"_batch{bs}"
    )
    for p, t in timed.items():
        rows[p].update(t)
    print(
        f"{name:20s} batch {bs}: "
        + ", ".join(f"{p} {t[f'latency_ms_batch{bs}']:.2f} ms ({detail(t)})" for p, t in timed.items()),
        flush=True,
    )


def top1(outs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent of logits ``outs`` [N, classes] against integer ``labels`` [N]."""
    return float(100.0 * (outs.argmax(1) == labels).mean())


def mean_cosine(outs: np.ndarray, targets: np.ndarray) -> float:
    """Mean row-wise dot product of unit-norm embeddings ``outs`` and ``targets`` [N, d]."""
    return float((outs * targets).sum(1).mean())


def agreement(outs: np.ndarray, ref: np.ndarray, classifier: bool) -> dict[str, float]:
    """Largest absolute difference between two output arrays, and top-1 agreement (classifiers)."""
    out = {"max_abs_diff": float(np.abs(outs - ref).max())}
    if classifier:
        out["top1_agreement"] = float((outs.argmax(1) == ref.argmax(1)).mean())
    return out


def run_all(s: ort.InferenceSession, inputs: dict[str, np.ndarray], batch: int = VAL_BATCH) -> np.ndarray:
    """The first output of ``s`` on every row of ``inputs`` (arrays of equal length), in batches."""
    n = len(next(iter(inputs.values())))
    return np.concatenate(
        [s.run(None, {k: v[i : i + batch] for k, v in inputs.items()})[0] for i in range(0, n, batch)]
    )


def _arrays(data: Any, prefix: str) -> dict[str, np.ndarray]:
    """The arrays ``prefix:NAME`` of an npz file, keyed by NAME (the ONNX input names)."""
    return {k.removeprefix(prefix + ":"): data[k] for k in data.files if k.startswith(prefix + ":")}


def check_task(root: Path, name: str, spec: dict[str, Any], repeats: int, threads: int) -> dict[str, Any]:
    """Metric, agreement with the simulation, and latency of one task's exported plans."""
    if spec["kind"] != "classifier":
        raise SystemExit(f"task {name}: kind {spec['kind']!r} is not checked here; valid: classifier")
    data = np.load(root / spec["data"])
    inputs, labels = _arrays(data, "val"), data["label"]
    rows: dict[str, dict[str, Any]] = {}
    fused: dict[str, ort.InferenceSession] = {}
    for plan, p in spec["plans"].items():
        sim = data[sim_key(plan)]
        row: dict[str, Any] = {
            "file": p["file"],
            "simulated_metric": p["simulated_metric"],
            "simulated_metric_here": top1(sim, labels),
        }
        emu = data[sim_key(plan, "emu")] if sim_key(plan, "emu") in data.files else None
        if emu is not None:
            row["emulated_metric"] = top1(emu, labels)
        for label, optimize in (("ort_fused", True), ("ort_reference", False)):
            s = session(root / p["file"], optimize, threads)
            outs = run_all(s, inputs)
            row[f"{label}_metric"] = top1(outs, labels)
            row[f"{label}_metric_minus_simulated"] = row[f"{label}_metric"] - p["simulated_metric"]
            row[f"{label}_vs_simulated"] = agreement(outs, sim, classifier=True)
            if optimize:
                fused[plan] = s
                if emu is not None:  # ONNX Runtime's integer kernels as mixq emulates them
                    row["ort_fused_metric_minus_emulated"] = row["ort_fused_metric"] - row["emulated_metric"]
                    row["ort_fused_vs_emulated"] = agreement(outs, emu, classifier=True)
        rows[plan] = row
        print(
            f"{name:20s} {plan:30s} sim={p['simulated_metric']:.4f} fused={row['ort_fused_metric']:.4f} "
            f"ref={row['ort_reference_metric']:.4f}",
            flush=True,
        )
    load = {"before": os.getloadavg()}
    for bs in spec["latency_batches"]:
        speedup = f"paired_speedup_vs_fp32_batch{bs}"
        time_batch(
            name, fused, _arrays(data, f"lat{bs}"), bs, repeats, rows, lambda t, k=speedup: f"{t[k]:.2f}x"
        )
    load["after"] = os.getloadavg()
    return {
        "metric_name": spec["metric_name"],
        "fp32_metric": spec["fp32_metric"],
        "val_samples": len(labels),
        "latency_batches": spec["latency_batches"],
        "latency_load_average": load,
        "plans": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path, help="a folder written by bench/deploy.py --export-dir")
    ap.add_argument("--repeats", type=int, default=61)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--tasks", help="comma-separated tasks of the folder (default: all)")
    ap.add_argument("--out", default="deploy_target", help="result name under bench/results")
    args = ap.parse_args()
    path = args.dir / MANIFEST
    if not path.is_file():
        raise SystemExit(f"{path} not found: write the folder with bench/deploy.py --export-dir {args.dir}")
    manifest = json.loads(path.read_text())
    names = args.tasks.split(",") if args.tasks else list(manifest["tasks"])
    unknown = [n for n in names if n not in manifest["tasks"]]
    if unknown:
        raise SystemExit(f"tasks {unknown} are not in {path}; it has: {', '.join(manifest['tasks'])}")
    load_before = os.getloadavg()
    results = {n: check_task(args.dir, n, manifest["tasks"][n], args.repeats, args.threads) for n in names}
    out = write(
        args.out,
        {
            "exported_by": manifest["provenance"],
            "cpu": cpu_info(),
            "setup": {
                "ort_intra_op_num_threads": args.threads,
                "ort_inter_op_num_threads": 1,
                "providers": ["CPUExecutionProvider"],
                "repeats": args.repeats,
                "timing": "median of interleaved repeats (one run per plan in turn) after one warm-up",
                "ort_fused": "ORT_ENABLE_ALL (the deployment setting)",
                "ort_reference": "ORT_DISABLE_ALL (QDQ semantics, no fused kernels)",
                "load_average_before": load_before,
                "load_average_after": os.getloadavg(),
            },
            "tasks": results,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
