"""Number formats: integer, low-bit floating point and MX block formats, with saturating rounding.

A format is a small frozen value (`Int`, `Fp` or `Mx`) whose `str` is its canonical name, so
``parse(str(fmt)) == fmt``. Rounding is a pure, vectorized function of a float32 tensor.

Floating-point element types follow the OCP 8-bit Floating Point Specification (OFP8) rev. 1.0
(E4M3 "fn": no inf, NaN only at S.1111.111, max 448; E5M2: IEEE-like, max 57344) and the
element types of the OCP Microscaling Formats (MX) Specification v1.0 (FP6 E3M2 max 28, FP6
E2M3 max 7.5, FP4 E2M1 max 6; no inf or NaN). All rounding is round-to-nearest-even with
**saturation** (the OFP8 saturating mode): overflow and ±inf clamp to ±max, NaN stays NaN.

MX formats (OCP MX v1.0) share one E8M0 scale ``2^shared_exp`` per block of ``block``
consecutive elements, with ``shared_exp = floor(log2(max|x_block|)) - emax_elem`` clamped to
``[-127, 127]``; elements are the saturating round of ``x / 2^shared_exp``. A block holding
NaN or ±inf gets E8M0's NaN scale (0xFF), so the whole block is NaN.

Rounding in any ExMy (bias ``2^(exp-1) - 1``): clamp to ±max, take ``e = floor(log2|x|)``
clamped to ``[1 - bias, e_max]`` (the lower clamp yields subnormals), and round ``x`` to the
nearest multiple of ``2^(e - man)``, ties to even. It runs in float64, where every step is
exact, and the result (a float32 value) is cast back exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "ACT_FORMAT_NAMES",
    "FORMAT_NAMES",
    "Format",
    "Fp",
    "Int",
    "Mx",
    "SPARQ_OPTIONS",
    "Sparq",
    "bits",
    "elem_bits",
    "grid",
    "max_value",
    "min_value",
    "mx_quantize",
    "mx_scales",
    "names",
    "parse",
    "register",
    "round_to_format",
    "unregister",
]

# (exp, man) -> canonical name. The special-value policy follows from the pair: OFP8 E4M3 is
# "fn" (finite, one NaN code), OFP8 E5M2 is IEEE-like, the MX element types are all-finite.
_FP_NAMES = {
    (4, 3): "fp8_e4m3fn",
    (5, 2): "fp8_e5m2",
    (3, 2): "fp6_e3m2",
    (2, 3): "fp6_e2m3",
    (2, 1): "fp4_e2m1",
}
_FN, _IEEE = (4, 3), (5, 2)
_MX_BLOCK = 32
_E8M0_NAN = 128  # E8M0 code 0xFF minus bias 127: the NaN scale of a block with NaN or inf


@dataclass(frozen=True)
class Int:
    """Integer format with `bits` bits (2..8), two's complement when `signed`."""

    bits: int
    signed: bool = True

    def __post_init__(self) -> None:
        if type(self.bits) is not int or not 2 <= self.bits <= 8:
            raise ValueError(f"Int bits must be an int in 2..8, got {self.bits!r}")
        if not isinstance(self.signed, bool):
            raise ValueError(f"Int signed must be a bool, got {self.signed!r}")

    def __str__(self) -> str:
        return f"{'' if self.signed else 'u'}int{self.bits}"


@dataclass(frozen=True)
class Fp:
    """Sign, `exp` exponent bits and `man` mantissa bits (OFP8 and OCP MX element types)."""

    exp: int
    man: int

    def __post_init__(self) -> None:
        if type(self.exp) is not int or type(self.man) is not int or (self.exp, self.man) not in _FP_NAMES:
            valid = ", ".join(f"Fp({e}, {m})" for e, m in _FP_NAMES)
            raise ValueError(f"unsupported Fp(exp={self.exp!r}, man={self.man!r}); valid: {valid}")

    def __str__(self) -> str:
        return _FP_NAMES[(self.exp, self.man)]


@dataclass(frozen=True)
class Mx:
    """OCP MX block format: `block` elements of type `elem` share one E8M0 power-of-two scale.

    `elem` is one of the five `Fp` element types or ``Int(8)`` (MXINT8: two's complement with
    an implied 2^-6 scale). The name of a block size other than 32 ends in ``_b<block>``.
    """

    elem: Int | Fp
    block: int = _MX_BLOCK

    def __post_init__(self) -> None:
        if not (isinstance(self.elem, Fp) or self.elem == Int(8)):
            raise ValueError(f"Mx elem must be an Fp format or Int(8), got {self.elem!r}")
        if type(self.block) is not int or self.block < 1:
            raise ValueError(f"Mx block must be a positive int, got {self.block!r}")

    def __str__(self) -> str:
        base = "mxint8" if isinstance(self.elem, Int) else "mx" + str(self.elem).removesuffix("fn")
        return base if self.block == _MX_BLOCK else f"{base}_b{self.block}"


SPARQ_OPTIONS = ("5opt", "3opt", "2opt")  # 4-bit window placements (mixq.quant.sparq)


@dataclass(frozen=True)
class Sparq:
    """SPARQ activation format (activations only): a 4-bit window of an unsigned 8-bit code.

    The window is placed by the code's leading one among `option`'s placements, rounded half to
    even (`rounding`) or truncated (RAW); with `pairs` (vSPARQ) a code whose partner channel is
    zero keeps all 8 bits. Named ``sparq4_<option>[_raw][_v]``, e.g. ``sparq4_5opt_v``.
    Numerics: :mod:`mixq.quant.sparq`.
    """

    option: str = "5opt"
    rounding: bool = True
    pairs: bool = False

    def __post_init__(self) -> None:
        if self.option not in SPARQ_OPTIONS:
            valid = ", ".join(SPARQ_OPTIONS)
            raise ValueError(f"unknown SPARQ window option {self.option!r}; valid: {valid}")
        if not isinstance(self.rounding, bool) or not isinstance(self.pairs, bool):
            raise ValueError(f"Sparq rounding and pairs must be bools, got {self.rounding!r}, {self.pairs!r}")

    def __str__(self) -> str:
        return f"sparq4_{self.option}{'' if self.rounding else '_raw'}{'_v' if self.pairs else ''}"


Format = Int | Fp | Mx | Sparq

_FORMATS: tuple[Format, ...] = (
    *(Int(b) for b in range(2, 9)),
    *(Int(b, signed=False) for b in range(2, 9)),
    *(Fp(e, m) for e, m in _FP_NAMES),
    *(Mx(Fp(e, m)) for e, m in _FP_NAMES),
    Mx(Int(8)),
)
_BY_NAME: dict[str, Format] = {str(f): f for f in _FORMATS}
FORMAT_NAMES: tuple[str, ...] = tuple(_BY_NAME)
# Formats for activations only (kept out of FORMAT_NAMES, which weights accept too).
_ACT_BY_NAME: dict[str, Format] = {
    str(f): f for f in (Sparq(o, r, p) for o in SPARQ_OPTIONS for r in (True, False) for p in (False, True))
}
ACT_FORMAT_NAMES: tuple[str, ...] = tuple(_ACT_BY_NAME)


def register(fmt: object, act_only: bool = False) -> None:
    """Make ``parse(str(fmt))`` return ``fmt``: a format value of a new kind (see :mod:`mixq.kinds`).

    ``act_only``: an activation format (listed with the SPARQ names). Registering the same value
    again does nothing; another value under a taken name raises a ValueError.
    """
    name = str(fmt)
    table = _ACT_BY_NAME if act_only else _BY_NAME
    if table.get(name) == fmt:
        return
    if name in _BY_NAME or name in _ACT_BY_NAME or not name or not name.isascii() or not name.isidentifier():
        raise ValueError(f"cannot register format {fmt!r}: name {name!r} is taken or not an identifier")
    table[name] = fmt  # type: ignore[assignment]


def unregister(fmt: object) -> None:
    """Forget a format added with :func:`register` (the built-in ones stay)."""
    name = str(fmt)
    if name in FORMAT_NAMES or name in ACT_FORMAT_NAMES:
        raise ValueError(f"{name!r} is a built-in format")
    _BY_NAME.pop(name, None)
    _ACT_BY_NAME.pop(name, None)


def names(act_only: bool = False) -> tuple[str, ...]:
    """The format names :func:`parse` accepts now (weights and activations, or activations only)."""
    return tuple(_ACT_BY_NAME if act_only else _BY_NAME)


def parse(name: str) -> Format:
    """Return the format called `name`; the inverse of ``str(fmt)``.

    MX names accept a ``_b<block>`` suffix for a block size other than 32.

    Raises:
        ValueError: `name` is not a valid format name; the message lists the valid ones.

    >>> parse("mxfp4_e2m1")
    Mx(elem=Fp(exp=2, man=1), block=32)
    >>> str(parse("uint4"))
    'uint4'
    """
    if not isinstance(name, str):
        raise TypeError(f"format name must be a str, got {type(name).__name__}: {name!r}")
    if name in _BY_NAME:
        return _BY_NAME[name]
    if name in _ACT_BY_NAME:
        return _ACT_BY_NAME[name]
    base, sep, block = name.rpartition("_b")
    fmt = _BY_NAME.get(base)
    if (
        sep
        and isinstance(fmt, Mx)
        and block.isascii()
        and block.isdigit()
        and block[0] != "0"
        and int(block) != _MX_BLOCK
    ):
        return Mx(fmt.elem, int(block))
    raise ValueError(
        f"unknown format {name!r}; valid names: {', '.join(names())} "
        "(an MX name may end in _b<block> for a block size other than 32, e.g. mxfp4_e2m1_b16); "
        f"activations only: {', '.join(names(act_only=True))}"
    )


def elem_bits(fmt: Format) -> int:
    """Return the storage bits of one element (for `Mx`, of its element type).

    >>> elem_bits(parse("fp6_e2m3")), elem_bits(parse("mxfp4_e2m1"))
    (6, 4)
    """
    if isinstance(fmt, Int):
        return fmt.bits
    if isinstance(fmt, Fp):
        return 1 + fmt.exp + fmt.man
    if isinstance(fmt, Mx):
        return elem_bits(fmt.elem)
    if isinstance(fmt, Sparq):  # the window: what enters the 4b x 8b multiplier
        return 4
    raise TypeError(f"expected a Format, got {fmt!r}")


def bits(fmt: Format) -> float:
    """Return bits per element, counting an `Mx` block's 8-bit shared scale (``8 / block``).

    A `Sparq` activation counts its 4 window bits, ``ceil(log2(options))`` bits of window
    position, and with vSPARQ one mode bit per pair (a full 8-bit code, its channel and the flag
    fit in the pair's two windows and positions).

    >>> bits(parse("int4")), bits(parse("mxfp4_e2m1")), bits(parse("mxint8"))
    (4.0, 4.25, 8.25)
    >>> bits(parse("sparq4_5opt")), bits(parse("sparq4_3opt_v")), bits(parse("sparq4_2opt_raw"))
    (7.0, 6.5, 5.0)
    """
    if isinstance(fmt, Sparq):  # + the window position, + one mode bit per vSPARQ pair
        position = math.ceil(math.log2(int(fmt.option[0])))  # 5opt: 3, 3opt: 2, 2opt: 1
        return 4.0 + position + (0.5 if fmt.pairs else 0.0)
    extra = 8 / fmt.block if isinstance(fmt, Mx) else 0.0
    return float(elem_bits(fmt)) + extra


def _scalar(fmt: Int | Fp) -> None:
    if not isinstance(fmt, Int | Fp):
        hint = "; use mx_quantize for MX formats" if isinstance(fmt, Mx) else ""
        raise TypeError(f"expected an Int or Fp format, got {fmt!r}{hint}")


def _fp_range(fmt: Fp) -> tuple[int, int, float]:
    """Return ``(e_min, e_max, max)``: unbiased exponent range of normals and largest value."""
    bias = 2 ** (fmt.exp - 1) - 1
    top = 2**fmt.exp - 1 - bias  # exponent of the all-ones exponent field
    if (fmt.exp, fmt.man) == _IEEE:
        return 1 - bias, top - 1, 2.0 ** (top - 1) * (2 - 2.0**-fmt.man)
    if (fmt.exp, fmt.man) == _FN:  # S.1111.111 is NaN: the largest mantissa is one step lower
        return 1 - bias, top, 2.0**top * (2 - 2.0 ** (1 - fmt.man))
    return 1 - bias, top, 2.0**top * (2 - 2.0**-fmt.man)


def max_value(fmt: Int | Fp) -> float:
    """Return the largest finite value of `fmt`.

    >>> [max_value(parse(n)) for n in ("int4", "uint4", "fp8_e4m3fn", "fp8_e5m2", "fp4_e2m1")]
    [7.0, 15.0, 448.0, 57344.0, 6.0]
    """
    _scalar(fmt)
    if isinstance(fmt, Int):
        return float(2 ** (fmt.bits - 1) - 1 if fmt.signed else 2**fmt.bits - 1)
    return _fp_range(fmt)[2]


def min_value(fmt: Int | Fp) -> float:
    """Return the smallest (most negative) value of `fmt`.

    >>> min_value(parse("int4")), min_value(parse("uint4")), min_value(parse("fp6_e3m2"))
    (-8.0, 0.0, -28.0)
    """
    _scalar(fmt)
    if isinstance(fmt, Int):
        return float(-(2 ** (fmt.bits - 1)) if fmt.signed else 0)
    return -max_value(fmt)


def grid(fmt: Int | Fp) -> torch.Tensor:
    """Return every finite value of `fmt`, ascending, float32, with a single zero.

    >>> grid(parse("fp4_e2m1")).tolist()
    [-6.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    """
    _scalar(fmt)
    if isinstance(fmt, Int):
        return torch.arange(min_value(fmt), max_value(fmt) + 1, dtype=torch.float32)
    bias = 2 ** (fmt.exp - 1) - 1
    field = torch.arange(2**fmt.exp)[:, None]  # [E, 1] exponent field
    frac = torch.arange(2**fmt.man, dtype=torch.float64)[None, :] / 2**fmt.man  # [1, M]
    normal = (1 + frac) * _pow2(field - bias)
    subnormal = frac * 2.0 ** (1 - bias)
    pos = torch.where(field == 0, subnormal, normal).flatten()  # encodings in order: ascending
    pos = pos[(pos > 0) & (pos <= max_value(fmt))]  # drops zero and the inf/NaN codes
    return torch.cat([-pos.flip(0), pos.new_zeros(1), pos]).float()


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """Return ``2.0**e`` exactly as float64 for integer `e` in [-1022, 1023], via the bits."""
    return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)


def _round64(y: torch.Tensor, fmt: Int | Fp) -> torch.Tensor:
    """Round float64 `y` to `fmt`, saturating, ties to even; float64 out, every step exact."""
    if isinstance(fmt, Int):  # + 0.0 turns -0.0 into +0.0: an integer has a single zero
        return torch.round(y).clamp(min_value(fmt), max_value(fmt)) + 0.0
    e_min, e_max, top = _fp_range(fmt)
    y = y.clamp(-top, top)  # saturate first: ±inf -> ±max, and no value rounds past max
    exponent = torch.frexp(y).exponent - 1  # floor(log2|y|), exact (frexp mantissa in [.5, 1))
    step = _pow2(exponent.clamp(e_min, e_max) - fmt.man)
    # A value just below 2^(e+1) may round up to 2^(e+1): still a multiple of step, representable.
    return torch.round(y / step) * step


def _check_float32(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"expected a float32 tensor, got {got}")


def round_to_format(x: torch.Tensor, fmt: Int | Fp) -> torch.Tensor:
    """Round every element of float32 `x` to the nearest value of `fmt`, ties to even.

    Saturating: values beyond the range and ±inf become ±max (`Int`: min/max); NaN stays NaN.
    `Fp` keeps the sign of zero; `Int` has a single zero, +0. Float32 in and out, any shape.

    >>> x = torch.tensor([0.25, 0.75, 2.5, 5.0, 7.0, -1e9])
    >>> round_to_format(x, parse("fp4_e2m1")).tolist()
    [0.0, 1.0, 2.0, 4.0, 6.0, -6.0]
    >>> round_to_format(torch.tensor([0.5, 1.5, -2.5, 9.0]), parse("int4")).tolist()
    [0.0, 2.0, -2.0, 7.0]
    """
    _scalar(fmt)
    _check_float32(x)
    return _round64(x.double(), fmt).float()


def _emax_elem(elem: Int | Fp) -> int:
    """Return the exponent of the element type's largest power of two (MXINT8: 0)."""
    return 0 if isinstance(elem, Int) else _fp_range(elem)[1]


def _blocks(x: torch.Tensor, fmt: Mx, axis: int) -> torch.Tensor:
    """Return `x` with `axis` moved last and cut into zero-padded blocks: [..., nblocks, block]."""
    _check_float32(x)
    if x.dim() == 0:
        raise ValueError("mx formats need a tensor with at least one dimension")
    moved = x.movedim(axis, -1)
    pad = -moved.shape[-1] % fmt.block
    moved = torch.nn.functional.pad(moved, (0, pad)) if pad else moved
    return moved.reshape(*moved.shape[:-1], -1, fmt.block)


def _shared_exp(blocks: torch.Tensor, fmt: Mx) -> torch.Tensor:
    """Return per-block shared exponents [..., nblocks], int32; ``_E8M0_NAN`` for non-finite."""
    amax = blocks.abs().amax(dim=-1)  # NaN if any element is NaN
    floor_log2 = torch.frexp(amax).exponent - 1
    se = (floor_log2 - _emax_elem(fmt.elem)).clamp(-127, 127)
    se = torch.where(amax == 0, -127, se)  # floor(log2 0) = -inf, clamped
    return torch.where(amax.isfinite(), se, _E8M0_NAN).to(torch.int32)


def mx_scales(x: torch.Tensor, fmt: Mx, axis: int = -1) -> torch.Tensor:
    """Return the shared exponent of each block of `fmt.block` elements along `axis`, int32.

    The result has `x`'s shape with `axis` shortened to ``ceil(n / fmt.block)``. An all-zero
    block gives -127; a block holding NaN or ±inf gives 128 (E8M0's NaN code 0xFF less bias).

    >>> mx_scales(torch.tensor([5.0, -1.0, 0.5]), parse("mxfp4_e2m1")).tolist()
    [0]
    """
    se = _shared_exp(_blocks(x, fmt, axis), fmt)
    return se.movedim(-1, axis)


def mx_quantize(x: torch.Tensor, fmt: Mx, axis: int = -1) -> torch.Tensor:
    """Fake-quantize float32 `x` to MX format `fmt` in blocks along `axis` (OCP MX v1.0).

    Each block of `fmt.block` consecutive elements (the last one zero-padded internally) gets
    ``X = 2^shared_exp`` (see `mx_scales`) and each element becomes
    ``round_to_format(x / X, elem) * X``, saturating. MXINT8 elements are ``k / 64``,
    ``k`` in [-128, 127]. A block holding NaN or ±inf has a NaN scale, so all of it is NaN.
    Float32 in and out, same shape as `x`.

    >>> mx_quantize(torch.tensor([5.0, 7.9, -0.2, 0.0]), parse("mxfp4_e2m1")).tolist()
    [4.0, 6.0, -0.0, 0.0]
    >>> mx_quantize(torch.tensor([1.0, 1 / 128, 3 / 128, -0.001]), parse("mxint8")).tolist()
    [1.0, 0.0, 0.03125, 0.0]
    """
    if not isinstance(fmt, Mx):
        raise TypeError(f"expected an Mx format, got {fmt!r}; use round_to_format otherwise")
    blocks = _blocks(x, fmt, axis)  # [..., nblocks, block]
    se = _shared_exp(blocks, fmt)  # [..., nblocks]
    scale = _pow2(se.clamp(max=127))[..., None]  # [..., nblocks, 1], float64, exact
    y = blocks.double() / scale
    if isinstance(fmt.elem, Int):  # MXINT8: int8 with an implied 2^-6 scale
        q = _round64(y * 64, fmt.elem) / 64
        # k = -128 at the largest scale would be -2^128, beyond float32: saturate to k = -127.
        q = torch.where(se[..., None] == 127, q.clamp(min=-127 / 64), q)
    else:
        q = _round64(y, fmt.elem)
    # q * scale is a float32 value: at most 4 significant bits, exponent within float32 range.
    out = torch.where(se[..., None] == _E8M0_NAN, torch.nan, q * scale).float()
    n = x.shape[axis]
    return out.flatten(-2)[..., :n].movedim(-1, axis)
