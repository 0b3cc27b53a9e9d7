"""MX blocks (``Mx``, OCP MX v1.0): ``block`` elements share one E8M0 power-of-two scale.

Weights are blocked along each output channel's flattened input, activations along their
channel axis. Storage: every element, plus 8 bits per block. An MX input has no per-tensor
parameters (nothing to calibrate, no scale to store). The packed file stores each block's
scale as its E8M0 byte ``e + 127``; ONNX has no MX form that ONNX Runtime runs on the CPU, so
a weight goes in as its float32 values and an input raises.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from mixq import formats
from mixq.formats import Int, Mx
from mixq.kinds.base import ActParams, ActStats, Kind, kind_of_format
from mixq.plan import QSpec
from mixq.quant import fake
from mixq.quant.codes import E8M0_BIAS, Encoded, code_to_int, int_to_code
from mixq.quant.packing import decode_fp, encode_fp, pack_bits, unpack_bits


def _blocks(w: torch.Tensor, fmt: Mx) -> torch.Tensor:
    """The weight as [out, blocks, block], zero-padded, float64."""
    flat = w.detach().float().reshape(w.shape[0], -1)
    flat = torch.nn.functional.pad(flat, (0, -flat.shape[1] % fmt.block))
    return flat.reshape(flat.shape[0], -1, fmt.block).double()


class MxKind(Kind):
    """Block floating point: element codes and one shared exponent per block."""

    name = "mx"
    formats = (Mx,)
    blocks = True
    act_scales = False
    add_operand = False

    def family(self, fmt: Mx) -> str:
        """The family of the element type."""
        return kind_of_format(fmt.elem).family(fmt.elem)

    def weight_bits(self, spec: QSpec, info: Any) -> float:
        assert isinstance(spec.fmt, Mx)
        blocks = info.out_channels * math.ceil(info.row_len / spec.fmt.block)
        return float(info.numel * self.elem_bits(spec.fmt) + blocks * 8)

    def act_param_bits(self, spec: QSpec) -> float:  # noqa: ARG002
        return 0.0

    def quantize_weight(self, w: torch.Tensor, spec: QSpec, gram: torch.Tensor | None) -> torch.Tensor:
        return fake.quantize_weight(w, spec, gram)

    def needs_stats(self, spec: QSpec) -> bool:  # noqa: ARG002
        return False

    def act_params(self, spec: QSpec, stats: ActStats) -> ActParams:  # noqa: ARG002
        return ActParams()

    def quantize_act(
        self, x: torch.Tensor, spec: QSpec, params: ActParams, channel_axis: int
    ) -> torch.Tensor:  # noqa: ARG002
        assert isinstance(spec.fmt, Mx)
        return formats.mx_quantize(x, spec.fmt, axis=channel_axis)

    def encode(
        self, w: torch.Tensor, spec: QSpec, gram: torch.Tensor | None, wq: torch.Tensor | None
    ) -> Encoded:  # noqa: ARG002
        """Shared exponents from ``w``, element codes from ``wq`` (exact: ``wq / 2^e`` is on the grid)."""
        fmt = spec.fmt
        assert isinstance(fmt, Mx)
        wq = w if wq is None else wq
        k = w[0].numel()
        se = formats.mx_scales(w.detach().float().reshape(w.shape[0], -1), fmt, axis=-1).to(torch.int64)
        if int(se.max()) > E8M0_BIAS:
            raise ValueError("cannot export an MX block holding NaN or inf")
        y = torch.ldexp(_blocks(wq, fmt), -se[..., None].double()).float()  # exact: a power of two
        if isinstance(fmt.elem, Int):  # MXINT8: k / 64, k in [-128, 127]; -128 saturated at e = 127
            q = formats.round_to_format(y * 64, fmt.elem)
            q = torch.where(se[..., None] == E8M0_BIAS, q.clamp(min=-127), q)
            codes = int_to_code(q, fmt.elem, True)
        else:
            codes = encode_fp(formats.round_to_format(y, fmt.elem), fmt.elem)
        codes = codes.reshape(w.shape[0], -1)[:, :k].reshape(w.shape)
        return Encoded(spec, tuple(w.shape), codes, se, None)

    def decode(self, enc: Encoded) -> torch.Tensor:
        """``value(code) * 2^e`` in float64, cast to float32."""
        fmt = enc.spec.fmt
        assert isinstance(fmt, Mx)
        flat = enc.codes.reshape(enc.shape[0], -1)
        k = flat.shape[1]
        flat = torch.nn.functional.pad(flat, (0, -k % fmt.block)).reshape(enc.shape[0], -1, fmt.block)
        if isinstance(fmt.elem, Int):
            v = code_to_int(flat, fmt.elem, True).double() / 64
        else:
            v = decode_fp(flat, fmt.elem).double()
        out = torch.ldexp(v, enc.scale[..., None].double()).float()
        return out.reshape(enc.shape[0], -1)[:, :k].reshape(enc.shape)

    def weight_tensors(self, enc: Encoded, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.codes": pack_bits(enc.codes, enc.spec.bits),
            f"{prefix}.scale": (enc.scale + E8M0_BIAS).to(torch.uint8),
        }

    def read_weight(
        self, spec: QSpec, shape: tuple[int, ...], take: Callable[[str], torch.Tensor], prefix: str
    ) -> Encoded:
        assert isinstance(spec.fmt, Mx)
        codes = unpack_bits(take(f"{prefix}.codes"), spec.bits, math.prod(shape)).reshape(shape)
        raw = take(f"{prefix}.scale")
        expected = (shape[0], -(-math.prod(shape[1:]) // spec.fmt.block))
        if tuple(raw.shape) != expected:
            raise ValueError(f"{prefix}.scale has shape {tuple(raw.shape)}, expected {expected}")
        return Encoded(spec, tuple(shape), codes, raw.to(torch.int64) - E8M0_BIAS, None)


KIND = MxKind()
