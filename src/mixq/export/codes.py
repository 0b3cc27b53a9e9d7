"""Quantized tensors as integer codes plus scales: the exact inverse of mixq's fake quantization.

:func:`encode_weight` splits a layer's weight under a QSpec into element codes (unsigned bit
patterns of the element's width), scales and zero points, and :func:`decode_weight` rebuilds
the float weight with the same float operations, so ``decode(encode(w))`` equals the
fake-quantized weight bit for bit. The spec's format kind (:mod:`mixq.kinds`) does both with
the very functions the fake quantizer uses:

* integer: ``(q - z) * s`` in float32, ``q`` the signed or unsigned integer of the code;
* floating point: ``value(code) * s`` in float32;
* MX: ``value(code) * 2^e`` in float64, cast to float32 (E8M0 scale ``e``, stored ``e + 127``);
* multipoint (``QSpec.points``): ``sum_i step_i * q_i`` over the points of each output channel,
  the very reconstruction of :mod:`mixq.quant.multipoint`.

Activation quantizers keep one scale and zero point per tensor (:func:`act_params`).
"""

from __future__ import annotations

import torch

from mixq.kinds import kind_of
from mixq.kinds.multipoint import point_mask
from mixq.nn import Quantizer
from mixq.plan import QSpec
from mixq.quant.codes import E8M0_BIAS, Encoded, code_to_int, int_to_code

__all__ = [
    "E8M0_BIAS",
    "Encoded",
    "act_export",
    "act_params",
    "code_to_int",
    "decode_weight",
    "encode_weight",
    "int_to_code",
    "int_weight",
    "point_mask",
]


def encode_weight(
    w: torch.Tensor, spec: QSpec, gram: torch.Tensor | None = None, wq: torch.Tensor | None = None
) -> Encoded:
    """Split weight ``w`` [out, ...] under ``spec`` into codes, scales and zero points.

    ``gram`` is the layer's input Gram matrix, needed by clip "omse" only (as in
    ``fake.quantize_weight``). ``wq`` is the fake-quantized weight when it was not rounded to
    nearest (e.g. AdaRound): the codes are then read off it (``wq / s`` is within an ulp of a
    grid value); the scales always come from ``w``.

    Raises:
        ValueError: the spec's format has no packed form.
    """
    return kind_of(spec).encode(w, spec, gram, wq)


def decode_weight(enc: Encoded) -> torch.Tensor:
    """Rebuild the float32 fake-quantized weight from its codes; see the module docstring."""
    return kind_of(enc.spec).decode(enc)


def int_weight(enc: Encoded) -> torch.Tensor:
    """An integer weight's codes minus their zero points, as float64 (exact): ``w = int * scale``."""
    fmt = enc.spec.fmt
    if enc.spec.float_zero:
        raise ValueError(
            f"weight {enc.spec.fmt} with a float zero point (fzero) has no integer form w = int * scale; "
            "its layers run on float weights (valid there: symmetric or +asym integer weights)"
        )
    q = code_to_int(enc.codes, fmt, enc.spec.symmetric).double()  # type: ignore[arg-type]
    if enc.zero is not None:
        q = q - enc.zero.double().reshape(-1, *[1] * (q.dim() - 1))
    return q.reshape(enc.shape)


def act_export(site: Quantizer) -> tuple[torch.Tensor | None, torch.Tensor | None, QSpec | None]:
    """Return the scale, zero point [1] and code spec (None: the spec's own) of an input site.

    These are the values the site itself uses in its forward pass; a format without
    per-tensor parameters (MX) gives (None, None, None).
    """
    spec = site.spec
    if spec is None or not kind_of(spec).act_scales:
        return None, None, None
    p = site.act_params()  # the site's own computation, not a copy of it
    if p.scale is None or p.zero is None:
        raise ValueError(f"input format {spec.fmt} has no per-tensor export form")
    return p.scale.float(), p.zero.float(), p.base


def act_params(site: Quantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the per-tensor scale and zero point [1] of a calibrated activation site.

    These are the values the site itself uses in its forward pass (MX activations have none).
    """
    scale, zero, _ = act_export(site)
    if scale is None or zero is None:
        spec = site.spec
        raise ValueError(
            f"input format {spec.fmt if spec else None} has no per-tensor export form; "
            "exportable inputs: integer, fp and MX formats"
        )
    return scale, zero
