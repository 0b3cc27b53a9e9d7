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

    OMP_NUM_THREADS=2 python -m bench.clado_scale [--threads 2] [--rows notop,all,window8]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="notop,all", help=f"of {', '.join(ROWS)}")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    labels = [r for r in args.rows.split(",") if r]
    bad = [r for r in labels if r not in ROWS]
    if bad:
        raise SystemExit(f"clado_scale: unknown rows {bad}; valid: {', '.join(ROWS)}")
    path = RESULTS / f"{NAME}.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    rows = {r["label"]: r for r in data.get("rows", [])}
    for label in labels:
        if label in rows and rows[label].get("method_args") == ROWS[label]:
            continue
        row = run_row(label, args.threads)
        row.update({k: v for k, v in provenance().items() if k in ("command", "git_commit", "src_dirty")})
        rows[label] = row
        write(NAME, {"rows": list(rows.values())})
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
