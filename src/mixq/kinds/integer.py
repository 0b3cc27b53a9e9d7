"""Integer grids (``Int``): per tensor, output channel or group; symmetric or with a zero point.

Codes are the integers' bit patterns (two's complement for a signed symmetric grid, else the
unsigned integer). In ONNX a weight or an input of up to 4 bits is INT4/UINT4, of 5 to 8 bits
INT8/UINT8 (``int4_as_int8``: weights of 2 to 4 bits as INT8/UINT8 too); an input whose width
is neither 4 nor 8 adds a Clip to its grid's ends.
"""

from __future__ import annotations

from typing import Any

import torch

from mixq.formats import Int
from mixq.kinds.scaled import ScaledKind
from mixq.plan import QSpec
from mixq.quant import fake
from mixq.quant.codes import code_to_int, int_to_code


def onnx_int_type(tp: Any, bits: int, signed: bool) -> int:
    """The ONNX element type that holds ``bits``-bit integer codes."""
    if bits <= 4:
        return tp.INT4 if signed else tp.UINT4
    return tp.INT8 if signed else tp.UINT8


class IntegerKind(ScaledKind):
    """Integer elements: ``(q - z) * s``, or ``q * s + m`` with a float zero point (``+fzero``)."""

    name = "integer"
    formats = (Int,)
    zero_points = True

    def family(self, fmt: Int) -> str:  # noqa: ARG002
        return "int"

    def to_codes(self, x: torch.Tensor, zero: torch.Tensor, spec: QSpec) -> torch.Tensor:
        assert isinstance(spec.fmt, Int)
        qmin, qmax = fake.int_grid(spec.fmt, spec.symmetric)
        q = torch.clamp(torch.round(x) + zero[:, None], qmin, qmax)
        return int_to_code(q, spec.fmt, spec.symmetric)

    def row_codes(
        self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QSpec
    ) -> torch.Tensor:
        if not spec.float_zero:
            return super().row_codes(x, scale, zero, spec)
        assert isinstance(spec.fmt, Int)  # the codes of fake.quantize_rows: round((x - m) / s)
        q = torch.clamp(torch.round((x - zero[:, None]) / scale[:, None]), 0, 2**spec.fmt.bits - 1)
        return int_to_code(q, spec.fmt, False)

    def dequantize(
        self, codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, spec: QSpec
    ) -> torch.Tensor:
        if spec.float_zero:  # s q + m
            return self.values(codes, spec) * scale + zero
        return super().dequantize(codes, zero, scale, spec)

    def values(self, codes: torch.Tensor, spec: QSpec) -> torch.Tensor:
        assert isinstance(spec.fmt, Int)
        return code_to_int(codes, spec.fmt, spec.symmetric)

    def onnx_weight_type(self, spec: QSpec, g: Any) -> int:
        assert isinstance(spec.fmt, Int)
        bits = max(spec.fmt.bits, 8) if g.int4_as_int8 else spec.fmt.bits
        return onnx_int_type(g.tp, bits, spec.symmetric and spec.fmt.signed)

    def onnx_act_type(self, spec: QSpec, tp: Any) -> int:
        assert isinstance(spec.fmt, Int)
        return onnx_int_type(tp, spec.fmt.bits, spec.symmetric and spec.fmt.signed)

    def onnx_act_bounds(
        self, spec: QSpec, scale: torch.Tensor, zero: torch.Tensor
    ) -> tuple[float, float] | None:
        """The grid's ends, dequantized as the fake quantizer does, for widths other than 4 and 8."""
        assert isinstance(spec.fmt, Int)
        if spec.fmt.bits in (4, 8):
            return None
        ends = torch.tensor(fake.int_grid(spec.fmt, spec.symmetric), dtype=torch.float32)
        lo, hi = ((ends - zero) * scale).tolist()
        return lo, hi


KIND = IntegerKind()
