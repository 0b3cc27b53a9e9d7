"""Pairwise (CLADO-style) bit-allocation programs: every solver of `mixq.search` at fixed time limits.

Instances (seeded): ``L × C`` layers × candidates with weight bits (2, 4, 8) for C = 3 and
(2, 3, 4, 8) for C = 4, layer sizes of ViT-B (q, k, v, proj 768², fc1, fc2 768·3072, repeated)
or ResNet-50 (its convolutions, repeated), cost ``numel · bits``, budget 3.0 average bits.
The pair matrix follows CLADO's model ``G[(l,a),(m,b)] ≈ Δ_laᵀ H Δ_mb`` with a low-rank curvature:
``Δ_la = κ_l 2^{−b_a} √numel_l (A_l + 0.3 ξ_la)`` in ``R^8``, ``G = ΔΔᵀ`` scaled to a largest
diagonal of 1, plus symmetric Gaussian noise of 0.3 times the entry's low-rank scale
(a measured matrix). ``indefinite``: that matrix as is; ``psd``: its PSD projection
(negative eigenvalues clipped, CLADO's repair); ``lowrank``: ``ΔΔᵀ`` alone (PSD, no noise).
The problem is built like
`mixq.methods.clado.objective_terms`: scores ``½ diag(G)``, pairs ``G`` (diagonal blocks dropped).

Real matrices: the CLADO sensitivity of mnist-cnn (``--real``; computed with a small batch,
seconds), unprojected and projected.

Each row (instance, solver, time limit) records the incumbent, bound, gap, status, seconds and
the command and commit that made it, and is written as soon as it finishes (resumable: rows
already in the JSON are skipped). One thread per solver; time limits are wall-clock.

    OMP_NUM_THREADS=1 python -m bench.iqp [--limits 10,60] [--sizes 29x4,50x3] [--solvers ...] [--redo]

``--redo`` recomputes the selected rows that an earlier commit made (each replaced as it finishes).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import numpy as np
import torch

from bench.common import RESULTS, provenance
from mixq.search import Problem
from mixq.search.portfolio import run_solver

NAME = "iqp"
SIZES = ("29x4", "50x3", "72x3", "100x4", "200x3")
KINDS = ("lowrank", "psd", "indefinite")
BITS = {3: (2, 4, 8), 4: (2, 3, 4, 8)}


def vit_sizes(n: int) -> list[int]:
    """ViT-B linear layers in order (q, k, v, proj, fc1, fc2 per block), repeated to ``n``."""
    block = [768 * 768] * 4 + [768 * 3072] * 2
    return [block[i % 6] for i in range(n)]


def resnet50_sizes(n: int) -> list[int]:
    """ResNet-50 convolutions after the stem (bottlenecks, downsamples), repeated to ``n``."""
    sizes, cin = [], 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            sizes += [cin * width, 9 * width * width, width * 4 * width]
            if b == 0:
                sizes.append(cin * 4 * width)
            cin = 4 * width
    return [sizes[i % len(sizes)] for i in range(n)]


def instance(L: int, C: int, kind: str, seed: int) -> Problem:
    """Return the seeded instance of the module docstring."""
    rng = np.random.default_rng(seed)
    numel = np.array(vit_sizes(L) if L in (72, 100) else resnet50_sizes(L), dtype=float)
    bits = np.array(BITS[C], dtype=float)
    rank = 8
    kappa = rng.lognormal(0.0, 1.0, size=L)
    a = rng.normal(size=(L, 1, rank)) + 0.3 * rng.normal(size=(L, C, rank))
    scale = (kappa[:, None] * 2.0 ** (-bits)[None, :] * np.sqrt(numel / numel.mean())[:, None]).reshape(-1)
    delta = scale[:, None] * a.reshape(L * C, rank) / math.sqrt(rank)
    g = delta @ delta.T
    noise = rng.normal(size=g.shape)
    if kind != "lowrank":
        g = g + 0.3 * np.outer(scale, scale) * (noise + noise.T) / math.sqrt(2)
    if kind == "psd":
        w, v = np.linalg.eigh(g)
        g = (v * np.maximum(w, 0.0)) @ v.T
    g /= np.abs(np.diag(g)).max()
    scores = 0.5 * np.diag(g).reshape(L, C)
    pairs = g.reshape(L, C, L, C).copy()
    pairs[np.arange(L), :, np.arange(L), :] = 0.0
    size = numel[:, None] * bits[None, :]
    budget = 3.0 * float(numel.sum())
    return Problem(
        torch.from_numpy(scores),
        {"size_bits": torch.from_numpy(size)},
        {"size_bits": budget},
        torch.from_numpy(pairs),
    )


def _row(problem: Problem, solver: str, limit: float) -> dict[str, Any]:
    sol = run_solver(solver, problem, time_limit=limit)
    return {
        "incumbent": sol.objective,
        "bound": sol.bound,
        "gap": sol.gap,
        "status": sol.status,
        "seconds": sol.seconds,
        "note": sol.note,
        "cost_over_budget": {k: sol.costs[k] / b for k, b in problem.budgets.items()},
    }


def summary(rows: list[dict[str, Any]]) -> str:
    """A markdown table: per instance and time limit, each solver's incumbent / bound / gap."""
    solvers = sorted({r["solver"] for r in rows})
    lines = [
        "| instance | limit s | " + " | ".join(f"{s} inc / bound / gap" for s in solvers) + " |",
        "|---|---|" + "---|" * len(solvers),
    ]
    keys = sorted({(r["instance"], r["time_limit"]) for r in rows}, key=lambda k: (k[1], k[0]))
    for inst, limit in keys:
        cells = []
        for s in solvers:
            r = next(
                (r for r in rows if (r["instance"], r["time_limit"], r["solver"]) == (inst, limit, s)), None
            )
            cells.append("" if r is None else f"{r['incumbent']:.4g} / {r['bound']:.4g} / {r['gap']:.3g}")
        lines.append(f"| {inst} | {limit:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--solvers", default="highs,cpsat,scip,sdp,qcr,portfolio")
    parser.add_argument("--limits", default="10,60")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", default="", help="zoo tasks for real CLADO matrices, e.g. mnist-cnn:64")
    parser.add_argument("--out", default=NAME)
    parser.add_argument("--summary", action="store_true", help="only write the markdown table (.md)")
    parser.add_argument(
        "--redo",
        action="store_true",
        help="recompute selected rows made at another commit (replaced when done)",
    )
    args = parser.parse_args()
    path = RESULTS / f"{args.out}.json"
    if args.summary:
        path.with_suffix(".md").write_text(summary(json.loads(path.read_text())["rows"]))
        return
    data = json.loads(path.read_text()) if path.exists() else {"rows": []}
    data["provenance"] = provenance()  # of the last invocation; each row names its own
    origin = {k: data["provenance"][k] for k in ("command", "git_commit", "src_dirty")}
    done = {
        (r["instance"], r["solver"], r["time_limit"])
        for r in data["rows"]
        if not args.redo or r.get("git_commit") == origin["git_commit"]
    }
    problems: dict[str, Problem] = {}
    for size in filter(None, args.sizes.split(",")):
        L, C = (int(v) for v in size.split("x"))
        for kind in args.kinds.split(","):
            problems[f"{size}-{kind}-s{args.seed}"] = (L, C, kind)  # built lazily
    if args.real:
        from bench.iqp_real import real_problems

        problems.update(real_problems(args.real))
    for limit in (float(v) for v in args.limits.split(",")):
        for name, spec in problems.items():
            for solver in args.solvers.split(","):
                if (name, solver, limit) in done:
                    continue
                problem = instance(*spec, args.seed) if isinstance(spec, tuple) else spec
                t0 = time.perf_counter()
                row = {
                    "instance": name,
                    "solver": solver,
                    "time_limit": limit,
                    **_row(problem, solver, limit),
                }
                row["wall_seconds"] = time.perf_counter() - t0
                row.update(origin)
                print(json.dumps(row), flush=True)
                key = (name, solver, limit)
                data["rows"] = [
                    r for r in data["rows"] if (r["instance"], r["solver"], r["time_limit"]) != key
                ]
                data["rows"].append(row)
                path.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
