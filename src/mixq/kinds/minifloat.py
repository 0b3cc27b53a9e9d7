"""Minifloats (``Fp``: OFP8 and the OCP MX element types) times a scale per tensor, channel or group.

Codes are the elements' bit patterns (:func:`mixq.quant.packing.encode_fp`). In ONNX, fp8
e4m3fn and e5m2 are FLOAT8E4M3FN/FLOAT8E5M2; fp6 and fp4 have no QDQ form (weights go in as
their float32 values, inputs raise).
"""

from __future__ import annotations

from typing import Any

import torch

from mixq import formats
from mixq.formats import Fp
from mixq.kinds.scaled import ScaledKind
from mixq.plan import QSpec
from mixq.quant.packing import decode_fp, encode_fp


def onnx_fp_type(tp: Any, fmt: Fp) -> int | None:
    """The ONNX element type of an fp format, None where ONNX has none."""
    return {"fp8_e4m3fn": tp.FLOAT8E4M3FN, "fp8_e5m2": tp.FLOAT8E5M2}.get(str(fmt))


class MinifloatKind(ScaledKind):
    """Floating-point elements: ``value(code) * s``."""

    name = "minifloat"
    formats = (Fp,)

    def family(self, fmt: Fp) -> str:  # noqa: ARG002
        return "fp"

    def to_codes(self, x: torch.Tensor, zero: torch.Tensor, spec: QSpec) -> torch.Tensor:  # noqa: ARG002
        assert isinstance(spec.fmt, Fp)
        return encode_fp(formats.round_to_format(x, spec.fmt), spec.fmt)

    def values(self, codes: torch.Tensor, spec: QSpec) -> torch.Tensor:
        assert isinstance(spec.fmt, Fp)
        return decode_fp(codes, spec.fmt)

    def dequantize(
        self, codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, spec: QSpec
    ) -> torch.Tensor:  # noqa: ARG002
        return self.values(codes, spec) * scale

    def onnx_act_type(self, spec: QSpec, tp: Any) -> int | None:
        assert isinstance(spec.fmt, Fp)
        return onnx_fp_type(tp, spec.fmt)


KIND = MinifloatKind()
