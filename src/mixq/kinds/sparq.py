"""SPARQ windows (``Sparq``, activations only): a 4-bit window of an unsigned 8-bit code.

The 8-bit code spec underneath (:func:`mixq.quant.sparq.base_spec`) depends on the site's
calibrated minimum: unsigned with zero point 0 for a non-negative site, the plain 8-bit
asymmetric code for a signed one (outside SPARQ, see :func:`fallback`). The kind's activation
parameters carry that spec as :attr:`mixq.kinds.ActParams.base`, so the site, the packed file
(``act_base``) and the ONNX writer read it from there. BOPs count the window, its position
and vSPARQ's mode bit (:func:`mixq.formats.bits`); ONNX runs the window table as a Gather.
"""

from __future__ import annotations

from typing import Any

import torch

from mixq import formats
from mixq.formats import Sparq
from mixq.kinds.base import ActParams, ActStats, Kind
from mixq.kinds.scaled import affine_mask, affine_params, affine_quantize, missing_stats
from mixq.plan import QSpec
from mixq.quant import sparq


def fallback(params: ActParams) -> bool:
    """Whether a SPARQ site is signed and uses the plain 8-bit asymmetric code."""
    assert params.base is not None
    return not params.base.symmetric


class SparqKind(Kind):
    """Activation windows; the codes are those of the 8-bit base spec."""

    name = "sparq"
    formats = (Sparq,)
    act_only = True
    act_base = True
    add_operand = False

    def bop_bits(self, spec: QSpec) -> float:
        """Window plus window-position bits (and vSPARQ's mode bit per pair)."""
        return formats.bits(spec.fmt)

    def act_params(self, spec: QSpec, stats: ActStats) -> ActParams:
        if stats.min is None:
            raise missing_stats()
        base = sparq.base_spec(spec, signed=bool(stats.min < 0))
        p = affine_params(base, stats)
        return ActParams(p.scale, p.zero, base)

    def quantize_act(
        self, x: torch.Tensor, spec: QSpec, params: ActParams, channel_axis: int
    ) -> torch.Tensor:
        assert params.base is not None and params.scale is not None and isinstance(spec.fmt, Sparq)
        if params.base.symmetric:
            return sparq.fake_quantize(x, params.scale[0], spec.fmt, channel_axis)
        return affine_quantize(x, params.base, params)

    def act_mask(self, x: torch.Tensor, spec: QSpec, params: ActParams) -> torch.Tensor:  # noqa: ARG002
        assert params.base is not None
        return affine_mask(x, params.base, params)

    def onnx_act_type(self, spec: QSpec, tp: Any) -> int:  # noqa: ARG002
        return tp.UINT8

    def act_nodes(self, g: Any, lx: Any, x: str, out: str, channels: int) -> list[Any] | None:
        """8-bit code, window table, vSPARQ partner test, scale; a signed site: plain QDQ (None)."""
        if lx.act_base is None or not lx.act_base.symmetric:
            return None
        return _nodes(g, lx, x, out, channels)


def _nodes(g: Any, lx: Any, x: str, out: str, channels: int) -> list[Any]:
    """A SPARQ input in standard ops: 8-bit code, window table, vSPARQ partner test, scale."""
    helper, tp = g.onnx.helper, g.tp
    spec = lx.act
    assert spec is not None and isinstance(spec.fmt, Sparq) and lx.act_scale is not None
    fmt, p = spec.fmt, f"{lx.name}.input"
    scale = g.tensor(f"{p}.scale", tp.FLOAT, lx.act_scale.reshape(()))
    zp = g.tensor(f"{p}.zero", tp.UINT8, torch.zeros(()))
    table = g.tensor(f"{p}.sparq_table", tp.FLOAT, sparq._float_table(fmt.option, fmt.rounding))
    kept = f"{p}.kept" if not fmt.pairs else f"{p}.window"
    nodes = [
        helper.make_node("QuantizeLinear", [x, scale, zp], [f"{p}.codes"], name=f"{p}_q"),
        helper.make_node("Cast", [f"{p}.codes"], [f"{p}.index"], name=f"{p}_index", to=tp.INT64),
        helper.make_node("Gather", [table, f"{p}.index"], [kept], name=f"{p}_window", axis=0),
    ]
    if fmt.pairs:  # channel 2k <-> 2k+1; an odd last channel has an implicit zero partner
        axis = lx.channel_axis
        perm = torch.arange(channels) ^ 1
        odd = channels % 2 == 1
        perm[-1] = channels - 1 if odd else perm[-1]
        shape = [channels, 1, 1] if lx.kind == "conv" else [channels]  # broadcast along the channel axis
        last = torch.zeros(channels, dtype=torch.bool)
        last[-1] = odd
        idx = g.tensor(f"{p}.partner", tp.INT64, perm)
        lone = g.add(g.onnx.numpy_helper.from_array(last.reshape(shape).numpy(), f"{p}.lone"))
        zero = g.tensor(f"{p}.code_zero", tp.FLOAT, torch.tensor(0.0))
        nodes += [
            helper.make_node("Cast", [f"{p}.codes"], [f"{p}.codes_f"], name=f"{p}_codes_f", to=tp.FLOAT),
            helper.make_node(
                "Gather", [f"{p}.codes_f", idx], [f"{p}.partner_code"], name=f"{p}_partner", axis=axis
            ),
            helper.make_node("Equal", [f"{p}.partner_code", zero], [f"{p}.partner_zero"], name=f"{p}_eq"),
            helper.make_node("Or", [f"{p}.partner_zero", lone], [f"{p}.full"], name=f"{p}_full"),
            helper.make_node("Where", [f"{p}.full", f"{p}.codes_f", kept], [f"{p}.kept"], name=f"{p}_pair"),
        ]
    nodes.append(helper.make_node("Mul", [f"{p}.kept", scale], [out], name=f"{p}_scale"))
    return nodes


KIND = SparqKind()
