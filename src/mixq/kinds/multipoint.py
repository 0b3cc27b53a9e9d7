"""Multipoint weights (``QSpec.points``, :mod:`mixq.quant.multipoint`): a sum of points per channel.

Channel j is ``sum_i step_i * q_i`` over its ``points[j]`` points, each a signed symmetric
integer vector with a step: the first point is the base integer quantizer (its float32 scale;
granularity "tensor": one for the layer), the extra points have float16 steps. An asymmetric
base (``+asym``) makes the first point ``step_0 * (q_0 - z)`` with unsigned codes q_0 in
[0, 2^b - 1] and a zero point z of b bits per scale; the extra points stay signed symmetric.
Storage: every point's codes, every step and the first point's zero points. BOPs: a low-bit dot
product per point plus a float32 merge per extra point. The packed file holds the codes and
steps of the points each channel has (and ``.zero``); ONNX sums one DequantizeLinear per point.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from mixq.formats import Int
from mixq.kinds.base import FLOAT_BITS, Kind, kind_of_format
from mixq.kinds.integer import onnx_int_type
from mixq.plan import QSpec
from mixq.quant import multipoint
from mixq.quant.codes import Encoded, code_to_int, int_to_code
from mixq.quant.packing import pack_bits, unpack_bits

MAX_POINTS = 16
STEP_BITS = 16  # an extra point's step is float16 (mixq.quant.multipoint.STEP_DTYPE)


def point_mask(spec: QSpec) -> torch.Tensor:
    """Which of the [C, n] point slots of a multipoint spec exist (``i < points[j]``)."""
    assert spec.points is not None
    counts = torch.tensor(spec.points)
    return torch.arange(int(counts.max()))[None, :] < counts[:, None]


class MultipointKind(Kind):
    """Signed symmetric integer points with float32 steps, a count per output channel."""

    name = "multipoint"
    formats = ()  # a spec-level kind: integer formats with ``points``
    single_weight = False

    def matches(self, spec: QSpec) -> bool:
        return spec.points is not None

    def check(self, spec: QSpec) -> None:
        """The format's own checks, then the points (naming the bad value and the valid choices)."""
        kind_of_format(spec.fmt).check(spec)
        pts = spec.points
        if not isinstance(pts, tuple):
            object.__setattr__(spec, "points", pts := tuple(pts) if isinstance(pts, list) else pts)
        if not isinstance(pts, tuple) or not pts:
            raise ValueError(f"points must be a non-empty list of points per output channel, got {pts!r}")
        bad = [n for n in pts if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_POINTS]
        if bad:
            raise ValueError(f"points per channel must be integers in 1..{MAX_POINTS}, got {bad[:5]}")
        if not (isinstance(spec.fmt, Int) and spec.fmt.signed):
            raise ValueError(
                f"multipoint points need a signed integer format (symmetric or +asym), got {spec.fmt}"
            )
        if spec.granularity not in ("channel", "tensor"):
            raise ValueError(
                f"multipoint points take granularity 'channel' or 'tensor', got {spec.granularity!r}"
            )

    def name_mods(self, spec: QSpec) -> list[str]:
        """Display only (the counts live in the plan JSON): the mean points per channel."""
        assert spec.points is not None
        return [f"mp{sum(spec.points) / len(spec.points):.2f}"]

    # -- cost
    def weight_bits(self, spec: QSpec, info: Any) -> float:
        """Channel j stores n_j * row_len codes, a float32 first step ("tensor": one for the layer)
        with a zero point of b bits when asymmetric, and n_j − 1 float16 extra steps."""
        assert spec.points is not None
        if len(spec.points) != info.out_channels:
            raise ValueError(
                f"layer {info.name} has {info.out_channels} output channels but the spec gives "
                f"points for {len(spec.points)}"
            )
        total = sum(spec.points)
        first = info.out_channels if spec.granularity == "channel" else 1
        extra = total - info.out_channels
        elem = self.elem_bits(spec.fmt)
        zero = 0 if spec.symmetric else elem
        return float(total * info.row_len * elem + first * (FLOAT_BITS + zero) + extra * STEP_BITS)

    def bops(self, info: Any, weight: QSpec, act_bits: float) -> float:
        """``row_len`` MACs per point at (weight x input bits), a float32 merge per extra point."""
        assert weight.points is not None
        c, total = info.out_channels, sum(weight.points)
        outputs = info.macs / info.row_len  # output values per sample
        low = info.macs * (total / c) * self.bop_bits(weight) * act_bits
        return low + outputs * (total - c) / c * FLOAT_BITS * FLOAT_BITS

    # -- simulation (nothing is clipped: the default all-true mask)
    def quantize_weight(self, w: torch.Tensor, spec: QSpec, gram: torch.Tensor | None) -> torch.Tensor:
        return multipoint.quantize_weight(w, spec, gram)

    # -- packed codes
    def encode(
        self, w: torch.Tensor, spec: QSpec, gram: torch.Tensor | None, wq: torch.Tensor | None
    ) -> Encoded:  # noqa: ARG002
        """The points of ``w``, found by the simulation's own search."""
        if w.dtype != torch.float32:
            raise ValueError(f"multipoint export needs a float32 weight, got {w.dtype}")
        pts = multipoint.spec_points(w, spec, gram)
        q = pts.codes.to(torch.int64)
        codes = int_to_code(q, Int(spec.bits), True)
        zero = None
        if pts.zero is not None:  # the first point's stored codes: q - z + z, unsigned
            zero = pts.zero.float()
            codes[:, 0] = q[:, 0] + zero.to(torch.int64)[:, None]
        return Encoded(spec, tuple(w.shape), codes, pts.steps.float(), zero)

    def decode(self, enc: Encoded) -> torch.Tensor:
        """As ``multipoint.Points.reconstruct``."""
        return (enc.scale[..., None] * point_values(enc)).sum(1).reshape(enc.shape)

    def weight_tensors(self, enc: Encoded, prefix: str) -> dict[str, torch.Tensor]:
        """Only the points each channel has. The first steps float32 (one per channel; "tensor":
        one), their zero points (asymmetric) packed at b bits, the extra steps float16 (exactly
        what was simulated)."""
        mask = point_mask(enc.spec)
        first = enc.scale[:, 0].float().contiguous()
        extra = enc.scale[:, 1:][mask[:, 1:]]
        if not torch.equal(extra.half().float(), extra.float()):
            raise ValueError(f"{prefix}: multipoint extra steps are not float16 values")
        tensor = enc.spec.granularity == "tensor"
        out = {
            f"{prefix}.codes": pack_bits(enc.codes[mask], enc.spec.bits),
            f"{prefix}.steps": first[:1] if tensor else first,
            f"{prefix}.extra_steps": extra.half().contiguous(),
        }
        if enc.zero is not None:
            zero = enc.zero.to(torch.int64)
            out[f"{prefix}.zero"] = pack_bits(zero[:1] if tensor else zero, enc.spec.bits)
        return out

    def read_weight(
        self, spec: QSpec, shape: tuple[int, ...], take: Callable[[str], torch.Tensor], prefix: str
    ) -> Encoded:
        assert spec.points is not None
        name = prefix.rpartition(".")[0]
        if len(spec.points) != shape[0]:
            raise ValueError(f"{name}: points for {len(spec.points)} channels, the weight has {shape[0]}")
        mask = point_mask(spec)
        d = math.prod(shape[1:])
        total = int(mask.sum())
        c = shape[0]
        first = take(f"{prefix}.steps").float()
        n_first = 1 if spec.granularity == "tensor" else c
        if tuple(first.shape) != (n_first,):
            raise ValueError(f"{prefix}.steps has shape {tuple(first.shape)}, expected ({n_first},)")
        extra = take(f"{prefix}.extra_steps")
        if extra.dtype != torch.float16 or tuple(extra.shape) != (total - c,):
            raise ValueError(
                f"{prefix}.extra_steps must be float16 of shape ({total - c},), got {extra.dtype} "
                f"{tuple(extra.shape)}"
            )
        flat = unpack_bits(take(f"{prefix}.codes"), spec.bits, total * d).reshape(total, d)
        q = code_to_int(flat, Int(spec.bits), True)
        k = 2 ** (spec.bits - 1) - 1
        is_first = mask.cumsum(1)[mask] == 1  # each channel's first point may use -2^(b-1)
        bad = bool((q[~is_first] < -k).any()) or bool((q[~is_first] > k).any())
        if spec.symmetric and q.numel() and float(q[is_first].max()) > k:
            bad = True
        if bad:
            raise ValueError(f"{name}: multipoint codes outside the symmetric grid [-{k}, {k}]")
        codes = torch.zeros(*mask.shape, d, dtype=torch.int64)
        codes[mask] = int_to_code(q, Int(spec.bits), True)
        zero = None
        if not spec.symmetric:  # the first points' codes are unsigned, with a zero point each
            codes[:, 0] = flat[is_first]
            zero = unpack_bits(take(f"{prefix}.zero"), spec.bits, n_first).float().expand(c).clone()
        scale = torch.zeros(mask.shape)
        scale[:, 0] = first.expand(c)
        extra_slots = mask.clone()
        extra_slots[:, 0] = False
        scale[extra_slots] = extra.float()
        return Encoded(spec, tuple(shape), codes, scale, zero)

    # -- ONNX
    def weight_nodes(self, g: Any, lx: Any, out: str, as_float: bool) -> list[Any]:  # noqa: ARG002
        """``DQ(q_0, s_0) + DQ(q_1, s_1) + ...`` with per-channel scales (INT4 or INT8 codes)."""
        helper = g.onnx.helper
        enc = lx.weight
        spec = enc.spec
        linear = lx.kind == "linear"
        q = code_to_int(enc.codes, Int(spec.bits), True)  # [C, n, d]
        parts = []
        for i in range(q.shape[1]):
            asym = i == 0 and enc.zero is not None  # unsigned codes and zero points
            dtype = onnx_int_type(g.tp, spec.bits, not asym)
            codes = (enc.codes[:, 0].float() if asym else q[:, i]).reshape(enc.shape)
            step = enc.scale[:, i]
            scale = torch.where(step > 0, step, torch.ones_like(step))  # zero steps have zero codes
            p = f"{lx.name}.weight.point{i}"
            c = g.tensor(f"{p}.codes", dtype, codes.t() if linear else codes, share=False)
            s = g.tensor(f"{p}.scale", g.tp.FLOAT, scale)
            z = g.tensor(f"{p}.zero", dtype, enc.zero if asym else torch.zeros_like(scale))
            parts.append(
                helper.make_node(
                    "DequantizeLinear", [c, s, z], [f"{p}.dq"], name=f"{p}_dq", axis=1 if linear else 0
                )
            )
        nodes, acc = list(parts), parts[0].output[0]
        for i, part in enumerate(parts[1:], 1):  # in point order, as the simulation sums them
            dst = out if i == len(parts) - 1 else f"{lx.name}.weight.sum{i}"
            nodes.append(
                helper.make_node("Add", [acc, part.output[0]], [dst], name=f"{lx.name}.weight_add{i}")
            )
            acc = dst
        if len(parts) == 1:
            nodes.append(helper.make_node("Identity", [acc], [out], name=f"{lx.name}.weight_points"))
        return nodes


def point_values(enc: Encoded) -> torch.Tensor:
    """The integer values [C, n, d] of every point (float32): the first point's codes less its
    zero points when asymmetric."""
    q = code_to_int(enc.codes, Int(enc.spec.bits), True)
    if enc.zero is not None:
        q[:, 0] = enc.codes[:, 0].float() - enc.zero[:, None]
    return q


KIND = MultipointKind()
