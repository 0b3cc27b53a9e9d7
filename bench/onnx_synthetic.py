"""ONNX Runtime against mixq's simulation on synthetic CNNs outside the zoo, 1,000 random inputs each,
and why the two part where they do.

Networks (random weights; ``bench.nets``, ``bench.onnx_unseen``):

* ``conv-net``: MobileNet-like, as model libraries write it ("same"-padding conv subclasses, one
  shared ReLU6 module, depthwise blocks, squeeze-excitation gating, ``ZeroPad2d``, batch norm),
  3x16x16 inputs, 5 classes (:func:`bench.nets.conv_net`, the tests' net);
* ``hardswish-net``: MobileNetV3-like ("same" stem and depthwise convs, hard-swish, hard-sigmoid
  gating, average pooling), 3x16x16 inputs, 10 classes (:func:`bench.nets.hardswish_net`);
* ``mbv2-32``: MobileNetV2 1.0 (17 inverted residual blocks, ReLU6, depthwise, global average
  pooling, 1,000 classes; :func:`bench.onnx_unseen.build`) at 32x32 px. Its decisions are set
  by rounding noise, not by the input (its float model and its w8a8 simulation share top-1 on
  42 % of 200 inputs); with smaller batch-norm gains (0.5/0.15 or 0.4/0.1) even its float model
  is (batch-norm folding moves its logits by 1 to 19), so no calmer variant of it is built here.

(The trained MobileNetV3-small-like net is ``bench.onnx_trained``.) Inputs: standard normal
pixels (the 16 px nets, as the tests) or smoothed noise (``bench.onnx_unseen.images``).

Per row (a uniform plan from ``mixq.run``, batch norm folded, 8-bit activations; ``+int32_bias``
with ``ptq=["int32_bias"]``; 4-bit weights exported as INT8 codes so ONNX Runtime fuses them):
ONNX Runtime (CPU provider, full optimization) on the inputs: top-1 agreement with the
simulation (``res.model``) and with ``mixq.export.emulate`` (and how many output rows differ from
the emulation beyond 1e-4); then why ORT and the simulation part:

* ``codes``: per input, the first layer whose input codes differ between the simulation and the
  emulation (``bench.onnx_trained.trace``), and there how far the simulation's value before
  rounding was from the rounding tie ``k + 1/2``, in codes (``tie_distance``): a difference of the
  float32 arithmetic (ORT's requantization ``float32(acc) * float32(s_x s_w / s_y)`` against the
  simulation's float32 sums) moves a code only within about 1e-5 codes of a tie;
* ``flips``: for the inputs whose top-1 ORT and the simulation do not share, the simulation's
  margin (top-1 minus top-2 logit) and the largest logit difference ORT - simulation, against the
  logits' standard deviation;
* ``one_code``: the simulation's own sensitivity: per input, one activation code of one quantized
  layer (both drawn at random, seed 0) moved by one step; the share of inputs whose top-1 stays.
  Where this is far below 99.5 %, no deployment that is not bit-exact can agree with the
  simulation to 99.5 %, whatever it rounds.

Rows are written to bench/results/onnx_synthetic.json as each finishes; a row already there is
kept (``--redo`` runs it again).

    OMP_NUM_THREADS=1 PYTHONPATH=src python -m bench.onnx_synthetic
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import mixq
from bench.common import RESULTS, save_row
from bench.nets import conv_net, hardswish_net
from bench.onnx_trained import trace
from bench.onnx_unseen import build, images
from mixq.export.modules import ActQuant
from mixq.wrap import sites

NAME = "onnx_synthetic"
PLANS = {"w8a8": ["w8a8"], "w4a8": ["w4a8"]}


def randn_inputs(n: int, seed: int, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# name -> (model builder, inputs(n, seed))
NETS: dict[str, tuple[Callable[[], nn.Module], Callable[[int, int], torch.Tensor]]] = {
    "conv-net": (conv_net, randn_inputs),
    "hardswish-net": (hardswish_net, randn_inputs),
    "mbv2-32": (lambda: build(32), lambda n, seed: images(n, seed, 32)),
}
ROWS = [f"{net}/{plan}{s}" for net in NETS for plan in PLANS for s in ("", "+int32_bias")]


@torch.no_grad()
def first_ties(sim: nn.Module, emu: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Per input whose codes differ anywhere: the first such layer (forward order) and the largest
    distance, in codes, of the simulation's value before rounding from the tie ``k + 1/2`` at the
    codes that differ there."""
    pre: dict[str, torch.Tensor] = {}
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    hooks = []
    for name, s in sites(sim).items():
        q = s.input_quant
        if q.spec is None:
            continue
        sc = q.act_params().scale.double()
        hooks.append(
            q.register_forward_pre_hook(lambda _m, i, n=name, sc=sc: pre.__setitem__(n, i[0].double() / sc))
        )
        hooks.append(
            q.register_forward_hook(
                lambda _m, _i, y, n=name, sc=sc: a.__setitem__(n, torch.round(y.double() / sc))
            )
        )
    for m in emu.modules():
        if isinstance(m, ActQuant):
            hooks.append(
                m.register_forward_hook(
                    lambda m, _i, y: b.__setitem__(m.layer, torch.round(y.double() / m.scale.double()))
                )
            )
    sim(x)
    emu(x)
    for h in hooks:
        h.remove()
    n = len(x)
    hit = torch.zeros(n, dtype=torch.bool)
    firsts: dict[str, int] = {}
    worst = 0.0
    codes = 0
    for k in [k for k in a if k in b]:
        d = (a[k] != b[k]).reshape(n, -1)
        new = d.any(1) & ~hit
        for i in new.nonzero().flatten().tolist():
            r = pre[k].reshape(n, -1)[i, d[i]]
            worst = max(worst, float((r - torch.floor(r) - 0.5).abs().max()))
            firsts[k] = firsts.get(k, 0) + 1
            codes += int(d[i].sum())
        hit |= new
    return {
        "inputs_with_a_differing_code": int(hit.sum()),
        "first_differing_layer": firsts,
        "codes_differing_at_the_first_layer": codes,
        "tie_distance_max": worst,
    }


@torch.no_grad()
def one_code(sim: nn.Module, x: torch.Tensor, seed: int = 0) -> dict[str, Any]:
    """Top-1 of the simulation with one activation code moved by one step, per input (a random
    quantized layer and position each): the share of inputs whose top-1 stays."""
    quants = [(n, s.input_quant) for n, s in sites(sim).items() if s.input_quant.spec is not None]
    g = torch.Generator().manual_seed(seed)
    layer = torch.randint(len(quants), (len(x),), generator=g)
    base = sim(x).argmax(1)
    kept = 0
    per_layer: dict[str, list[int]] = {}
    for j, (name, q) in enumerate(quants):
        rows = (layer == j).nonzero().flatten()
        if not len(rows):
            continue
        scale = q.act_params().scale.reshape(())

        def move(_m: nn.Module, _i: Any, y: torch.Tensor, scale: torch.Tensor = scale) -> torch.Tensor:
            flat = y.reshape(len(y), -1).clone()
            pos = torch.randint(flat.shape[1], (len(y),), generator=g)
            sign = torch.where(torch.rand(len(y), generator=g) < 0.5, -1.0, 1.0)
            flat[torch.arange(len(y)), pos] += sign * scale
            return flat.reshape(y.shape)

        h = q.register_forward_hook(move)
        same = int((sim(x[rows]).argmax(1) == base[rows]).sum())
        h.remove()
        kept += same
        per_layer[name] = [same, len(rows)]
    return {"inputs": len(x), "top1_kept": kept / len(x), "per_layer_kept_of": per_layer}


def measure(res: Any, task: mixq.Task, x: torch.Tensor, batch: int) -> dict[str, Any]:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        path = mixq.export.save(res, Path(d) / "m.onnx", format="onnx", task=task, int4_as_int8=True)
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        emu = mixq.export.emulate(res, task, int4_as_int8=True)
        ys, ss, es = [], [], []
        for i in range(0, len(x), batch):
            xb = x[i : i + batch]
            ys.append(s.run(None, {"input": xb.numpy()})[0])
            with torch.no_grad():
                ss.append(res.model(xb).numpy())
                es.append(emu(xb).numpy())
    y, sim, em = (np.concatenate(v) for v in (ys, ss, es))
    flip = y.argmax(1) != sim.argmax(1)
    top2 = np.sort(sim, 1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    rec: dict[str, Any] = {
        "inputs": len(x),
        "top1_agree_simulation": float(1 - flip.mean()),
        "top1_agree_emulation": float((y.argmax(1) == em.argmax(1)).mean()),
        "outputs_off_emulation": int((np.abs(y - em) > 1e-4 + 1e-4 * np.abs(em)).any(1).sum()),
        "max_logit_diff_emulation": float(np.abs(y - em).max()),
        "max_logit_diff_simulation": float(np.abs(y - sim).max()),
        "logit_std": float(sim.std()),
        "margin_median": float(np.median(margin)),
        "flips": {
            "margins": [float(v) for v in margin[flip]],
            "max_logit_diff": [float(np.abs(y[i] - sim[i]).max()) for i in np.nonzero(flip)[0]],
        },
        "emulated": {k: len(v) for k, v in emu.emulated.items()},
        "not_emulated": len(emu.not_emulated),
    }
    rec["codes"] = first_ties(res.model, emu, x)
    rec["code_trace"] = {k: v for k, v in trace(res.model, emu, [x]).items() if k != "layers"}
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated NET/PLAN[+int32_bias]")
    ap.add_argument("--inputs", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--redo", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    path = RESULTS / f"{NAME}.json"
    for key in args.rows.split(","):
        if key not in ROWS:
            raise SystemExit(f"unknown row {key!r}; valid: {', '.join(ROWS)}")
        doc = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
        if key in doc["rows"] and not args.redo:
            continue
        t0 = time.perf_counter()
        net, plan = key.split("/")
        make, inputs = NETS[net]
        ptq = ["int32_bias"] if plan.endswith("+int32_bias") else []
        cands = PLANS[plan.removesuffix("+int32_bias")]
        calib = [(inputs(16, 10 + i), torch.zeros(16, dtype=torch.long)) for i in range(2)]
        task = mixq.Task(make(), calib, [(inputs(16, 20), torch.zeros(16, dtype=torch.long))], name=net)
        res = mixq.run(task, "uniform", cands, ptq=ptq)
        x = inputs(args.inputs, 1000)
        rec: dict[str, Any] = {"net": net, "plan": cands, "ptq": ptq}
        rec.update(measure(res, task, x, args.batch))
        rec["one_code"] = one_code(res.model, x)
        rec["wall_seconds"] = time.perf_counter() - t0
        print(key, json.dumps({k: v for k, v in rec.items() if k not in ("one_code", "flips")}), flush=True)
        save_row(NAME, key, rec)


if __name__ == "__main__":
    main()
