"""SmolLM2-135M (Q4_1-derived fp32) perplexity under uniform and mixed weight quantization.

The ``smollm2`` task (:func:`mixq.tasks.smollm2`): 512-token windows of ``pydoc_data.topics``
text, windows 8-11 validation, the first 4 other windows calibration. Rows, by name:

* ``fp``: the float model;
* ``uniform/<setting>/<steps>``: every Linear layer (lm_head included; the tied embedding stays
  a float copy, counted in ``size_bytes``) at one of w8g64, w4g128, w4g64, w4g32, w3g32, each
  symmetric, ``+asym`` (an integer zero point) and ``+fzero`` (a float16 offset per group, the
  asset's own Q4_1 grid at w4g32); steps ``rtn`` (round to nearest, min-max ranges), ``omse``
  (clip by the output MSE), ``gptq`` (PTQ step ``gptq``), ``mse+gptq`` (each group's range by
  the squared-error search, then ``gptq``) and ``awq+gptq`` (``awq`` then ``gptq``);
* ``export/w4g32+asym/embeddings``: uniform w4g32+asym with the tied embedding quantized too,
  saved as a packed file and loaded again (its size, the tie, the outputs);
* ``mixed/<method>/<bits>``: ``embeddings=True`` (lm_head and the embedding are one tied
  tensor, counted once), candidates w3g32+asym, w4g32+asym, w8g64 (and w3g32 so that 3.5 bits
  is feasible), searched by sensitivity-ilp, hawq and clado at 3.5, 4.0 and 4.25 average bits;
  ``mixed/sensitivity-ilp/<bits>/gptq`` the same plan search followed by GPTQ at each layer's
  own bits; ``mixed/sensitivity-ilp/<bits>/gptq/fzero``: the same with float-offset candidates
  (``FZERO_CANDIDATES``).

The hawq and clado rows of one method share their sensitivity: they run in one run directory per
method under ``--runs`` (overwritten, its ``store.sqlite`` kept), so the first of them measures
the traces or terms and the others read them (``sensitivity_seconds`` says which).
``--out NAME`` writes bench/results/NAME.json instead (the fp row is read from llm.json there).

A row whose PTQ step or method is not registered is recorded as "pending: step not available"
(or method) and runs once it is. Each row runs in its own process (its peak resident memory is
that process's ``ru_maxrss``) and is written to bench/results/llm.json as it finishes; a rerun
skips the rows there (``--redo`` runs them again).

    OMP_NUM_THREADS=1 python -m bench.llm --rows 'uniform/*/rtn'      # the RTN uniform rows
    OMP_NUM_THREADS=1 python -m bench.llm                             # every row
    OMP_NUM_THREADS=1 python -m bench.llm --rows 'mixed/hawq/*,mixed/clado/*' --out llm_mixed
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

from bench.common import RESULTS, provenance, write_rows

NAME = "llm"
SETTINGS = ("w8g64", "w4g128", "w4g64", "w4g32", "w3g32")
ZERO_POINTS = ("", "+asym", "+fzero")
STEPS: dict[str, dict[str, Any]] = {
    "rtn": {"ptq": [], "clip": ""},
    "omse": {"ptq": [], "clip": "+omse"},
    "gptq": {"ptq": ["gptq"], "clip": ""},
    "mse+gptq": {"ptq": ["gptq"], "clip": "+mse"},
    "awq+gptq": {"ptq": ["awq", "gptq"], "clip": ""},
}
MIXED_CANDIDATES = ["w3g32", "w3g32+asym", "w4g32+asym", "w8g64"]
MIXED_METHODS = ("sensitivity-ilp", "hawq", "clado")
MIXED_BITS = (3.5, 4.0, 4.25)
SHARED = ("hawq", "clado")  # methods whose rows share one sensitivity (see the module)
RUNS = "/tmp/mixq-bench-llm"
# GPTQ settings measured beside the defaults (rows ``<row>/<variant>``): calibration windows
# (the task's first N windows outside validation 8-11; 216 exist) and GPTQ's own settings.
GPTQ_VARIANTS: dict[str, dict[str, Any]] = {
    "c8": {"calib": 8, "gptq": {}},
    "c32": {"calib": 32, "gptq": {}},
    "c64": {"calib": 64, "gptq": {}},
    "c128": {"calib": 128, "gptq": {}},
    "c4-static": {"calib": 4, "gptq": {"groups": "static"}},
    "c4-act": {"calib": 4, "gptq": {"act_order": True}},
    "c4-damp0.1": {"calib": 4, "gptq": {"damp": 0.1}},
    "c32-static": {"calib": 32, "gptq": {"groups": "static"}},
    "c32-act": {"calib": 32, "gptq": {"act_order": True}},
    "c32-damp0.1": {"calib": 32, "gptq": {"damp": 0.1}},
}
GPTQ_SETTINGS = ("w4g128", "w4g128+asym", "w4g64+asym", "w4g32+asym", "w4g128+fzero")
# Mixed candidates with group-128/64 asymmetric 4-bit grids beside the defaults (rows ``.../wide``).
SENSITIVITY_WINDOWS = 8  # the mixed rows' sensitivity windows when GPTQ calibrates on more
WIDE_CANDIDATES = ["w3g32+asym", "w4g128+asym", "w4g64+asym", "w4g32+asym", "w8g64"]
# Float-offset candidates: w4g32+fzero is the block weights' own grid (5 bits with its offsets);
# at 4.25 average bits (the tied embedding/lm_head is 21 % of the weights) 8 bits do not fit, so
# the cheaper integer-zero w4g128+asym (4.16 bits) takes w8g64's place.
FZERO_CANDIDATES = ["w3g32+fzero", "w4g128+asym", "w4g128+fzero", "w4g64+fzero", "w4g32+fzero"]


def rows() -> dict[str, dict[str, Any]]:
    """Every row by name: what ``mixq.run`` gets (or ``fp``)."""
    out: dict[str, dict[str, Any]] = {"fp": {"kind": "fp"}}
    for s in SETTINGS:
        for asym in ZERO_POINTS:
            for step, how in STEPS.items():
                out[f"uniform/{s}{asym}/{step}"] = {
                    "kind": "run",
                    "method": "uniform",
                    "candidates": [f"{s}{asym}{how['clip']}"],
                    "budget": {},
                    "ptq": how["ptq"],
                    "embeddings": False,
                }
    for method in MIXED_METHODS:
        for bits in MIXED_BITS:
            out[f"mixed/{method}/{bits}"] = {
                "kind": "run",
                "method": method,
                "candidates": MIXED_CANDIDATES,
                "budget": {"avg_weight_bits": bits},
                "ptq": [],
                "embeddings": True,
            }
    for bits in MIXED_BITS:  # the mixed plan with GPTQ at each layer's own bits
        out[f"mixed/sensitivity-ilp/{bits}/gptq"] = {
            "kind": "run",
            "method": "sensitivity-ilp",
            "candidates": MIXED_CANDIDATES,
            "budget": {"avg_weight_bits": bits},
            "ptq": ["gptq"],
            "embeddings": True,
        }
    for s in GPTQ_SETTINGS:
        for variant, how in GPTQ_VARIANTS.items():
            out[f"uniform/{s}/gptq/{variant}"] = {
                **out["uniform/w4g128/gptq"],
                "candidates": [s],
                "calib": how["calib"],
                "ptq_args": {"gptq": how["gptq"]} if how["gptq"] else None,
            }
    for bits in MIXED_BITS:
        base = out[f"mixed/sensitivity-ilp/{bits}/gptq"]
        out[f"mixed/sensitivity-ilp/{bits}/gptq/wide"] = {**base, "candidates": WIDE_CANDIDATES}
        out[f"mixed/sensitivity-ilp/{bits}/gptq/fzero"] = {**base, "candidates": FZERO_CANDIDATES}
        for variant in ("c32", "c64"):
            how = GPTQ_VARIANTS[variant]
            base = out[f"mixed/sensitivity-ilp/{bits}/gptq"]
            sens = {"batches": SENSITIVITY_WINDOWS}  # GPTQ on all calibration windows
            out[f"mixed/sensitivity-ilp/{bits}/gptq/{variant}"] = {
                **base,
                "calib": how["calib"],
                "method_args": sens,
            }
            out[f"mixed/sensitivity-ilp/{bits}/gptq/{variant}/wide"] = {
                **base,
                "calib": how["calib"],
                "method_args": sens,
                "candidates": WIDE_CANDIDATES,
            }
    out["export/w4g32+asym/embeddings"] = {
        "kind": "export",
        "method": "uniform",
        "candidates": ["w4g32+asym"],
        "budget": {},
        "ptq": [],
        "embeddings": True,
    }
    return out


def pending(row: dict[str, Any]) -> str | None:
    """Why a row cannot run yet (a PTQ step or a method not registered), else None."""
    if row["kind"] == "fp":
        return None
    from mixq.methods import METHODS
    from mixq.ptq import STEPS as REGISTERED

    missing = [s for s in row["ptq"] if s not in REGISTERED]
    if missing:
        return f"pending: step not available ({', '.join(missing)})"
    if row["method"] not in METHODS:
        return f"pending: method not available ({row['method']})"
    return None


def run_one(name: str, fp_metric: float | None, runs: str = RUNS) -> dict[str, Any]:
    """Run one row in this process and return its record."""
    import torch

    import mixq

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    row = rows()[name]
    t0 = time.perf_counter()
    task = mixq.tasks.get("smollm2", calib_size=row.get("calib"))
    load = time.perf_counter() - t0
    out: dict[str, Any] = {"row": name, "load_seconds": load, "from_cache": task.info.get("from_cache")}
    if row["kind"] == "fp":
        t1 = time.perf_counter()
        value = task.fp_metric()
        out.update({"perplexity": -value, "metric": value, "eval_seconds": time.perf_counter() - t1})
        return out
    if fp_metric is not None:
        task._fp_metric = fp_metric  # measured by the fp row: the float model's windows, once
    shared = {}
    if row["method"] in SHARED and not row["ptq"]:
        shared = {"out": os.path.join(runs, row["method"]), "overwrite": True}
    res = mixq.run(
        task,
        row["method"],
        row["candidates"],
        row["budget"],
        ptq=row["ptq"],
        embeddings=row["embeddings"],
        ptq_args=row.get("ptq_args"),
        method_args=row.get("method_args"),
        **shared,
    )
    m = res.metrics
    if res.sensitivity is not None:
        out["sensitivity_kind"] = res.sensitivity.kind
        out["shared_store"] = shared.get("out")
    if row["kind"] == "export":  # the packed file: a tied tensor stored once, tied again on loading
        out.update(_export_check(res, task))
    out.update(
        {
            "perplexity": m.extra.get("perplexity"),
            "fp_perplexity": m.extra.get("fp_perplexity"),
            "metric": m.metric,
            "bops": m.bops,
            **stage_record(res),
            "calib_windows": len(task.calib),
            "ptq_args": row.get("ptq_args"),
            "method_args": row.get("method_args"),
            "float_layers": m.float_layers,
        }
    )
    return out


def stage_record(res: Any) -> dict[str, Any]:
    """A run's size and stage times: sensitivity, search (with it), PTQ records, evaluation, plan counts."""
    m = res.metrics
    return {
        "avg_weight_bits": m.avg_weight_bits,
        "size_bytes": m.size_bytes,
        "sensitivity_seconds": res.sensitivity.meta.get("seconds") if res.sensitivity is not None else None,
        "search_seconds": m.seconds,
        "eval_seconds": m.eval_seconds,
        "ptq": m.ptq,
        "plan_counts": _counts(res.plan),
    }


def _export_check(res: Any, task: Any) -> dict[str, Any]:
    import tempfile
    from pathlib import Path

    import torch

    import mixq

    with tempfile.TemporaryDirectory() as d:
        path = mixq.export.save(res, Path(d) / "model.safetensors")
        size = path.stat().st_size
        model = mixq.export.load(path)
    ids = task.val[0]["input_ids"]
    with torch.no_grad():
        equal = torch.equal(model(input_ids=ids).logits, res.model(input_ids=ids).logits)
    return {
        "file_bytes": size,
        "tied_after_load": model.get_input_embeddings().weight is model.get_output_embeddings().weight,
        "outputs_equal_after_load": equal,
        "tied": res.plan.meta.get("tied"),
    }


def _counts(plan: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for spec in plan.layers.values():
        key = spec.name if hasattr(spec, "name") else str(spec)
        counts[key] = counts.get(key, 0) + 1
    return counts


def load_results(name: str = NAME) -> dict[str, Any]:
    path = RESULTS / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    return {"rows": {}}


def save_row(name: str, rec: dict[str, Any], out: str = NAME) -> dict[str, Any]:
    """Add one row to the results file as it is now (another bench.llm process may add others)."""
    doc = load_results(out)
    doc["rows"][name] = rec
    doc["provenance"] = provenance()
    write_rows(out, doc)
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="*", help="fnmatch pattern(s) of row names, comma-separated")
    ap.add_argument("--redo", action="store_true", help="run rows already in the results again")
    ap.add_argument("--list", action="store_true", help="print the rows and whether each can run")
    ap.add_argument("--out", default=NAME, help="result name under bench/results/ (default llm)")
    ap.add_argument("--runs", default=RUNS, help="run directories of the rows that share a sensitivity")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a child process: run this row, print its record
    ap.add_argument("--fp-metric", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        rec = run_one(args.one, args.fp_metric, args.runs)
        rec["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rec["cpu_seconds"] = (
            time.process_time()
        )  # the row's CPU time (wall time depends on the machine's load)
        print("ROW " + json.dumps(rec))
        return
    patterns = args.rows.split(",")
    chosen = [n for n in rows() if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if args.list:
        for n in chosen:
            print(n, pending(rows()[n]) or "runs")
        return
    doc = load_results(args.out)
    if "fp" not in doc["rows"] and "fp" in load_results()["rows"]:
        doc = save_row("fp", load_results()["rows"]["fp"], args.out)  # the float perplexity, measured once
    if "fp" not in chosen and "fp" not in doc["rows"]:
        chosen.insert(0, "fp")  # the float perplexity first: every other row reuses it
    for name in chosen:
        done = doc["rows"].get(name)
        if done and not args.redo and "pending" not in str(done.get("status", "")):
            continue
        why = pending(rows()[name])
        if why:
            doc = save_row(name, {"row": name, "status": why}, args.out)
            print(name, why, flush=True)
            continue
        fp = doc["rows"].get("fp", {}).get("metric")
        cmd = [sys.executable, "-m", "bench.llm", "--one", name, "--runs", args.runs]
        cmd += ["--fp-metric", repr(fp)] if fp is not None and name != "fp" else []
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        line = next((x for x in proc.stdout.splitlines() if x.startswith("ROW ")), None)
        if proc.returncode != 0 or line is None:
            rec = {"row": name, "status": "failed", "error": proc.stderr.strip().splitlines()[-3:]}
        else:
            rec = {**json.loads(line[4:]), "status": "done"}
        rec["wall_seconds"] = wall
        rec["command"] = " ".join(["python", *cmd[1:]])
        doc = save_row(name, rec, args.out)
        print(name, rec.get("status"), rec.get("perplexity"), f"{wall:.0f}s", flush=True)


if __name__ == "__main__":
    main()
