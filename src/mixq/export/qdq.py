"""ONNX export with QuantizeLinear/DequantizeLinear (QDQ) nodes for weights and activations.

The deployed model (:mod:`mixq.export.modules`) is traced by ``torch.onnx.export``; each
quantized weight and input leaves a ``mixq::Weight`` / ``mixq::Act`` marker in the graph, which
is then replaced here:

* weights: ``DequantizeLinear(codes, scale, zero_point, axis)`` with per-tensor or per-channel
  scales. Integer grids of up to 4 bits are stored as INT4/UINT4 (int2 and int3 codes are a
  subset of the int4 grid, with the same scale), 5 to 8 bits as INT8/UINT8; fp8 e4m3fn and
  e5m2 as FLOAT8E4M3FN/FLOAT8E5M2 (opset 21). Group scales, fp6, fp4 and MX blocks have no
  QDQ form that ONNX Runtime runs on the CPU: they are stored as float32 initializers holding
  the exact dequantized values.
* inputs: ``QuantizeLinear -> DequantizeLinear`` per tensor, in int8/uint8, int4/uint4 or fp8;
  integer widths other than 4 and 8 add a ``Clip`` to the grid's range, exact because the
  dequantized values are monotonic in the code. MX, fp6 and fp4 inputs cannot be expressed
  and raise a ValueError.
* biases stay float32; ONNX Runtime quantizes them itself when it fuses a layer into an
  integer kernel (QLinearConv, QGemm).

ONNX's QuantizeLinear rounds ``x / scale`` half to even and saturates, as mixq's fake quantizer
does, so ONNX Runtime without graph fusion computes the simulated model up to float
summation order. Fused integer kernels add their own rounding (int32 bias, requantization),
and on AVX2 CPUs ONNX Runtime's u8s8 kernels can saturate with full-range int8 weights: 7-bit
weights (``w7a8``, codes in [-64, 63], stored as INT8) avoid that, the remedy ONNX Runtime
itself recommends (``reduce_range``).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mixq.export.codes import Encoded, code_to_int
from mixq.export.modules import MARKER_DOMAIN
from mixq.export.packed import LayerExport, deploy_model
from mixq.formats import Fp, Int, Mx
from mixq.plan import QSpec

log = logging.getLogger(__name__)

OPSET = 21
SUPPORTED_ACTS = "int2..int8 and uint2..uint8 per tensor, fp8_e4m3fn, fp8_e5m2"


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs onnx: pip install 'mixq[onnx]'") from None
    return onnx


def _int_type(bits: int, signed: bool) -> int:
    tp = _onnx().TensorProto
    if bits <= 4:
        return tp.INT4 if signed else tp.UINT4
    return tp.INT8 if signed else tp.UINT8


def _fp_type(fmt: Fp) -> int | None:
    tp = _onnx().TensorProto
    return {"fp8_e4m3fn": tp.FLOAT8E4M3FN, "fp8_e5m2": tp.FLOAT8E5M2}.get(str(fmt))


def _tensor(name: str, dtype: int, values: torch.Tensor) -> Any:
    """An ONNX initializer of element type ``dtype`` from exact float32 or integer ``values``."""
    onnx = _onnx()
    tp = onnx.TensorProto
    v = values.detach().cpu()
    dims = list(v.shape)
    if dtype in (tp.FLOAT8E4M3FN, tp.FLOAT8E5M2):
        torch_dtype = torch.float8_e4m3fn if dtype == tp.FLOAT8E4M3FN else torch.float8_e5m2
        raw = v.float().to(torch_dtype).view(torch.uint8).numpy().tobytes()  # exact: grid values
        return onnx.helper.make_tensor(name, dtype, dims, raw, raw=True)
    if dtype in (tp.INT4, tp.UINT4):
        return onnx.helper.make_tensor(name, dtype, dims, v.to(torch.int64).reshape(-1).tolist())
    np_dtype = {tp.INT8: np.int8, tp.UINT8: np.uint8, tp.INT32: np.int32, tp.FLOAT: np.float32}[dtype]
    return onnx.numpy_helper.from_array(v.numpy().astype(np_dtype), name)


def _weight_values(enc: Encoded) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """The stored element values, zero points and element type of an encoded weight, or None."""
    spec, fmt = enc.spec, enc.spec.fmt
    if isinstance(fmt, Mx) or spec.granularity == "group":
        return None
    if isinstance(fmt, Int):
        signed = spec.symmetric and fmt.signed
        q = code_to_int(enc.codes, fmt, spec.symmetric)
        zero = enc.zero if enc.zero is not None else torch.zeros_like(enc.scale)
        return q, zero, _int_type(fmt.bits, signed)
    dtype = _fp_type(fmt)
    if dtype is None:
        return None
    from mixq.export.packing import decode_fp

    return decode_fp(enc.codes, fmt), torch.zeros_like(enc.scale), dtype


class _Graph:
    """Accumulates the nodes and initializers that replace the markers."""

    def __init__(self) -> None:
        self.nodes: dict[str, list[Any]] = {}  # weight marker output -> replacement nodes
        self.inits: list[Any] = []
        self.float_weights: list[str] = []

    def add(self, t: Any) -> str:
        self.inits.append(t)
        return t.name


def _scalar_or_channels(t: torch.Tensor, enc: Encoded) -> torch.Tensor:
    return t.reshape(()) if enc.spec.granularity == "tensor" else t.reshape(-1)


def _weight_nodes(g: _Graph, lx: LayerExport, marker_in: str, out: str) -> None:
    onnx = _onnx()
    enc = lx.weight
    assert isinstance(enc, Encoded)
    vals = _weight_values(enc)
    linear = lx.kind == "linear"
    if vals is None:  # no QDQ form: the exact dequantized float32 weight
        w = lx.float_weight()
        name = g.add(_tensor(f"{lx.name}.weight", onnx.TensorProto.FLOAT, w.t() if linear else w))
        g.nodes[out] = [onnx.helper.make_node("Identity", [name], [out], name=f"{lx.name}.weight_float")]
        g.float_weights.append(lx.name)
        return
    q, zero, dtype = vals
    q = q.t() if linear else q  # Linear exports as MatMul(x, W^T): channels on axis 1
    codes = g.add(_tensor(f"{lx.name}.weight.codes", dtype, q))
    scale = g.add(
        _tensor(f"{lx.name}.weight.scale", onnx.TensorProto.FLOAT, _scalar_or_channels(enc.scale, enc))
    )
    zp = g.add(_tensor(f"{lx.name}.weight.zero", dtype, _scalar_or_channels(zero, enc)))
    axis = 1 if linear else 0
    g.nodes[out] = [
        onnx.helper.make_node(
            "DequantizeLinear", [codes, scale, zp], [out], name=f"{lx.name}.weight_dq", axis=axis
        )
    ]


def _act_quantizer(g: _Graph, lx: LayerExport) -> tuple[str, str, tuple[str, str] | None]:
    """Add the scale and zero point (and Clip bounds) of a layer's input; return their names."""
    onnx = _onnx()
    spec = lx.act
    assert spec is not None
    fmt = spec.fmt
    zero = lx.act_zero
    if isinstance(fmt, Int):
        dtype = _int_type(fmt.bits, spec.symmetric and fmt.signed)
    elif isinstance(fmt, Fp) and _fp_type(fmt) is not None:
        dtype = _fp_type(fmt)
    else:
        raise ValueError(
            f"layer {lx.name}: input format {fmt} has no ONNX QDQ form; supported "
            f"input formats: {SUPPORTED_ACTS}"
        )
    assert lx.act_scale is not None and lx.act_zero is not None
    p = f"{lx.name}.input"
    scale = g.add(_tensor(f"{p}.scale", onnx.TensorProto.FLOAT, lx.act_scale.reshape(())))
    zp = g.add(_tensor(f"{p}.zero", dtype, zero.reshape(())))
    bounds = None
    if isinstance(fmt, Int) and fmt.bits not in (4, 8):  # the grid's ends, dequantized as fake does
        from mixq.quant.fake import int_grid

        ends = torch.tensor(int_grid(fmt, spec.symmetric), dtype=torch.float32)
        lo, hi = ((ends - lx.act_zero) * lx.act_scale).tolist()
        bounds = (
            g.add(_tensor(f"{p}.lo", onnx.TensorProto.FLOAT, torch.tensor(lo))),
            g.add(_tensor(f"{p}.hi", onnx.TensorProto.FLOAT, torch.tensor(hi))),
        )
    return scale, zp, bounds


def _qdq(params: tuple[str, str, tuple[str, str] | None], x: str, out: str, tag: str) -> list[Any]:
    """QuantizeLinear -> DequantizeLinear (-> Clip) from ``x`` to ``out``."""
    helper = _onnx().helper
    scale, zp, bounds = params
    dq_out = f"{tag}.dq" if bounds else out
    nodes = [
        helper.make_node("QuantizeLinear", [x, scale, zp], [f"{tag}.q"], name=f"{tag}_q"),
        helper.make_node("DequantizeLinear", [f"{tag}.q", scale, zp], [dq_out], name=f"{tag}_dq"),
    ]
    if bounds:
        nodes.append(helper.make_node("Clip", [dq_out, *bounds], [out], name=f"{tag}_clip"))
    return nodes


# Ops through which an input quantizer is also applied upstream, exactly: Q->DQ is monotone with
# QDQ(0) = 0, so it commutes with max (Relu, MaxPool) and with reshapes; QDQ is idempotent.
HOIST_OPS = ("Relu", "MaxPool", "Flatten", "Reshape")


def _chain_above(x: str, producers: dict[str, Any], consumers: dict[str, list[Any]]) -> list[Any]:
    """The chain of HOIST_OPS nodes (top first) that ends in tensor ``x``, each output used once."""
    chain: list[Any] = []
    while (
        (p := producers.get(x)) is not None
        and p.op_type in HOIST_OPS
        and len(p.output) == 1  # a MaxPool's indices could change where quantization makes ties
        and len(consumers.get(x, [])) == 1
    ):
        chain.insert(0, p)
        x = p.input[0]
    return chain


def rewrite(model: Any, layers: dict[str, LayerExport]) -> Any:
    """Replace the ``mixq`` markers of a traced graph by QDQ nodes; return the new ModelProto.

    An input quantizer is also repeated before each node of a chain of Relu/MaxPool/Flatten/
    Reshape that feeds it (exact, see HOIST_OPS), so that ONNX Runtime sees
    ``Conv -> QuantizeLinear`` and ``DequantizeLinear -> MaxPool -> QuantizeLinear`` and runs
    the producing layer and the chain in integers.
    """
    graph = model.graph
    g = _Graph()
    consumers: dict[str, list[Any]] = {}
    producers: dict[str, Any] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
        for o in node.output:
            producers[o] = node
    before: dict[int, list[Any]] = {}  # id(node) -> QDQ nodes to emit just before it
    replace: dict[int, list[Any]] = {}  # id(marker) -> its replacement
    for node in graph.node:
        if node.domain != MARKER_DOMAIN:
            continue
        layer = next(a.s.decode() for a in node.attribute if a.name == "layer")
        lx = layers[layer]
        if node.op_type == "Weight":
            _weight_nodes(g, lx, node.input[0], node.output[0])
            replace[id(node)] = g.nodes[node.output[0]]
        elif node.op_type == "Act":
            params = _act_quantizer(g, lx)
            replace[id(node)] = _qdq(params, node.input[0], node.output[0], f"{lx.name}.input")
            for i, link in enumerate(_chain_above(node.input[0], producers, consumers)):
                tag = f"{lx.name}.input_above{i}"
                before[id(link)] = _qdq(params, link.input[0], f"{tag}.out", tag)
                link.input[0] = f"{tag}.out"
        else:
            raise RuntimeError(f"unknown marker {node.op_type}")
    new_nodes = []
    for node in graph.node:
        new_nodes.extend(before.get(id(node), []))
        new_nodes.extend(replace.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(_guard_relus(g, new_nodes, {t.name: t.data_type for t in g.inits}))
    graph.initializer.extend(g.inits)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    opsets = [o for o in model.opset_import if o.domain not in (MARKER_DOMAIN,)]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = max(o.version, OPSET)
    if g.float_weights:
        log.info("float32 weights (no QDQ form) for %d layers: %s", len(g.float_weights), g.float_weights[:5])
    return model


def _guard_relus(g: _Graph, nodes: list[Any], types: dict[str, int]) -> list[Any]:
    """Write a Relu next to a QDQ of another type than int8/uint8 as ``Max(x, 0)`` (same values).

    ONNX Runtime 1.32's graph optimizations drop a Relu that feeds a QuantizeLinear (or follows
    a DequantizeLinear) as if every zero point of 0 were the type's minimum: right for uint8,
    wrong for fp8 and signed int4, whose grids hold negative values.
    """
    onnx = _onnx()
    tp = onnx.TensorProto
    exact = (tp.UINT8, tp.INT8)

    def other_type(node: Any) -> bool:
        return (
            node.op_type in ("QuantizeLinear", "DequantizeLinear") and types.get(node.input[2]) not in exact
        )

    by_output = {o: n for n in nodes for o in n.output}
    users: dict[str, list[Any]] = {}
    for n in nodes:
        for i in n.input:
            users.setdefault(i, []).append(n)
    zero = None
    out = []
    for n in nodes:
        src = by_output.get(n.input[0]) if n.op_type == "Relu" else None
        if n.op_type == "Relu" and (
            (src is not None and other_type(src)) or any(other_type(u) for u in users.get(n.output[0], []))
        ):
            if zero is None:
                zero = g.add(_tensor("mixq.relu_zero", tp.FLOAT, torch.tensor(0.0)))
            n = onnx.helper.make_node("Max", [n.input[0], zero], list(n.output), name=f"{n.name}_as_max")
        out.append(n)
    return out


# -- tracing ------------------------------------------------------------------------------------


class _Forward(nn.Module):
    """Runs ``task.forward`` on a batch rebuilt from positional tensors (the ONNX inputs)."""

    def __init__(self, model: nn.Module, forward: Any, keys: list[str] | None) -> None:
        super().__init__()
        self.model, self.fn, self.keys = model, forward, keys

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        batch: Any = dict(zip(self.keys, xs, strict=True)) if self.keys is not None else (xs[0],)
        return self.fn(self.model, batch)


def model_inputs(batch: Any) -> tuple[list[str], list[torch.Tensor], list[str] | None]:
    """ONNX input names and example tensors of a batch: a tensor, (inputs, labels) or a dict.

    A dict's tensors named ``target``, ``label`` or ``labels`` are labels, not inputs.
    """
    if isinstance(batch, dict):
        keys = [
            k
            for k, v in batch.items()
            if isinstance(v, torch.Tensor) and k not in ("target", "label", "labels")
        ]
        return keys, [batch[k] for k in keys], keys
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return ["input"], [x], None


def export_deployed(
    model: nn.Module,
    layers: dict[str, LayerExport],
    task: Any,
    path: str | Path,
    batch_size: int = 2,
) -> Path:
    """Trace a deployed model on a slice of the task's first calibration batch and write ONNX."""
    import warnings

    onnx = _onnx()
    names, xs, keys = model_inputs(task.calib[0])
    xs = [x[:batch_size] for x in xs]
    dynamic = {
        n: ({0: "batch", 1: "seq"} if not x.is_floating_point() and x.dim() > 1 else {0: "batch"})
        for n, x in zip(names, xs, strict=True)
    }
    dynamic["output"] = {0: "batch"}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Forward(model.eval(), task.forward, keys),
            tuple(xs),
            buf,
            input_names=names,
            output_names=["output"],
            dynamic_axes=dynamic,
            opset_version=OPSET - 1,
            dynamo=False,
            custom_opsets={MARKER_DOMAIN: 1},
        )
    proto = rewrite(onnx.load_from_string(buf.getvalue()), layers)
    onnx.checker.check_model(proto)
    path = Path(path)
    onnx.save(proto, str(path))
    return path


def save_onnx(qmodel: nn.Module, task: Any, path: str | Path) -> Path:
    """Export a wrapped model with its plan applied as an ONNX QDQ model."""
    model, layers = deploy_model(qmodel)
    for lx in layers.values():  # fail before tracing on an input format ONNX cannot express
        if lx.act is not None and not _act_expressible(lx.act):
            raise ValueError(
                f"layer {lx.name}: input format {lx.act.fmt} has no ONNX QDQ form; "
                f"supported input formats: {SUPPORTED_ACTS}"
            )
    return export_deployed(model, layers, task, path)


def _act_expressible(spec: QSpec) -> bool:
    return isinstance(spec.fmt, Int) or (isinstance(spec.fmt, Fp) and _fp_type(spec.fmt) is not None)
