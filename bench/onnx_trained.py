"""ONNX Runtime against mixq's simulation on a trained CNN that is not in the zoo, and where the two
first differ, layer by layer.

The network is a MobileNetV3-small-like net written here for 28x28 grey images (Howard et al.
2019, "Searching for MobileNetV3", ICCV, table 2, scaled down): a 3x3 stride-2 "same"-padding
stem (a Conv2d subclass padding in its own forward, as TensorFlow ports do) with hard-swish, then
inverted-residual blocks (1x1 expansion, 3x3 or 5x5 depthwise, squeeze-excitation gating with
average pooling, ReLU6 and hard-sigmoid, 1x1 linear projection, residual additions where shapes
allow) with ReLU6 or hard-swish, a 1x1 head with hard-swish, global average pooling and a
two-layer classifier; batch norm after every conv (folded by mixq). It is trained here for two
epochs on the Fashion-MNIST training images (seed 0, Adam, one thread) and its weights shipped in
``bench/weights/fashion-mbv3s.safetensors`` (about 0.2 MB; ``--retrain`` trains again).

Per row (a plan from ``mixq.run`` on 2 batches of 64 training images; int8 activations; each
plan also with ``ptq=["int32_bias"]``, rows ``NAME+int32_bias``, whose trace is of that model):
the ONNX export (``mixq.export.save(..., format="onnx")``) run by ONNX Runtime (CPU provider,
full optimization) on all 10,000 Fashion-MNIST test images and on 1,000 random inputs (standard
normal pixels); reported per input set: the top-1 accuracy (test images) of ORT, the simulation
(``res.model``) and ``mixq.export.emulate``, ORT's top-1 agreement with the simulation and with
the emulation, and the simulation's agreement with itself on the inputs scaled by 1 + 1e-6 (how
far a last-bit change spreads in this network).

``trace``: where the simulation's activation codes first differ from the emulation's (which
equals ORT code for code): for every quantized layer in forward order, the share of its input
codes that differ and the largest difference (in codes), and per input the first layer whose
codes differ. It is measured for three simulations, each removing one source of difference:

* ``simulation``: mixq's fake-quantized model (float32 sums of dequantized values, float bias);
* ``int32 bias``: the same with each bias on its accumulator's int32 grid,
  ``round(b / (s_x s_w)) s_x s_w``, as ORT adds it (the ``int32_bias`` plan step on a copy);
* ``int32 bias, float64``: that model computed in float64, where the sums are exact: what remains
  is ORT's requantization (``float32(acc) * float32(s_x s_w / s_y)``, rounded) and its float32
  elementwise ops.

Rows are written to bench/results/onnx_trained.json as each finishes; a row already there is kept
(``--redo`` runs it again).

    OMP_NUM_THREADS=1 PYTHONPATH=src python -m bench.onnx_trained
"""

from __future__ import annotations

import argparse
import copy
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
from bench.common import RESULTS, ROOT, provenance, write_rows
from bench.nets import SameConv2d
from mixq.datasets import fashion_mnist
from mixq.export.modules import ActQuant
from mixq.ptq.int32_bias import int32_bias

NAME = "onnx_trained"
WEIGHTS = ROOT / "bench" / "weights" / "fashion-mbv3s.safetensors"
# k (depthwise kernel), expansion channels, out channels, squeeze-excitation, activation, stride
BLOCKS = (
    (3, 16, 16, True, "relu6", 2),
    (3, 48, 24, False, "relu6", 1),
    (3, 64, 24, False, "relu6", 1),
    (5, 72, 40, True, "hswish", 2),
    (5, 96, 40, True, "hswish", 1),
    (5, 96, 48, True, "hswish", 1),
)
BASE = {  # name -> (method, candidates, budget)
    "w8a8": ("uniform", ["w8a8"], None),
    "w7a8": ("uniform", ["w7a8"], None),
    "w4a8": ("uniform", ["w4a8"], None),
    "mixed-w4a8-w8a8": ("sensitivity-ilp", ["w4a8", "w8a8"], {"avg_weight_bits": 6.0}),
}
# each plan as it is, and with the int32_bias plan step (the simulation adds ORT's int32 biases)
ROWS = {
    **{n: (*r, []) for n, r in BASE.items()},
    **{f"{n}+int32_bias": (*r, ["int32_bias"]) for n, r in BASE.items()},
}


def act(name: str) -> nn.Module:
    return nn.ReLU6() if name == "relu6" else nn.Hardswish()


class SqueezeExcite(nn.Module):
    """Average pool, 1x1 reduce, ReLU6, 1x1 expand, hard-sigmoid, multiply."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, max(8, channels // 4), 1)
        self.expand = nn.Conv2d(max(8, channels // 4), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu6(self.reduce(F.adaptive_avg_pool2d(x, 1)))
        return x * F.hardsigmoid(self.expand(s))


class Block(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise ("same" padding), gating, 1x1 projection."""

    def __init__(self, cin: int, k: int, mid: int, cout: int, se: bool, a: str, stride: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if mid != cin:
            layers += [nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), act(a)]
        layers += [SameConv2d(mid, mid, k, stride, groups=mid, bias=False), nn.BatchNorm2d(mid), act(a)]
        if se:
            layers.append(SqueezeExcite(mid))
        layers += [nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV3Small(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [SameConv2d(1, 16, 3, 2, bias=False), nn.BatchNorm2d(16), nn.Hardswish()]
        cin = 16
        for k, mid, cout, se, a, s in BLOCKS:
            layers.append(Block(cin, k, mid, cout, se, a, s))
            cin = cout
        layers += [nn.Conv2d(cin, 144, 1, bias=False), nn.BatchNorm2d(144), nn.Hardswish()]
        self.features = nn.Sequential(*layers)
        self.fc1 = nn.Linear(144, 128)
        self.fc2 = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(self.features(x), 4)  # 4x4 -> 1x1 (28 px inputs)
        return self.fc2(F.hardswish(self.fc1(torch.flatten(x, 1))))


def train(epochs: int = 2, batch: int = 128, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """Train on the 60,000 Fashion-MNIST training images (deterministic order, one thread)."""
    torch.manual_seed(seed)
    model = MobileNetV3Small()
    x, y = fashion_mnist("train")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(len(x) // batch):
            idx = order[i * batch : (i + 1) * batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    xt, yt = fashion_mnist("test")
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean()) * 100
    info = {"epochs": epochs, "batch": batch, "seed": seed, "optimizer": "Adam, one-cycle lr 3e-3"}
    info |= {"test_top1": acc, "train_seconds": time.perf_counter() - t0}
    return model, info


def trained(retrain: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The shipped weights (trained on first use or with ``retrain``) and their training record."""
    from safetensors.torch import load_file, save_file

    record = WEIGHTS.with_suffix(".json")
    if retrain or not WEIGHTS.is_file():
        model, info = train()
        WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(WEIGHTS))
        record.write_text(json.dumps({**info, "provenance": provenance()}, indent=2) + "\n")
    model = MobileNetV3Small()
    model.load_state_dict(load_file(str(WEIGHTS)))
    return model.eval(), json.loads(record.read_text())


def code_hooks(model: nn.Module, emulated: bool, seen: dict[str, torch.Tensor]) -> list[Any]:
    """Record every quantized layer's input codes (relative to the zero point) in ``seen``."""
    from mixq.wrap import sites

    scales = {}
    if emulated:
        quants = {m.layer: m for m in model.modules() if isinstance(m, ActQuant)}
    else:
        quants = {n: s.input_quant for n, s in sites(model).items() if s.input_quant.spec is not None}
    for n, q in quants.items():
        scales[n] = q.scale if emulated else q.act_params().scale

    def hook(name: str) -> Any:
        return lambda m, _, y: seen.__setitem__(name, torch.round(y.double() / scales[name].double()))

    return [q.register_forward_hook(hook(n)) for n, q in quants.items()]


@torch.no_grad()
def trace(sim: nn.Module, emu: nn.Module, xs: list[torch.Tensor]) -> dict[str, Any]:
    """Per layer (forward order): differing input codes between ``sim`` and ``emu``; per input the
    first layer whose codes differ; and top-1 agreement."""
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    hooks = code_hooks(sim, False, a) + code_hooks(emu, True, b)
    per_layer: dict[str, list[float]] = {}
    first: dict[str, int] = {}
    agree = n = 0
    for x in xs:
        a.clear()
        b.clear()
        ys, ye = sim(x.to(next(sim.parameters()).dtype)), emu(x)
        agree += int((ys.argmax(1) == ye.argmax(1)).sum())
        n += len(x)
        order = [k for k in a if k in b]
        hit = torch.zeros(len(x), dtype=torch.bool)
        for k in order:
            d = (a[k] - b[k]).abs()
            row = per_layer.setdefault(k, [0, 0, 0.0])
            row[0] += int((d > 0).sum())
            row[1] += d.numel()
            row[2] = max(row[2], float(d.max()))
            new = (d.reshape(len(x), -1) > 0).any(1) & ~hit
            if new.any():
                first[k] = first.get(k, 0) + int(new.sum())
            hit |= new
    for h in hooks:
        h.remove()
    return {
        "inputs": n,
        "top1_agree_emulation": agree / n,
        "inputs_with_a_differing_code": sum(first.values()),
        "codes_differing": sum(r[0] for r in per_layer.values()),
        "codes": sum(r[1] for r in per_layer.values()),
        "first_differing_layer": first,
        "layers": {
            k: {"differing": r[0], "codes": r[1], "max_code_diff": r[2]} for k, r in per_layer.items()
        },
    }


def random_inputs(n: int, seed: int = 1000) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def compare(res: Any, emu: nn.Module, s: Any, x: torch.Tensor, y: torch.Tensor | None, batch: int) -> dict:
    """Top-1 agreements (and accuracies with labels) of ORT, the simulation and the emulation."""
    outs: dict[str, list[np.ndarray]] = {"ort": [], "sim": [], "emu": [], "nudged": []}
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        outs["ort"].append(s.run(None, {"input": xb.numpy()})[0])
        outs["sim"].append(res.model(xb).numpy())
        outs["emu"].append(emu(xb).numpy())
        outs["nudged"].append(res.model(xb * (1 + 1e-6)).numpy())
    o = {k: np.concatenate(v) for k, v in outs.items()}
    top = {k: v.argmax(1) for k, v in o.items()}
    rec: dict[str, Any] = {
        "inputs": len(x),
        "top1_agree_ort_simulation": float((top["ort"] == top["sim"]).mean()),
        "top1_agree_ort_emulation": float((top["ort"] == top["emu"]).mean()),
        "top1_agree_simulation_nudged_input": float((top["nudged"] == top["sim"]).mean()),
        "max_logit_diff_ort_simulation": float(np.abs(o["ort"] - o["sim"]).max()),
        "max_logit_diff_ort_emulation": float(np.abs(o["ort"] - o["emu"]).max()),
    }
    if y is not None:
        for k, name in (("ort", "ort"), ("sim", "simulation"), ("emu", "emulation")):
            rec[f"top1_{name}"] = float((top[k] == y.numpy()).mean()) * 100
    return rec


def run_row(name: str, task: mixq.Task, test: tuple[torch.Tensor, torch.Tensor], args: Any) -> dict:
    import onnxruntime as ort

    method, cands, budget, ptq = ROWS[name]
    t0 = time.perf_counter()
    res = mixq.run(task, method, cands, budget, ptq=ptq)
    emu = mixq.export.emulate(res, task)
    rec: dict[str, Any] = {"method": method, "candidates": cands, "budget": budget, "ptq": ptq}
    rec["plan_counts"] = {c: sum(v.name == c for v in res.plan.layers.values()) for c in cands}
    rec["emulated"] = {k: len(v) for k, v in emu.emulated.items()}
    with tempfile.TemporaryDirectory() as d:
        path = mixq.export.save(res, Path(d) / "m.onnx", format="onnx", task=task)
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        rec["fashion_test"] = compare(res, emu, s, *test, args.batch)
        rec["random_inputs"] = compare(res, emu, s, random_inputs(args.random), None, args.batch)
    xs = [test[0][i : i + args.batch] for i in range(0, args.trace, args.batch)]
    variants: dict[str, Any] = {"simulation": trace(res.model, emu, xs)}
    sim = copy.deepcopy(res.model)
    if not ptq:  # the int32_bias step on a copy, against the emulation of that model's export
        rec["int32_bias"] = int32_bias(sim, task)
        emu = mixq.export.emulate(sim, task)
        variants["int32 bias"] = trace(sim, emu, xs)
    variants["int32 bias, float64" if not ptq else "float64"] = trace(sim.double(), emu, xs)
    rec["trace"] = variants
    rec["wall_seconds"] = time.perf_counter() - t0
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    ap.add_argument("--random", type=int, default=1000, help="random inputs")
    ap.add_argument("--trace", type=int, default=1000, help="test images of the layer-by-layer trace")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--retrain", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, info = trained(args.retrain)
    xtr, ytr = fashion_mnist("train")
    g = torch.Generator().manual_seed(1)
    pick = torch.randperm(len(xtr), generator=g)[:128]
    calib = [(xtr[pick[i : i + 64]], ytr[pick[i : i + 64]]) for i in (0, 64)]
    test = fashion_mnist("test")
    val = [(test[0][i : i + 1000], test[1][i : i + 1000]) for i in range(0, 10000, 1000)]
    task = mixq.Task(model, calib, val, name="fashion-mbv3s")
    path = RESULTS / f"{NAME}.json"
    for name in args.rows.split(","):
        if name not in ROWS:
            raise SystemExit(f"unknown row {name!r}; valid: {', '.join(ROWS)}")
        doc = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
        if name in doc["rows"] and not args.redo:
            continue
        rec = run_row(name, task, test, args)
        print(name, json.dumps({k: v for k, v in rec.items() if k != "trace"}), flush=True)
        doc = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
        doc["rows"][name] = rec
        doc["model"] = "MobileNetV3-small-like (bench.onnx_trained), trained on Fashion-MNIST"
        doc["training"] = info
        doc["provenance"] = provenance()
        write_rows(NAME, doc)


if __name__ == "__main__":
    main()
