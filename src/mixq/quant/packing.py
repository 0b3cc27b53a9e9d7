"""Bit packing of integer codes and the bit patterns of low-bit floating-point values.

Codes of ``b`` bits (1..8) are packed little-endian: code ``i`` occupies bits
``[b*i, b*(i+1))`` of the byte stream, bit 0 being the least significant bit of byte 0. A run
of ``n`` codes takes ``ceil(n * b / 8)`` bytes. Packing works on groups of eight codes, which
fill exactly ``b`` bytes, so it is one vectorized pass for every ``b``.

A floating-point element (``Fp`` formats) is stored as its encoding: sign bit, then the
exponent and mantissa fields. For every supported format the non-negative finite values,
in ascending order, are exactly the encodings 0, 1, 2, ..., so the magnitude code of a value
is its index among them; the OFP8 fp8 codes coincide with PyTorch's ``float8`` bit patterns.
"""

from __future__ import annotations

import functools
import math

import torch

from mixq import formats
from mixq.formats import Fp

__all__ = ["decode_fp", "encode_fp", "pack_bits", "packed_bytes", "unpack_bits"]


def packed_bytes(n: int, bits: int) -> int:
    """Return the bytes that ``n`` codes of ``bits`` bits take.

    >>> packed_bytes(10, 3), packed_bytes(10, 8)
    (4, 10)
    """
    return math.ceil(n * bits / 8)


def _check_bits(bits: int) -> None:
    if type(bits) is not int or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``codes`` (any integer dtype and shape, values < 2**bits) into uint8 bytes.

    >>> pack_bits(torch.tensor([1, 2, 3, 0]), 2).tolist()  # 0b00_11_10_01
    [57]
    """
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] to pack into {bits} bits")
    n = flat.numel()
    if bits == 8:
        return flat.to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, -n % 8)).reshape(-1, 8)  # [groups, 8]
    words = (flat << (bits * torch.arange(8))).sum(1)  # [groups]: 8 codes = `bits` bytes
    out = (words[:, None] >> (8 * torch.arange(bits))) & 0xFF  # [groups, bits]
    return out.reshape(-1)[: packed_bytes(n, bits)].to(torch.uint8)


def unpack_bits(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Unpack ``n`` codes of ``bits`` bits from uint8 ``data``; the inverse of :func:`pack_bits`.

    Returns an int64 tensor [n].

    >>> unpack_bits(torch.tensor([57], dtype=torch.uint8), 2, 4).tolist()
    [1, 2, 3, 0]
    """
    _check_bits(bits)
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError(f"packed codes must be a 1-D uint8 tensor, got {data.dtype} {tuple(data.shape)}")
    if data.numel() != packed_bytes(n, bits):
        raise ValueError(
            f"{n} codes of {bits} bits take {packed_bytes(n, bits)} bytes, the data holds {data.numel()}"
        )
    flat = data.to(torch.int64)
    if bits == 8:
        return flat
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % bits)).reshape(-1, bits)
    words = (flat << (8 * torch.arange(bits))).sum(1)  # [groups]
    codes = (words[:, None] >> (bits * torch.arange(8))) & ((1 << bits) - 1)  # [groups, 8]
    return codes.reshape(-1)[:n]


@functools.cache
def _magnitudes(fmt: Fp) -> torch.Tensor:
    """Non-negative finite values of ``fmt`` ascending, index = magnitude code (float32)."""
    g = formats.grid(fmt)
    return g[g >= 0]


def encode_fp(values: torch.Tensor, fmt: Fp) -> torch.Tensor:
    """Return the bit patterns (int64, same shape) of float32 ``values`` of format ``fmt``.

    Every value must be a finite value of ``fmt`` (e.g. from ``formats.round_to_format``); the
    sign of zero is kept.

    >>> encode_fp(torch.tensor([0.5, -6.0, -0.0]), formats.parse("fp4_e2m1")).tolist()
    [1, 15, 8]
    """
    mags = _magnitudes(fmt)
    a = values.abs()
    idx = torch.searchsorted(mags, a.contiguous()).clamp(max=mags.numel() - 1)
    if not torch.equal(mags[idx], a):
        raise ValueError(f"values are not all finite values of {fmt}; round them to the format first")
    sign = torch.signbit(values).to(torch.int64)
    return (sign << (formats.elem_bits(fmt) - 1)) | idx


def decode_fp(codes: torch.Tensor, fmt: Fp) -> torch.Tensor:
    """Return the float32 values of bit patterns ``codes``; the inverse of :func:`encode_fp`.

    >>> decode_fp(torch.tensor([1, 15, 8]), formats.parse("fp4_e2m1")).tolist()
    [0.5, -6.0, -0.0]
    """
    mags = _magnitudes(fmt)
    half = 1 << (formats.elem_bits(fmt) - 1)
    mag = codes & (half - 1)
    if codes.numel() and int(mag.max()) >= mags.numel():
        raise ValueError(f"codes hold a non-finite or invalid {fmt} pattern")
    out = mags[mag]
    return torch.where(codes >= half, -out, out)
