"""CLADO on a 50-layer depthwise-separable CNN: how long the pairs, the solver and the run take.

The network (:class:`DepthwiseNet`): a 3×3 stem convolution, 24 depthwise-separable blocks
(3×3 depthwise + 1×1 pointwise, ReLU6, a residual connection where the shape allows, strides 2
at blocks 1, 9 and 17) and a linear classifier: 50 quantizable layers. Its task labels random
3×32×32 inputs by the float network itself, after its last layer is scaled to confident and
balanced logits (the teacher pattern of ``mixq.tasks``' synthetic tasks): 512 calibration images
(4 batches of 128), 512 validation images. CLADO runs with its defaults (all 1,225 layer pairs
× 9 candidate pairs, 8 parts for the standard errors, PSD repair, the portfolio solver with a
60 s limit) at 4 average weight bits on ``w{2,4,8}+asym`` weights, float activations.

Recorded per row in ``bench/results/clado_scale.json`` (written when each row finishes;
finished rows are skipped; the run directory ``runs/clado-scale/<row>`` keeps the finished
sensitivity jobs, so an interrupted row resumes, and its timings then count only the rest):
the sensitivity (single and pair) time, the pair evaluations, the solver's time and status, the
total ``mixq.run`` wall and CPU time, the threads and the machine's load.

    OMP_NUM_THREADS=1 python -m bench.clado_scale [--threads 1] [--rows notop,all,window8]
    OMP_NUM_THREADS=1 python -m bench.clado_scale --project   # CPU projection, checked on finished jobs
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mixq
from bench.common import RESULTS, provenance, write
from mixq.tasks import _teacher_task

NAME = "clado_scale"
RUNS = Path(__file__).resolve().parent.parent / "runs" / "clado-scale"
CANDIDATES = ["w2+asym", "w4+asym", "w8+asym"]
BUDGET = 4.0
ROWS: dict[str, dict[str, Any]] = {
    "all": {},  # CLADO's defaults: every layer pair, every candidate pair
    "notop": {"top_pairs": False},  # the pairs of w8 (near-lossless) taken as independent: 4/9 of the passes
    "window8": {"window": 8},  # pairs of layers at most 8 apart
}


class Block(nn.Module):
    """A depthwise-separable block: 3×3 depthwise, ReLU6, 1×1 pointwise, ReLU6 (+ input)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin)
        self.pw = nn.Conv2d(cin, cout, 1)
        self.act = nn.ReLU6()
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.pw(self.act(self.dw(x))))
        return x + 0.5 * y if self.residual else y


class DepthwiseNet(nn.Module):
    """Stem, 24 depthwise-separable blocks, classifier: 50 quantizable layers."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        widths = [16] + [32] * 8 + [48] * 8 + [64] * 8
        strides = {1: 2, 9: 2, 17: 2}
        self.blocks = nn.Sequential(
            *(Block(widths[i - 1], widths[i], strides.get(i, 1)) for i in range(1, len(widths)))
        )
        self.fc = nn.Linear(widths[-1], classes)
        self.act = nn.ReLU6()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.uniform_(m.bias, 0.0, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.act(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def task() -> mixq.Task:
    """The teacher-labelled task of the module docstring."""
    torch.manual_seed(0)
    return _teacher_task(DepthwiseNet(), (3, 32, 32), "depthwise50", n=512)


def load() -> float:
    """The machine's 1-minute load average (0 where unknown)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def run_row(label: str, threads: int) -> dict[str, Any]:
    """Run CLADO with the row's settings; return the timings."""
    t = task()
    layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in t.model.modules())
    load_before = load()
    t0, c0 = time.perf_counter(), time.process_time()
    res = mixq.run(
        t,
        method="clado",
        candidates=CANDIDATES,
        budget={"avg_weight_bits": BUDGET},
        method_args=ROWS[label],
        out=RUNS / label,  # its store keeps finished sensitivity jobs: an interrupted row resumes
        overwrite=True,
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    info = res.history[0]
    return {
        "label": label,
        "method_args": ROWS[label],
        "layers": layers,
        "candidates": CANDIDATES,
        "budget_avg_weight_bits": BUDGET,
        "threads": threads,
        "load_before": load_before,
        "load_after": load(),
        "fp_metric": t.fp_metric(),
        "metric": res.metrics.metric,
        "avg_weight_bits": res.metrics.avg_weight_bits,
        "sensitivity_seconds": info.get("sensitivity_seconds"),
        "pair_evals": info.get("pair_evals"),
        "pairs_measured": info.get("pairs_measured"),
        "pairs_kept": info.get("pairs_kept"),
        "solve_seconds": info.get("solve_seconds"),
        "solver_status": info.get("status"),
        "solver_gap": info.get("gap"),
        "run_seconds": res.metrics.seconds,
        "wall_seconds": wall,
        "cpu_seconds": cpu,  # all threads of this process: what the machine's other load disturbs least
        "under_15_min": wall < 900.0,
    }


def layer_profile(t: mixq.Task, repeats: int = 5) -> tuple[list[str], list[float], float]:
    """CPU seconds of one float forward over a 64-image part, and each layer's share of it.

    Returns the quantizable layers in execution order, the fraction of the forward's CPU time
    spent from each layer's start to the end (the suffix a pair pass with that layer second
    runs), and the forward's CPU seconds (one thread).
    """
    x = t.calib[0][0][:64]
    layers = [(n, m) for n, m in t.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    starts: dict[str, float] = {}

    def hook(name: str) -> Any:
        def pre(_module: nn.Module, _inputs: Any) -> None:
            starts.setdefault(name, time.process_time())

        return pre

    hooks = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
    totals = {n: 0.0 for n, _ in layers}
    forward = 0.0
    with torch.inference_mode():
        t.model(x)  # warm-up
        for _ in range(repeats):
            starts.clear()
            c0 = time.process_time()
            t.model(x)
            c1 = time.process_time()
            forward += c1 - c0
            for n, _ in layers:
                totals[n] += (c1 - starts[n]) / max(c1 - c0, 1e-12)
    for h in hooks:
        h.remove()
    names = [n for n, _ in layers]
    return names, [totals[n] / repeats for n in names], forward / repeats


def project(splits: int = 8) -> dict[str, Any]:
    """A projection (labelled as such) of each row's CPU seconds from one forward's measured cost.

    Assumptions: with prefix reuse a single (layer l at c) runs the forward from l, a pair
    (l at c, m at c') the forward from m; every part of 64 images costs the same; the solver's
    60 s limit is added once. The finished row jobs of ``runs/clado-scale/*`` check it.
    """
    torch.set_num_threads(1)
    t = task()
    names, suffix, forward = layer_profile(t)
    L, C = len(names), len(CANDIDATES)
    out: dict[str, Any] = {"forward_cpu_seconds_64_images": forward, "layers": L, "splits": splits}
    for label, args in ROWS.items():
        pair_c = C - (0 if args.get("top_pairs", True) else 1)
        window = args.get("window") or L
        singles = splits * C * forward * sum(suffix)
        pairs = (
            splits
            * pair_c
            * pair_c
            * forward
            * sum(suffix[m] for l_ in range(L) for m in range(l_ + 1, min(L, l_ + 1 + window)))
        )
        out[label] = {
            "single_cpu_seconds": singles,
            "pair_cpu_seconds": pairs,
            "pair_evals": splits * pair_c * pair_c * sum(min(window, L - 1 - l_) for l_ in range(L)),
            "total_cpu_seconds_with_60s_solver": singles + pairs + 60.0,
        }
    out["check"] = check_projection(names, suffix, forward)
    return out


def check_projection(names: list[str], suffix: list[float], forward: float) -> list[dict[str, Any]]:
    """The finished row jobs of every row's store: measured pair CPU seconds against the projection."""
    import sqlite3

    rows = []
    for store in sorted(RUNS.glob("*/store.sqlite")):
        with sqlite3.connect(store) as conn:
            for key, value in conn.execute("SELECT job_key, value FROM jobs"):
                job = json.loads(value)
                if not isinstance(job, dict) or not job.get("pair_evals"):
                    continue
                layer = key.split("/")[-2]
                pos = names.index(layer)
                per_later = job["pair_evals"] / max(1, len(names) - 1 - pos)  # candidate pairs x batches
                predicted = forward * per_later * sum(suffix[pos + 1 :])
                rows.append(
                    {
                        "row": store.parent.name,
                        "job": "/".join(key.split("/")[-2:]),
                        "pair_evals": job["pair_evals"],
                        "measured_pair_cpu_seconds": job.get("pair_cpu_seconds"),
                        "projected_pair_cpu_seconds": predicted,
                    }
                )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="notop,all", help=f"of {', '.join(ROWS)}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--project", action="store_true", help="write the CPU projection of every row and stop")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    labels = [r for r in args.rows.split(",") if r]
    bad = [r for r in labels if r not in ROWS]
    if bad:
        raise SystemExit(f"clado_scale: unknown rows {bad}; valid: {', '.join(ROWS)}")
    path = RESULTS / f"{NAME}.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    if args.project:
        data["projection"] = {
            **project(),
            **{k: v for k, v in provenance().items() if k in ("command", "git_commit")},
        }
        write(NAME, {k: v for k, v in data.items() if k != "provenance"})
        print(json.dumps({k: v for k, v in data["projection"].items() if k != "check"}, indent=1))
        return
    rows = {r["label"]: r for r in data.get("rows", [])}
    for label in labels:
        if label in rows and rows[label].get("method_args") == ROWS[label]:
            continue
        row = run_row(label, args.threads)
        row.update({k: v for k, v in provenance().items() if k in ("command", "git_commit", "src_dirty")})
        rows[label] = row
        data = json.loads(path.read_text()) if path.is_file() else {}  # a projection written meanwhile
        write(
            NAME,
            {
                **{k: v for k, v in data.items() if k not in ("provenance", "rows")},
                "rows": list(rows.values()),
            },
        )
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
