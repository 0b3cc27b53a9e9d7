"""ONNX export with QuantizeLinear/DequantizeLinear (QDQ) nodes for weights and activations.

The deployed model (:mod:`mixq.export.modules`) is traced by ``torch.onnx.export``; each
quantized weight and input leaves a ``mixq::Weight`` / ``mixq::Act`` marker in the graph, which
is then replaced here:

* weights: ``DequantizeLinear(codes, scale, zero_point, axis)`` with per-tensor or per-channel
  scales. Integer grids of up to 4 bits are stored as INT4/UINT4 (int2 and int3 codes are a
  subset of the int4 grid, with the same scale), 5 to 8 bits as INT8/UINT8; fp8 e4m3fn and
  e5m2 as FLOAT8E4M3FN/FLOAT8E5M2 (opset 21). Group scales, fp6, fp4 and MX blocks have no
  QDQ form that ONNX Runtime runs on the CPU: they are stored as float32 initializers holding
  the exact dequantized values, and so is the weight of a conv that ONNX Runtime can only run
  in float32 (a float input, or an output that feeds no quantizer: a residual Add, a pooling):
  ORT does not constant-fold a DequantizeLinear, so a DQ weight would be dequantized on every
  run and keep the conv off its fast float kernels (the packed safetensors export stores the
  codes). A multipoint weight (``QSpec.points``) is the sum of one
  DequantizeLinear per point (INT4 or INT8 codes, the point's steps as per-channel scales; a
  channel without that point has zero codes), so ORT computes ``sum_i s_i q_i`` as the simulation.
* inputs: ``QuantizeLinear -> DequantizeLinear`` per tensor, in int8/uint8, int4/uint4 or fp8;
  integer widths other than 4 and 8 add a ``Clip`` to the grid's range, exact because the
  dequantized values are monotonic in the code. MX, fp6 and fp4 inputs cannot be expressed
  and raise a ValueError. A SPARQ input is its unsigned 8-bit code (QuantizeLinear to UINT8),
  the window table looked up per code (Gather on a 256-entry table of kept codes), with vSPARQ
  the partner channel's code tested for zero (Gather along the channel axis, Equal, Where),
  times the scale: standard ops that compute the simulation's values. A signed SPARQ site
  (outside SPARQ) is the plain 8-bit asymmetric QDQ, as simulated.
* residual additions (:class:`mixq.nn.QAdd`, a plan's ``meta["adds"]``): each operand is a
  ``QuantizeLinear -> DequantizeLinear`` like a layer's input, so ONNX Runtime fuses the
  addition into QLinearAdd and the convs feeding it into QLinearConv;
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

from mixq.export.codes import Encoded
from mixq.export.modules import MARKER_DOMAIN
from mixq.export.packed import LayerExport, collect_adds, deploy_model
from mixq.kinds import kind_of
from mixq.plan import QSpec

log = logging.getLogger(__name__)

OPSET = 21
SUPPORTED_ACTS = "int2..int8 and uint2..uint8 per tensor, fp8_e4m3fn, fp8_e5m2, SPARQ"


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs onnx: pip install 'mixq[onnx]'") from None
    return onnx


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
    np_dtype = {tp.INT8: np.int8, tp.UINT8: np.uint8, tp.INT32: np.int32, tp.INT64: np.int64,
                tp.FLOAT: np.float32}[dtype]  # fmt: skip
    return onnx.numpy_helper.from_array(v.numpy().astype(np_dtype), name)


class _Graph:
    """Accumulates the nodes and initializers that replace the markers."""

    def __init__(self, int4_as_int8: bool = False) -> None:
        self.onnx = _onnx()
        self.tp = self.onnx.TensorProto
        self.nodes: dict[str, list[Any]] = {}  # weight marker output -> replacement nodes
        self.inits: list[Any] = []
        self.float_weights: list[str] = []
        self.int4_as_int8 = int4_as_int8  # 2..4-bit weight codes stored as INT8/UINT8
        self._seen: dict[tuple, str] = {}  # (type, dims, bytes) -> the initializer's name

    def add(self, t: Any, share: bool = True) -> str:
        """Add an initializer; one equal to an earlier one (type, shape, bytes) is that one.

        Equal scales and zero points under one name let ONNX Runtime merge the quantizers that
        several consumers put on one tensor (common subexpressions), so that, e.g., a residual
        addition whose output feeds both the next conv's and the next addition's quantizer still
        fuses into QLinearAdd. ``share=False`` keeps the initializer's own name: weight codes
        (:func:`mixq.export.emulate` finds each layer by its codes' name).
        """
        key = (t.data_type, tuple(t.dims), t.raw_data) if share and t.raw_data else None
        if key is not None and key in self._seen:
            return self._seen[key]
        self.inits.append(t)
        if key is not None:
            self._seen[key] = t.name
        return t.name

    def tensor(self, name: str, dtype: int, values: torch.Tensor, share: bool = True) -> str:
        """Add an initializer of element type ``dtype`` from exact values (see :meth:`add`)."""
        return self.add(_tensor(name, dtype, values), share)

    def weight_nodes(
        self, lx: LayerExport, out: str, vals: tuple[torch.Tensor, torch.Tensor, int] | None
    ) -> list[Any]:
        """A weight as ``DequantizeLinear(codes, scale, zero)`` from a kind's ``vals`` (element
        values, zero points, element type), per tensor or output channel; None: as its exact
        dequantized float32 values (an initializer)."""
        helper = self.onnx.helper
        linear = lx.kind == "linear"
        enc = lx.weight
        assert isinstance(enc, Encoded)
        if vals is None:
            w = lx.float_weight()
            name = self.tensor(f"{lx.name}.weight", self.tp.FLOAT, w.t() if linear else w)
            self.float_weights.append(lx.name)
            return [helper.make_node("Identity", [name], [out], name=f"{lx.name}.weight_float")]
        q, zero, dtype = vals
        q = q.t() if linear else q  # Linear exports as MatMul(x, W^T): channels on axis 1
        per = (lambda t: t.reshape(())) if enc.spec.granularity == "tensor" else (lambda t: t.reshape(-1))
        codes = self.tensor(f"{lx.name}.weight.codes", dtype, q, share=False)
        scale = self.tensor(f"{lx.name}.weight.scale", self.tp.FLOAT, per(enc.scale))
        zp = self.tensor(f"{lx.name}.weight.zero", dtype, per(zero))
        axis = 1 if linear else 0
        tag = f"{lx.name}.weight_dq"
        return [helper.make_node("DequantizeLinear", [codes, scale, zp], [out], name=tag, axis=axis)]


def _weight_nodes(g: _Graph, lx: LayerExport, out: str, as_float: bool = False) -> None:
    """The nodes that produce a layer's weight, from its format kind; ``as_float``: its float32 values."""
    enc = lx.weight
    assert isinstance(enc, Encoded)
    g.nodes[out] = kind_of(enc.spec).weight_nodes(g, lx, out, as_float)


def _as_depthwise(g: _Graph, lx: LayerExport, qdq: list[Any], conv: Any) -> None:
    """Run a conv with one input channel as a depthwise conv on that channel repeated (in place).

    ``Q -> Expand(1 -> C_out channels) -> DQ -> Conv(group=C_out)`` computes the same dot
    products (the weight [C_out, 1, kh, kw] fits both), and ONNX Runtime fuses it into its
    int8 depthwise kernel; its dense int8 kernel runs such a conv (9 terms per output for a
    3x3 kernel) slower than float32 does. The codes are repeated as uint8/int8 bytes.
    """
    onnx = _onnx()
    out_channels = int(lx.weight.shape[0])
    grouped = any(a.name == "group" and a.i != 1 for a in conv.attribute)
    act = lx.act_base or lx.act
    tp = onnx.TensorProto
    eight_bit = act is not None and kind_of(act).onnx_act_type(act, tp) in (tp.INT8, tp.UINT8)
    summed = isinstance(lx.weight, Encoded) and not kind_of(lx.weight.spec).single_weight
    if conv.op_type != "Conv" or out_channels == 1 or grouped or not eight_bit or summed:
        return
    q, dq = qdq[0], qdq[1]
    assert q.op_type == "QuantizeLinear" and dq.op_type == "DequantizeLinear"
    shape = torch.tensor([1, out_channels, 1, 1])
    reps = g.add(_tensor(f"{lx.name}.input.repeat", onnx.TensorProto.INT64, shape))
    expanded = f"{lx.name}.input.q_repeated"
    repeat = onnx.helper.make_node("Expand", [q.output[0], reps], [expanded], name=f"{lx.name}.input_repeat")
    qdq.insert(1, repeat)
    dq.input[0] = expanded
    kept = [a for a in conv.attribute if a.name != "group"]
    del conv.attribute[:]
    conv.attribute.extend([*kept, onnx.helper.make_attribute("group", out_channels)])


def _own_act_nodes(g: _Graph, lx: LayerExport, marker: Any, channels: int) -> list[Any] | None:
    """The nodes an input's format kind writes itself, or None for QuantizeLinear/DequantizeLinear."""
    if lx.act is None:
        return None
    return kind_of(lx.act).act_nodes(g, lx, marker.input[0], marker.output[0], channels)


def _integer_kernel(lx: LayerExport, g: _Graph) -> bool:
    """Whether ONNX Runtime has an integer kernel for the layer: 8-bit codes of input and weight.

    Layers with 4-bit (INT4/UINT4) or fp8 weights or inputs, multipoint weights and float32
    weight initializers (no QDQ form) run in float32 on dequantized values; ORT would still
    round their float biases to int32 (at scale ``s_x * s_w``) when their input is a
    DequantizeLinear. An addition's operands keep their DequantizeLinear: ORT fuses 8-bit ones
    into QLinearAdd, and an addition has no weight or bias for ORT to change.
    """
    if lx.kind == "add":
        return True
    spec = lx.act_base or lx.act
    w = lx.weight
    eight_bit = (g.tp.INT8, g.tp.UINT8)
    if spec is None or kind_of(spec).onnx_act_type(spec, g.tp) not in eight_bit or not isinstance(w, Encoded):
        return False
    vals = kind_of(w.spec).onnx_weight(g, w)
    return vals is not None and vals[2] in eight_bit


def _act_quantizer(g: _Graph, lx: LayerExport) -> tuple[str, str, tuple[str, str] | None]:
    """Add the scale and zero point (and Clip bounds) of a layer's input; return their names."""
    onnx = _onnx()
    spec = lx.act_base or lx.act  # a signed SPARQ site: its plain 8-bit asymmetric code
    assert spec is not None
    kind = kind_of(spec)
    dtype = kind.onnx_act_type(spec, onnx.TensorProto)
    if dtype is None:
        raise ValueError(
            f"layer {lx.name}: input format {spec.fmt} has no ONNX QDQ form; supported "
            f"input formats: {SUPPORTED_ACTS}"
        )
    assert lx.act_scale is not None and lx.act_zero is not None
    p = f"{lx.name}.input"
    scale = g.add(_tensor(f"{p}.scale", onnx.TensorProto.FLOAT, lx.act_scale.reshape(())))
    zp = g.add(_tensor(f"{p}.zero", dtype, lx.act_zero.reshape(())))
    bounds = None
    ends = kind.onnx_act_bounds(spec, lx.act_scale, lx.act_zero)  # e.g. an integer grid's (Clip)
    if ends is not None:
        lo, hi = ends
        bounds = (
            g.add(_tensor(f"{p}.lo", onnx.TensorProto.FLOAT, torch.tensor(lo))),
            g.add(_tensor(f"{p}.hi", onnx.TensorProto.FLOAT, torch.tensor(hi))),
        )
    return scale, zp, bounds


def _qdq(
    params: tuple[str, str, tuple[str, str] | None], x: str, out: str, tag: str, float_zero: str | None = None
) -> list[Any]:
    """QuantizeLinear -> DequantizeLinear (-> Clip) from ``x`` to ``out``.

    With ``float_zero`` (the zero point as a float initializer) the dequantization is written
    ``(Cast(q) - zero) * scale``: the same values, which ONNX Runtime does not fuse (see rewrite).
    """
    helper = _onnx().helper
    scale, zp, bounds = params
    dq_out = f"{tag}.dq" if bounds else out
    q = f"{tag}.q"
    nodes = [helper.make_node("QuantizeLinear", [x, scale, zp], [q], name=f"{tag}_q")]
    if float_zero is None:
        nodes.append(helper.make_node("DequantizeLinear", [q, scale, zp], [dq_out], name=f"{tag}_dq"))
    else:
        nodes += [
            helper.make_node("Cast", [q], [f"{tag}.qf"], name=f"{tag}_cast", to=_onnx().TensorProto.FLOAT),
            helper.make_node("Sub", [f"{tag}.qf", float_zero], [f"{tag}.centered"], name=f"{tag}_sub"),
            helper.make_node("Mul", [f"{tag}.centered", scale], [dq_out], name=f"{tag}_dq"),
        ]
    if bounds:
        nodes.append(helper.make_node("Clip", [dq_out, *bounds], [out], name=f"{tag}_clip"))
    return nodes


# Ops through which an input quantizer is also applied upstream, exactly: Q->DQ is monotone with
# QDQ(0) = 0, so it commutes with max (Relu, MaxPool) and with reshapes; QDQ is idempotent. With
# constant bounds, QDQ(min(QDQ(x), c)) = min(QDQ(x), QDQ(c)) = QDQ(min(x, c)) for a monotone,
# idempotent QDQ, so clamps (Clip, and Min/Max with a constant: CLE's per-channel clamps) too.
HOIST_OPS = ("Relu", "MaxPool", "Flatten", "Reshape", "Clip", "Min", "Max")
BOUNDED_OPS = ("Clip", "Min", "Max")  # hoisted through only when every other input is a constant


def _chain_above(
    x: str, producers: dict[str, Any], consumers: dict[str, list[Any]], constants: set[str] | None = None
) -> list[Any]:
    """The chain of HOIST_OPS nodes (top first) that ends in tensor ``x``, each output used once."""
    constants = constants or set()
    chain: list[Any] = []
    while (
        (p := producers.get(x)) is not None
        and p.op_type in HOIST_OPS
        and len(p.output) == 1  # a MaxPool's indices could change where quantization makes ties
        and len(consumers.get(x, [])) == 1
        and (p.op_type not in BOUNDED_OPS or all(i in constants or not i for i in p.input[1:]))
    ):
        chain.insert(0, p)
        x = p.input[0]
    return chain


LAYER_OPS = ("Conv", "MatMul", "Gemm")


def _float_layer(node: Any, producers: dict[str, Any], constants: set[str], float_convs: set[str]) -> bool:
    """Whether ``node`` (through a bias Add) is a layer that runs in float32.

    That is a layer whose input is not quantized, or a conv of ``float_convs``. Such a layer
    runs in float32 whatever follows it, so a quantizer hoisted above its output gains no
    integer kernel; ONNX Runtime would only run the chain between them (a MaxPool) in its slow
    NCHW uint8 kernel instead of its float one.
    """
    if node is not None and node.op_type == "Add" and len(node.input) == 2 and node.input[1] in constants:
        node = producers.get(node.input[0])
    if node is None or node.op_type not in LAYER_OPS:
        return False
    weight = producers.get(node.input[1]) if len(node.input) > 1 else None
    if weight is not None and weight.domain == MARKER_DOMAIN and _marker_layer(weight) in float_convs:
        return True
    src = producers.get(node.input[0])
    return src is None or not (src.domain == MARKER_DOMAIN and src.op_type == "Act")


def _float_convs(
    graph: Any, layers: dict[str, LayerExport], producers: dict[str, Any], consumers: dict[str, list[Any]],
    constants: set[str], channels: dict[str, int],
) -> set[str]:
    """The conv layers that ONNX Runtime runs in float32: their weights go in as float.

    ORT runs a conv in integers (QLinearConv) only when both its input and its output pass
    through QDQ: a conv with a float input, or whose output feeds something other than input
    quantizers with equal parameters (a float residual Add, a pooling), runs in float32. With a
    DequantizeLinear weight it would then dequantize the weight on every run and miss its NCHWc
    float kernels, since ORT does not constant-fold DequantizeLinear; the exact dequantized
    values avoid both. Their inputs are dequantized in the form ORT does not fuse (see
    :func:`rewrite`): ORT quantizes the float weight of a conv with a DequantizeLinear input to
    int8 itself, per tensor, which would change the layer's values.

    A conv with a single input channel (an image model's stem on grayscale images) whose output
    is max-pooled before its next quantizer runs in float32 too, on its dequantized input codes
    and weight: summing only 9 products per output (3x3), ORT's int8 kernels are slower than its
    float32 one (on an AVX2 CPU, mnist-cnn at batch 256: 8.9 ms dense, 5.9 ms depthwise on the
    input repeated per output channel plus 1.7 ms to repeat and transpose it, against 2.1 ms),
    and the float32 pooling leaves a quarter of the values to convert to ORT's int8 layout. A
    stem without pooling stays on the int8 depthwise kernel (:func:`_as_depthwise`): converting
    its whole float32 output costs more than the float32 kernel saves.
    """
    heads: dict[str, set[int]] = {}  # tensor -> its users that lead to an input quantizer
    quantizers: dict[str, set[tuple]] = {}  # tensor -> the parameters of those quantizers
    for node in graph.node:
        if node.domain == MARKER_DOMAIN and node.op_type == "Act":
            chain = _chain_above(node.input[0], producers, consumers, constants)
            x = chain[0].input[0] if chain else node.input[0]
            heads.setdefault(x, set()).add(id(chain[0] if chain else node))
            layer = _marker_layer(node)
            quantizers.setdefault(x, set()).add(_quantizer_key(layers[layer]))
    # a tensor whose every user leads to an equal quantizer: ORT merges those into one and fuses
    # the producer (e.g. a projection conv feeding the next block's conv and residual addition),
    # also through a Relu above the merged quantizer (ORT drops a Relu that feeds a uint8 QDQ
    # with zero point 0): a stem conv whose Relu feeds the first block's conv and shortcut
    fed = set()
    for x, users in heads.items():
        if len(consumers.get(x, [])) != len(users) or len(quantizers[x]) != 1:
            continue
        top = producers.get(x)
        while (top is not None and top.op_type == "Relu"
               and len(consumers.get(top.input[0], [])) == 1):  # fmt: skip
            top = producers.get(top.input[0])
        if top is not None:
            fed.add(id(top))
    out: set[str] = set()
    for node in graph.node:
        if node.domain != MARKER_DOMAIN or node.op_type != "Weight":
            continue
        layer = _marker_layer(node)
        lx, users = layers[layer], consumers.get(node.output[0], [])
        summed = isinstance(lx.weight, Encoded) and not kind_of(lx.weight.spec).single_weight
        if lx.kind != "conv" or summed or len(users) != 1 or users[0].op_type != "Conv":
            continue
        stem = channels.get(layer) == 1 and _pooled_below(users[0], consumers)
        if lx.act is None or (lx.act_base is None and id(users[0]) not in fed) or stem:
            out.add(layer)
    return out


def _pooled_below(node: Any, consumers: dict[str, list[Any]]) -> bool:
    """Whether ``node``'s output goes through a MaxPool in a chain of HOIST_OPS (one user each)."""
    x = node.output[0]
    while len(users := consumers.get(x, [])) == 1 and users[0].op_type in HOIST_OPS:
        if users[0].op_type == "MaxPool":
            return True
        x = users[0].output[0]
    return False


def _marker_layer(node: Any) -> str:
    """The layer a ``mixq`` marker node names."""
    return next(a.s.decode() for a in node.attribute if a.name == "layer")


def _quantizer_key(lx: LayerExport) -> tuple:
    """What decides an input quantizer's QDQ nodes: equal keys give equal nodes."""
    spec = lx.act_base or lx.act
    scale = None if lx.act_scale is None else lx.act_scale.float().numpy().tobytes()
    zero = None if lx.act_zero is None else lx.act_zero.float().numpy().tobytes()
    return (repr(spec), lx.act_base is not None, scale, zero)


def _pool_before_relu(chain: list[Any], moved: dict[int, Any]) -> None:
    """Rewire each ``Relu -> MaxPool`` of a chain as ``MaxPool -> Relu`` (the same values).

    Max commutes with the monotone Relu. With the Relu last, ONNX Runtime's QDQ propagation
    stops at it and cannot move the next QuantizeLinear above the MaxPool, so the pool stays in
    float32 (its NCHWc kernel). ``moved`` swaps the two nodes' places in the graph's order.
    """
    for relu, pool in zip(chain, chain[1:], strict=False):
        if relu.op_type != "Relu" or pool.op_type != "MaxPool" or id(relu) in moved or id(pool) in moved:
            continue
        x, mid, y = relu.input[0], relu.output[0], pool.output[0]
        pool.input[0], pool.output[0] = x, mid
        relu.input[0], relu.output[0] = mid, y
        moved[id(relu)], moved[id(pool)] = pool, relu


def rewrite(
    model: Any,
    layers: dict[str, LayerExport],
    channels: dict[str, int] | None = None,
    int4_as_int8: bool = False,
) -> Any:
    """Replace the ``mixq`` markers of a traced graph by QDQ nodes; return the new ModelProto.

    An input quantizer is also repeated before each node of a chain of Relu/MaxPool/Flatten/
    Reshape/Clip/Min/Max that feeds it (exact, see HOIST_OPS), so that ONNX Runtime sees
    ``Conv -> QuantizeLinear`` and ``DequantizeLinear -> MaxPool -> QuantizeLinear`` and runs
    the producing layer and the chain in integers; above a layer that runs in float32 anyway (a
    float input, a conv of :func:`_float_convs`) nothing is hoisted, and a ``Relu -> MaxPool``
    there becomes ``MaxPool -> Relu`` (:func:`_pool_before_relu`). Another conv with a single
    input channel becomes a depthwise conv on the repeated channel (:func:`_as_depthwise`). A
    layer that ONNX Runtime runs in float32 (a float32 weight initializer, a conv whose output
    meets no quantizer or a pooled stem: :func:`_float_convs`, 4-bit or fp8 codes:
    :func:`_integer_kernel`) gets its input dequantized as
    ``(Cast(q) - zero) * scale`` instead of a DequantizeLinear: after a DequantizeLinear, ONNX
    Runtime's graph optimizations quantize a conv's or Gemm's float weight to int8 per tensor and
    its float bias to int32 themselves, which changes the layer's values. ``channels``: the input
    channels of each layer (see :func:`_float_convs` and :func:`_as_depthwise`; vSPARQ inputs'
    pairs run along them). ``int4_as_int8``: see :func:`mixq.export.save`.
    """
    graph = model.graph
    channels = channels or {}
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                       for o in n.output}  # fmt: skip
    g = _Graph(int4_as_int8)
    consumers: dict[str, list[Any]] = {}
    producers: dict[str, Any] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
        for o in node.output:
            producers[o] = node
    before: dict[int, list[Any]] = {}  # id(node) -> QDQ nodes to emit just before it
    replace: dict[int, list[Any]] = {}  # id(marker) -> its replacement
    moved: dict[int, Any] = {}  # id(node) -> the node emitted in its place (see _pool_before_relu)
    float_convs = _float_convs(graph, layers, producers, consumers, constants, channels)
    for node in graph.node:
        if node.domain != MARKER_DOMAIN:
            continue
        layer = _marker_layer(node)
        lx = layers[layer]
        if node.op_type == "Weight":
            _weight_nodes(g, lx, node.output[0], as_float=layer in float_convs)
            replace[id(node)] = g.nodes[node.output[0]]
        elif node.op_type == "Act" and (own := _own_act_nodes(g, lx, node, channels.get(layer, 0))):
            replace[id(node)] = own  # the kind's own nodes (SPARQ windows)
        elif node.op_type == "Act":
            params = _act_quantizer(g, lx)
            float_zero = None
            if layer in float_convs or not _integer_kernel(lx, g):
                # a layer ORT runs in float32: keep it from quantizing the weight and bias itself
                assert lx.act_zero is not None
                zf = lx.act_zero.reshape(())
                float_zero = g.add(_tensor(f"{lx.name}.input.zero_float", _onnx().TensorProto.FLOAT, zf))
            replace[id(node)] = _qdq(params, node.input[0], node.output[0], f"{lx.name}.input", float_zero)
            users = consumers.get(node.output[0], [])
            if float_zero is None and channels.get(layer) == 1 and lx.kind == "conv" and len(users) == 1:
                _as_depthwise(g, lx, replace[id(node)], users[0])
            chain = _chain_above(node.input[0], producers, consumers, constants)
            if chain and _float_layer(producers.get(chain[0].input[0]), producers, constants, float_convs):
                _pool_before_relu(chain, moved)  # nothing to fuse above: keep the chain in float
                chain = []
            for i, link in enumerate(chain):
                tag = f"{lx.name}.input_above{i}"
                before[id(link)] = _qdq(params, link.input[0], f"{tag}.out", tag)
                link.input[0] = f"{tag}.out"
        else:
            raise RuntimeError(f"unknown marker {node.op_type}")
    new_nodes = []
    for node in graph.node:
        node = moved.get(id(node), node)
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
    int4_as_int8: bool = False,
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
    channels = {n: int(m.weight.shape[1]) * getattr(m, "groups", 1) for n, m in model.named_modules()
                if n in layers and layers[n].kind != "add"}  # fmt: skip
    proto = rewrite(onnx.load_from_string(buf.getvalue()), layers, channels, int4_as_int8)
    onnx.checker.check_model(proto)
    path = Path(path)
    onnx.save(proto, str(path))
    return path


def save_onnx(qmodel: nn.Module, task: Any, path: str | Path, int4_as_int8: bool = False) -> Path:
    """Export a wrapped model with its plan applied as an ONNX QDQ model (see mixq.export.save)."""
    model, layers = deploy_model(qmodel)
    layers = layers | collect_adds(model)  # the residual additions' operands, by marker name
    for lx in layers.values():  # fail before tracing on an input format ONNX cannot express
        if lx.act is not None and not _act_expressible(lx.act):
            raise ValueError(
                f"layer {lx.name}: input format {lx.act.fmt} has no ONNX QDQ form; "
                f"supported input formats: {SUPPORTED_ACTS}"
            )
    return export_deployed(model, layers, task, path, int4_as_int8=int4_as_int8)


def _act_expressible(spec: QSpec) -> bool:
    return kind_of(spec).onnx_act_type(spec, _onnx().TensorProto) is not None
