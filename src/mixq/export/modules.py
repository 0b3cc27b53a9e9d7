"""Deployed layers: a dequantized weight and a fixed-parameter input quantizer.

A :class:`DeployLinear` / :class:`DeployConv2d` computes exactly what the fake-quantized
``QLinear`` / ``QConv2d`` computes (same float operations on the same values), but holds only
what a deployed model holds: the weight rebuilt from its codes and the input quantizer's
frozen scale and zero point. During ``torch.onnx.export`` the weight and the input pass
through marker nodes (domain ``mixq``) that :mod:`mixq.export.qdq` replaces by
QuantizeLinear/DequantizeLinear.
"""

from __future__ import annotations

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


def mark(x: torch.Tensor, kind: str, layer: str) -> torch.Tensor:
    """Return ``x``, marked as the ``kind`` ("Weight" or "Act") of ``layer`` when exporting to ONNX."""
    if torch.onnx.is_in_onnx_export():
        return _Marker.apply(x, kind, layer)
    return x


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
        if torch.onnx.is_in_onnx_export():
            return mark(x, "Act", self.layer)
        params = ActParams(self.scale, self.zero, self.base)  # as the site computes it (Quantizer.forward)
        if x.dtype in LOW_PRECISION:
            return (
                kind_of(self.spec).quantize_act(x.float(), self.spec, params, self.channel_axis).to(x.dtype)
            )
        return kind_of(self.spec).quantize_act(x, self.spec, params, self.channel_axis)

    def extra_repr(self) -> str:
        return f"spec={self.spec}"


class DeployLinear(nn.Module):
    """``F.linear(act(x), weight, bias)`` with a dequantized weight; MatMul(x, W^T) in ONNX."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        if torch.onnx.is_in_onnx_export():
            wt = self.weight.t().contiguous()
            wt = mark(wt, "Weight", self.layer) if self.quantized else wt
            y = torch.matmul(x, wt)
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.weight, self.bias)


class DeployConv2d(nn.Module):
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
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = (
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
        )
        self.padding_mode = conv.padding_mode
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.act, self.layer, self.quantized = act, layer, quantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        w = mark(self.weight, "Weight", self.layer) if self.quantized else self.weight
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
