"""Row-scaled grids: the part that integer and minifloat kinds share.

A weight is viewed as rows sharing one scale (per tensor, output channel or group, see
:func:`mixq.quant.fake.to_rows`); an activation has one scale (and zero point) per tensor.
Storage: a float32 scale per tensor or channel, a float16 scale per group, and with an
asymmetric grid a zero point of the element's width per scale (a float zero point, ``+fzero``:
an offset stored like the scale). The element codes (integers
or fp bit patterns) are the subclass's: :meth:`ScaledKind.to_codes`, :meth:`ScaledKind.values`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from mixq.kinds.base import ActParams, ActStats, Kind
from mixq.plan import QSpec
from mixq.quant import fake
from mixq.quant.codes import Encoded
from mixq.quant.packing import pack_bits, unpack_bits


def missing_stats() -> RuntimeError:
    """The error of an activation site asked for parameters before calibration."""
    return RuntimeError(
        "an activation site has no calibration statistics; run "
        "mixq.calibrate(qmodel, batches) before applying activation specs"
    )


def affine_params(spec: QSpec, stats: ActStats) -> ActParams:
    """Per-tensor scale and zero point from the statistics: the range ("minmax") or the sample."""
    if stats.min is None or stats.max is None or stats.sample is None:
        raise missing_stats()
    if spec.clip == "minmax":
        scale, zero = fake.scale_zero(stats.min.reshape(1), stats.max.reshape(1), spec)
    else:
        scale, zero = fake.calibrate_rows(stats.sample.reshape(1, -1), spec)
    return ActParams(scale, zero)


def affine_quantize(x: torch.Tensor, spec: QSpec, params: ActParams) -> torch.Tensor:
    """``x`` fake-quantized per tensor with the parameters' scale and zero point."""
    return fake.quantize_rows(x.reshape(1, -1), params.scale, params.zero, spec).reshape(x.shape)


def affine_mask(x: torch.Tensor, spec: QSpec, params: ActParams) -> torch.Tensor:
    """Where ``x`` is inside the per-tensor grid's range."""
    assert params.scale is not None and params.zero is not None
    rows = x.reshape(1, -1)
    return fake.clip_mask(rows, params.scale[:, None], params.zero[:, None], spec).reshape(x.shape)


def row_params(
    w: torch.Tensor, spec: QSpec, gram: torch.Tensor | None
) -> tuple[fake.Rows, torch.Tensor, torch.Tensor]:
    """Rows, scale and zero point exactly as ``fake.quantize_weight`` computes them."""
    rows = fake.to_rows(w.detach().float(), spec)
    error = fake.output_error(gram, spec, w.shape[0]) if gram is not None else None
    scale, zero = fake.calibrate_rows(rows.data, spec, error)
    return rows, scale, zero


def scale_shape(spec: QSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of a weight's scale under a per-tensor, per-channel or per-group spec."""
    out, k = shape[0], math.prod(shape[1:])
    if spec.granularity == "tensor":
        return (1,)
    if spec.granularity == "channel":
        return (out,)
    assert spec.group_size is not None
    return (out * -(-k // spec.group_size),)


class ScaledKind(Kind):
    """Elements of a scalar format times a scale per tensor, output channel or group."""

    def to_codes(self, x: torch.Tensor, zero: torch.Tensor, spec: QSpec) -> torch.Tensor:
        """The codes of rows ``x`` already divided by their scale."""
        raise NotImplementedError

    def values(self, codes: torch.Tensor, spec: QSpec) -> torch.Tensor:
        """The element values (float32) of codes, before the zero point and the scale."""
        raise NotImplementedError

    # -- cost
    def weight_bits(self, spec: QSpec, info: Any) -> float:
        """Elements, plus a float32 scale per tensor or channel or a float16 one per group,
        plus a zero point of the element's width per scale when asymmetric (a float zero point:
        the scale's bits)."""
        elem = self.elem_bits(spec.fmt)
        if spec.granularity == "tensor":
            scales, scale_bits = 1, 32
        elif spec.granularity == "channel":
            scales, scale_bits = info.out_channels, 32
        else:
            assert spec.group_size is not None
            scales, scale_bits = info.out_channels * math.ceil(info.row_len / spec.group_size), 16
        zero_bits = scale_bits if spec.float_zero else 0 if spec.symmetric else elem
        return float(info.numel * elem + scales * (scale_bits + zero_bits))

    # -- simulation
    def quantize_weight(self, w: torch.Tensor, spec: QSpec, gram: torch.Tensor | None) -> torch.Tensor:
        return fake.quantize_weight(w, spec, gram)

    def weight_mask(self, w: torch.Tensor, spec: QSpec, gram: torch.Tensor | None) -> torch.Tensor:
        rows, scale, zero = row_params(w, spec, gram)
        inside = fake.clip_mask(rows.data, scale[:, None], zero[:, None], spec)
        return fake.from_rows(rows, inside.to(w.dtype)).bool()

    def act_params(self, spec: QSpec, stats: ActStats) -> ActParams:
        return affine_params(spec, stats)

    def quantize_act(
        self, x: torch.Tensor, spec: QSpec, params: ActParams, channel_axis: int
    ) -> torch.Tensor:  # noqa: ARG002
        return affine_quantize(x, spec, params)

    def act_mask(self, x: torch.Tensor, spec: QSpec, params: ActParams) -> torch.Tensor:
        return affine_mask(x, spec, params)

    # -- packed codes
    def row_codes(
        self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QSpec
    ) -> torch.Tensor:
        """The codes of rows ``x`` [R, k] on the grid of ``scale`` and ``zero`` [R]."""
        return self.to_codes(x / scale[:, None], zero, spec)

    def encode(
        self, w: torch.Tensor, spec: QSpec, gram: torch.Tensor | None, wq: torch.Tensor | None
    ) -> Encoded:
        """Scales from ``w``; codes from ``wq`` when given (AdaRound: within an ulp of the grid)."""
        rows, scale, zero = row_params(w, spec, gram)
        src = rows.data if wq is None else fake.to_rows(wq.detach().float(), spec).data
        codes = fake.from_rows(rows, self.row_codes(src, scale, zero, spec))
        return Encoded(spec, tuple(w.shape), codes, scale, None if spec.symmetric else zero)

    def decode(self, enc: Encoded) -> torch.Tensor:
        rows = fake.to_rows(enc.codes, enc.spec)
        s = enc.scale[:, None]
        z = enc.zero[:, None] if enc.zero is not None else torch.zeros_like(s)
        return fake.from_rows(rows, self.dequantize(rows.data, z, s, enc.spec))

    def dequantize(
        self, codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, spec: QSpec
    ) -> torch.Tensor:
        """The float32 values of code rows: ``(value - zero) * scale`` (no zero: ``value * scale``)."""
        return (self.values(codes, spec) - zero) * scale

    def weight_tensors(self, enc: Encoded, prefix: str) -> dict[str, torch.Tensor]:
        spec = enc.spec
        out = {f"{prefix}.codes": pack_bits(enc.codes, spec.bits)}
        out[f"{prefix}.scale"] = (
            enc.scale.to(torch.float16) if spec.granularity == "group" else enc.scale.float()
        )
        if enc.zero is not None and spec.float_zero:  # float offsets, stored as the scales are
            out[f"{prefix}.zero"] = enc.zero.to(out[f"{prefix}.scale"].dtype)
        elif enc.zero is not None:
            out[f"{prefix}.zero"] = pack_bits(enc.zero.to(torch.int64), spec.bits)
        return out

    def read_weight(
        self, spec: QSpec, shape: tuple[int, ...], take: Callable[[str], torch.Tensor], prefix: str
    ) -> Encoded:
        codes = unpack_bits(take(f"{prefix}.codes"), spec.bits, math.prod(shape)).reshape(shape)
        raw = take(f"{prefix}.scale")
        expected = scale_shape(spec, shape)
        if tuple(raw.shape) != expected:
            raise ValueError(f"{prefix}.scale has shape {tuple(raw.shape)}, expected {expected}")
        scale = raw.float()
        zero = None
        if spec.float_zero:
            zero = take(f"{prefix}.zero").float()
            if zero.shape != scale.shape:
                raise ValueError(
                    f"{prefix}.zero has shape {tuple(zero.shape)}, expected {tuple(scale.shape)}"
                )
        elif not spec.symmetric:
            zero = unpack_bits(take(f"{prefix}.zero"), spec.bits, scale.numel()).float()
        return Encoded(spec, tuple(shape), codes, scale, zero)

    # -- ONNX
    def onnx_weight(self, g: Any, enc: Encoded) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """Codes as DequantizeLinear inputs; group scales have no such form (None)."""
        if enc.spec.granularity == "group" or enc.spec.float_zero:  # float offsets: no such form
            return None
        dtype = self.onnx_weight_type(enc.spec, g)
        if dtype is None:
            return None
        zero = enc.zero if enc.zero is not None else torch.zeros_like(enc.scale)
        return self.values(enc.codes, enc.spec), zero, dtype

    def onnx_weight_type(self, spec: QSpec, g: Any) -> int | None:
        """The ONNX element type of the weight codes (None: no DequantizeLinear form)."""
        return self.onnx_act_type(spec, g.tp)
