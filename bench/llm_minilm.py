"""MiniLM (all-MiniLM-L6-v2, the ``minilm`` task) under the LLM steps: RTN, GPTQ, AWQ+GPTQ, mixed.

Mean cosine of the sentence embeddings to the fp32 ones (512 validation sentences, 256
calibration sentences of ``pydoc_data.topics``), every Linear layer of the 6 BERT blocks
quantized (the word embeddings stay float, as in every minilm benchmark). Rows, by name:

* ``uniform/<setting>/<steps>``: one weight setting for every layer, near 4.5 average bits
  (w4g32, w4g32+asym, w4g128+asym) and near 6 (w6, w6+asym, w6g128+asym); steps ``rtn``,
  ``gptq`` (PTQ step ``gptq``, block by block over the BERT layers) and ``awq+gptq``;
* ``mixed/<bits>/<steps>``: sensitivity-ilp (the measured change of the task's loss, 1 − mean
  cosine, on the first calibration batch of 64 sentences; minilm is not a causal LM, so full
  forwards) over candidates w3g32+asym, w4g32+asym, w6g32+asym, w8g64 at 4.5 and 6.0 average
  bits, with ``rtn`` or ``gptq`` (GPTQ at each layer's own bits after the search). The four
  share one sensitivity: one run directory under /tmp/mixq-bench-minilm, overwritten, its
  ``store.sqlite`` kept (the first row measures, ``sensitivity_seconds`` says which).

The rows run in one process on one loaded task (building the task's fp32 targets takes minutes
on a loaded machine); each is written to bench/results/llm_minilm.json as it finishes with its
wall time and the process's peak resident memory so far; a rerun skips finished rows.

    OMP_NUM_THREADS=1 PYTHONPATH=src python -m bench.llm_minilm [--rows 'uniform/*'] [--redo]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import resource
import sys
import time
from typing import Any

from bench.common import RESULTS, provenance, write_rows
from bench.llm import stage_record

NAME = "llm_minilm"
UNIFORM = ("w4g32", "w4g32+asym", "w4g128+asym", "w6", "w6+asym", "w6g128+asym")
STEPS = {"rtn": [], "gptq": ["gptq"], "awq+gptq": ["awq", "gptq"]}
MIXED_CANDIDATES = ["w3g32+asym", "w4g32+asym", "w6g32+asym", "w8g64"]
MIXED_BITS = (4.5, 6.0)
GOALS = {4.5: 0.990, 6.0: 0.995}  # mean cosine at these average bits


def rows() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for s in UNIFORM:
        for step, ptq in STEPS.items():
            out[f"uniform/{s}/{step}"] = {"method": "uniform", "candidates": [s], "budget": {}, "ptq": ptq}
    for bits in MIXED_BITS:
        for step in ("rtn", "gptq"):
            out[f"mixed/{bits}/{step}"] = {
                "method": "sensitivity-ilp",
                "candidates": MIXED_CANDIDATES,
                "budget": {"avg_weight_bits": bits},
                "ptq": STEPS[step],
                "method_args": {"batches": SENSITIVITY_BATCHES},
                "share": True,
            }
    return out


VAL, CALIB = 512, 256
SENSITIVITY_BATCHES = 1  # of 64 sentences, cut into 8 parts for the errors (GPTQ calibrates on all 256)
RUNS = "/tmp/mixq-bench-minilm"


def run_one(name: str, task: Any) -> dict[str, Any]:
    import mixq

    row = rows()[name]
    shared = {"out": os.path.join(RUNS, row["method"]), "overwrite": True} if row.get("share") else {}
    res = mixq.run(
        task,
        row["method"],
        row["candidates"],
        row["budget"],
        ptq=row["ptq"],
        method_args=row.get("method_args", {}),
        **shared,
    )
    return {
        "row": name,
        "mean_cosine": res.metrics.metric,
        **stage_record(res),
        "budget": row["budget"],
        "candidates": row["candidates"],
    }


def load_results() -> dict[str, Any]:
    path = RESULTS / f"{NAME}.json"
    return json.loads(path.read_text()) if path.exists() else {"rows": {}}


def save_row(name: str, rec: dict[str, Any]) -> dict[str, Any]:
    doc = load_results()
    doc["rows"][name] = rec
    doc["provenance"] = provenance()
    doc["goals"] = {str(k): v for k, v in GOALS.items()}
    doc["val_sentences"], doc["calib_sentences"] = VAL, CALIB
    write_rows(NAME, doc)
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="*", help="fnmatch pattern(s) of row names, comma-separated")
    ap.add_argument("--redo", action="store_true", help="run rows already in the results again")
    args = ap.parse_args()
    import torch

    import mixq

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    patterns = args.rows.split(",")
    doc = load_results()
    todo = list(
        dict.fromkeys(n for p in patterns for n in rows() if fnmatch.fnmatchcase(n, p))
    )  # pattern order
    todo = [n for n in todo if args.redo or doc["rows"].get(n, {}).get("status") != "done"]
    if not todo:
        return
    t0 = time.perf_counter()
    task = mixq.tasks.get("minilm", val_size=VAL, calib_size=CALIB)
    fp = task.fp_metric()
    load = {"load_seconds": time.perf_counter() - t0, "fp_mean_cosine": fp}
    for name in todo:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            rec = {**run_one(name, task), "status": "done"}
        except Exception as e:  # noqa: BLE001 - a failed row is recorded and the others run
            rec = {"row": name, "status": "failed", "error": f"{type(e).__name__}: {e}"}
        rec["wall_seconds"] = time.perf_counter() - t0
        rec["cpu_seconds"] = time.process_time() - c0
        rec["peak_rss_mb_so_far"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rec["command"] = " ".join(["python", "-m", "bench.llm_minilm", *sys.argv[1:]])
        rec["task"] = load
        save_row(name, rec)
        print(name, rec.get("status"), rec.get("mean_cosine"), rec.get("avg_weight_bits"), flush=True)


if __name__ == "__main__":
    main()
