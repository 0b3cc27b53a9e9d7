"""Real CLADO pair matrices for bench/iqp.py: measured on a zoo model with a small sensitivity batch.

The sensitivity (single and pairwise loss changes, KL to the float outputs) is measured
by `mixq.methods.clado.measure` on the first ``images`` calibration images with symmetric
per-channel weight candidates, activations float, and turned into problems exactly as CLADO
does (`mixq.methods.clado.problem`): the unprojected matrix and its PSD projection, each at a
budget of 3.0 average weight bits (cost ``weight_bits``). The problems are cached under
bench/results/iqp_real/ (npz) so later runs of bench/iqp.py reuse them.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

import mixq
from bench.clado import sub_batches
from bench.common import RESULTS
from mixq import cost
from mixq.api import prepare
from mixq.methods import clado
from mixq.methods.common import Context
from mixq.plan import as_layer_spec
from mixq.search import Problem

CACHE = RESULTS / "iqp_real"


def measure(task_name: str, bits: tuple[int, ...], images: int) -> dict[str, np.ndarray]:
    """Return single, pairs, size costs and the 3-bit budget of ``task_name``."""
    task = mixq.tasks.get(task_name)
    specs = [as_layer_spec(f"w{b}") for b in bits]
    qmodel, infos = prepare(task, specs, mixq.Cache())
    costs = cost.cost_table(infos, specs)
    numel = np.array([i.numel for i in infos], dtype=float)
    ctx = Context(
        task=dataclasses.replace(task, calib=sub_batches(list(task.calib), images)),
        qmodel=qmodel,
        layers=[i.name for i in infos],
        candidates=specs,
        costs=costs,
        model_costs=cost.model_costs(qmodel, infos),
        budget={},
        limits={},
        out=None,
    )
    t0 = time.perf_counter()
    sens = clado.measure(ctx, clado.Config(loss="kl"))
    seconds = time.perf_counter() - t0
    return {
        "single": sens.single.double().numpy(),
        "pairs": sens.pairs.double().numpy(),
        "weight_bits": costs["weight_bits"].double().numpy(),
        "budget": np.array(3.0 * float(numel.sum())),
        "seconds": np.array(seconds),
    }


def problems_of(task_name: str, bits: tuple[int, ...], images: int) -> dict[str, Problem]:
    """The raw and PSD-projected CLADO problems of ``task_name`` (cached)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{task_name}-w{''.join(map(str, bits))}-{images}.npz"
    if not path.exists():
        np.savez(path, **measure(task_name, bits, images))
    d = np.load(path)
    L, C = d["single"].shape
    out = {}
    for psd in (False, True):
        g = clado.interaction_matrix(d["single"], d["pairs"])
        if psd:
            g = clado.psd_projection(g)
        scores, pairs = clado.objective_terms(g, L, C)
        size = torch.from_numpy(d["weight_bits"])
        out[f"{task_name}-{'psd' if psd else 'raw'}"] = Problem(
            scores, {"weight_bits": size}, {"weight_bits": float(d["budget"])}, pairs
        )
    return out


def real_problems(spec: str) -> dict[str, Problem]:
    """``spec``: comma-separated ``task[:images[:bits]]`` (default 64 images, bits 248)."""
    out: dict[str, Problem] = {}
    for item in spec.split(","):
        name, images, bits = (item.split(":") + ["", ""])[:3]
        bits = bits or "248"
        found = problems_of(name, tuple(int(b) for b in bits), int(images or 64))
        out.update({k if bits == "248" else f"{k}-w{bits}": p for k, p in found.items()})
    return out


if __name__ == "__main__":  # python -m bench.iqp_real [task:images,...]: measure and cache
    import sys

    for k, p in real_problems(sys.argv[1] if len(sys.argv) > 1 else "mnist-cnn:64").items():
        print(k, tuple(p.scores.shape), Path(CACHE), flush=True)
