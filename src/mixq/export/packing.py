"""Bit packing of codes and fp bit patterns: see :mod:`mixq.quant.packing` (kept importable here)."""

from __future__ import annotations

from mixq.quant.packing import decode_fp, encode_fp, pack_bits, packed_bytes, unpack_bits

__all__ = ["decode_fp", "encode_fp", "pack_bits", "packed_bytes", "unpack_bits"]
