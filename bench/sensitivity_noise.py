"""How noisy are the measured single-layer sensitivities, and what does more data cost?

For each zoo model and calibration size, the measured sensitivity (sensitivity-ilp's default:
the KL divergence of the output distribution from the float model's, each layer quantized
alone) with its standard errors over equal parts of the calibration data (``min_batches=8``),
and:

* ``median_se_gap_ratio``: the median over (layer, adjacent candidates by bits) of
  ``sqrt(se_a² + se_b²) / |score_a − score_b|``: below 1 the data tells the candidates apart
  (the combined SE treats the two scores as independent; they share batches, so this is a
  conservative figure);
* ``resolved``: the fraction of those gaps larger than twice their combined SE;
* ``median_rel_se``: the median of ``se / score``;
* ``seconds``: the wall time of the measurement (one thread).

Every (task, images) row is written as it finishes; a rerun skips the rows already there.

    OMP_NUM_THREADS=1 PYTHONPATH=src python -m bench.sensitivity_noise
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from typing import Any

import torch

import mixq
from bench.common import RESULTS, write
from mixq.api import prepare
from mixq.fold import fold_model
from mixq.plan import as_layer_spec
from mixq.sensitivity import measured
from mixq.wrap import sites

NAME = "sensitivity_noise"


def first_images(batches: list, n: int) -> list:
    """The first ``n`` examples of (x, y) batches, as batches."""
    out, left = [], n
    for x, y in batches:
        if left <= 0:
            break
        out.append((x[:left], y[:left]))
        left -= len(x[:left])
    if left > 0:
        raise ValueError(f"the task has fewer than {n} calibration images")
    return out


def noise_stats(single: torch.Tensor, se: torch.Tensor) -> dict[str, float]:
    """Median SE/gap ratio of adjacent candidates (overall and per pair), fraction resolved, median
    relative SE."""
    gap = (single[:, 1:] - single[:, :-1]).abs()  # candidates ordered by bits
    comb = (se[:, 1:] ** 2 + se[:, :-1] ** 2).sqrt()
    ratio = (comb / gap).flatten()
    rel = (se / single.abs()).flatten()
    return {
        "median_se_gap_ratio": float(ratio.nanmedian()),
        "resolved": float((gap > 2 * comb).double().mean()),
        "median_rel_se": float(rel.nanmedian()),
        "max_se_gap_ratio": float(ratio.nan_to_num(nan=0.0).max()),
        "median_se_gap_ratio_by_pair": [float(r.nanmedian()) for r in (comb / gap).T],
    }


def run_row(task: mixq.Task, candidates: list[str], images: int) -> dict[str, Any]:
    model = copy.deepcopy(task.model).eval()
    batch = task.calib[0]
    fold_model(model, lambda m: task.forward(m, batch))
    ftask = dataclasses.replace(task, model=model)
    qmodel, _ = prepare(ftask, [as_layer_spec(c) for c in candidates])
    layers = list(sites(qmodel))
    data = first_images(list(task.calib), images)
    t0 = time.perf_counter()
    sens = measured(qmodel, ftask, layers, candidates, batches=data, objective="kl", progress=False)
    seconds = time.perf_counter() - t0
    return {
        "images": images,
        "task_calib_images": sum(len(b[1]) for b in task.calib),
        "parts": sens.meta["batches"],
        "layers": len(layers),
        "seconds": seconds,
        **noise_stats(sens.single, sens.se),
        "below_noise": len(sens.meta["below_noise"]),
        "single": sens.single.tolist(),
        "se": sens.se.tolist(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="mnist-cnn,fashion-resnet20,fashion-mobilenetv2")
    ap.add_argument("--images", default="64,128,256,512")
    ap.add_argument("--candidates", default="w2,w3,w4,w8")
    ap.add_argument("--calib", type=int, default=0, help="calibration images of the task (0: its default)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = RESULTS / f"{NAME}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    results: dict[str, Any] = doc.get("tasks", {})
    candidates = args.candidates.split(",")
    for entry in results.values():  # statistics of rows written by an earlier version
        for r in entry["rows"]:
            r.update(noise_stats(torch.tensor(r["single"]), torch.tensor(r["se"])))
    for name in args.tasks.split(","):
        task = mixq.tasks.get(name, calib_size=args.calib or None)
        entry = results.setdefault(name, {"candidates": candidates, "rows": []})
        done = {r["images"] for r in entry["rows"]}
        for images in map(int, args.images.split(",")):
            if images in done:
                continue
            row = run_row(task, candidates, images)
            entry["rows"].append(row)
            print(
                f"{name} {images} images: SE/gap {row['median_se_gap_ratio']:.3f}, resolved "
                f"{row['resolved']:.2f}, {row['seconds']:.1f} s",
                flush=True,
            )
            write(NAME, {"metric": "KL to float outputs", "tasks": results})


if __name__ == "__main__":
    main()
