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
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.sparq --tasks fashion-resnet20,fashion-mobilenetv2 \
        --settings a8,a4,asparq4_5opt_v --out sparq_10k      # the claims table's rows

Each task's entry is written as soon as it is done (with the command that produced it); tasks
from earlier runs stay in the file, so tasks can be run in separate invocations. Each setting's
row is also written as soon as it is evaluated, and a later run with the same ``--val`` skips the
settings its task already has (resumable). Every row keeps the indices of the test images it gets
wrong (``wrong``), so two settings' difference has a paired standard error
(``bench.common.paired_stderr``).
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


def all_settings() -> list[str]:
    """Every activation setting this script knows, in its order."""
    return [*BASELINES, *(f"a{n}" for n in ACT_FORMAT_NAMES)]


def run_task(
    name: str, val: int, settings: list[str] | None = None, done: dict | None = None, save=None
) -> dict:
    """Evaluate ``settings`` (default: every setting) on one task.

    ``done`` is this task's entry from an earlier run with the same ``val``: its rows are kept
    and their settings skipped. ``save(entry)`` is called after each setting (resumable).
    """
    t0 = time.perf_counter()
    settings = settings or all_settings()
    kept = {r["setting"]: r for r in (done or {}).get("rows", [])}
    task = mixq.tasks.get(name, val_size=val)
    qmodel = wrap(copy.deepcopy(task.model).eval())
    calibrate(qmodel, task.calib)
    infos = cost.probe(qmodel, task.calib[0])
    mc = cost.model_costs(qmodel, infos)
    qlayers = sites(qmodel)
    signed = {n for n, m in qlayers.items() if float(m.input_quant.stats_min) < 0}
    fp_pred, labels = predictions(task.model.eval(), task.val)
    rows = [
        {
            "setting": "fp32",
            "top1": 100.0 * float((fp_pred == labels).float().mean()),
            "disagree_fp32": 0.0,
            "wrong": _wrong(fp_pred, labels),
        }
    ]
    print(f"{name:20s} {'fp32':22s} {rows[0]['top1']:.2f}", flush=True)
    head = {
        "info": task.info,
        "val_images": sum(len(y) for _, y in task.val),
        "signed_layers_at_a8": sorted(signed),
    }
    for setting in settings:
        if setting in kept:
            rows.append(kept[setting])
            print(f"{name:20s} {setting:22s} done, kept", flush=True)
            continue
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
                "wrong": _wrong(pred, labels),
            }
        )
        if save is not None:
            save({**head, "rows": rows, "wall_seconds": time.perf_counter() - t0})
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
        **head,
        "rows": rows,
        "layers": layers,
        "macs_weighted_zero_fraction": sum(macs[n] * v["zero_fraction"] for n, v in layers.items()) / tot,
        "wall_seconds": time.perf_counter() - t0,
    }


def _wrong(pred: torch.Tensor, labels: torch.Tensor) -> list[int]:
    """Indices of the test images a setting gets wrong (for paired differences)."""
    return [int(i) for i in torch.nonzero(pred != labels).flatten()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="mnist-cnn,fashion-resnet20,fashion-mobilenetv2")
    ap.add_argument("--val", type=int, default=10_000, help="test images per task (first N)")
    ap.add_argument(
        "--settings",
        default="",
        help=f"activation settings (default all); valid: {', '.join(all_settings())}",
    )
    ap.add_argument("--out", default="sparq", help="result name under bench/results/")
    args = ap.parse_args()
    settings = [s for s in args.settings.split(",") if s] or all_settings()
    bad = [s for s in settings if s not in all_settings()]
    if bad:
        raise SystemExit(f"unknown settings {bad}; valid: {', '.join(all_settings())}")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    path = RESULTS / f"{args.out}.json"
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
        done = results.get(name)
        done = done if done and done.get("val_images") == args.val else None

        def save(entry: dict, name: str = name) -> None:
            results[name] = {"command": provenance()["command"], **entry}
            write(args.out, {"setup": setup, "tasks": results, "wall_seconds": time.perf_counter() - t0})

        save(run_task(name, args.val, settings, done, save))
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
