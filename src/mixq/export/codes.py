"""Quantized tensors as integer codes plus scales: the exact inverse of mixq's fake quantization.

:func:`encode_weight` splits a layer's weight under a QSpec into element codes (unsigned bit
patterns of the element's width), scales and zero points, computed by the very functions the
fake quantizer uses (:mod:`mixq.quant.fake`, :mod:`mixq.formats`); :func:`decode_weight`
rebuilds the float weight with the same float operations, so ``decode(encode(w))`` equals the
fake-quantized weight bit for bit:

* integer: ``(q - z) * s`` in float32, ``q`` the signed or unsigned integer of the code;
* floating point: ``value(code) * s`` in float32;
* MX: ``value(code) * 2^e`` in float64, cast to float32 (E8M0 scale ``e``, stored ``e + 127``);
* multipoint (``QSpec.points``): ``sum_i step_i * q_i`` over the points of each output channel,
  the very reconstruction of :mod:`mixq.quant.multipoint`.

Activation quantizers keep one scale and zero point per tensor (:func:`act_params`).
"""

from __future__ import annotations

import torch

from mixq import formats
from mixq.formats import Fp, Int, Mx
from mixq.nn import Quantizer
from mixq.plan import QSpec
from mixq.quant import fake
from mixq.quant.codes import E8M0_BIAS, Encoded, code_to_int, int_to_code
from mixq.quant.packing import decode_fp, encode_fp

def _row_params(
    w: torch.Tensor, spec: QSpec, gram: torch.Tensor | None
) -> tuple[fake.Rows, torch.Tensor, torch.Tensor]:
    """Rows, scale and zero point exactly as ``fake.quantize_weight`` computes them."""
    rows = fake.to_rows(w.detach().float(), spec)
    error = fake.output_error(gram, spec, w.shape[0]) if gram is not None else None
    scale, zero = fake.calibrate_rows(rows.data, spec, error)
    return rows, scale, zero


def _mx_blocks(w: torch.Tensor, fmt: Mx) -> torch.Tensor:
    """The weight as [out, blocks, block], zero-padded, float64."""
    flat = w.detach().float().reshape(w.shape[0], -1)
    flat = torch.nn.functional.pad(flat, (0, -flat.shape[1] % fmt.block))
    return flat.reshape(flat.shape[0], -1, fmt.block).double()


def _encode_mx(w: torch.Tensor, spec: QSpec, wq: torch.Tensor) -> Encoded:
    """Shared exponents from ``w``, element codes from ``wq`` (exact: ``wq / 2^e`` is on the grid)."""
    fmt = spec.fmt
    assert isinstance(fmt, Mx)
    k = w[0].numel()
    se = formats.mx_scales(w.detach().float().reshape(w.shape[0], -1), fmt, axis=-1).to(torch.int64)
    if int(se.max()) > E8M0_BIAS:
        raise ValueError("cannot export an MX block holding NaN or inf")
    y = torch.ldexp(_mx_blocks(wq, fmt), -se[..., None].double()).float()  # exact: a power of two
    if isinstance(fmt.elem, Int):  # MXINT8: k / 64, k in [-128, 127]; -128 saturated at e = 127
        q = formats.round_to_format(y * 64, fmt.elem)
        q = torch.where(se[..., None] == E8M0_BIAS, q.clamp(min=-127), q)
        codes = int_to_code(q, fmt.elem, True)
    else:
        codes = encode_fp(formats.round_to_format(y, fmt.elem), fmt.elem)
    codes = codes.reshape(w.shape[0], -1)[:, :k].reshape(w.shape)
    return Encoded(spec, tuple(w.shape), codes, se, None)


def encode_weight(
    w: torch.Tensor, spec: QSpec, gram: torch.Tensor | None = None, wq: torch.Tensor | None = None
) -> Encoded:
    """Split weight ``w`` [out, ...] under ``spec`` into codes, scales and zero points.

    ``gram`` is the layer's input Gram matrix, needed by clip "omse" only (as in
    ``fake.quantize_weight``). ``wq`` is the fake-quantized weight when it was not rounded to
    nearest (e.g. AdaRound): the codes are then read off it (``wq / s`` is within an ulp of a
    grid value); the scales always come from ``w``.

    Raises:
        ValueError: the spec has no packed form (multipoint weights).
    """
    fmt = spec.fmt
    if spec.points is not None:
        return _encode_multipoint(w, spec)
    if not isinstance(fmt, Int | Fp | Mx):
        raise ValueError(f"weight format {fmt} has no packed export form")
    if isinstance(fmt, Mx):
        return _encode_mx(w, spec, w if wq is None else wq)
    rows, scale, zero = _row_params(w, spec, gram)
    src = rows.data if wq is None else fake.to_rows(wq.detach().float(), spec).data
    x = src / scale[:, None]
    if isinstance(fmt, Int):
        qmin, qmax = fake.int_grid(fmt, spec.symmetric)
        q = torch.clamp(torch.round(x) + zero[:, None], qmin, qmax)
        codes = int_to_code(q, fmt, spec.symmetric)
    else:
        assert isinstance(fmt, Fp)
        codes = encode_fp(formats.round_to_format(x, fmt), fmt)
    codes = fake.from_rows(rows, codes)
    return Encoded(spec, tuple(w.shape), codes, scale, None if spec.symmetric else zero)


def _encode_multipoint(w: torch.Tensor, spec: QSpec) -> Encoded:
    """The points of ``w`` under a multipoint spec, found by the simulation's own search."""
    from mixq.quant import multipoint

    if w.dtype != torch.float32:
        raise ValueError(f"multipoint export needs a float32 weight, got {w.dtype}")
    pts = multipoint.spec_points(w, spec)
    codes = int_to_code(pts.codes.to(torch.int64), Int(spec.bits), True)
    return Encoded(spec, tuple(w.shape), codes, pts.steps.float(), None)


def point_mask(spec: QSpec) -> torch.Tensor:
    """Which of the [C, n] point slots of a multipoint spec exist (``i < points[j]``)."""
    assert spec.points is not None
    counts = torch.tensor(spec.points)
    return torch.arange(int(counts.max()))[None, :] < counts[:, None]


def decode_weight(enc: Encoded) -> torch.Tensor:
    """Rebuild the float32 fake-quantized weight from its codes; see the module docstring."""
    spec, fmt = enc.spec, enc.spec.fmt
    if spec.points is not None:  # as multipoint.Points.reconstruct
        q = code_to_int(enc.codes, Int(spec.bits), True)
        return (enc.scale[..., None] * q).sum(1).reshape(enc.shape)
    if isinstance(fmt, Mx):
        flat = enc.codes.reshape(enc.shape[0], -1)
        k = flat.shape[1]
        flat = torch.nn.functional.pad(flat, (0, -k % fmt.block)).reshape(enc.shape[0], -1, fmt.block)
        if isinstance(fmt.elem, Int):
            v = code_to_int(flat, fmt.elem, True).double() / 64
        else:
            v = decode_fp(flat, fmt.elem).double()
        out = torch.ldexp(v, enc.scale[..., None].double()).float()
        return out.reshape(enc.shape[0], -1)[:, :k].reshape(enc.shape)
    rows = fake.to_rows(enc.codes, spec)
    s = enc.scale[:, None]
    if isinstance(fmt, Int):
        z = enc.zero[:, None] if enc.zero is not None else torch.zeros_like(s)
        deq = (code_to_int(rows.data, fmt, spec.symmetric) - z) * s
    else:
        assert isinstance(fmt, Fp)
        deq = decode_fp(rows.data, fmt) * s
    return fake.from_rows(rows, deq)


def act_params(site: Quantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the per-tensor scale and zero point [1] of a calibrated activation site.

    These are the values the site itself uses in its forward pass (MX activations have none).
    """
    spec = site.spec
    if spec is None or not isinstance(spec.fmt, Int | Fp):
        raise ValueError(
            f"input format {spec.fmt if spec else None} has no per-tensor export form; "
            "exportable inputs: integer, fp and MX formats"
        )
    scale, zero = site._act_params(spec)  # the site's own computation, not a copy of it
    return scale.float(), zero.float()
