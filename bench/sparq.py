"""SPARQ on the real ReLU models: A8, uniform A4 and every 4-bit SPARQ window setting, W8.

For each task the model is wrapped and calibrated once (512 training images, min/max ranges),
then evaluated under each activation setting with weights 8-bit per channel (symmetric,
min/max) on every layer:

* ``a8``: 8-bit per-tensor activations (asymmetric; on a ReLU input the zero point is 0, so it
  is the unsigned 8-bit code SPARQ starts from);
* ``a4``, ``a4+mse``: uniform 4-bit activations, min/max range and MSE-searched range;
* ``sparq4_<opt>[_raw][_v]``: bSPARQ with 5, 3 or 2 window placements, rounding or RAW
  (truncation), without and with vSPARQ pairing.

Layers whose calibrated input has negative values (the first conv, fed normalized images; the
inputs after MobileNetV2's linear bottleneck adds) are outside SPARQ and keep ``a8`` in every
setting except fp32, so settings differ only on the non-negative sites. Per layer the script
records the measured sparsity of the 8-bit activation codes on the calibration images.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.sparq [--tasks mnist-cnn,...] [--val 1000]

Each task's entry is written as soon as it is done (with the command that produced it); tasks
from earlier runs stay in the file, so tasks can be run in separate invocations.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import mixq
from bench.common import RESULTS, provenance, write
from mixq import cost
from mixq.formats import ACT_FORMAT_NAMES
from mixq.plan import FLOAT, LayerSpec, Plan, parse_candidate
from mixq.quant import sparq
from mixq.wrap import apply, calibrate, sites, wrap

WEIGHT = "w8"
BASELINES = ("a8", "a4", "a4+mse")
SIGNED_FALLBACK = "a8"


def setting_specs(setting: str) -> tuple[LayerSpec, LayerSpec]:
    """Return (spec of a non-negative site, spec of a signed site) of one activation setting."""
    return parse_candidate(f"{WEIGHT}-{setting}"), parse_candidate(f"{WEIGHT}-{SIGNED_FALLBACK}")


def predictions(model: torch.nn.Module, batches: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the argmax predictions and the labels over ``batches``."""
    preds, labels = [], []
    with torch.inference_mode():
        for x, y in batches:
            preds.append(model(x).argmax(-1))
            labels.append(y)
    return torch.cat(preds), torch.cat(labels)


@torch.no_grad()
def sparsity(qmodel: torch.nn.Module, batches: list, signed: set[str]) -> dict[str, dict]:
    """Measure each non-negative site's 8-bit code statistics under the sparq4_5opt_v plan."""
    spec, fallback = setting_specs("asparq4_5opt_v")
    qlayers = sites(qmodel)
    apply(qmodel, Plan({n: fallback if n in signed else spec for n in qlayers}))
    acc: dict[str, dict[str, float]] = {}

    def hook(name: str):
        def fn(site: torch.nn.Module, args: tuple) -> None:
            if name in signed:
                return
            codes = sparq.to_codes(args[0], site.act_params().scale[0]).movedim(site.channel_axis, -1)
            partner_zero = sparq.partner_is_zero(codes)
            kept = sparq.quantize_codes(codes, "5opt", True, False)
            nz = codes != 0
            a = acc.setdefault(
                name,
                {
                    "n": 0,
                    "zero": 0,
                    "nonzero_partner_zero": 0,
                    "below16": 0,
                    "bsparq_5opt_exact": 0,
                    "nonzero": 0,
                },
            )
            a["n"] += codes.numel()
            a["zero"] += int((~nz).sum())
            a["nonzero"] += int(nz.sum())
            a["nonzero_partner_zero"] += int((nz & partner_zero).sum())
            a["below16"] += int((nz & (codes < 16)).sum())
            a["bsparq_5opt_exact"] += int((nz & (kept == codes)).sum())

        return fn

    handles = [m.input_quant.register_forward_pre_hook(hook(n)) for n, m in qlayers.items()]
    try:
        for x, _ in batches:
            qmodel(x)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, a in acc.items():
        nzc = max(1, a["nonzero"])
        out[name] = {
            "zero_fraction": a["zero"] / a["n"],
            "nonzero_with_zero_partner": a["nonzero_partner_zero"] / nzc,
            "nonzero_below_16": a["below16"] / nzc,
            "nonzero_exact_in_5opt": a["bsparq_5opt_exact"] / nzc,
            "values": a["n"],
        }
    return out


def run_task(name: str, val: int) -> dict:
    """Evaluate every setting on one task."""
    t0 = time.perf_counter()
    task = mixq.tasks.get(name, val_size=val)
    qmodel = wrap(copy.deepcopy(task.model).eval())
    calibrate(qmodel, task.calib)
    infos = cost.probe(qmodel, task.calib[0])
    mc = cost.model_costs(qmodel, infos)
    qlayers = sites(qmodel)
    signed = {n for n, m in qlayers.items() if float(m.input_quant.stats_min) < 0}
    fp_pred, labels = predictions(task.model.eval(), task.val)
    rows = [
        {"setting": "fp32", "top1": 100.0 * float((fp_pred == labels).float().mean()), "disagree_fp32": 0.0}
    ]
    print(f"{name:20s} {'fp32':22s} {rows[0]['top1']:.2f}", flush=True)
    for setting in (*BASELINES, *(f"a{n}" for n in ACT_FORMAT_NAMES)):
        spec, fallback = setting_specs(setting)
        plan = {n: fallback if n in signed else spec for n in qlayers}
        apply(qmodel, plan)
        t1 = time.perf_counter()
        pred, _ = predictions(qmodel, task.val)
        m = cost.metrics_of(mc, [plan.get(i.name, FLOAT) for i in infos])
        rows.append(
            {
                "setting": setting,
                "candidate": spec.name,
                "top1": 100.0 * float((pred == labels).float().mean()),
                "disagree_fp32": 100.0 * float((pred != fp_pred).float().mean()),
                "bops": m["bops"],
                "avg_weight_bits": m["avg_weight_bits"],
                "eval_seconds": time.perf_counter() - t1,
            }
        )
        r = rows[-1]
        print(
            f"{name:20s} {setting:22s} {r['top1']:.2f} disagree={r['disagree_fp32']:.2f}% "
            f"t={r['eval_seconds']:.1f}s",
            flush=True,
        )
    layers = sparsity(qmodel, task.calib, signed)
    macs = {i.name: i.macs for i in infos}
    tot = sum(macs[n] for n in layers)
    return {
        "info": task.info,
        "val_images": sum(len(y) for _, y in task.val),
        "signed_layers_at_a8": sorted(signed),
        "rows": rows,
        "layers": layers,
        "macs_weighted_zero_fraction": sum(macs[n] * v["zero_fraction"] for n, v in layers.items()) / tot,
        "wall_seconds": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="mnist-cnn,fashion-resnet20,fashion-mobilenetv2")
    ap.add_argument("--val", type=int, default=10_000, help="test images per task (first N)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    path = RESULTS / "sparq.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    results = dict(old.get("tasks", {}))  # tasks of earlier runs are kept, with their own command
    setup = {
        "weights": f"{WEIGHT}: 8-bit symmetric per output channel, min/max",
        "activations": "per tensor, min/max over 512 calibration images (sample of training set)",
        "signed_sites": f"{SIGNED_FALLBACK} in every quantized setting",
        "val_subsample": "first val_images test images of each task (see each task)",
        "sparsity": "8-bit codes of the calibration images at each non-negative site",
    }
    for name in args.tasks.split(","):
        results[name] = {"command": provenance()["command"], **run_task(name, args.val)}
        path = write("sparq", {"setup": setup, "tasks": results, "wall_seconds": time.perf_counter() - t0})
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
