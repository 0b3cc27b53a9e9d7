"""Fake quantization: scales, zero points, range search and rounding, as pure functions.

Every quantized tensor is handled as a 2-D matrix of rows that share one scale: a row per
tensor, per output channel or per group (see :func:`to_rows`). Integer grids follow the usual
affine scheme (docs/methods.md §6.1):

* symmetric signed:   s = max|x| / (2^(b-1) - 1),  q = clamp(round(x/s), -2^(b-1), 2^(b-1) - 1)
* symmetric unsigned: s = max(x) / (2^b - 1),      q = clamp(round(x/s), 0, 2^b - 1)
* asymmetric:         s = (hi - lo) / (2^b - 1),   z = clamp(round(-lo/s), 0, 2^b - 1),
                      q = clamp(round(x/s) + z, 0, 2^b - 1),  x^ = s (q - z)

with [lo, hi] widened to contain 0. A float zero point (``+fzero``, the GGUF Q4_1 grid) keeps the
range as it is and stores its low end as a float offset m (float16 per group, like the scale):

* float zero point:   s = (hi - lo) / (2^b - 1),   m = lo,
                      q = clamp(round((x - m) / s), 0, 2^b - 1),  x^ = s q + m

Floating-point element formats use s = max|x| / max_fmt and
round ``x/s`` to the format (ties to even, saturating). Rounding is half-to-even everywhere.
Group scales are stored as float16 (as deployed), channel and tensor scales as float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mixq import formats
from mixq.cache import Cache, current
from mixq.formats import Fp, Int, Mx
from mixq.plan import QSpec

MSE_STEPS = 100  # candidate clipping ranges: hi * (1 - i / MSE_STEPS), i = 0 .. 0.8 * MSE_STEPS
MSE_MIN_RATIO = 0.2
REFINE_ROUNDS, REFINE_STEPS = 2, 60  # asymmetric ranges: per-end factors 0.71 .. 1.30


@dataclass(frozen=True)
class Rows:
    """A tensor viewed as rows sharing one scale each, with what is needed to undo the view."""

    data: torch.Tensor  # [rows, k]
    shape: torch.Size
    pad: int  # zeros appended to each output channel's flattened input for groups


def to_rows(w: torch.Tensor, spec: QSpec) -> Rows:
    """View a weight ``w`` [out, ...] as rows sharing a scale: 1, ``out``, or ``out * groups``."""
    if spec.granularity == "tensor":
        return Rows(w.reshape(1, -1), w.shape, 0)
    flat = w.reshape(w.shape[0], -1)
    if spec.granularity in ("channel", "block"):
        return Rows(flat, w.shape, 0)
    g = spec.group_size
    assert g is not None
    k = flat.shape[1]
    pad = (-k) % g
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return Rows(flat.reshape(-1, g), w.shape, pad)


def from_rows(rows: Rows, data: torch.Tensor) -> torch.Tensor:
    """Undo :func:`to_rows` on ``data`` (same layout as ``rows.data``)."""
    if rows.pad:
        data = data.reshape(rows.shape[0], -1)[:, : -rows.pad]
    return data.reshape(rows.shape)


def int_grid(fmt: Int, symmetric: bool) -> tuple[int, int]:
    """Return (qmin, qmax) of the integer codes: signed symmetric, unsigned, or asymmetric."""
    if not symmetric:
        return 0, 2**fmt.bits - 1
    return int(formats.min_value(fmt)), int(formats.max_value(fmt))


def scale_zero(lo: torch.Tensor, hi: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute the scale and zero point (float tensors, one per row) of the range [lo, hi]."""
    fmt = spec.fmt
    if spec.float_zero:
        return _float_zero_scale(lo, hi, spec)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if isinstance(fmt, Int) and not spec.symmetric:
        qmax = 2**fmt.bits - 1
        scale = (hi - lo) / qmax
    else:
        amax = torch.maximum(-lo, hi)
        if isinstance(fmt, Int) and not fmt.signed:
            amax = hi
        scale = amax / formats.max_value(fmt)
    if spec.granularity == "group":
        scale = scale.to(torch.float16).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if isinstance(fmt, Int) and not spec.symmetric:
        zero = torch.clamp(torch.round(-lo / scale), 0, 2**fmt.bits - 1)
    else:
        zero = torch.zeros_like(scale)
    return scale, zero


def _float_zero_scale(lo: torch.Tensor, hi: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and float offset of the range [lo, hi] (not widened to contain 0)."""
    assert isinstance(spec.fmt, Int)
    scale = (hi - lo) / (2**spec.fmt.bits - 1)
    offset = lo.clone()
    if spec.granularity == "group":
        scale = scale.to(torch.float16).to(torch.float32)
        offset = offset.to(torch.float16).to(torch.float32)
    return torch.where(scale > 0, scale, torch.ones_like(scale)), offset


def quantize_rows(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """Fake-quantize rows ``x`` [R, k] with per-row ``scale`` and ``zero`` [R] (no gradient)."""
    s, z = scale[:, None], zero[:, None]
    fmt = spec.fmt
    if spec.float_zero:  # z is the float offset m
        q = torch.clamp(torch.round((x - z) / s), 0, 2**spec.bits - 1)
        return q * s + z
    if isinstance(fmt, Int):
        qmin, qmax = int_grid(fmt, spec.symmetric)
        q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
        return (q - z) * s
    assert isinstance(fmt, Fp)
    return formats.round_to_format(x / s, fmt) * s


def row_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the per-row min and max of ``x`` [R, k]."""
    return x.amin(dim=1), x.amax(dim=1)


def search_range(
    x: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    spec: QSpec,
    error: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Search the clipping range [lo, hi] of each row that minimizes the quantization error.

    First a joint shrink ``f * [lo, hi]`` for f = 1, 0.99, ..., 0.2 (the linear search of BRECQ
    and LAPQ, docs/methods.md §6.2); then, for asymmetric ranges, coordinate descent on each end
    alone (factors 0.71 .. 1.30 of the current end, two rounds), since the best range of a
    skewed row is rarely a scaled copy of its min/max. All rows are searched at once. The error
    of a row is ``error(Q(x) - x)`` (default: its squared error).
    """
    error = error or (lambda d: d.pow(2).sum(dim=1))

    def evaluate(lo_: torch.Tensor, hi_: torch.Tensor) -> torch.Tensor:
        s, z = scale_zero(lo_, hi_, spec)
        return error(quantize_rows(x, s, z, spec) - x)

    best_err = torch.full_like(lo, math.inf)
    best_lo, best_hi = lo.clone(), hi.clone()

    def consider(lo_: torch.Tensor, hi_: torch.Tensor) -> None:
        nonlocal best_err, best_lo, best_hi
        err = evaluate(lo_, hi_)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo_, best_lo)
        best_hi = torch.where(better, hi_, best_hi)

    for i in range(int(MSE_STEPS * (1 - MSE_MIN_RATIO)) + 1):
        f = 1.0 - i / MSE_STEPS
        consider(lo * f, hi * f)
    if not spec.symmetric:
        for _ in range(REFINE_ROUNDS):
            for end in ("lo", "hi"):
                base_lo, base_hi = best_lo.clone(), best_hi.clone()
                for i in range(1, REFINE_STEPS + 1):
                    f = 0.7 + i / MSE_STEPS
                    consider(base_lo * f, base_hi) if end == "lo" else consider(base_lo, base_hi * f)
    return best_lo, best_hi


def percentile_range(x: torch.Tensor, pct: float, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip each row at the ``pct``-th percentile (of x for asymmetric ranges, of |x| otherwise)."""
    k = x.shape[1]
    hi_rank = max(1, min(k, math.ceil(pct / 100.0 * k)))
    if spec.symmetric:
        amax = x.abs().kthvalue(hi_rank, dim=1).values
        return -amax, amax
    lo_rank = max(1, min(k, k + 1 - hi_rank))
    return x.kthvalue(lo_rank, dim=1).values, x.kthvalue(hi_rank, dim=1).values


def output_error(
    gram: torch.Tensor, spec: QSpec, out_channels: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return the error of weight-error rows measured on the layer's output.

    For a layer y = W x with calibration inputs X, the output error of output channel c is
    ``||X d_c||^2 = d_c^T H d_c`` with ``H = X^T X`` (``gram`` [G, k, k], one per conv group).
    Per-group rows use H's diagonal blocks (cross-group terms are left out).
    """
    groups, k = gram.shape[0], gram.shape[1]
    per = out_channels // groups

    def channel_error(d: torch.Tensor) -> torch.Tensor:  # d [out, k] -> [out]
        dg = d.reshape(groups, per, k)
        return (torch.bmm(dg, gram) * dg).sum(-1).reshape(out_channels)

    if spec.granularity == "tensor":
        return lambda d: channel_error(d.reshape(out_channels, k)).sum().reshape(1)
    if spec.granularity == "channel":
        return channel_error
    g = spec.group_size
    assert g is not None
    n_groups = -(-k // g)
    pad = n_groups * g - k
    blocks = torch.nn.functional.pad(gram, (0, pad, 0, pad))
    blocks = blocks.reshape(groups, n_groups, g, n_groups, g).diagonal(dim1=1, dim2=3)
    blocks = blocks.permute(0, 3, 1, 2)  # [G, n_groups, g, g]

    def group_error(d: torch.Tensor) -> torch.Tensor:  # d [out * n_groups, g]
        dg = d.reshape(groups, per, n_groups, g)
        return torch.einsum("aoni,anij,aonj->aon", dg, blocks, dg).reshape(-1)

    return group_error


def calibrate_rows(
    x: torch.Tensor, spec: QSpec, error: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the scale and zero point of each row of ``x`` [R, k] by ``spec.clip``."""
    if spec.clip == "percentile":
        lo, hi = percentile_range(x, spec.percentile, spec)
    else:
        lo, hi = row_range(x)
        if spec.clip in ("mse", "omse"):
            if spec.clip == "omse" and error is None:
                raise RuntimeError(
                    "clip 'omse' needs the layer's calibration inputs; run "
                    "mixq.calibrate(qmodel, batches, gram=True) first"
                )
            lo, hi = search_range(x, lo, hi, spec, error if spec.clip == "omse" else None)
    return scale_zero(lo, hi, spec)


def quantize_weight(
    w: torch.Tensor, spec: QSpec, gram: torch.Tensor | None = None, cache: Cache | None = None
) -> torch.Tensor:
    """Return the fake-quantized weight [out, ...] under ``spec`` (no gradient).

    ``gram`` (the layer's input Gram matrix [G, k, k]) is needed by clip "omse" only. The
    ranges found by a search (clip "mse", "omse") are kept in ``cache`` (by default the cache
    of the run in progress, :func:`mixq.cache.current`), keyed by the contents of the weight,
    the Gram matrix and the spec, so the same search is not run twice (a budget sweep that
    shares a cache re-quantizes the same layers on fresh copies of the model).

    >>> from mixq.plan import parse_candidate
    >>> w = torch.tensor([[0.5, -1.0, 0.25, 1.0]])
    >>> quantize_weight(w, parse_candidate("w2").weight).tolist()  # 0.5 ties to even: 0
    [[0.0, -1.0, 0.0, 1.0]]
    """
    with torch.no_grad():
        if isinstance(spec.fmt, Mx):
            return formats.mx_quantize(w.reshape(w.shape[0], -1), spec.fmt, axis=-1).reshape(w.shape)
        rows = to_rows(w.detach().float(), spec)

        def search() -> tuple[torch.Tensor, torch.Tensor]:
            error = output_error(gram, spec, w.shape[0]) if gram is not None else None
            return calibrate_rows(rows.data, spec, error)

        cache = cache if cache is not None else current()
        if cache is not None and spec.clip in ("mse", "omse"):
            scale, zero = cache.searched(rows.data, gram if spec.clip == "omse" else None, spec, search)
        else:
            scale, zero = search()
        return from_rows(rows, quantize_rows(rows.data, scale, zero, spec)).to(w.dtype)


def clip_mask(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """Return where ``x`` lies inside the representable range (the straight-through region)."""
    fmt = spec.fmt
    if spec.float_zero:
        lo, hi = zero, (2**spec.bits - 1) * scale + zero
    elif isinstance(fmt, Int):
        qmin, qmax = int_grid(fmt, spec.symmetric)
        lo, hi = (qmin - zero) * scale, (qmax - zero) * scale
    else:
        m = formats.max_value(fmt)
        lo, hi = -m * scale, m * scale
    return (x >= lo) & (x <= hi)


def straight_through(x: torch.Tensor, xq: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Return ``xq`` in the forward pass, with gradient 1 where ``inside`` and 0 elsewhere."""
    if not x.requires_grad:
        return xq
    return xq.detach() + (x - x.detach()) * inside
