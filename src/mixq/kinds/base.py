"""The format-kind protocol (:class:`Kind`) and the registry that maps a spec to its kind.

See :mod:`mixq.kinds` for what a kind owns. Of mixq, this module imports only the number
formats (:mod:`mixq.formats`, the ground floor), so the plan grammar (:mod:`mixq.plan`) can ask
it while the built-in kinds (which build specs) import the plan. :mod:`mixq.kinds` registers
the built-in kinds when it is imported, which ``import mixq`` does first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mixq import formats

if TYPE_CHECKING:
    from collections.abc import Callable

    from mixq.formats import Format
    from mixq.plan import QSpec

FLOAT_BITS = 32

__all__ = [
    "FLOAT_BITS",
    "ActParams",
    "ActStats",
    "Kind",
    "kind_of",
    "kind_of_format",
    "kinds",
    "register",
    "unregister",
]


@dataclass(frozen=True)
class ActStats:
    """Calibration statistics of an activation site: running range and a sample of values."""

    min: torch.Tensor | None
    max: torch.Tensor | None
    sample: torch.Tensor | None


@dataclass(frozen=True)
class ActParams:
    """The fixed parameters of an activation quantizer.

    Attributes:
        scale, zero: per-tensor scale and zero point [1] (None for a kind without them: MX).
        base: the integer spec of the codes when they differ from the spec's own (SPARQ: its
            8-bit code spec, :func:`mixq.quant.sparq.base_spec`), else None.
    """

    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    base: QSpec | None = None


class Kind:
    """A representation of quantized tensors; subclasses answer every question mixq asks of it.

    Class attributes (the defaults suit a per-tensor / per-channel affine grid):
        name: the kind's name (errors and listings).
        formats: the format value classes the kind owns (``kind_of_format``).
        act_only: an activation format (a weight spec cannot use it).
        blocks: specs take granularity "block" (and only they do).
        zero_points: asymmetric specs (a zero point) are allowed.
        act_scales: an activation quantizer has a per-tensor scale and zero point.
        act_base: an activation quantizer's codes follow another spec (``ActParams.base``).
        add_operand: the format can quantize a residual addition's operands in an export.
        single_weight: in ONNX the weight is one tensor (a DequantizeLinear or a float32
            initializer), not a sum of several.
    """

    name = "kind"
    formats: tuple[type, ...] = ()
    act_only = False
    blocks = False
    zero_points = False
    act_scales = True
    act_base = False
    add_operand = True
    single_weight = True

    # -- specs ------------------------------------------------------------------------------
    def matches(self, spec: QSpec) -> bool:
        """Whether ``spec`` is of this kind (by default: its format is one of ``formats``)."""
        return isinstance(spec.fmt, self.formats) and spec.points is None

    def elem_bits(self, fmt: Format) -> int:
        """Storage bits of one element."""
        return formats.elem_bits(fmt)

    def family(self, fmt: Format) -> str:  # noqa: ARG002
        """The element family a format belongs to: "int", "fp" or "other" (FLIQS search spaces)."""
        return "other"

    def parse_defaults(self) -> dict[str, Any]:
        """Spec fields a candidate name implies for a format of this kind."""
        out: dict[str, Any] = {} if self.zero_points else {"symmetric": True}
        if self.blocks:
            out["granularity"] = "block"
        return out

    def check(self, spec: QSpec) -> None:
        """Raise a ValueError naming what is wrong with ``spec`` for this kind."""
        if self.blocks != (spec.granularity == "block"):
            raise ValueError(
                f"granularity 'block' goes with MX formats and only with them (got {spec.fmt} "
                f"with {spec.granularity!r})"
            )
        if (spec.granularity == "group") != (spec.group_size is not None):
            raise ValueError("granularity 'group' needs group_size, and only it takes one")
        if spec.group_size is not None and spec.group_size < 1:
            raise ValueError(f"group_size must be positive, got {spec.group_size}")
        if not spec.symmetric and not self.zero_points:
            raise ValueError(f"asymmetric ranges need an integer format, got {spec.fmt}")

    def name_mods(self, spec: QSpec) -> list[str]:  # noqa: ARG002
        """Extra modifiers of the spec's display name (after the generic ones)."""
        return []

    # -- cost -------------------------------------------------------------------------------
    def weight_bits(self, spec: QSpec, info: Any) -> float:
        """Storage bits of a layer's weights (``info``: a :class:`mixq.cost.LayerInfo`)."""
        raise ValueError(f"weight format {spec.fmt} ({self.name}) has no storage cost")

    def act_param_bits(self, spec: QSpec) -> float:
        """Storage bits of an input quantizer's parameters: float32 scale and zero point."""
        return 32.0 + (0 if spec.symmetric else self.elem_bits(spec.fmt))

    def bop_bits(self, spec: QSpec) -> float:
        """Element bits used in BOPs."""
        return self.elem_bits(spec.fmt)

    def bops(self, info: Any, weight: QSpec, act_bits: float) -> float:
        """BOPs of a layer whose weight has this kind, its input at ``act_bits``."""
        return info.macs * self.bop_bits(weight) * act_bits

    # -- simulation -------------------------------------------------------------------------
    def quantize_weight(self, w: torch.Tensor, spec: QSpec, gram: torch.Tensor | None) -> torch.Tensor:
        """The fake-quantized weight (no gradient); ``gram``: the layer's input Gram matrix."""
        raise ValueError(f"weight format {spec.fmt} ({self.name}) cannot quantize weights")

    def weight_mask(self, w: torch.Tensor, spec: QSpec, gram: torch.Tensor | None) -> torch.Tensor:  # noqa: ARG002
        """Where the straight-through gradient of the weight passes (by default everywhere)."""
        return torch.ones_like(w, dtype=torch.bool)

    def needs_stats(self, spec: QSpec) -> bool:  # noqa: ARG002
        """Whether an activation spec needs calibration statistics (:class:`ActStats`)."""
        return True

    def act_params(self, spec: QSpec, stats: ActStats) -> ActParams:
        """The activation quantizer's parameters from the site's statistics."""
        raise ValueError(f"activation format {spec.fmt} ({self.name}) cannot quantize activations")

    def quantize_act(
        self, x: torch.Tensor, spec: QSpec, params: ActParams, channel_axis: int
    ) -> torch.Tensor:
        """The fake-quantized activation (no gradient)."""
        raise ValueError(f"activation format {spec.fmt} ({self.name}) cannot quantize activations")

    def act_mask(self, x: torch.Tensor, spec: QSpec, params: ActParams) -> torch.Tensor:  # noqa: ARG002
        """Where the straight-through gradient of the activation passes (by default everywhere)."""
        return torch.ones_like(x, dtype=torch.bool)

    # -- packed codes -----------------------------------------------------------------------
    def encode(self, w: torch.Tensor, spec: QSpec, gram: torch.Tensor | None, wq: torch.Tensor | None) -> Any:
        """Split a weight into codes and scales (an :class:`mixq.quant.codes.Encoded`)."""
        raise ValueError(f"weight format {spec.fmt} has no packed export form")

    def decode(self, enc: Any) -> torch.Tensor:
        """Rebuild the float32 fake-quantized weight from its codes."""
        raise ValueError(f"weight format {enc.spec.fmt} has no packed export form")

    def weight_tensors(self, enc: Any, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors of the packed file that hold an encoded weight (``prefix``: ``L.weight``)."""
        raise ValueError(f"weight format {enc.spec.fmt} has no packed export form")

    def read_weight(
        self, spec: QSpec, shape: tuple[int, ...], take: Callable[[str], torch.Tensor], prefix: str
    ) -> Any:
        """The encoded weight from the packed file's tensors (``take(key)`` removes and returns one)."""
        raise ValueError(f"weight format {spec.fmt} has no packed export form")

    # -- ONNX -------------------------------------------------------------------------------
    def onnx_weight(self, g: Any, enc: Any) -> tuple[torch.Tensor, torch.Tensor, int] | None:  # noqa: ARG002
        """The stored element values, zero points and ONNX element type of an encoded weight.

        None: the weight has no DequantizeLinear form and goes in as its float32 values.
        """
        return None

    def weight_nodes(self, g: Any, lx: Any, out: str, as_float: bool) -> list[Any]:
        """The ONNX nodes that produce a layer's weight as ``out`` (see :mod:`mixq.export.qdq`)."""
        return g.weight_nodes(lx, out, None if as_float else self.onnx_weight(g, lx.weight))

    def onnx_act_type(self, spec: QSpec, g: Any) -> int | None:  # noqa: ARG002
        """The ONNX element type of an input's QuantizeLinear codes; None: no QDQ form."""
        return None

    def onnx_act_bounds(  # noqa: ARG002
        self, spec: QSpec, scale: torch.Tensor, zero: torch.Tensor
    ) -> tuple[float, float] | None:
        """Clip bounds after an input's DequantizeLinear (the grid's ends), or None."""
        return None

    def act_nodes(self, g: Any, lx: Any, x: str, out: str, channels: int) -> list[Any] | None:  # noqa: ARG002
        """The nodes of an input quantizer, or None for the writer's QuantizeLinear/DequantizeLinear."""
        return None


_KINDS: list[Kind] = []  # the registry: mixq.kinds registers the built-in kinds on import


def register(kind: Kind) -> Kind:
    """Add ``kind`` to the registry (asked before every kind registered earlier); return it."""
    if not isinstance(kind, Kind):
        raise TypeError(f"expected a mixq.kinds.Kind, got {type(kind).__name__}")
    if kind not in _KINDS:
        _KINDS.append(kind)
    return kind


def unregister(kind: Kind) -> None:
    """Remove a kind added with :func:`register`."""
    if kind in _KINDS:
        _KINDS.remove(kind)


def kinds() -> tuple[Kind, ...]:
    """The registered kinds, the one asked first last."""
    return tuple(_KINDS)


def kind_of(spec: QSpec) -> Kind:
    """The kind of a quantization spec.

    >>> from mixq.plan import parse_candidate
    >>> kind_of(parse_candidate("w4").weight).name, kind_of(parse_candidate("wmxfp4_e2m1").weight).name
    ('integer', 'mx')
    """
    for kind in reversed(_KINDS):
        if kind.matches(spec):
            return kind
    raise TypeError(f"no format kind for spec with format {spec.fmt!r}; kinds: {[k.name for k in kinds()]}")


def kind_of_format(fmt: Format) -> Kind:
    """The kind that owns a format value (a spec's kind before its other fields are known)."""
    for kind in reversed(_KINDS):
        if isinstance(fmt, kind.formats):
            return kind
    raise TypeError(f"no format kind for format {fmt!r}; kinds: {[k.name for k in kinds()]}")
