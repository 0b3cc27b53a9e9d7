"""CLADO against its own ablation (clado-naive) through ``mixq.run``, on all 10,000 test images.

Both methods run with the same settings (the defaults, with the sensitivity set given below) at
each budget; each row is written to bench/results/NAME.json as it finishes (resumable: rows
already there are kept). The run directories keep the sensitivity jobs, so later budgets reuse
them. The Fashion models are slow on two cores: pass a small sensitivity set.

    python -m bench.clado_ablation --task fashion-resnet20 --budgets 3.0,2.5,3.5 --batches 1 --samples 64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import mixq
from bench.common import RESULTS, provenance

CANDIDATES = "w2+asym+omse-a8,w4+asym+omse-a8,w8+asym+omse-a8"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="fashion-resnet20")
    ap.add_argument("--candidates", default=CANDIDATES)
    ap.add_argument("--budgets", default="3.0", help="average weight bits, comma-separated")
    ap.add_argument("--methods", default="clado,clado-naive")
    ap.add_argument("--batches", type=int, default=0, help="calibration batches of the sensitivity set")
    ap.add_argument("--samples", type=int, default=0, help="images of each sensitivity batch (0: all)")
    ap.add_argument("--out", default="clado_ablation")
    ap.add_argument("--runs", default="/tmp/mixq-bench-clado-ablation")
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = RESULTS / f"{args.out}.json"
    result = json.loads(path.read_text()) if path.exists() else {"rows": []}
    result["provenance"] = provenance()
    done = {(r["task"], r["method"], r["budget"], r["candidates"]) for r in result["rows"]}
    task = mixq.tasks.get(args.task)
    cands = args.candidates.split(",")
    cache = mixq.Cache()
    margs = {"batches": args.batches, "samples": args.samples}
    for b in [float(v) for v in args.budgets.split(",")]:
        for method in args.methods.split(","):
            if (args.task, method, b, args.candidates) in done:
                continue
            t0 = time.perf_counter()
            res = mixq.run(
                task,
                method,
                cands,
                {"avg_weight_bits": b},
                method_args=margs,
                out=Path(args.runs) / args.task / method,
                overwrite=True,
                cache=cache,
            )
            info = res.history[0]
            result["rows"].append(
                {
                    "task": args.task,
                    "method": method,
                    "budget": b,
                    "candidates": args.candidates,
                    "method_args": margs,
                    "metric": res.metrics.metric,
                    "fp32": res.metrics.fp_metric,
                    "val_images": sum(len(v[1]) for v in task.val),
                    "avg_weight_bits": res.metrics.avg_weight_bits,
                    "plan": {k: s.name for k, s in res.plan.layers.items()},
                    "pairs_kept": info.get("pairs_kept"),
                    "pairs_measured": info.get("pairs_measured"),
                    "status": info.get("status"),
                    "search_seconds": res.metrics.seconds,
                    "wall_seconds": time.perf_counter() - t0,
                }
            )
            print(f"{args.task} {method} {b}: {res.metrics.metric:.2f}", flush=True)
            path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
