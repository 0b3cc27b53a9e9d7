"""ONNX export with QuantizeLinear/DequantizeLinear (QDQ) nodes for weights and activations.

This module is the generic QDQ writer: the graph builder (initializers, a weight's and an
input's nodes from its format kind, ``QuantizeLinear -> DequantizeLinear``), the trace of the
deployed model through ``torch.onnx.export`` and :func:`save_onnx`. Where the nodes go and in
which form, as far as only ONNX Runtime's fusions and kernels decide it (float32 convs, hoisted
quantizers, depthwise stems, guarded Relus), is :mod:`mixq.export.ort`'s graph surgery.

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

import copy
import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mixq.export import ort
from mixq.export.codes import Encoded
from mixq.export.deploy import LayerExport, collect_adds, deploy_model
from mixq.export.modules import MARKER_DOMAIN, dynamo_onnx_export, marker_translations
from mixq.kinds import kind_of
from mixq.plan import QSpec
from mixq.tasks import output_tensor

log = logging.getLogger(__name__)

OPSET = 21
EXPORTERS = ("dynamo", "torchscript")  # torch.onnx.export(dynamo=True), and the legacy one
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
    np_dtype = {
        tp.INT8: np.int8,
        tp.UINT8: np.uint8,
        tp.INT32: np.int32,
        tp.INT64: np.int64,
        tp.FLOAT: np.float32,
    }[dtype]
    return onnx.numpy_helper.from_array(v.numpy().astype(np_dtype), name)


class Graph:
    """The graph builder: the initializers and nodes of the weights and inputs that replace the markers.

    The format kinds write their nodes through it (see :mod:`mixq.kinds`), and
    :func:`mixq.export.ort.rewrite` places them into the traced graph.
    """

    def __init__(self, int4_as_int8: bool = False) -> None:
        self.onnx = _onnx()
        self.tp = self.onnx.TensorProto
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

    def weight(self, lx: LayerExport, out: str, as_float: bool = False) -> list[Any]:
        """The nodes that produce a layer's weight, from its format kind; ``as_float``: its float32 values."""
        enc = lx.weight
        assert isinstance(enc, Encoded)
        return kind_of(enc.spec).weight_nodes(self, lx, out, as_float)

    def own_act_nodes(self, lx: LayerExport, marker: Any, channels: int) -> list[Any] | None:
        """The nodes an input's format kind writes itself, or None for QuantizeLinear/DequantizeLinear."""
        if lx.act is None:
            return None
        return kind_of(lx.act).act_nodes(self, lx, marker.input[0], marker.output[0], channels)

    def act_quantizer(self, lx: LayerExport) -> tuple[str, str, tuple[str, str] | None]:
        """Add the scale and zero point (and Clip bounds) of a layer's input; return their names."""
        tp = self.tp
        spec = lx.act_base or lx.act  # a signed SPARQ site: its plain 8-bit asymmetric code
        assert spec is not None
        kind = kind_of(spec)
        dtype = kind.onnx_act_type(spec, tp)
        if dtype is None:
            raise ValueError(
                f"layer {lx.name}: input format {spec.fmt} has no ONNX QDQ form; supported "
                f"input formats: {SUPPORTED_ACTS}"
            )
        assert lx.act_scale is not None and lx.act_zero is not None
        p = f"{lx.name}.input"
        scale = self.tensor(f"{p}.scale", tp.FLOAT, lx.act_scale.reshape(()))
        zp = self.tensor(f"{p}.zero", dtype, lx.act_zero.reshape(()))
        bounds = None
        ends = kind.onnx_act_bounds(spec, lx.act_scale, lx.act_zero)  # e.g. an integer grid's (Clip)
        if ends is not None:
            lo, hi = ends
            bounds = (
                self.tensor(f"{p}.lo", tp.FLOAT, torch.tensor(lo)),
                self.tensor(f"{p}.hi", tp.FLOAT, torch.tensor(hi)),
            )
        return scale, zp, bounds

    def qdq(
        self,
        params: tuple[str, str, tuple[str, str] | None],
        x: str,
        out: str,
        tag: str,
        float_zero: str | None = None,
    ) -> list[Any]:
        """QuantizeLinear -> DequantizeLinear (-> Clip) from ``x`` to ``out``.

        ``params``: from :meth:`act_quantizer`. With ``float_zero`` (the zero point as a float
        initializer) the dequantization is written ``(Cast(q) - zero) * scale``: the same
        values, which ONNX Runtime does not fuse (see :func:`mixq.export.ort.rewrite`).
        """
        helper = self.onnx.helper
        scale, zp, bounds = params
        dq_out = f"{tag}.dq" if bounds else out
        q = f"{tag}.q"
        nodes = [helper.make_node("QuantizeLinear", [x, scale, zp], [q], name=f"{tag}_q")]
        if float_zero is None:
            nodes.append(helper.make_node("DequantizeLinear", [q, scale, zp], [dq_out], name=f"{tag}_dq"))
        else:
            nodes += [
                helper.make_node("Cast", [q], [f"{tag}.qf"], name=f"{tag}_cast", to=self.tp.FLOAT),
                helper.make_node("Sub", [f"{tag}.qf", float_zero], [f"{tag}.centered"], name=f"{tag}_sub"),
                helper.make_node("Mul", [f"{tag}.centered", scale], [dq_out], name=f"{tag}_dq"),
            ]
        if bounds:
            nodes.append(helper.make_node("Clip", [dq_out, *bounds], [out], name=f"{tag}_clip"))
        return nodes

    def finish(self, model: Any, nodes: list[Any]) -> Any:
        """Put ``nodes`` and the new initializers into ``model`` (in place), drop the unused
        initializers and the marker domain, raise the opset to OPSET; return ``model``."""
        graph = model.graph
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(self.inits)
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
        if self.float_weights:
            n, first = len(self.float_weights), self.float_weights[:5]
            log.info("float32 weights (no QDQ form) for %d layers: %s", n, first)
        return model


# -- tracing ------------------------------------------------------------------------------------


class _Forward(nn.Module):
    """Runs ``task.forward`` on a batch rebuilt from positional tensors (the ONNX inputs)."""

    def __init__(self, model: nn.Module, forward: Any, keys: list[str] | None) -> None:
        super().__init__()
        self.model, self.fn, self.keys = model, forward, keys

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        batch: Any = dict(zip(self.keys, xs, strict=True)) if self.keys is not None else (xs[0],)
        return output_tensor(self.fn(self.model, batch))  # a ModelOutput's logits (or first tensor)


def model_inputs(batch: Any) -> tuple[list[str], list[torch.Tensor], list[str] | None]:
    """ONNX input names and example tensors of a batch: a tensor, (inputs, labels) or a dict.

    A dict's tensors named ``target``, ``label`` or ``labels`` are labels, not inputs.
    """
    if isinstance(batch, Mapping):
        keys = [
            k
            for k, v in batch.items()
            if isinstance(v, torch.Tensor) and k not in ("target", "label", "labels")
        ]
        return keys, [batch[k] for k in keys], keys
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return ["input"], [x], None


def _not_fp32(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.dtype != torch.float32


def export_deployed(
    model: nn.Module,
    layers: dict[str, LayerExport],
    task: Any,
    path: str | Path,
    batch_size: int = 2,
    int4_as_int8: bool = False,
    exporter: str = "dynamo",
) -> Path:
    """Trace a deployed model on a slice of the task's first calibration batch and write ONNX.

    ``exporter``: "dynamo" (``torch.onnx.export(..., dynamo=True)`` on torch.export, the
    maintained exporter) or "torchscript" (the legacy exporter PyTorch deprecates, a fallback).
    """
    onnx = _onnx()
    names, xs, keys = model_inputs(task.calib[0])
    xs = [x[:batch_size] for x in xs]
    if any(_not_fp32(t) for t in (*model.parameters(), *model.buffers(), *xs)):
        # QDQ nodes take float32 scales: a bfloat16, float16 or float64 model is exported as a
        # float32 graph (the same codes and scales; the float layers run in float32)
        model = copy.deepcopy(model).float()
        xs = [x.float() if _not_fp32(x) else x for x in xs]
    dynamic = {
        n: ({0: "batch", 1: "seq"} if not x.is_floating_point() and x.dim() > 1 else {0: "batch"})
        for n, x in zip(names, xs, strict=True)
    }
    dynamic["output"] = {0: "batch"}
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown ONNX exporter {exporter!r}; valid: {', '.join(EXPORTERS)}")
    fwd = _Forward(model.eval(), task.forward, keys).eval()
    if exporter == "dynamo":
        traced = _trace_dynamo(fwd, xs, names, dynamic)
    else:
        traced = _trace_torchscript(fwd, xs, names, dynamic)
    channels = {
        n: int(m.weight.shape[1]) * getattr(m, "groups", 1)
        for n, m in model.named_modules()
        if n in layers and layers[n].kind != "add"
    }
    del traced.graph.value_info[:]  # the tracer's intermediate shapes: stale after the rewrite
    proto = ort.rewrite(traced, layers, Graph(int4_as_int8), channels)
    onnx.checker.check_model(proto)
    path = Path(path)
    onnx.save(proto, str(path))
    return path


def _trace_torchscript(fwd: nn.Module, xs: list[torch.Tensor], names: list[str], dynamic: dict) -> Any:
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            fwd,
            tuple(xs),
            buf,
            input_names=names,
            output_names=["output"],
            dynamic_axes=dynamic,
            opset_version=OPSET - 1,
            dynamo=False,
            custom_opsets={MARKER_DOMAIN: 1},
        )
    return _onnx().load_from_string(buf.getvalue())


def _trace_dynamo(fwd: nn.Module, xs: list[torch.Tensor], names: list[str], dynamic: dict) -> Any:
    shapes = tuple({a: torch.export.Dim.AUTO for a in dynamic[n]} for n in names)
    with torch.no_grad(), dynamo_onnx_export():
        program = torch.onnx.export(
            fwd,
            tuple(xs),
            input_names=names,
            output_names=["output"],
            dynamic_shapes=(shapes,),  # _Forward(*xs): one varargs argument
            opset_version=OPSET,
            dynamo=True,
            custom_translation_table=marker_translations(),
            verbose=False,
        )
    return program.model_proto


def save_onnx(
    qmodel: nn.Module, task: Any, path: str | Path, int4_as_int8: bool = False, exporter: str = "dynamo"
) -> Path:
    """Export a wrapped model with its plan applied as an ONNX QDQ model (see mixq.export.save)."""
    model, layers = deploy_model(qmodel)
    layers = layers | collect_adds(model)  # the residual additions' operands, by marker name
    for lx in layers.values():  # fail before tracing on an input format ONNX cannot express
        if lx.act is not None and not _act_expressible(lx.act):
            raise ValueError(
                f"layer {lx.name}: input format {lx.act.fmt} has no ONNX QDQ form; "
                f"supported input formats: {SUPPORTED_ACTS}"
            )
    return export_deployed(model, layers, task, path, int4_as_int8=int4_as_int8, exporter=exporter)


def _act_expressible(spec: QSpec) -> bool:
    return kind_of(spec).onnx_act_type(spec, _onnx().TensorProto) is not None
