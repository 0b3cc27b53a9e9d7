"""Deployed layers: a dequantized weight and a fixed-parameter input quantizer.

A :class:`DeployLinear` / :class:`DeployConv2d` computes exactly what the fake-quantized
``QLinear`` / ``QConv2d`` computes (same float operations on the same values), but holds only
what a deployed model holds: the weight rebuilt from its codes and the input quantizer's
frozen scale and zero point. During ``torch.onnx.export`` the weight and the input pass
through marker nodes (domain ``mixq``) that :mod:`mixq.export.qdq` replaces by
QuantizeLinear/DequantizeLinear.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mixq.kinds import ActParams, kind_of
from mixq.nn import LOW_PRECISION
from mixq.plan import QSpec

MARKER_DOMAIN = "mixq"


def marker_layer(node: Any) -> str:
    """The layer a ``mixq`` marker node of a traced ONNX graph names."""
    return next(a.s.decode() for a in node.attribute if a.name == "layer")


class _Marker(torch.autograd.Function):
    """Identity in PyTorch; a ``mixq::<kind>`` node naming its layer in the ONNX graph."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, kind: str, layer: str) -> torch.Tensor:  # noqa: ARG004
        return x.clone()

    @staticmethod
    def symbolic(g: object, x: object, kind: str, layer: str) -> object:
        out = g.op(f"{MARKER_DOMAIN}::{kind}", x, layer_s=layer)  # type: ignore[attr-defined]
        out.setType(x.type())  # type: ignore[attr-defined]
        return out


@torch.library.custom_op("mixq::weight_marker", mutates_args=())
def _weight_marker(x: torch.Tensor, layer: str) -> torch.Tensor:  # noqa: ARG001
    return x.clone()


@torch.library.custom_op("mixq::act_marker", mutates_args=())
def _act_marker(x: torch.Tensor, layer: str) -> torch.Tensor:  # noqa: ARG001
    return x.clone()


@_weight_marker.register_fake
def _(x: torch.Tensor, layer: str) -> torch.Tensor:  # noqa: ARG001
    return torch.empty_like(x)


@_act_marker.register_fake
def _(x: torch.Tensor, layer: str) -> torch.Tensor:  # noqa: ARG001
    return torch.empty_like(x)


_MARKER_OPS = {"Weight": _weight_marker, "Act": _act_marker}


def marker_translations() -> dict[Any, Any]:
    """The dynamo exporter's translation of the marker ops: a ``mixq::<kind>`` node naming its layer."""
    import onnxscript
    from onnx.defs import OpSchema

    opset = onnxscript.values.Opset(MARKER_DOMAIN, 1)

    def marker_op(kind: str) -> Any:
        schema = OpSchema(
            kind,
            MARKER_DOMAIN,
            1,
            inputs=[OpSchema.FormalParameter("x", "T")],
            outputs=[OpSchema.FormalParameter("y", "T")],
            type_constraints=[("T", ["tensor(float)"], "float32 values")],
            attributes=[OpSchema.Attribute("layer", OpSchema.AttrType.STRING, "the layer's name")],
        )
        return onnxscript.values.Op(opset, kind, schema)

    weight_op, act_op = marker_op("Weight"), marker_op("Act")

    def weight(x: Any, layer: str) -> Any:
        return weight_op(x, layer=layer)

    def act(x: Any, layer: str) -> Any:
        return act_op(x, layer=layer)

    return {torch.ops.mixq.weight_marker.default: weight, torch.ops.mixq.act_marker.default: act}


def mark(x: torch.Tensor, kind: str, layer: str) -> torch.Tensor:
    """Return ``x``, marked as the ``kind`` ("Weight" or "Act") of ``layer`` when exporting to ONNX
    (the dynamo exporter: a custom op; the TorchScript exporter: an autograd Function's symbolic)."""
    if _DYNAMO[0]:
        return _MARKER_OPS[kind](x, layer)
    if torch.onnx.is_in_onnx_export():
        return _Marker.apply(x, kind, layer)
    return x


_DYNAMO = [False]  # inside dynamo_onnx_export(): the markers are custom ops


@contextlib.contextmanager
def dynamo_onnx_export() -> Iterator[None]:
    """Within it, the deployed layers trace for the dynamo ONNX exporter (markers as custom ops)."""
    _DYNAMO[0] = True
    try:
        yield
    finally:
        _DYNAMO[0] = False


def onnx_exporting() -> bool:
    """Whether an ONNX export (TorchScript or dynamo, :func:`dynamo_onnx_export`) traces the model."""
    return _DYNAMO[0] or torch.onnx.is_in_onnx_export()


class ActQuant(nn.Module):
    """An input quantizer with frozen parameters: per-tensor scale and zero point, or MX blocks.

    A SPARQ input (``base`` its 8-bit code spec) keeps the windows of its unsigned 8-bit codes,
    or, on a signed site (``base`` asymmetric), is the plain 8-bit code, as the simulation does.
    """

    mixq_quantizer = True  # a frozen quantizer (mixq.wrap.guard_save_pretrained)

    def __init__(
        self,
        spec: QSpec,
        scale: torch.Tensor | None,
        zero: torch.Tensor | None,
        channel_axis: int,
        layer: str,
        base: QSpec | None = None,
    ) -> None:
        super().__init__()
        self.spec, self.channel_axis, self.layer, self.base = spec, channel_axis, layer, base
        kind = kind_of(spec)
        if kind.act_scales != (scale is not None):
            raise ValueError("an activation quantizer has a scale unless its format is MX")
        if kind.act_base != (base is not None):
            raise ValueError("a SPARQ input quantizer needs its 8-bit code spec (base), only it has one")
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if onnx_exporting():
            return mark(x, "Act", self.layer)
        params = ActParams(self.scale, self.zero, self.base)  # as the site computes it (Quantizer.forward)
        if x.dtype in LOW_PRECISION:
            return (
                kind_of(self.spec).quantize_act(x.float(), self.spec, params, self.channel_axis).to(x.dtype)
            )
        return kind_of(self.spec).quantize_act(x, self.spec, params, self.channel_axis)

    def extra_repr(self) -> str:
        return f"spec={self.spec}"


class _DeployLayer(nn.Module):
    """What every deployed layer holds: its dequantized weight and bias (buffers), its frozen
    input quantizer, its name and whether its weight is quantized (marked for ONNX)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        act: ActQuant | None,
        layer: str,
        quantized: bool,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.act, self.layer, self.quantized = act, layer, quantized

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` through the input quantizer (a float input as it is)."""
        return x if self.act is None else self.act(x)

    def marked_weight(self) -> torch.Tensor:
        """The weight, marked as the layer's (quantized) weight when exporting to ONNX."""
        return mark(self.weight, "Weight", self.layer) if self.quantized else self.weight


class DeployLinear(_DeployLayer):
    """``F.linear(act(x), weight, bias)`` with a dequantized weight; MatMul(x, W^T) in ONNX."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantized_input(x)
        if onnx_exporting():
            wt = self.weight.t().contiguous()
            wt = mark(wt, "Weight", self.layer) if self.quantized else wt
            y = torch.matmul(x, wt)
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.weight, self.bias)


class DeployConv2d(_DeployLayer):
    """A Conv2d (grouped and depthwise too) on ``act(x)`` with a dequantized weight."""

    def __init__(
        self,
        conv: nn.Conv2d,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        act: ActQuant | None,
        layer: str,
        quantized: bool,
    ) -> None:
        super().__init__(weight, bias, act, layer, quantized)
        self.stride, self.padding, self.dilation, self.groups = (
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
        )
        self.padding_mode = conv.padding_mode
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantized_input(x)
        w = self.marked_weight()
        if self.padding_mode != "zeros":  # as nn.Conv2d._conv_forward
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class DeployAdd(nn.Module):
    """A residual addition with frozen operand quantizers: ``quant[0](a) + quant[1](b)``.

    The quantizers' layer names are ``{addition}.quant.{i}``, as their markers in the ONNX graph.
    """

    def __init__(self, acts: list[ActQuant]) -> None:
        super().__init__()
        if len(acts) != 2:
            raise ValueError(f"an addition has two operand quantizers, got {len(acts)}")
        self.quant = nn.ModuleList(acts)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.quant[0](a) + self.quant[1](b)


class DeployCall(_DeployLayer):
    """A layer run by its own forward on ``act(x)`` with a dequantized weight, as
    :class:`mixq.nn.QCall` runs it with the fake-quantized one: a subclass of nn.Conv2d or
    nn.Linear with a forward of its own (e.g. "same" padding computed from the input), an
    nn.Conv1d, an nn.Embedding (weight-only: a Gather of the dequantized rows in ONNX).

    The layer is kept as ``module`` (not a submodule: its weight is this module's buffer).
    """

    def __init__(
        self,
        module: nn.Module,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        act: ActQuant | None,
        layer: str,
        quantized: bool,
    ) -> None:
        super().__init__(weight, bias, act, layer, quantized)
        self.groups = getattr(module, "groups", 1)
        object.__setattr__(self, "module", module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(self.quantized_input(x), self.marked_weight(), self.bias)

    def run(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """The layer's own forward on ``x`` with weight ``w`` and bias ``b``."""
        m = self.module  # the tensors are swapped in: functional_call does not trace in the
        saved = dict(m._parameters)  # TorchScript exporter
        m._parameters["weight"] = w
        if "bias" in saved:
            m._parameters["bias"] = b
        try:
            return m(x)
        finally:
            m._parameters.update(saved)
