"""SPARQ: sparsity-aware activation quantization, as pure functions of 8-bit activation codes.

Shomron, Gabbay, Kurzum and Weiser, "Post-Training Sparsity-Aware Quantization", NeurIPS 2021
(arXiv 2105.11010); window logic as in the authors' public CUDA kernels (docs/methods.md §5.3-5.4).

An activation is first quantized to an unsigned 8-bit code ``a`` in 0..255 (post-ReLU inputs,
per-tensor scale). Then:

* **bSPARQ** keeps a 4-bit window ``a & mask`` placed by the position of ``a``'s leading one;
  the kept value keeps its significance, so it is ``value << shift`` with ``value`` < 16.
  Window options (bit ranges ``[hi:lo]``; ``shift`` = lo):

  ====== ===================================== ============================================
  option windows                               selection
  ====== ===================================== ============================================
  5opt   [7:4] [6:3] [5:2] [4:1] [3:0]         shift = max(msb - 3, 0)
  3opt   [7:4] [5:2] [3:0]                     bits 7-6 set: 4; else bits 5-4 set: 2; else 0
  2opt   [7:4] [3:0]                           a >= 16: 4; else 0
  ====== ===================================== ============================================

  With ``rounding`` the window is rounded half to even on the bits below it (round up iff the
  bit just below is set and any lower bit or the window's LSB is set) and **saturates** to the
  window's all-ones value instead of moving to the next window; without it (the paper's RAW
  mode) the bits below are truncated. The lowest window [3:0] is exact.
* **vSPARQ** pairs channels ``2k`` and ``2k+1`` at the same position: when one of the two codes
  is zero the other keeps all 8 bits (it takes its partner's 4-bit budget); otherwise both go
  through bSPARQ. An odd last channel is paired with an implicit zero (it keeps 8 bits).

Deviations from the authors' code, each an engineering choice:

* Pairs are formed on the layer's input tensor (channels ``2k, 2k+1`` at the same pixel or
  token), which is what the kernel's (tap-major, channel-minor) im2col order gives when the
  channels per conv group are even. With an odd channel count the kernel's pairs run across
  kernel taps (and, for depthwise convs, along taps); here they stay on channels.
* Signed sites (calibrated minimum below zero, e.g. a first conv fed normalized images or an
  input taken after a residual add without ReLU) are outside SPARQ: the authors' code raises
  there. mixq quantizes such a site with the plain 8-bit asymmetric per-tensor code (the
  ``a8`` candidate with the same range clip) and says so (see :func:`base_spec`,
  :func:`mixq.kinds.sparq.fallback` and the ``sparq`` method's record).

The integer path (:func:`int_linear`, :func:`int_conv2d`) accumulates ``value * weight_code``
in int32, shifted by ``shift``, which is what the 4b x 8b multiplier-and-shifter hardware does.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

from mixq.formats import SPARQ_OPTIONS, Int, Sparq
from mixq.plan import QSpec

__all__ = [
    "SPARQ_OPTIONS",
    "base_spec",
    "fake_quantize",
    "int_conv2d",
    "int_linear",
    "partner_is_zero",
    "quantize_codes",
    "to_codes",
    "window_codes",
]

CODE_MAX = 255
WINDOW_BITS = 4


def _shift_of(a: torch.Tensor, option: str) -> torch.Tensor:
    """Return the window shift (its LSB position) of each code ``a`` (int64, 0..255)."""
    if option == "5opt":
        msb = torch.where(a > 0, torch.frexp(a.double()).exponent - 1, 0)
        return (msb - (WINDOW_BITS - 1)).clamp(min=0).long()
    if option == "3opt":
        return torch.where((a & 0xC0) > 0, 4, torch.where((a & 0x30) > 0, 2, 0)).long()
    return torch.where(a >= 16, 4, 0).long()


@cache
def _tables(option: str, rounding: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the kept value and the window shift of every code 0..255 (two int64 [256] LUTs)."""
    a = torch.arange(CODE_MAX + 1, dtype=torch.int64)
    shift = _shift_of(a, option)
    lsb = 1 << shift  # [256] the window's LSB
    mask = ((1 << WINDOW_BITS) - 1) << shift  # the window's all-ones value
    kept = a & mask
    if rounding:
        half = lsb >> 1  # the bit just below the window (0 for shift 0: never rounded)
        below = (a & (half - 1)) > 0
        up = ((a & half) > 0) & (below | ((a & lsb) > 0))
        kept = torch.where(up, (kept + lsb).clamp(max=mask), kept)  # saturate inside the window
    return kept, shift


def _check_args(option: str, rounding: bool, pairs: bool) -> None:
    if option not in SPARQ_OPTIONS:
        raise ValueError(f"unknown SPARQ window option {option!r}; valid: {', '.join(SPARQ_OPTIONS)}")
    for name, v in (("rounding", rounding), ("pairs", pairs)):
        if not isinstance(v, bool):
            raise ValueError(f"SPARQ {name} must be a bool (True or False), got {v!r}")


def _check_codes(codes: torch.Tensor) -> None:
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex():
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"SPARQ codes must be an integer tensor of 8-bit codes 0..255, got {got}")
    if codes.dtype == torch.bool:
        raise ValueError("SPARQ codes must be an integer tensor of 8-bit codes 0..255, got torch.bool")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > CODE_MAX):
        bad = int(codes.min()) if int(codes.min()) < 0 else int(codes.max())
        raise ValueError(f"SPARQ codes must lie in 0..{CODE_MAX} (unsigned 8-bit), got {bad}")
    if codes.dim() == 0:
        raise ValueError("SPARQ codes need at least one dimension (the last one is the channel axis)")


def partner_is_zero(a: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """Return where the pair partner (channel 2k <-> 2k+1 along ``axis``) is zero."""
    axis = axis % a.dim()
    c = a.shape[axis]
    if c % 2:  # an odd last channel pairs with an implicit zero
        a = torch.cat([a, a.new_zeros(*a.shape[:axis], 1, *a.shape[axis + 1 :])], axis)
    partner = a.unflatten(axis, (-1, 2)).flip(axis + 1).flatten(axis, axis + 1)
    return (partner == 0).narrow(axis, 0, c)


@cache
def _float_table(option: str, rounding: bool) -> torch.Tensor:
    """Return the kept value of every code 0..255 as a float32 LUT [256]."""
    return _tables(option, rounding)[0].float()


def window_codes(
    codes: torch.Tensor, option: str = "5opt", rounding: bool = True, pairs: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(value, shift)`` with ``value << shift`` the code SPARQ keeps (int64 tensors).

    ``value`` is what enters the multiplier: below 16 for a 4-bit window, up to 255 for a vSPARQ
    code whose partner is zero (then ``shift`` is 0). Arguments as in :func:`quantize_codes`.

    >>> [t.tolist() for t in window_codes(torch.tensor([200, 13, 0]))]
    [[12, 13, 0], [4, 0, 0]]
    >>> [t.tolist() for t in window_codes(torch.tensor([200, 0]), pairs=True)]
    [[200, 0], [0, 0]]
    """
    _check_args(option, rounding, pairs)
    _check_codes(codes)
    a = codes.long()
    kept_lut, shift_lut = _tables(option, rounding)
    kept, shift = kept_lut[a], shift_lut[a]
    if pairs:
        full = partner_is_zero(a)
        kept, shift = torch.where(full, a, kept), torch.where(full, 0, shift)
    return kept >> shift, shift


def quantize_codes(
    codes: torch.Tensor, option: str = "5opt", rounding: bool = True, pairs: bool = False
) -> torch.Tensor:
    """Return the 8-bit activation codes that SPARQ keeps, on the same 0..255 scale.

    Args:
        codes: integer tensor of unsigned 8-bit activation codes (0..255); the last dimension
            is the channel dimension (vSPARQ pairs channels 2k and 2k+1).
        option: window placements, "5opt", "3opt" or "2opt".
        rounding: round half to even inside the window, saturating (False: truncate, RAW).
        pairs: vSPARQ: a code whose partner is zero keeps all 8 bits.

    Returns:
        A tensor of ``codes``' shape and dtype.

    Raises:
        ValueError: a code outside 0..255, a float tensor, or an unknown option.

    >>> quantize_codes(torch.tensor([255, 108, 100, 24, 7])).tolist()  # 100: a tie, to even
    [240, 112, 96, 24, 7]
    >>> quantize_codes(torch.tensor([255, 100, 24, 7]), option="2opt", rounding=False).tolist()
    [240, 96, 16, 7]
    >>> quantize_codes(torch.tensor([[100, 0, 101, 3]]), pairs=True).tolist()
    [[100, 0, 104, 3]]
    """
    value, shift = window_codes(codes, option, rounding, pairs)
    return (value << shift).to(codes.dtype)


def base_spec(spec: QSpec, signed: bool) -> QSpec:
    """Return the 8-bit integer spec underneath a SPARQ activation spec.

    A non-negative site gets unsigned 8-bit codes with scale ``max / 255`` (zero point 0, so
    ReLU zeros stay exact zeros). A ``signed`` site is outside SPARQ and gets the plain 8-bit
    asymmetric per-tensor code (the ``a8`` candidate) with the same range clip.
    """
    if not isinstance(spec.fmt, Sparq):
        raise ValueError(f"expected a SPARQ activation spec, got format {spec.fmt}")
    fmt, symmetric = (Int(8), False) if signed else (Int(8, signed=False), True)
    return QSpec(fmt, granularity="tensor", symmetric=symmetric, clip=spec.clip, percentile=spec.percentile)


def to_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Return the unsigned 8-bit codes ``clamp(round(x / scale), 0, 255)`` of float ``x`` (int64)."""
    return torch.clamp(torch.round(x / scale), 0, CODE_MAX).long()


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, fmt: Sparq, channel_axis: int) -> torch.Tensor:
    """Fake-quantize float ``x`` with SPARQ: 8-bit codes at ``scale``, windows, times ``scale``.

    ``channel_axis`` is the axis vSPARQ pairs along. No gradient (see ``fake.straight_through``).

    >>> xq = fake_quantize(torch.tensor([2.55, 1.0, 0.07]), torch.tensor(0.01), Sparq("2opt"), -1)
    >>> [round(v, 4) for v in xq.tolist()]  # codes 255, 100, 7 -> 240, 96, 7
    [2.4, 0.96, 0.07]
    """
    codes = torch.clamp(torch.round(x.detach() / scale), 0, CODE_MAX)  # float: one LUT lookup
    kept = torch.take(_float_table(fmt.option, fmt.rounding).to(x.dtype), codes.long())
    if fmt.pairs:
        kept = torch.where(partner_is_zero(codes, channel_axis), codes, kept)
    return kept * scale


def _shifted_sum(value: torch.Tensor, shift: torch.Tensor, dot) -> torch.Tensor:
    """Return ``sum_s dot(value * [shift == s]) << s``: one integer product per window position."""
    acc = None
    for s in torch.unique(shift).tolist():
        part = dot(torch.where(shift == s, value, 0).to(torch.int32)) << s
        acc = part if acc is None else acc + part
    return acc


def int_linear(x_codes: torch.Tensor, w_codes: torch.Tensor, fmt: Sparq) -> torch.Tensor:
    """Return the int32 accumulators of a linear layer with SPARQ inputs: ``kept(x) @ w.T``.

    Each product is ``value * weight_code`` (at most 8b x 8b, usually 4b x 8b) shifted by the
    window position, accumulated in int32. Multiply by ``scale_x * scale_w[out]`` for the output.

    Args:
        x_codes: unsigned 8-bit activation codes [..., in].
        w_codes: signed integer weight codes [out, in].
        fmt: the SPARQ format (its option, rounding and pairs, see :func:`quantize_codes`).
    """
    value, shift = window_codes(x_codes, fmt.option, fmt.rounding, fmt.pairs)
    w = w_codes.to(torch.int32)
    return _shifted_sum(value, shift, lambda v: v @ w.T)


def int_conv2d(
    x_codes: torch.Tensor,
    w_codes: torch.Tensor,
    fmt: Sparq,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
) -> torch.Tensor:
    """Return the int32 accumulators [N, out, H', W'] of a conv with SPARQ inputs (zero padding).

    vSPARQ pairs input channels at the same pixel before im2col, so a pair meets the same
    kernel tap; the GEMM runs on the im2col columns in int32, one product per window shift.

    Args:
        x_codes: unsigned 8-bit activation codes [N, C, H, W].
        w_codes: signed integer weight codes [out, C / groups, kh, kw].
        fmt: the SPARQ format (its option, rounding and pairs, see :func:`quantize_codes`).
        stride, padding, dilation, groups: as in ``torch.nn.Conv2d``.
    """
    value, shift = window_codes(x_codes.movedim(1, -1), fmt.option, fmt.rounding, fmt.pairs)
    value, shift = value.movedim(-1, 1), shift.movedim(-1, 1)
    n, _, h, w_ = x_codes.shape
    out, cg, kh, kw = w_codes.shape
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w_ + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    wg = w_codes.reshape(groups, out // groups, cg * kh * kw).to(torch.int32)  # [G, O/G, K]

    def dot(v: torch.Tensor) -> torch.Tensor:  # exact: codes below 2^24 survive float64 unfold
        cols = F.unfold(v.double(), (kh, kw), dilation, padding, stride).to(torch.int32)  # [N, C*k, P]
        cols = cols.reshape(n, groups, cg * kh * kw, -1)
        return torch.einsum("gok,ngkp->ngop", wg, cols).reshape(n, out, oh, ow)

    return _shifted_sum(value, shift, dot)
