"""How noisy is DDQ's sensitivity read-out, and what does the noise cost? bench/results/ddq_readout.json.

DDQ's read-out (:func:`mixq.methods.ddq.readout_scores`) measures, for every layer l and
candidate j, the training loss with layer l on j's deployable grid minus the loss with the search
quantizers everywhere, on ``readout_batches`` training batches, and the exact ILP picks the plan
under the budget. This benchmark measures those ΔL_lj per batch (on the pretrained model with the
search quantizers at the budget's bits, i.e. DDQ's read-out at step 0) on ``--batches`` training
batches, then for read-outs of B = 1, 2, 4, 8 batches (disjoint sets):

* the signal-to-noise of the scores: the share of (layer, candidate) entries whose mean is within
  two standard errors of zero, the ILP's objective;
* the agreement of the plans chosen from two disjoint sets of B batches (share of layers with the
  same candidate);
* the quality of each plan: the training loss of the deployed plan (every layer on its chosen
  candidate's grid) on ``--held`` held-out training batches, beside uniform w4a8 at the same budget.

::

    OMP_NUM_THREADS=1 python -m bench.ddq_readout --task fashion-mobilenetv2 --batches 16 --held 8
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch

from bench.common import provenance, write

A8 = [f"w{b}a8" for b in (2, 3, 4, 6, 8)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="fashion-mobilenetv2")
    ap.add_argument("--batches", type=int, default=16, help="read-out batches measured one by one")
    ap.add_argument("--held", type=int, default=8, help="held-out batches that score each plan")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import mixq
    from mixq import api
    from mixq.methods import ddq
    from mixq.options import RunOptions
    from mixq.wrap import apply

    t0 = time.perf_counter()
    task = mixq.tasks.get(args.task, val_size=100)
    uni = mixq.run(task, "uniform", candidates=["w4a8"])
    budget = {"avg_weight_bits": uni.metrics.avg_weight_bits}
    specs = api._candidates(A8)
    ctx = api._context(task, specs, budget, RunOptions(), None, "")
    apply(ctx.qmodel, {})
    cfg = ddq.Config()
    start = ddq.budget_bits(ctx)
    installed = ddq.Installed(ctx.qmodel, ddq.search_quantizers(ctx, cfg, start))
    train = task.train
    per_batch = []
    for i in range(args.batches):
        per_batch.append(ddq.readout_scores(ctx, installed, [train[i]]))
        print(f"batch {i}: {time.perf_counter() - t0:.0f}s", flush=True)
    installed.restore()
    scores = torch.stack(per_batch)  # [N, L, C]
    held = [train[args.batches + i] for i in range(args.held)]

    def plan_loss(choices: list[int]) -> float:
        inst = ddq.Installed(ctx.qmodel, ddq.deploy_quantizers(ctx, choices))
        try:
            with torch.no_grad():
                ctx.qmodel.eval()
                return float(sum(float(task.loss(ctx.qmodel, b)) for b in held) / len(held))
        finally:
            inst.restore()

    j4 = [c.name for c in specs].index("w4a8")
    rows: dict[str, Any] = {"uniform w4a8": {"held_loss": plan_loss([j4] * len(ctx.layers))}}
    for b in (1, 2, 4, 8):
        sets = [scores[k * b : (k + 1) * b] for k in range(args.batches // b)]
        plans, objectives, noisy, losses = [], [], [], []
        for s in sets:
            mean = s.mean(0)
            choices, _ = ddq.choose(ctx, mean, cfg.time_limit)
            plans.append(choices)
            objectives.append(float(mean[torch.arange(len(choices)), torch.tensor(choices)].sum()))
            if b > 1:
                se = s.std(0) / math.sqrt(b)
                noisy.append(float(((mean.abs() < 2 * se)[:, [c != "w2a8" for c in A8]]).float().mean()))
        for choices in plans[:4]:
            losses.append(plan_loss(choices))
        agree = [
            sum(x == y for x, y in zip(plans[k], plans[k + 1], strict=True)) / len(ctx.layers)
            for k in range(0, len(plans) - 1, 2)
        ]
        rows[f"B={b}"] = {
            "sets": len(sets),
            "ilp_objective": objectives,
            "share_within_2se_w3_to_w8": noisy or None,
            "plan_agreement_disjoint_pairs": agree,
            "held_loss_of_plans": losses,
            "plans_w_bits": [[int(specs[j].weight.bits) for j in p] for p in plans[:4]],
        }
        print(f"B={b}: {rows[f'B={b}']}", flush=True)
    per_entry_sd = scores.std(0)  # one batch
    out = {
        "task": args.task,
        "candidates": A8,
        "budget": budget,
        "start_bits": start,
        "layers": ctx.layers,
        "readout_batches_measured": args.batches,
        "held_out_batches": args.held,
        "batch_size": int(train[0][0].shape[0]),
        "mean_delta_loss": {c: [round(float(v), 5) for v in scores.mean(0)[:, j]] for j, c in enumerate(A8)},
        "sd_one_batch": {c: [round(float(v), 5) for v in per_entry_sd[:, j]] for j, c in enumerate(A8)},
        "rows": rows,
        "seconds": time.perf_counter() - t0,
        "provenance": provenance(),
    }
    print(f"wrote {write('ddq_readout', out)}")


if __name__ == "__main__":
    main()
