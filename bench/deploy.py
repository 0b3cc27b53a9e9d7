"""Deployment: fp32 against exported int8 and mixed plans in ONNX Runtime on the CPU.

For each task and plan: the simulated metric (mixq's fake-quantized model), the ONNX file's
size, the packed safetensors size against the cost model, the metric computed from ONNX
Runtime's outputs (full graph optimization: fused integer kernels where ONNX Runtime has them,
and no optimization: the reference QDQ semantics), their agreement with the simulation, the
metric of mixq's emulation of ONNX Runtime's integer kernels (``mixq.export.emulate``) and the
fused outputs' agreement with it on every validation sample, and the median latency at batch 1
and batch 256 (minilm: 1, 32 and 256 sentences). Plans are timed interleaved (one run of each
in turn, repeated) so that all of them see the same load of a shared machine.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.deploy [--tasks mnist-cnn,minilm] [--repeats 7]

``--export-dir DIR`` only writes the plans' ONNX files, the validation data and the simulated
outputs, for ``bench/deploy_target.py DIR`` to check and time on another machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F

import mixq
import mixq.export
from bench import deploy_target
from bench.common import RESULTS, provenance, write
from mixq.export import qdq
from mixq.nn import Add
from mixq.plan import LayerSpec, Plan

TASKS = "mnist-cnn,fashion-resnet20,fashion-mobilenetv2,minilm"
# name -> (method, candidates, budget, method_args). w7a8 keeps int8 storage with weight codes in
# [-64, 63]: ONNX Runtime's u8s8 kernels on AVX2 saturate 16-bit pair sums with full-range int8
# weights, so w8a8 is measured on mnist-cnn only, to show that.
PLANS: dict[str, tuple[str, list[str], dict[str, float], dict[str, Any]]] = {
    "fp32": ("uniform", ["float"], {}, {}),
    "int8-w8a8": ("uniform", ["w8a8"], {}, {}),
    "int8-w7a8": ("uniform", ["w7a8"], {}, {}),
    "mixed-w4a8/w7a8": ("sensitivity-ilp", ["w4a8", "w7a8"], {"avg_weight_bits": 5.5}, {"batches": 1}),
}
# name -> the plan it is derived from, with the first layer's input left float (its weight codes
# unchanged): the network's input (an image) is not quantized, so the first conv, whose single
# input channel gives ONNX Runtime's integer kernels nothing to gain, runs in its float kernel.
FLOAT_INPUT = {"int8-w7a8-float-input": "int8-w7a8"}
# name -> the plan whose result is exported again with its 2-4 bit weight codes stored as INT8
# (mixq.export.save(..., int4_as_int8=True)): ORT's integer kernels instead of float on the fly.
INT8_STORAGE = {"mixed-w4a8/w7a8-int8-storage": "mixed-w4a8/w7a8"}
# name -> (the plan it is derived from, 4-bit codes stored as INT8): the same plan with both
# operands of every residual addition quantized (mixq.with_adds, the plan's input spec "a8"), so
# that ONNX Runtime runs the additions in integers and fuses the convs that feed them; for the
# models that have mixq.nn.Add modules (the Fashion ResNet-20 and MobileNetV2).
ADDS_PLANS = {
    "int8-w7a8+adds": ("int8-w7a8", False),
    "mixed-w4a8/w7a8+adds-int8-storage": ("mixed-w4a8/w7a8", True),
}
FULL_W8_TASKS = ("mnist-cnn",)
REFERENCE_BATCHES = 1  # output agreement with the simulation on the first batches (the metric: all)
THREADS = 1
MACHINE_SHARED = "2 cores shared with other jobs (see the load averages)"
MINILM_BIG_BATCHES = (32, 256)  # sentences of the large-batch latencies (256 take seconds per run)


def set_threads(n: int) -> None:
    """ONNX Runtime's intra-op threads for every session (inter-op: 1, the graphs are chains)."""
    global THREADS
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    THREADS = n


def session(path: Path, optimize: bool) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with ``THREADS`` intra-op threads."""
    return deploy_target.session(path, optimize, THREADS)


def feeds(batch: Any) -> dict[str, np.ndarray]:
    """ONNX inputs of a batch (the same names the export uses)."""
    names, xs, _ = qdq.model_inputs(batch)
    return {n: x.numpy() for n, x in zip(names, xs, strict=True)}


def outputs(run: Any, batches: list) -> list[np.ndarray]:
    return [run(b) for b in batches]


def metric_of(task: mixq.Task, outs: list[np.ndarray]) -> float:
    """The task's metric from model outputs: top-1 % or mean cosine to the fp32 embeddings."""
    if task.name == "minilm":
        return deploy_target.mean_cosine(np.concatenate(outs), truth(task))
    return deploy_target.top1(np.concatenate(outs), truth(task))


def truth(task: mixq.Task) -> np.ndarray:
    """The validation labels (classifiers) or fp32 embeddings (minilm), concatenated."""
    if task.name == "minilm":
        return np.concatenate([b["target"].numpy() for b in task.val])
    return np.concatenate([b[1].numpy() for b in task.val])


def agreement(task: mixq.Task, a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, float]:
    """Largest absolute difference of two output lists, and top-1 agreement (classifiers)."""
    x, y = np.concatenate(a), np.concatenate(b)
    out = deploy_target.agreement(x, y, classifier=task.name != "minilm")
    if task.name == "minilm":
        out["min_cosine"] = float((x * y).sum(1).min())
    return out


def latency_batches(task: mixq.Task) -> dict[int, Any]:
    """A batch of 1 and a batch of 256 inputs from the validation data (minilm: 1, 32 and 256
    sentences, as many as there are)."""
    if task.name == "minilm":
        width = max(b["input_ids"].shape[1] for b in task.val)
        pad = [
            {k: F.pad(b[k], (0, width - b[k].shape[1])) for k in ("input_ids", "attention_mask")}
            for b in task.val
        ]
        cat = {k: torch.cat([b[k] for b in pad]) for k in ("input_ids", "attention_mask")}
        n = int(task.val[0]["attention_mask"][0].sum())
        out = {1: {k: task.val[0][k][:1, :n] for k in ("input_ids", "attention_mask")}}
        for size in MINILM_BIG_BATCHES:
            big = {k: v[:size] for k, v in cat.items()}
            out[len(big["input_ids"])] = big
        return out
    x = torch.cat([b[0] for b in task.val])
    return {1: (x[:1],), 256: (x[:256],)}


def simulated_outputs(task: mixq.Task, model: torch.nn.Module, n: int) -> list[np.ndarray]:
    """Outputs of the fake-quantized model on the first ``n`` validation batches."""
    with torch.inference_mode():
        return [task.forward(model, b).numpy() for b in task.val[:n]]


def build_task(name: str, val: int | None) -> mixq.Task:
    """The task, with ``val`` validation samples (None: the task's default, the full test set).

    A validation subset comes with a smaller calibration draw on minilm (64) and Fashion-MNIST (256).
    """
    if val is None:
        return mixq.tasks.get(name)
    calib = 64 if name == "minilm" else 256 if name.startswith("fashion-") else None
    return mixq.tasks.get(name, val_size=val, calib_size=calib)


def kernel_profile(path: Path, batch: dict[str, np.ndarray], runs: int = 5) -> dict[str, float]:
    """Median ms per run of each node's kernel (ONNX Runtime's profiler, fused graph), largest first.

    The first (warm-up) run of each node is left out.
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
    so.enable_profiling = True
    so.profile_file_prefix = str(path.with_suffix(""))
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        s.run(None, batch)
    per: dict[str, list[float]] = {}
    for e in json.loads(Path(s.end_profiling()).read_text()):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            key = f"{e['args'].get('op_name')} {e['name'].removesuffix('_kernel_time')}"
            per.setdefault(key, []).append(e["dur"] / 1000)
    ms = {k: statistics.median(v[1:]) for k, v in per.items() if len(v) > 1}
    return dict(sorted(ms.items(), key=lambda kv: -kv[1]))


def int8_storage(plan: str) -> bool:
    """Whether a plan is exported with its 2-4 bit weight codes stored as INT8."""
    return plan in INT8_STORAGE or ADDS_PLANS.get(plan, ("", False))[1]


def plans_of(task: mixq.Task) -> Iterator[tuple[str, mixq.Result, dict[str, Any]]]:
    """Each plan of the benchmark run on ``task``: its name, mixq's result and how it was made."""
    done: dict[str, mixq.Result] = {}
    cache = mixq.Cache()  # the task prepared once for all its plans
    has_adds = any(isinstance(m, Add) for m in task.model.modules())
    for plan_name in [*PLANS, *FLOAT_INPUT, *INT8_STORAGE, *ADDS_PLANS]:
        if plan_name == "int8-w8a8" and task.name not in FULL_W8_TASKS:
            continue
        if plan_name in ADDS_PLANS and not has_adds:
            continue
        if plan_name in ADDS_PLANS:
            base_name = ADDS_PLANS[plan_name][0]
            res = mixq.evaluate(task, mixq.with_adds(done[base_name].plan, "a8"), cache)
            method, cands, budget, margs = f"{base_name}, residual additions a8", [], {}, {}
        elif plan_name in INT8_STORAGE:
            res = done[INT8_STORAGE[plan_name]]
            method, cands, budget, margs = PLANS[INT8_STORAGE[plan_name]]
        elif plan_name in FLOAT_INPUT:
            base = done[FLOAT_INPUT[plan_name]]
            first = next(iter(base.plan.layers))
            layers = {**base.plan.layers, first: LayerSpec(base.plan.layers[first].weight, None)}
            res = mixq.evaluate(task, Plan(layers, dict(base.plan.meta)), cache)
            method, cands, budget, margs = f"{FLOAT_INPUT[plan_name]}, first layer's input float", [], {}, {}
        else:
            method, cands, budget, margs = PLANS[plan_name]
            res = mixq.run(task, method, cands, budget, method_args=margs, cache=cache)
        done[plan_name] = res
        yield plan_name, res, {"method": method, "method_args": margs, "candidates": cands, "budget": budget}


def onnx_path(tmp: Path, task: str, plan: str) -> Path:
    return tmp / f"{task}-{plan.replace('/', '_')}.onnx"


def export_task(name: str, root: Path, val: int | None) -> dict[str, Any]:
    """Write ``name``'s plans as ONNX files into ``root`` with the data that
    ``bench/deploy_target.py`` checks them on elsewhere; return the task's manifest entry.

    ``root/NAME.npz`` holds the validation inputs and labels, the latency batches, and each plan's
    simulated outputs (mixq's fake-quantized model) on the whole validation set.
    """
    task = build_task(name, val)
    if task.name == "minilm":
        raise SystemExit("--export-dir writes the image classifiers (minilm's batches differ in length)")
    x = torch.cat([b[0] for b in task.val])
    arrays = {f"val:{k}": v for k, v in feeds((x,)).items()} | {"label": truth(task)}
    timing = latency_batches(task)
    for bs, batch in timing.items():
        arrays |= {f"lat{bs}:{k}": v for k, v in feeds(batch).items()}
    plans: dict[str, dict[str, Any]] = {}
    for plan_name, res, how in plans_of(task):
        path = onnx_path(root, name, plan_name)
        mixq.export.save(res, path, format="onnx", task=task, int4_as_int8=int8_storage(plan_name))
        sim = np.concatenate(simulated_outputs(task, res.model, len(task.val)))
        arrays[deploy_target.sim_key(plan_name)] = sim
        emu = mixq.export.emulate(res, task, int4_as_int8=int8_storage(plan_name))
        emulated = simulated_outputs(task, emu, len(task.val))  # ONNX Runtime's integer kernels
        arrays[deploy_target.sim_key(plan_name, "emu")] = np.concatenate(emulated)
        plans[plan_name] = {
            "file": path.name,
            "simulated_metric": res.metrics.metric,
            "plan_summary": res.plan.summary(),
            **how,
        }
        print(f"{name:20s} {plan_name:30s} sim={res.metrics.metric:.4f} -> {path.name}", flush=True)
    np.savez_compressed(root / f"{name}.npz", **arrays)
    return {
        "kind": "classifier",
        "metric_name": task.metric_name,
        "fp32_metric": task.fp_metric(),
        "info": task.info,
        "data": f"{name}.npz",
        "latency_batches": list(timing),
        "plans": plans,
    }


def bench_task(
    name: str, repeats: int, tmp: Path, val: int | None, latency_only: bool, profile: bool = False
) -> dict[str, Any]:
    t0 = time.perf_counter()
    task = build_task(name, val)
    rows: dict[str, dict[str, Any]] = {}
    sessions: dict[str, ort.InferenceSession] = {}
    paths: dict[str, Path] = {}
    for plan_name, res, how in plans_of(task):
        m = res.metrics
        path = onnx_path(tmp, name, plan_name)
        mixq.export.save(res, path, format="onnx", task=task, int4_as_int8=int8_storage(plan_name))
        paths[plan_name] = path
        if latency_only:
            sessions[plan_name] = session(path, optimize=True)
            rows[plan_name] = {"plan_summary": res.plan.summary(), "onnx_file_bytes": path.stat().st_size}
            continue
        packed = mixq.export.save(res, tmp / "packed.safetensors")
        header = int.from_bytes(packed.read_bytes()[:8], "little")
        payload = packed.stat().st_size - 8 - header
        sim = simulated_outputs(task, res.model, REFERENCE_BATCHES)
        row: dict[str, Any] = {
            **how,
            "plan_summary": res.plan.summary(),
            "avg_weight_bits": m.avg_weight_bits,
            "simulated_metric": m.metric,
            "cost_model_size_bytes": m.size_bytes,
            "safetensors_payload_bytes": payload,
            "safetensors_file_bytes": packed.stat().st_size,
            "onnx_file_bytes": path.stat().st_size,
        }
        emu = mixq.export.emulate(res, task, int4_as_int8=int8_storage(plan_name))
        emulated = simulated_outputs(task, emu, len(task.val))
        row["emulated_metric"] = metric_of(task, emulated)
        row["emulated_kernels"] = {k: len(v) for k, v in emu.emulated.items()}
        row["not_emulated_kernels"] = len(emu.not_emulated)
        for label, optimize in (("ort_fused", True), ("ort_reference", False)):
            s = session(path, optimize)
            outs = outputs(lambda b, s=s: s.run(None, feeds(b))[0], list(task.val))
            if optimize:
                row["ort_fused_metric"] = metric_of(task, outs)
                row["ort_fused_metric_minus_simulated"] = row["ort_fused_metric"] - m.metric
                row["ort_fused_metric_minus_emulated"] = row["ort_fused_metric"] - row["emulated_metric"]
                row["ort_fused_vs_emulated"] = agreement(task, outs, emulated)  # every sample
            else:  # the QDQ semantics without ORT's fused kernels: the simulated metric exactly
                row["ort_reference_metric"] = metric_of(task, outs)
                row["ort_reference_metric_minus_simulated"] = row["ort_reference_metric"] - m.metric
                row["ort_reference_samples"] = sum(len(o) for o in outs)
            row[f"{label}_vs_simulated"] = agreement(task, outs[:REFERENCE_BATCHES], sim)
            if optimize:
                sessions[plan_name] = s
                opt_path = tmp / "opt.onnx"
                so = ort.SessionOptions()
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                so.optimized_model_filepath = str(opt_path)
                ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
                ops: dict[str, int] = {}
                for node in onnx.load(str(opt_path)).graph.node:
                    ops[node.op_type] = ops.get(node.op_type, 0) + 1
                row["ort_fused_ops"] = ops
        rows[plan_name] = row
        print(
            f"{name:20s} {plan_name:16s} sim={m.metric:.4f} emulated={row['emulated_metric']:.4f} "
            f"ort={row['ort_fused_metric']:.4f} "
            f"ref_maxdiff={row['ort_reference_vs_simulated']['max_abs_diff']:.3g} "
            f"onnx={row['onnx_file_bytes']} payload={payload} cost={m.size_bytes:.0f}",
            flush=True,
        )
    inputs = latency_batches(task)
    load: dict[str, Any] = {"before": os.getloadavg()}
    for bs, batch in inputs.items():
        cpu = f"cpu_ms_batch{bs}"
        reps = repeats if name != "minilm" else min(repeats, 5)
        deploy_target.time_batch(
            name, sessions, feeds(batch), bs, reps, rows, lambda t, k=cpu: f"cpu {t[k]:.2f}"
        )
    load["after"] = os.getloadavg()
    if profile:  # where the time goes, per node, at the largest batch
        bs = max(inputs)
        for p in sessions:
            rows[p][f"kernel_ms_batch{bs}"] = kernel_profile(paths[p], feeds(inputs[bs]))
    return {
        "latency_load_average": load,
        "latency_batches": list(inputs),
        "metric_name": task.metric_name,
        "fp32_metric": task.fp_metric(),
        "info": task.info,
        "val_samples": sum(
            len(b[0]) if isinstance(b, (tuple, list)) else len(b["input_ids"]) for b in task.val
        ),
        "plans": rows,
        "wall_seconds": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="deploy")
    ap.add_argument("--val", type=int, help="validation samples (default: the task's full set)")
    ap.add_argument("--latency-only", action="store_true", help="export and time the plans, no metrics")
    ap.add_argument("--profile", action="store_true", help="record ONNX Runtime's per-node kernel times")
    ap.add_argument("--merge", help="comma-separated result names to merge into --out (no runs)")
    ap.add_argument("--threads", type=int, default=THREADS, help="ONNX Runtime intra-op threads")
    ap.add_argument("--export-dir", type=Path, help="only export plans and data, for bench/deploy_target.py")
    args = ap.parse_args()
    set_threads(args.threads)
    if args.export_dir:
        torch.set_num_threads(1)
        args.export_dir.mkdir(parents=True, exist_ok=True)
        tasks = {n: export_task(n, args.export_dir, args.val) for n in args.tasks.split(",")}
        manifest = {"provenance": provenance(), "val": args.val, "tasks": tasks}
        (args.export_dir / deploy_target.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"wrote {args.export_dir / deploy_target.MANIFEST}")
        return
    if args.merge:  # tasks run in separate processes: one file, each part with its provenance
        parts = {n: json.loads((RESULTS / f"{n}.json").read_text()) for n in args.merge.split(",")}
        merged = {
            "setup": next(iter(parts.values()))["setup"],
            "plans": next(iter(parts.values()))["plans"],
            "parts": {
                n: {"provenance": p["provenance"], "setup": p["setup"], "tasks": list(p["tasks"])}
                for n, p in parts.items()
            },
            "tasks": {},
        }
        for n, part in parts.items():  # a --latency-only part is attached to its task's full results
            for k, v in part["tasks"].items():
                if k in merged["tasks"]:
                    merged["tasks"][k]["latency_rerun"] = {"part": n, "setup": part["setup"], **v}
                else:
                    merged["tasks"][k] = v
        merged["speedups_vs_fp32"] = {  # wall-clock median ratios, fp32 and int8 timed interleaved
            task: {
                plan: {
                    k.removeprefix("speedup_vs_fp32_"): v
                    for k, v in row.items()
                    if k.startswith("speedup_vs_fp32_")
                }
                for plan, row in t["plans"].items()
                if plan != "fp32"
            }
            for task, t in merged["tasks"].items()
        }
        for task, t in merged["tasks"].items():
            if "latency_rerun" in t:
                merged["speedups_vs_fp32"][f"{task} (latency_rerun)"] = {
                    plan: {
                        k.removeprefix("speedup_vs_fp32_"): v
                        for k, v in row.items()
                        if k.startswith("speedup_vs_fp32_")
                    }
                    for plan, row in t["latency_rerun"]["plans"].items()
                    if plan != "fp32"
                }
        merged["goal"] = "int8 mnist-cnn at least 1.5x faster than fp32 at batch 256 in ONNX Runtime"
        print(f"wrote {write(args.out, merged)}")
        return
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for name in args.tasks.split(","):
            results[name] = bench_task(name, args.repeats, Path(d), args.val, args.latency_only, args.profile)
    path = write(
        args.out,
        {
            "setup": {
                "ort_intra_op_num_threads": THREADS,
                "ort_inter_op_num_threads": 1,
                "torch_threads": 1,
                "providers": ["CPUExecutionProvider"],
                "repeats": args.repeats,
                "timing": "median of interleaved repeats (one run per plan in turn) after one warm-up",
                "machine_shared": MACHINE_SHARED,
                "load_average_before": load_before,
                "load_average_after": os.getloadavg(),
                "ort_fused": "ORT_ENABLE_ALL (the deployment setting)",
                "ort_reference": "ORT_DISABLE_ALL (QDQ semantics, no fused kernels): metric on all "
                f"validation batches, output agreement on the first {REFERENCE_BATCHES}",
                "minilm_repeats": min(args.repeats, 5),
                "val": args.val if args.val is not None else "the task's full validation set",
            },
            "plans": {
                k: {"method": v[0], "candidates": v[1], "budget": v[2], "method_args": v[3]}
                for k, v in PLANS.items()
            }
            | {
                k: {"derived_from": v, "change": "the first layer's input is not quantized (float)"}
                for k, v in FLOAT_INPUT.items()
            }
            | {
                k: {"derived_from": v, "change": "exported with int4_as_int8=True (same values)"}
                for k, v in INT8_STORAGE.items()
            }
            | {
                k: {
                    "derived_from": v,
                    "change": "residual additions' operands quantized (mixq.with_adds, "
                    "'a8')" + (", exported with int4_as_int8=True" if i8 else ""),
                }
                for k, (v, i8) in ADDS_PLANS.items()
            },
            "tasks": results,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
