"""Emulate ONNX Runtime's integer kernels in PyTorch: the deployed model's outputs, bit for bit.

The fake-quantized model computes each layer in float32 on dequantized values. ONNX Runtime,
running mixq's QDQ export on the CPU, fuses the layers whose input and output pass through
8-bit QDQ into integer kernels that round differently:

* the bias becomes int32 at scale ``s_x * s_w``: ``round(b / (s_x * s_w))`` in float32 (ORT's
  own weight-bias quantization, constant-folded);
* the accumulator is exact (int32) and is requantized to the next layer's 8-bit grid in float32,
  ``q = round(clamp(float(acc) * M)) + z_y`` with ``M = s_x * s_w / s_y`` per output channel
  (QLinearConv, QGemm);
* a linear layer with a float output (a transformer's, followed by LayerNorm, GELU or
  softmax) runs as MatMulIntegerToFloat: the exact accumulator times ``s_x * s_w`` in float32;
* a residual addition (QLinearAdd) rescales both operands' codes in float32 with fused
  multiply-adds, ``q = round(q_a r_a + (q_b r_b + c))`` with ``r = s / s_out`` and
  ``c = z_out - (r_a z_a + r_b z_b)``: ORT's x86-64 AVX2 kernel (the one it runs on AVX2 and
  AVX-512 CPUs).

Each of these moves a value that lies within a rounding error of a code boundary to the
neighbouring code, so the fused model's metric can differ from the simulated one by a few
samples. :func:`emulate` returns the deployed model with the layers that ONNX Runtime fuses
replaced by modules that compute the same integer arithmetic: which layers are fused, with which
output scales and which int32 biases, is read from the graph ONNX Runtime optimizes (at the
extended level, the fusions of the full level without its layout changes). What stays in float32
in ONNX Runtime (a float residual addition, the pooling, the classifier's float output, a
transformer's LayerNorm, GELU, softmax and attention products) stays in float32 here too and
agrees up to float summation order.

```python
emu = mixq.export.emulate(res, task)     # needs onnx and onnxruntime
logits = emu(x)                          # ONNX Runtime's fused outputs, computed in PyTorch
```
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixq.export.codes import Encoded, int_weight
from mixq.export.deploy import LayerExport, collect_adds, deploy_model
from mixq.export.modules import DeployAdd, DeployCall, DeployConv2d, DeployLinear
from mixq.export.ort import EXACT_SUFFIX, exact_layer
from mixq.export.qdq import export_deployed

log = logging.getLogger(__name__)

WEIGHT_INPUT = {"QLinearConv": 3, "QGemm": 3}  # the weight codes' input of a fused layer


@dataclass(frozen=True)
class Requant:
    """The 8-bit output grid a fused kernel requantizes to: the next quantizer's parameters."""

    scale: torch.Tensor  # float32 scalar
    zero: float
    qmin: int
    qmax: int


def _requantize(acc: torch.Tensor, multiplier: torch.Tensor, out: Requant) -> torch.Tensor:
    """ONNX Runtime's requantization of an int32 accumulator, as dequantized values of the grid.

    ``float(acc) * M`` in float32, clamped to the grid and rounded half to even (MLAS's
    requantize: cvtdq2ps, mulps, min/max, cvtps2dq). The values are ``(q - z) * s``, on which the
    next quantizer (which computes ``round(x / s) + z``) finds the same codes.
    """
    v = acc.float() * multiplier
    k = torch.round(torch.clamp(v, out.qmin - out.zero, out.qmax - out.zero))
    return k * out.scale


class _IntegerLayer(nn.Module):
    """A deployed conv or linear layer computed as ONNX Runtime's fused integer kernel."""

    def __init__(
        self, m: DeployConv2d | DeployLinear, bias: torch.Tensor | None, out: Requant, node: str = ""
    ) -> None:
        super().__init__()
        self.node = node  # the tensor of ONNX Runtime's graph this layer's output codes equal
        lx: LayerExport = m.layer_export
        assert isinstance(lx.weight, Encoded) and m.act is not None and lx.act_scale is not None
        self.source = m
        self.out = out
        self.register_buffer("weight_int", int_weight(lx.weight))
        sx = lx.act_scale.float().reshape(())
        sw = lx.weight.scale.float().reshape(-1)
        self.register_buffer("act_scale", sx)
        self.register_buffer(
            "bias_int", torch.zeros(sw.numel(), dtype=torch.float64) if bias is None else bias.double()
        )
        self.register_buffer("multiplier", (sx * sw) / out.scale)  # float32, as ORT computes it

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The input's integer codes minus the zero point (exact, float64)."""
        assert self.source.act is not None
        return torch.round(self.source.act(x) / self.act_scale).double()


class IntegerConv2d(_IntegerLayer):
    """QLinearConv: exact integer convolution, int32 bias, float32 requantization."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.source
        if isinstance(m, DeployCall):  # a conv subclass's own forward ("same" padding), on the codes
            acc = m.run(self.codes(x), self.weight_int, None)
        else:
            acc = F.conv2d(self.codes(x), self.weight_int, None, m.stride, m.padding, m.dilation, m.groups)
        acc = acc + self.bias_int.reshape(1, -1, *[1] * (acc.dim() - 2))
        return _requantize(acc, self.multiplier.reshape(1, -1, *[1] * (acc.dim() - 2)), self.out)


class IntegerLinear(_IntegerLayer):
    """QGemm with an 8-bit output: exact integer matrix product, int32 bias, requantization."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = F.linear(self.codes(x), self.weight_int) + self.bias_int
        return _requantize(acc, self.multiplier, self.out)


class IntegerMatMul(_IntegerLayer):
    """MatMulIntegerToFloat: exact integer matrix product scaled to float32 (a float output).

    ``float(acc) * (s_x * s_w)``, the scale's product taken in float32 as ONNX Runtime takes
    it, then the layer's float32 bias added (ORT keeps the bias a separate Add).
    """

    def __init__(self, m: DeployLinear, node: str = "") -> None:
        one = torch.ones((), dtype=torch.float32)  # multiplier = s_x * s_w / 1: no output grid
        super().__init__(m, None, Requant(one, 0.0, 0, 0), node)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.codes(x), self.weight_int).float() * self.multiplier
        bias = self.source.bias
        return y if bias is None else y + bias.float()


class ExactLayer(nn.Module):
    """A layer ONNX Runtime runs in float32 on exact integers (:func:`mixq.export.ort.exact_layer`).

    ``acc = sum (q_x - z_x)(q_w - z_w)`` (exact: in float64 here, every partial sum an integer
    below 2^24 in ONNX Runtime's float32), then ``float32(acc) * float32(s_x s_w) + b`` in
    float32, as the exported graph computes it (Cast, DequantizeLinear, Add).
    """

    def __init__(self, m: DeployConv2d | DeployCall | DeployLinear, node: str = "") -> None:
        super().__init__()
        self.source, self.node = m, node
        e = exact_layer(m.layer_export)
        assert e is not None and m.layer_export.act_scale is not None
        self.register_buffer("weight_int", e.weight.double())
        self.register_buffer("scale", e.scale)
        self.register_buffer("act_scale", m.layer_export.act_scale.float().reshape(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.source
        assert m.act is not None
        q = torch.round(m.act(x) / self.act_scale).double()
        if isinstance(m, DeployLinear):
            acc, shape = F.linear(q, self.weight_int), (-1,)
        elif isinstance(m, DeployCall):
            acc, shape = m.run(q, self.weight_int, None), (1, -1, *[1] * (q.dim() - 2))
        else:
            acc = F.conv2d(q, self.weight_int, None, m.stride, m.padding, m.dilation, m.groups)
            shape = (1, -1, *[1] * (q.dim() - 2))
        y = acc.float() * (self.scale.reshape(shape) if self.scale.dim() else self.scale)
        return y if m.bias is None else y + m.bias.float().reshape(shape)


class IntegerAdd(nn.Module):
    """QLinearAdd as ONNX Runtime's x86-64 AVX2 kernel computes it (float32 fused multiply-adds).

    ``fma(q_a, r_a, fma(q_b, r_b, c))`` on the raw codes, rounded half to even and saturated;
    each fma is computed in float64, where ``q * r + c`` is exact for 8-bit codes, and rounded
    once to float32.
    """

    def __init__(
        self, m: DeployAdd, scales: list[float], zeros: list[float], out: Requant, node: str = ""
    ) -> None:
        super().__init__()
        self.source, self.out, self.node = m, out, node
        s = torch.tensor(scales, dtype=torch.float32)
        self.register_buffer("scales", s)
        self.register_buffer("zeros", torch.tensor(zeros, dtype=torch.float32))
        ratio = s / out.scale  # float32 divisions
        self.register_buffer("ratio", ratio)
        zero_out = torch.tensor(out.zero, dtype=torch.float32)
        self.register_buffer("const", zero_out - (ratio[0] * self.zeros[0] + ratio[1] * self.zeros[1]))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        q = self.source.quant
        qa = torch.round(q[0](a) / self.scales[0]) + self.zeros[0]
        qb = torch.round(q[1](b) / self.scales[1]) + self.zeros[1]
        r = self.ratio.double()
        t = (qb.double() * r[1] + self.const.double()).float()
        v = (qa.double() * r[0] + t.double()).float()
        k = torch.clamp(torch.round(v), self.out.qmin, self.out.qmax)
        return (k - self.out.zero) * self.out.scale


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("emulating ONNX Runtime needs onnxruntime: pip install 'mixq[onnx]'") from None
    return onnxruntime


def _requant(inits: dict[str, np.ndarray], scale: str, zero: str) -> Requant:
    """The output grid of a fused kernel from its output scale and zero point initializers."""
    z = inits[zero]
    info = np.iinfo(z.dtype)
    s = torch.tensor(inits[scale], dtype=torch.float32).reshape(())
    return Requant(s, float(z), int(info.min), int(info.max))


def optimized_graph(path: str | Path, out: str | Path) -> Any:
    """The graph ONNX Runtime runs for the ONNX file ``path`` (its extended-level fusions)."""
    import onnx

    ort = _ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(out)
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return onnx.load(str(out)).graph


def _int32_bias(node: Any, inits: dict[str, np.ndarray], users: dict[str, list[Any]]) -> bool:
    """Whether a DequantizeLinear node dequantizes an int32 constant into layers' biases."""
    q = inits.get(node.input[0])
    if q is None or q.dtype != np.int32 or node.input[1] not in inits:
        return False
    return all(len(u.input) > 2 and u.input[2] == node.output[0] for u in users.get(node.output[0], []))


def _weight_layer(node: Any, producers: dict[str, Any], inits: dict[str, np.ndarray]) -> str | None:
    """The mixq layer whose weight a Conv/Gemm node reads: its codes' or float weight's name."""
    w = node.input[1]
    src = producers.get(w)
    name = src.input[0] if src is not None and src.op_type == "DequantizeLinear" else w
    for suffix in (".weight.codes", ".weight"):
        if name.endswith(suffix) and (name in inits or src is not None):
            return name.removesuffix(suffix)
    return None


def _add_names(graph: Any) -> dict[str, str]:
    """Node name of each quantized residual addition in an exported graph -> the addition's name."""
    producers = {o: n for n in graph.node for o in n.output}
    out = {}
    for n in graph.node:
        src = producers.get(n.input[0]) if n.op_type == "Add" else None
        if src is not None and src.name.endswith(".quant.0.input_dq"):
            out[n.name] = src.name.removesuffix(".quant.0.input_dq")
    return out


def emulate(model: Any, task: Any, int4_as_int8: bool = False) -> nn.Module:
    """Return the deployed model with ONNX Runtime's fused integer kernels emulated.

    Args:
        model: a :class:`mixq.Result`, a wrapped model with its plan applied, or a deployed model
            (:func:`mixq.export.load`).
        task: the Task whose first calibration batch traces the model (as ``save(..., "onnx")``).
        int4_as_int8: emulate the export with this option of :func:`mixq.export.save` (2- to
            4-bit weight codes stored as INT8, which ONNX Runtime fuses).

    Returns:
        A deployed copy of the model in which every layer that ONNX Runtime's CPU provider runs as
        QLinearConv, QGemm (8-bit output), MatMulIntegerToFloat or QLinearAdd is an
        :class:`IntegerConv2d`, :class:`IntegerLinear`, :class:`IntegerMatMul` or
        :class:`IntegerAdd`, and every float layer whose bias ONNX
        Runtime quantizes to int32 (a layer with a quantized input and a 4-bit weight, which it
        runs in float32) holds that bias. ``model.emulated`` maps each emulated op type (and
        "int32 bias") to its layers; ``model.not_emulated`` lists other integer kernels ONNX
        Runtime chose (their layers keep the fake-quantized float computation).
    """
    import onnx

    qmodel = model if isinstance(model, nn.Module) else model.model  # a module, or a Result
    deployed, layers = deploy_model(qmodel)
    layers = layers | collect_adds(deployed)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_deployed(deployed, layers, task, Path(tmp) / "model.onnx", int4_as_int8=int4_as_int8)
        exported = onnx.load(str(path)).graph
        add_names = _add_names(exported)
        exact = [n.name.removesuffix(EXACT_SUFFIX) for n in exported.node if n.name.endswith(EXACT_SUFFIX)]
        graph = optimized_graph(path, Path(tmp) / "optimized.onnx")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    modules = dict(deployed.named_modules())
    producers = {o: n for n in graph.node for o in n.output}
    users: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    emulated: dict[str, list[str]] = {}
    not_emulated: list[str] = []
    for layer in exact:  # float32 kernels on exact integers
        src = modules[layer]
        assert isinstance(src, (DeployConv2d, DeployCall, DeployLinear))
        deployed.set_submodule(layer, ExactLayer(src))
        emulated.setdefault("exact float32", []).append(layer)
    for node in graph.node:
        op = node.op_type
        if op in WEIGHT_INPUT:
            layer = node.input[WEIGHT_INPUT[op]].removesuffix(".weight.codes")
            src = modules.get(layer)
            # QLinearConv: x, sx, zx, w, sw, zw, sy, zy[, bias]; QGemm: a, sa, za, b, sb, zb, c[, sy, zy]
            ys, yz, bias = (6, 7, 8) if op == "QLinearConv" else (7, 8, 6)
            if len(node.input) <= yz or not isinstance(src, (DeployConv2d, DeployCall, DeployLinear)):
                not_emulated.append(f"{op} {node.name}")  # a float output, or not a mixq layer
                continue
            out = _requant(inits, node.input[ys], node.input[yz])
            b = node.input[bias] if len(node.input) > bias and node.input[bias] else None
            bias_int = torch.from_numpy(inits[b].astype(np.int64)) if b is not None else None
            cls = IntegerConv2d if op == "QLinearConv" else IntegerLinear
            deployed.set_submodule(layer, cls(src, bias_int, out, node.output[0]))
            emulated.setdefault(op, []).append(layer)
        elif op == "MatMulIntegerToFloat":  # A, B, sa, sb[, za, zb, bias]
            layer = node.input[1].removesuffix(".weight.codes")
            src = modules.get(layer)
            if (len(node.input) > 6 and node.input[6]) or not isinstance(src, DeployLinear):
                not_emulated.append(f"{op} {node.name}")  # a fused bias, or not a mixq layer
                continue
            deployed.set_submodule(layer, IntegerMatMul(src, node.output[0]))
            emulated.setdefault(op, []).append(layer)
        elif op == "QLinearAdd" and node.name in add_names:
            name = add_names[node.name]  # A, sa, za, B, sb, zb, sc, zc
            src = modules[name]
            assert isinstance(src, DeployAdd)
            scales = [float(inits[node.input[1]]), float(inits[node.input[4]])]
            zeros = [float(inits[node.input[2]]), float(inits[node.input[5]])]
            out = _requant(inits, *node.input[6:8])
            deployed.set_submodule(name, IntegerAdd(src, scales, zeros, out, node.output[0]))
            emulated.setdefault(op, []).append(name)
        elif op == "DequantizeLinear" and _int32_bias(node, inits, users):
            for user in users[node.output[0]]:  # a float layer whose bias ORT made int32
                layer = _weight_layer(user, producers, inits)
                src = modules.get(layer) if layer else None
                if isinstance(src, (DeployConv2d, DeployCall, DeployLinear)):
                    q = torch.tensor(inits[node.input[0]].astype(np.int64)).float()
                    src.bias = q * torch.tensor(inits[node.input[1]], dtype=torch.float32)
                    emulated.setdefault("int32 bias", []).append(layer)
        elif op.startswith(("QLinear", "QGemm", "MatMulInteger", "DynamicQuantize", "QAttention")):
            not_emulated.append(f"{op} {node.name}")
    if not_emulated:
        log.warning("integer kernels not emulated (their layers compute in float): %s", not_emulated[:5])
    deployed.emulated = emulated
    deployed.not_emulated = not_emulated
    return deployed.eval()
