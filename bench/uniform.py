"""Uniform PTQ on the real models: fp32 and every uniform setting, with two quantizer recipes.

Recipes: "minmax" (symmetric weights, min/max ranges: the plain baseline) and "omse"
(asymmetric weights, ranges searched to minimize the layer's output error on calibration
data: mixq's best PTQ rounding without reconstruction). Also "mse" (asymmetric, weight-space
squared-error search) for reference.

    .venv/bin/python -m bench.uniform [--tasks mnist-cnn,minilm]
"""

from __future__ import annotations

import argparse
import time

import mixq
from bench.common import measures, task_entry, write

SETTINGS = {  # name -> (weight bits, group, activation bits)
    "w8a8": (8, None, 8),
    "w4a8": (4, None, 8),
    "w8": (8, None, None),
    "w4": (4, None, None),
    "w3": (3, None, None),
    "w2": (2, None, None),
    "w2a8": (2, None, 8),
    "w4g128": (4, 128, None),
    "w3g128": (3, 128, None),
    "w2g128": (2, 128, None),
}
RECIPES = {"minmax": "", "mse": "+asym+mse", "omse": "+asym+omse"}


def candidate(bits: int, group: int | None, act: int | None, recipe: str) -> str:
    """Build the candidate name of one setting under one recipe."""
    name = f"w{bits}" + (f"g{group}" if group else "") + RECIPES[recipe]
    return name + (f"-a{act}" if act else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", default="mnist-cnn,minilm")
    args = ap.parse_args()
    results = {}
    for task_name in args.tasks.split(","):
        t0 = time.perf_counter()
        task = mixq.tasks.get(task_name)
        cache = mixq.Cache()  # the task prepared once for all its rows
        rows = []
        fp = task.fp_metric()
        for setting, (bits, group, act) in SETTINGS.items():
            for recipe in RECIPES:
                if group and task_name == "mnist-cnn" and recipe != "omse":
                    continue  # few layers have rows longer than 128 here; one recipe suffices
                cand = candidate(bits, group, act, recipe)
                m = mixq.run(task, method="uniform", candidates=[cand], cache=cache).metrics
                rows.append(
                    {
                        "setting": setting,
                        "recipe": recipe,
                        "candidate": cand,
                        **measures(m),
                    }
                )
                print(
                    f"{task_name:10s} {cand:26s} {m.metric:.4f} "
                    f"bits={m.avg_weight_bits:.3f} t={m.seconds:.1f}s",
                    flush=True,
                )
        results[task_name] = task_entry(task, fp, rows, t0)
    path = write("uniform", {"tasks": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
