"""ONNX Runtime against mixq's simulation on an ImageNet-class depthwise CNN that is not in the zoo.

The network is MobileNetV2 (width 1.0, 1,000 classes; Sandler et al. 2018, table 2) written here
from its definition: a 3x3 stride-2 stem, 17 inverted-residual blocks (1x1 expansion, 3x3
depthwise, 1x1 projection, residual additions where shapes allow), a 1x1 head to 1,280 channels,
global average pooling and a linear classifier, with batch norm after every conv and ReLU6 after
every expansion, depthwise and the stem/head convs. Weights are random (He-normal, seed 0); the
batch-norm statistics are those of the random images (one pass in training mode) and its affine
parameters are drawn with a log-normal spread (per-channel scales over about two decades, as in
trained MobileNetV2 depthwise layers), so that folding batch norm gives realistic per-channel
weight ranges. Inputs: 224x224 images of smoothed Gaussian noise (seed per batch).

Per row (a plan from ``mixq.run``, batch norm folded, int8 activations): the ONNX export
(``mixq.export.save(..., format="onnx")``, default options) is run by ONNX Runtime (CPU provider,
full graph optimization) on 1,000 inputs; reported: the share of inputs whose top-1 class equals
the simulated model's (``res.model``), the largest absolute logit difference, and the same
against ``mixq.export.emulate`` (ONNX Runtime's integer kernels in PyTorch), and, as a measure
of how far any one-code difference spreads in this network, the simulation against itself on
the inputs scaled by 1 + 1e-6. Rows are written to
bench/results/onnx_unseen.json as each finishes; a row already there is kept (``--redo`` runs
it again; ``--tag`` names a set of rows, e.g. "before" and "after" a fix). Rows ``+int32_bias``
run the plan with ``ptq=["int32_bias"]`` (each bias on its accumulator's int32 grid, as ORT adds
it); ``--trace N`` adds, on N more inputs, where the simulation's codes first differ from the
emulation's, layer by layer (``bench.onnx_trained.trace``; with and without int32 biases).

    OMP_NUM_THREADS=1 PYTHONPATH=src python -m bench.onnx_unseen --tag after
    OMP_NUM_THREADS=1 PYTHONPATH=src python -m bench.onnx_unseen --tag traced --size 112 --trace 100
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import mixq
from bench.common import RESULTS, provenance, write_rows

NAME = "onnx_unseen"
# t (expansion), c (channels), n (blocks), s (first stride): MobileNetV2's table 2
SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
ROWS = {  # name -> (method, candidates, budget)
    "mbv2-w8a8": ("uniform", ["w8a8"], None),
    "mbv2-w4a8": ("uniform", ["w4a8"], None),
    "mbv2-mixed-w4a8-w8a8": ("uniform", ["w4a8"], None),  # replaced below: alternate layers
    "mbv2-w8a8+int32_bias": ("uniform", ["w8a8"], None),  # with ptq=["int32_bias"]
    "mbv2-w4a8+int32_bias": ("uniform", ["w4a8"], None),
}


def conv_bn(
    cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True
) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    return [*layers, nn.ReLU6()] if act else layers


class Block(nn.Module):
    """MobileNetV2's inverted residual: expand (1x1), depthwise (3x3), project (1x1, linear)."""

    def __init__(self, cin: int, cout: int, stride: int, t: int) -> None:
        super().__init__()
        mid = cin * t
        layers = conv_bn(cin, mid, 1) if t != 1 else []
        layers += conv_bn(mid, mid, 3, stride, groups=mid) + conv_bn(mid, cout, 1, act=False)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = conv_bn(3, 32, 3, 2)
        cin = 32
        for t, c, n, s in SETTINGS:
            for i in range(n):
                layers.append(Block(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += conv_bn(cin, 1280, 1)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def images(n: int, seed: int, size: int) -> torch.Tensor:
    """Smoothed Gaussian noise, per-channel standardized: natural-image-like low frequencies."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size // 4, size // 4, generator=g)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x + 0.3 * torch.randn(n, 3, size, size, generator=g)
    return (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)


@torch.no_grad()
def build(size: int, gain: float = 0.7, gain_project: float = 0.3, spread: float = 0.8) -> nn.Module:
    """MobileNetV2 with random weights, batch-norm statistics of the images, spread BN scales.

    Each block's batch-norm scales are log-normal (sigma 0.8: per-channel ranges over about two
    decades) around 0.7 before a ReLU6 and 0.3 on the linear projection, as trained networks
    keep their residual branches small; with larger gains a random batch-normed network is
    chaotic (an input change of 1e-6 moves the float logits by O(1)), where no two
    computations of the same function agree. The classifier reads the features minus their
    mean, scaled so that the logits' input-dependent part has standard deviation 3.
    """
    torch.manual_seed(0)
    model = MobileNetV2()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative averages over the pass below
    model.train()
    for i in range(2):
        model(images(16, 100 + i, size))
    g = torch.Generator().manual_seed(1)
    for block in model.modules():
        if isinstance(block, Block):
            bns = [m for m in block.body if isinstance(m, nn.BatchNorm2d)]
            for j, m in enumerate(bns):
                last = j == len(bns) - 1
                k = gain_project if last else gain
                m.weight.copy_(k * torch.exp(spread * torch.randn(m.num_features, generator=g)))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g) + (0.0 if last else 0.35))
    model.eval()
    feats = model.features(images(64, 200, size)).mean((2, 3))
    logits = model.classifier(feats - feats.mean(0))
    model.classifier.weight.mul_(3.0 / logits.std())
    model.classifier.bias.copy_(-model.classifier.weight @ feats.mean(0))
    return model


def plan_row(name: str, task: mixq.Task) -> Any:
    method, cands, budget = ROWS[name]
    if name != "mbv2-mixed-w4a8-w8a8":
        return mixq.run(task, method, cands, budget, ptq=["int32_bias"] if "int32_bias" in name else [])
    from mixq.plan import Plan, as_layer_spec

    res = mixq.run(task, "uniform", ["w8a8"])  # every other layer at 4 bits: a mixed plan
    w4, w8 = as_layer_spec("w4a8"), as_layer_spec("w8a8")
    layers = {n: (w4 if i % 2 else w8) for i, n in enumerate(res.plan.layers)}
    return mixq.evaluate(task, Plan(layers, dict(res.plan.meta)))


def measure(res: Any, task: mixq.Task, n: int, size: int, batch: int) -> dict[str, Any]:
    import onnxruntime as ort

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        path = mixq.export.save(res, Path(d) / "m.onnx", format="onnx", task=task)
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        emu = mixq.export.emulate(res, task)
        agree_sim = agree_emu = agree_self = 0
        diff_sim = diff_emu = diff_self = 0.0
        rows_emu = 0
        for i in range(0, n, batch):
            x = images(min(batch, n - i), 1000 + i, size)
            y = s.run(None, {"input": x.numpy()})[0]
            with torch.no_grad():
                sim, em = res.model(x).numpy(), emu(x).numpy()
                nudged = res.model(x * (1 + 1e-6)).numpy()  # the simulation's own sensitivity
            agree_self += int((nudged.argmax(1) == sim.argmax(1)).sum())
            diff_self = max(diff_self, float(np.abs(nudged - sim).max()))
            agree_sim += int((y.argmax(1) == sim.argmax(1)).sum())
            agree_emu += int((y.argmax(1) == em.argmax(1)).sum())
            diff_sim = max(diff_sim, float(np.abs(y - sim).max()))
            diff_emu = max(diff_emu, float(np.abs(y - em).max()))
            rows_emu += int((np.abs(y - em) > 1e-4 + 1e-4 * np.abs(em)).any(1).sum())
    return {
        "inputs": n,
        "top1_agree_simulation": agree_sim / n,
        "max_logit_diff_simulation": diff_sim,
        "top1_agree_emulation": agree_emu / n,
        "max_logit_diff_emulation": diff_emu,
        "outputs_off_emulation": rows_emu,
        "top1_agree_simulation_nudged_input": agree_self / n,
        "max_logit_diff_simulation_nudged_input": diff_self,
        "emulated": {k: len(v) for k, v in emu.emulated.items()},
        "not_emulated": len(emu.not_emulated),
        "seconds": time.perf_counter() - t0,
    }


def traced(res: Any, task: mixq.Task, xs: list[torch.Tensor]) -> dict[str, Any]:
    """Where the simulation's codes first differ from the emulation's (``bench.onnx_trained.trace``),
    for the simulation and, on a plan without it, the simulation with the int32_bias step."""
    import copy

    from bench.onnx_trained import trace
    from mixq.ptq.int32_bias import int32_bias

    out = {"simulation": trace(res.model, mixq.export.emulate(res, task), xs)}
    if not any(p.get("step") == "int32_bias" for p in res.metrics.ptq or []):
        sim = copy.deepcopy(res.model)
        int32_bias(sim, task)
        out["int32 bias"] = trace(sim, mixq.export.emulate(sim, task), xs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    ap.add_argument("--tag", default="after", help="the set of rows (e.g. before/after a fix)")
    ap.add_argument("--inputs", type=int, default=1000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--trace", type=int, default=0, help="inputs of the code trace (bench.onnx_trained)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    path = RESULTS / f"{NAME}.json"
    model = build(args.size)
    calib = [(images(16, 10 + i, args.size), torch.zeros(16, dtype=torch.long)) for i in range(2)]
    val = [(images(16, 20, args.size), torch.zeros(16, dtype=torch.long))]
    task = mixq.Task(model, calib, val, name=f"mobilenetv2-{args.size}")
    for name in args.rows.split(","):
        doc = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
        key = f"{args.tag}/{name}"
        if key in doc["rows"] and not args.redo:
            continue
        t0 = time.perf_counter()
        res = plan_row(name, task)
        rec = {"row": name, "tag": args.tag, "size": args.size, "plan": ROWS[name][1]}
        rec.update(measure(res, task, args.inputs, args.size, args.batch))
        if args.trace:
            rec["trace"] = traced(res, task, [images(args.trace, 5000, args.size)])
        rec["wall_seconds"] = time.perf_counter() - t0
        print(key, json.dumps(rec), flush=True)
        doc = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
        doc["rows"][key] = rec
        doc["provenance"] = provenance()
        doc["model"] = (
            "MobileNetV2 1.0 (random He-normal weights, BN stats of the inputs, log-normal BN scales)"
        )
        write_rows(NAME, doc)


if __name__ == "__main__":
    main()
