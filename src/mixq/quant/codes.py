"""Encoded weights: element codes plus scales, and the integer <-> code bit patterns.

The format kinds (:mod:`mixq.kinds`) split a weight into an :class:`Encoded` and rebuild it;
the packed file (:mod:`mixq.export.packed`) and the ONNX writer read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixq.formats import Int
from mixq.plan import QSpec

E8M0_BIAS = 127


@dataclass(frozen=True)
class Encoded:
    """A weight as codes and scales.

    Attributes:
        spec: the quantization spec.
        shape: the weight's shape.
        codes: unsigned bit patterns of ``spec.bits`` bits, int64, in the weight's shape.
        scale: float32 per row of :func:`mixq.quant.fake.to_rows` (float16-exact for groups);
            for MX, the shared exponents [out, blocks] as int64.
        zero: float32 zero point per row (asymmetric integer specs), else None.

    A multipoint weight (``spec.points``) holds ``codes`` [C, n, d]: the signed integer codes of
    each channel's n points (zeros past ``spec.points[j]``) as two's complement bit patterns,
    and ``scale`` [C, n]: their float32 steps (zero past the channel's points).
    """

    spec: QSpec
    shape: tuple[int, ...]
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None


def int_to_code(q: torch.Tensor, fmt: Int, symmetric: bool) -> torch.Tensor:
    """Return the unsigned code of integers ``q`` (two's complement for signed grids).

    >>> int_to_code(torch.tensor([-8.0, -1.0, 7.0]), Int(4), True).tolist()
    [8, 15, 7]
    """
    q = q.to(torch.int64)
    return q & ((1 << fmt.bits) - 1) if symmetric and fmt.signed else q


def code_to_int(codes: torch.Tensor, fmt: Int, symmetric: bool) -> torch.Tensor:
    """Return the integers (float32) of unsigned ``codes``; the inverse of :func:`int_to_code`.

    >>> code_to_int(torch.tensor([8, 15, 7]), Int(4), True).tolist()
    [-8.0, -1.0, 7.0]
    """
    if symmetric and fmt.signed:
        half = 1 << (fmt.bits - 1)
        codes = torch.where(codes >= half, codes - 2 * half, codes)
    return codes.to(torch.float32)
