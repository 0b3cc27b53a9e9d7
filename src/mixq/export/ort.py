"""ONNX Runtime's graph surgery: the QDQ graph shaped for what ONNX Runtime fuses and runs fast.

The generic writer (:mod:`mixq.export.qdq`) traces the deployed model and builds the nodes of a
weight or an input from its format kind; :func:`rewrite` puts them into the traced graph in
place of the ``mixq`` markers, and decides here, from how ONNX Runtime (1.32, CPU) fuses QDQ
graphs and how its kernels behave, everything that only serves it, the values staying those
of the simulation:

* which convs run in float32 and get their weight as float32 values (:func:`_float_convs`),
  and which inputs are dequantized in a form ORT does not fuse (:func:`_integer_kernel`);
* a layer ORT runs in float32 on integer codes sums the codes themselves, exactly, and scales
  the int32 sums after (:func:`exact_layer`);
* input quantizers repeated above chains of Relu/MaxPool/reshapes/clamps (``HOIST_OPS``), a
  ``Relu -> MaxPool`` above a float layer turned around (:func:`_pool_before_relu`);
* a conv with one input channel as a depthwise conv on the repeated channel
  (:func:`_as_depthwise`), a Relu next to a non-8-bit QDQ written as ``Max(x, 0)``
  (:func:`_guard_relus`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mixq.export.codes import Encoded, int_weight
from mixq.export.deploy import LayerExport
from mixq.export.modules import MARKER_DOMAIN, marker_layer
from mixq.formats import Int
from mixq.kinds import kind_of
from mixq.quant.fake import int_grid

if TYPE_CHECKING:  # the writer passes its graph builder in: qdq imports this module
    from mixq.export.qdq import Graph

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
EXACT_SUM = 2**24  # float32 holds every integer up to this: sums of integer products below it are exact
EXACT_SUFFIX = ".acc_dq"  # the DequantizeLinear that scales an exact layer's integer sums


@dataclass(frozen=True)
class Exact:
    """A layer ONNX Runtime runs in float32 on exact integers (see :func:`exact_layer`)."""

    weight: torch.Tensor  # the weight's integer codes minus their zero points, float32 [out, ...]
    scale: torch.Tensor  # float32(s_x * s_w): per output channel [out], or per tensor []
    bounds: tuple[float, float] | None  # the input grid's ends minus its zero point (a Clip), or None


def exact_layer(lx: LayerExport) -> Exact | None:
    """The integer form of a layer that ONNX Runtime runs in float32, or None where there is none.

    A layer with integer input codes (per tensor) and integer weight codes (per tensor or output
    channel) computes ``y = s_x s_w sum_k (q_x - z_x)(q_w - z_w) + b``. ONNX Runtime's float32
    kernels sum the dequantized products in their own order, PyTorch in another: the sums
    differ in their last bits and, now and then, a value moves across the next quantizer's
    rounding boundary; in a deep network each such code grows into many (a quantized network
    amplifies a one-code change to its quantization noise level). Summed on the integer
    differences instead, every partial sum is an integer below ``2^24`` (checked here from the
    grid's ends and each channel's weights), which float32 holds exactly in any order; then
    ``acc * float32(s_x s_w)`` and ``+ b`` are single float32 operations, the same everywhere.

    [DESIGN] A linear layer's integers are stored as float32 (4-bit codes in 32 bits): ONNX
    Runtime turns a MatMul's DequantizeLinear weight (INT4 codes) into MatMulNBits, which does
    not compute the layer's values (measured: MobileNetV2's w4a8 classifier, every output off).
    """
    act, w = lx.act, lx.weight
    if lx.kind not in ("conv", "linear") or act is None or lx.act_base is not None or lx.act_scale is None:
        return None
    if not (isinstance(act.fmt, Int) and kind_of(act).name == "integer" and act.granularity == "tensor"):
        return None
    if not isinstance(w, Encoded) or not isinstance(w.spec.fmt, Int) or kind_of(w.spec).name != "integer":
        return None
    if w.spec.granularity not in ("tensor", "channel") or w.spec.points is not None or w.spec.float_zero:
        return None  # (a float zero point has no integer weights: float32 ones)
    assert lx.act_zero is not None
    zero = float(lx.act_zero.reshape(()))
    lo, hi = (v - zero for v in int_grid(act.fmt, act.symmetric))
    wi = int_weight(w).float()
    if max(abs(lo), abs(hi)) * float(wi.abs().flatten(1).sum(1).max()) >= EXACT_SUM:
        return None
    scale = lx.act_scale.float().reshape(()) * w.scale.float().reshape(-1)
    if w.spec.granularity == "tensor":
        scale = scale.reshape(())
    bounds = None if act.fmt.bits in (4, 8) else (lo, hi)
    return Exact(wi, scale, bounds)


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
    if weight is not None and weight.domain == MARKER_DOMAIN and marker_layer(weight) in float_convs:
        return True
    src = producers.get(node.input[0])
    return src is None or not (src.domain == MARKER_DOMAIN and src.op_type == "Act")


def _float_convs(
    graph: Any,
    layers: dict[str, LayerExport],
    producers: dict[str, Any],
    consumers: dict[str, list[Any]],
    constants: set[str],
    channels: dict[str, int],
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
            layer = marker_layer(node)
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
        while top is not None and top.op_type == "Relu" and len(consumers.get(top.input[0], [])) == 1:
            top = producers.get(top.input[0])
        if top is not None:
            fed.add(id(top))
    out: set[str] = set()
    for node in graph.node:
        if node.domain != MARKER_DOMAIN or node.op_type != "Weight":
            continue
        layer = marker_layer(node)
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


def _as_depthwise(g: Graph, lx: LayerExport, qdq: list[Any], conv: Any) -> None:
    """Run a conv with one input channel as a depthwise conv on that channel repeated (in place).

    ``Q -> Expand(1 -> C_out channels) -> DQ -> Conv(group=C_out)`` computes the same dot
    products (the weight [C_out, 1, kh, kw] fits both), and ONNX Runtime fuses it into its
    int8 depthwise kernel; its dense int8 kernel runs such a conv (9 terms per output for a
    3x3 kernel) slower than float32 does. The codes are repeated as uint8/int8 bytes.
    """
    onnx = g.onnx
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
    reps = g.tensor(f"{lx.name}.input.repeat", onnx.TensorProto.INT64, shape)
    expanded = f"{lx.name}.input.q_repeated"
    repeat = onnx.helper.make_node("Expand", [q.output[0], reps], [expanded], name=f"{lx.name}.input_repeat")
    qdq.insert(1, repeat)
    dq.input[0] = expanded
    kept = [a for a in conv.attribute if a.name != "group"]
    del conv.attribute[:]
    conv.attribute.extend([*kept, onnx.helper.make_attribute("group", out_channels)])


def _integer_kernel(lx: LayerExport, g: Graph) -> bool:
    """Whether ONNX Runtime has an integer kernel for the layer: 8-bit codes of input and weight.

    Layers with 4-bit (INT4/UINT4) or fp8 weights or inputs, multipoint weights and float32
    weight initializers (no QDQ form) run in float32 on dequantized values; ORT would still
    round their float biases to int32 (at scale ``s_x * s_w``) when their input is a
    DequantizeLinear. An addition's operands keep their DequantizeLinear: ORT fuses 8-bit ones
    into QLinearAdd, and an addition has no weight or bias for ORT to change.
    """
    if lx.kind == "add":
        return True
    if lx.kind == "call":  # its own forward's ops (a Transpose for F.linear): run in float32 as traced
        return False
    spec = lx.act_base or lx.act
    w = lx.weight
    eight_bit = (g.tp.INT8, g.tp.UINT8)
    if spec is None or kind_of(spec).onnx_act_type(spec, g.tp) not in eight_bit or not isinstance(w, Encoded):
        return False
    vals = kind_of(w.spec).onnx_weight(g, w)
    return vals is not None and vals[2] in eight_bit


def _guard_relus(g: Graph, nodes: list[Any], types: dict[str, int]) -> list[Any]:
    """Write a Relu next to a QDQ of another type than int8/uint8 as ``Max(x, 0)``, a Clip as
    ``Min(Max(x, lo), hi)`` (same values).

    ONNX Runtime 1.32's graph optimizations drop a Relu that feeds a QuantizeLinear (or follows
    a DequantizeLinear) as if every zero point of 0 were the type's minimum: right for uint8,
    wrong for fp8 and signed int4, whose grids hold negative values.
    """
    onnx = g.onnx
    tp = onnx.TensorProto
    exact = (tp.UINT8, tp.INT8)

    def codes_type(node: Any) -> int | None:
        if len(node.input) > 2 and node.input[2]:  # the zero point's type is the codes' type
            return types.get(node.input[2])
        if node.op_type == "QuantizeLinear":  # no zero point: uint8
            return tp.UINT8
        if node.input[0] in types:  # a DequantizeLinear reads its input's type (int32 sums)
            return types[node.input[0]]
        src = by_output.get(node.input[0])
        return codes_type(src) if src is not None and src.op_type == "QuantizeLinear" else None

    def other_type(node: Any) -> bool:  # an unknown type is guarded: Max(x, 0) is the same values
        return node.op_type in ("QuantizeLinear", "DequantizeLinear") and codes_type(node) not in exact

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
                zero = g.tensor("mixq.relu_zero", tp.FLOAT, torch.tensor(0.0))
            n = onnx.helper.make_node("Max", [n.input[0], zero], list(n.output), name=f"{n.name}_as_max")
        src = by_output.get(n.input[0]) if n.op_type == "Clip" else None
        if n.op_type == "Clip" and (
            (src is not None and other_type(src)) or any(other_type(u) for u in users.get(n.output[0], []))
        ):
            out += _clip_as_min_max(onnx, n)
            continue
        out.append(n)
    return out


def _clip_as_min_max(onnx: Any, clip: Any) -> list[Any]:
    """``Clip(x, lo, hi)`` as ``Min(Max(x, lo), hi)`` (an absent bound left out): the same values.

    ONNX Runtime 1.32 fuses a Clip into a following QuantizeLinear only for 8-bit zero points
    (a ReLU6 before a 4-bit input quantizer fails the session's creation, "Unexpected data type
    for QuantizeLinear input y_zero_point").
    """
    x, lo, hi = (list(clip.input) + ["", ""])[:3]
    nodes, cur = [], x
    for op, bound in (("Max", lo), ("Min", hi)):
        if bound:
            nxt = f"{clip.name}.{op.lower()}"
            nodes.append(onnx.helper.make_node(op, [cur, bound], [nxt], name=f"{clip.name}_as_{op.lower()}"))
            cur = nxt
    if not nodes:
        return [onnx.helper.make_node("Identity", [x], list(clip.output), name=f"{clip.name}_as_identity")]
    nodes[-1].output[0] = clip.output[0]
    return nodes


@dataclass
class _Rewrite:
    """One rewrite of a traced graph: its index, ORT's decisions and the edits collected."""

    g: Graph
    layers: dict[str, LayerExport]
    channels: dict[str, int]
    producers: dict[str, Any] = field(default_factory=dict)
    consumers: dict[str, list[Any]] = field(default_factory=dict)
    constants: set[str] = field(default_factory=set)
    float_convs: set[str] = field(default_factory=set)  # see _float_convs
    before: dict[int, list[Any]] = field(default_factory=dict)  # id(node) -> QDQ nodes to emit just before it
    replace: dict[int, list[Any]] = field(default_factory=dict)  # id(marker) -> its replacement
    moved: dict[int, Any] = field(default_factory=dict)  # id(node) -> node in its place: _pool_before_relu
    exact: dict[str, Exact] = field(default_factory=dict)  # layers run on exact integers: exact_layer
    after: dict[int, list[Any]] = field(default_factory=dict)  # id(node) -> nodes to emit just after it

    def index(self, graph: Any) -> None:
        """Each tensor's producer and consumers, and the constant tensors of ``graph``."""
        self.constants = {t.name for t in graph.initializer} | {
            o for n in graph.node if n.op_type == "Constant" for o in n.output
        }
        for node in graph.node:
            for i in node.input:
                self.consumers.setdefault(i, []).append(node)
            for o in node.output:
                self.producers[o] = node
        self.float_convs = _float_convs(
            graph, self.layers, self.producers, self.consumers, self.constants, self.channels
        )
        for node in graph.node:
            if node.domain != MARKER_DOMAIN or node.op_type != "Weight":
                continue
            layer = marker_layer(node)
            lx, users = self.layers[layer], self.consumers.get(node.output[0], [])
            if (
                len(users) != 1
                or users[0].op_type not in ("Conv", "MatMul")
                or users[0].input[1] != node.output[0]
            ):
                continue
            if layer in self.float_convs or not _integer_kernel(lx, self.g):  # ORT runs it in float32
                if (e := exact_layer(lx)) is not None:
                    self.exact[layer] = e

    def marker(self, node: Any) -> None:
        """Replace one marker: a weight's nodes, an input's own nodes (its kind's) or its QDQ."""
        layer = marker_layer(node)
        lx = self.layers[layer]
        if node.op_type == "Weight" and layer in self.exact:
            self.exact_weight(node, lx, self.exact[layer])
        elif node.op_type == "Weight":
            # a layer run by its own forward ("call"): float32 values, or ORT turns its weight's
            # DequantizeLinear -> Transpose -> MatMul into MatMulNBits, which rounds the input to int8
            as_float = layer in self.float_convs or lx.kind == "call"
            self.replace[id(node)] = self.g.weight(lx, node.output[0], as_float=as_float)
        elif node.op_type == "Act" and (own := self.g.own_act_nodes(lx, node, self.channels.get(layer, 0))):
            self.replace[id(node)] = own  # the kind's own nodes (SPARQ windows)
        elif node.op_type == "Act":
            self.input(node, lx)
        else:
            raise RuntimeError(f"unknown marker {node.op_type}")

    def input(self, node: Any, lx: LayerExport) -> None:
        """An input's ``QuantizeLinear -> DequantizeLinear``, in the form ORT runs it best."""
        g, layer = self.g, lx.name
        params = g.act_quantizer(lx)
        float_zero = None
        if layer in self.exact:
            self.exact_input(node, lx, self.exact[layer], params)
            self.hoist(node, lx, params)
            return
        if layer in self.float_convs or not _integer_kernel(lx, g):
            # a layer ORT runs in float32: keep it from quantizing the weight and bias itself
            assert lx.act_zero is not None
            float_zero = g.tensor(f"{lx.name}.input.zero_float", g.tp.FLOAT, lx.act_zero.reshape(()))
        qdq = g.qdq(params, node.input[0], node.output[0], f"{lx.name}.input", float_zero)
        self.replace[id(node)] = qdq
        users = self.consumers.get(node.output[0], [])
        if float_zero is None and self.channels.get(layer) == 1 and lx.kind == "conv" and len(users) == 1:
            _as_depthwise(g, lx, qdq, users[0])
        self.hoist(node, lx, params)

    def exact_input(
        self, node: Any, lx: LayerExport, e: Exact, params: tuple[str, str, tuple[str, str] | None]
    ) -> None:
        """An exact layer's input: its integer codes minus the zero point, ``Cast(q) - z``, in float32."""
        g, helper, tag = self.g, self.g.onnx.helper, f"{lx.name}.input"
        scale, zp, _ = params
        assert lx.act_zero is not None
        zf = g.tensor(f"{tag}.zero_float", g.tp.FLOAT, lx.act_zero.reshape(()))
        out = node.output[0]
        centered = f"{tag}.centered" if e.bounds else out
        nodes = [
            helper.make_node("QuantizeLinear", [node.input[0], scale, zp], [f"{tag}.q"], name=f"{tag}_q"),
            helper.make_node("Cast", [f"{tag}.q"], [f"{tag}.qf"], name=f"{tag}_cast", to=g.tp.FLOAT),
            helper.make_node("Sub", [f"{tag}.qf", zf], [centered], name=f"{tag}_sub"),
        ]
        if e.bounds:  # a grid narrower than its ONNX type (e.g. 6 bits in INT8): its ends
            lo = g.tensor(f"{tag}.int_lo", g.tp.FLOAT, torch.tensor(e.bounds[0]))
            hi = g.tensor(f"{tag}.int_hi", g.tp.FLOAT, torch.tensor(e.bounds[1]))
            nodes.append(helper.make_node("Clip", [centered, lo, hi], [out], name=f"{tag}_clip"))
        self.replace[id(node)] = nodes

    def exact_weight(self, node: Any, lx: LayerExport, e: Exact) -> None:
        """An exact layer's weight (its integers, float32) and, after its Conv/MatMul, the scaling:
        ``Cast(acc, int32) -> DequantizeLinear(s_x s_w) (+ bias)``.

        The scaling is a DequantizeLinear of the int32 sums, not a Mul: ONNX Runtime folds a Mul
        by a constant (and an Add) into the conv's weights and bias, which would sum scaled
        products again.
        """
        g, helper, name = self.g, self.g.onnx.helper, lx.name
        linear = lx.kind == "linear"
        assert isinstance(lx.weight, Encoded)
        vals = kind_of(lx.weight.spec).onnx_weight(g, lx.weight)
        if linear or lx.name in self.float_convs or vals is None:
            w = g.tensor(f"{name}.weight", g.tp.FLOAT, e.weight.t() if linear else e.weight, share=False)
            self.replace[id(node)] = [
                helper.make_node("Identity", [w], [node.output[0]], name=f"{name}.weight_int")
            ]
        else:  # the codes as stored (e.g. INT4), dequantized with scale 1: the same integers
            q, zero, dtype = vals
            per_channel = lx.weight.spec.granularity != "tensor"
            shape = (-1,) if per_channel else ()
            codes = g.tensor(f"{name}.weight.codes", dtype, q.t() if linear else q, share=False)
            ones = g.tensor(f"{name}.weight.unit", g.tp.FLOAT, torch.ones(zero.numel()).reshape(shape))
            zp = g.tensor(f"{name}.weight.zero", dtype, zero.reshape(shape))
            axis = 1 if linear else 0
            dq = helper.make_node(
                "DequantizeLinear", [codes, ones, zp], [node.output[0]], name=f"{name}.weight_dq", axis=axis
            )
            self.replace[id(node)] = [dq]
        user = self.consumers[node.output[0]][0]
        y, acc = user.output[0], f"{name}.acc"
        user.output[0] = acc
        bias = None
        if user.op_type == "Conv" and len(user.input) > 2 and user.input[2]:
            del user.input[2]
            assert lx.bias is not None
            shape = (1, -1, *[1] * (e.weight.dim() - 2))
            bias = g.tensor(f"{name}.bias_exact", g.tp.FLOAT, lx.bias.float().reshape(shape))
        s = g.tensor(f"{name}.acc_scale", g.tp.FLOAT, e.scale)
        scaled = f"{name}.acc_scaled" if bias else y
        nodes = [
            helper.make_node("Cast", [acc], [f"{name}.acc_int"], name=f"{name}.acc_cast", to=g.tp.INT32),
            helper.make_node(
                "DequantizeLinear",
                [f"{name}.acc_int", s],
                [scaled],
                name=name + EXACT_SUFFIX,
                axis=-1 if linear else 1,
            ),
        ]
        if bias:
            nodes.append(helper.make_node("Add", [scaled, bias], [y], name=f"{name}.bias_add"))
        self.after[id(user)] = nodes

    def hoist(self, node: Any, lx: LayerExport, params: tuple[str, str, tuple[str, str] | None]) -> None:
        """Repeat an input's quantizer above the HOIST_OPS chain that feeds it (see :func:`rewrite`)."""
        chain = _chain_above(node.input[0], self.producers, self.consumers, self.constants)
        above = self.producers.get(chain[0].input[0]) if chain else None
        if chain and _float_layer(above, self.producers, self.constants, self.float_convs):
            _pool_before_relu(chain, self.moved)  # nothing to fuse above: keep the chain in float
            return
        for i, link in enumerate(chain):
            tag = f"{lx.name}.input_above{i}"
            self.before[id(link)] = self.g.qdq(params, link.input[0], f"{tag}.out", tag)
            link.input[0] = f"{tag}.out"

    def nodes(self, graph: Any) -> list[Any]:
        """The graph's nodes with the edits applied, in order."""
        out = []
        for node in graph.node:
            node = self.moved.get(id(node), node)
            out.extend(self.before.get(id(node), []))
            out.extend(self.replace.get(id(node), [node]))
            out.extend(self.after.get(id(node), []))
        return out


def rewrite(
    model: Any, layers: dict[str, LayerExport], g: Graph, channels: dict[str, int] | None = None
) -> Any:
    """Replace the ``mixq`` markers of a traced graph by QDQ nodes; return the new ModelProto.

    ``g``: the writer's graph builder (:class:`mixq.export.qdq.Graph`), which makes the nodes
    of each weight and input. An input quantizer is also repeated before each node of a chain
    of Relu/MaxPool/Flatten/Reshape/Clip/Min/Max that feeds it (exact, see HOIST_OPS), so that
    ONNX Runtime sees ``Conv -> QuantizeLinear`` and ``DequantizeLinear -> MaxPool ->
    QuantizeLinear`` and runs the producing layer and the chain in integers; above a layer that
    runs in float32 anyway (a float input, a conv of :func:`_float_convs`) nothing is hoisted,
    and a ``Relu -> MaxPool`` there becomes ``MaxPool -> Relu`` (:func:`_pool_before_relu`).
    Another conv with a single input channel becomes a depthwise conv on the repeated channel
    (:func:`_as_depthwise`). A layer that ONNX Runtime runs in float32 (a float32 weight
    initializer, a conv whose output meets no quantizer or a pooled stem: :func:`_float_convs`,
    4-bit or fp8 codes: :func:`_integer_kernel`) gets its input dequantized as
    ``(Cast(q) - zero) * scale`` instead of a DequantizeLinear: after a DequantizeLinear, ONNX
    Runtime's graph optimizations quantize a conv's or Gemm's float weight to int8 per tensor and
    its float bias to int32 themselves, which changes the layer's values. ``channels``: the input
    channels of each layer (see :func:`_float_convs` and :func:`_as_depthwise`; vSPARQ inputs'
    pairs run along them).
    """
    rw = _Rewrite(g, layers, channels or {})
    rw.index(model.graph)
    for node in model.graph.node:
        if node.domain == MARKER_DOMAIN:
            rw.marker(node)
    nodes = _guard_relus(g, rw.nodes(model.graph), {t.name: t.data_type for t in g.inits})
    return g.finish(model, nodes)
