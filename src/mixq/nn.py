"""Quantization sites and the quantized layers that hold them.

A :class:`Quantizer` is a site that applies one :class:`~mixq.plan.QSpec` (or nothing) to a
tensor. :class:`QLinear` and :class:`QConv2d` share their parameters with the float module they
replace and hold two sites: ``weight_quant`` and ``input_quant``. With no spec on either site
they compute exactly what the float module computes.

A residual addition written as an :class:`Add` module (``self.add(out, shortcut)``, as the zoo's
ResNet and MobileNetV2 blocks do) becomes a :class:`QAdd` with one activation site per operand:
off by default, and set by a plan's ``meta["adds"]`` (see :mod:`mixq.wrap`). With both operands
quantized, ONNX Runtime runs the addition in integers (QLinearAdd), and the convs that feed it
in its integer kernels, instead of leaving the residual path in float32.

Activation sites record statistics of their float input while observing (running min/max and a
fixed-size sample); every activation spec derives its range from those statistics, so specs can
be switched without calibrating again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mixq.kinds import ActParams, ActStats, kind_of
from mixq.plan import QSpec
from mixq.quant import fake

SAMPLE_SIZE = 1 << 16  # activation values kept per site for percentile and MSE ranges
SAMPLE_PER_BATCH = 1 << 13
LOW_PRECISION = (torch.float16, torch.bfloat16)  # model dtypes whose sites compute in float32


class Rounding(Protocol):
    """A rounding chosen outside the site (AdaRound): the quantized weight, or None to round."""

    def __call__(self, w: torch.Tensor, spec: QSpec) -> torch.Tensor | None: ...


@dataclass
class _WeightCache:
    """A weight site's quantized weight, keyed by the weight's values, and its STE mask."""

    w: torch.Tensor
    wq: torch.Tensor
    mask: torch.Tensor | None = None


class Quantizer(nn.Module):
    """A quantization site for a weight or an input activation.

    The spec's format kind (:func:`mixq.kinds.kind_of`) does the quantizing; the site holds
    what it needs: the spec, an activation site's calibration statistics (``stats_min``,
    ``stats_max``, ``sample``), a weight site's input Gram matrix (``gram``, handed over by
    calibration, for clip "omse"), an optional rounding chosen outside (:meth:`set_rounding`)
    and a cache of the quantized weight or the activation parameters. Methods change a site
    through its public methods only.

    Args:
        kind: "weight" or "act".
        channel_axis: for activations, the channel axis (MX blocks run along it).
    """

    def __init__(self, kind: str, channel_axis: int = -1) -> None:
        super().__init__()
        if kind not in ("weight", "act"):
            raise ValueError(f"unknown site kind {kind!r}; valid: 'weight', 'act'")
        self.kind = kind
        self.channel_axis = channel_axis
        self.spec: QSpec | None = None
        self.observing = False
        self.stats_min: torch.Tensor | None = None
        self.stats_max: torch.Tensor | None = None
        self.sample: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None  # weights: the layer's input Gram matrix [G, k, k]
        self.rounding: Rounding | None = None  # weights: see set_rounding
        self._gen = torch.Generator().manual_seed(0)
        self._weight_cache: _WeightCache | None = None
        self._params: ActParams | None = None

    def _drop_caches(self) -> None:
        self._weight_cache = None
        self._params = None

    def set_spec(self, spec: QSpec | None) -> None:
        """Set the spec (None: pass through) and drop cached values."""
        if spec is not None and not isinstance(spec, QSpec):
            raise TypeError(f"expected a QSpec or None, got {type(spec).__name__}")
        if spec is not None and self.kind == "weight" and kind_of(spec).act_only:
            raise ValueError(f"{spec.fmt} is an activation format; a weight site cannot use it")
        if spec != self.spec:
            self.spec = spec
            self._drop_caches()

    def set_gram(self, gram: torch.Tensor | None) -> None:
        """Use ``gram`` (float64 [G, k, k], the layer's input Gram matrix) for clip "omse"; None: none."""
        self.gram = gram
        self._drop_caches()

    def set_rounding(self, rounding: Rounding | None) -> None:
        """Let ``rounding(w, spec)`` choose the quantized weight (None from it: plain rounding).

        PTQ steps that choose the rounding (AdaRound, :class:`mixq.ptq.adaround.FixedRounding`)
        keep their result in ``rounding``, so it survives later forwards and plan switches.
        """
        self.rounding = rounding

    def extra_repr(self) -> str:
        return f"kind={self.kind}, spec={self.spec}"

    # -- activation statistics -------------------------------------------------------------
    def reset_stats(self) -> None:
        """Forget recorded statistics."""
        self.stats_min = self.stats_max = self.sample = None
        self._gen.manual_seed(0)
        self._drop_caches()

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Replace the recorded range (e.g. by one a method learned; the sample stays)."""
        self.stats_min, self.stats_max = lo, hi
        self._drop_caches()

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Record the running range and a random sample of ``x``'s values."""
        flat = x.detach().float().reshape(-1)
        if flat.numel() == 0:
            return
        if not torch.isfinite(flat).all():
            raise ValueError(f"non-finite values reach an activation site ({self.kind})")
        lo, hi = flat.min(), flat.max()
        self.stats_min = lo if self.stats_min is None else torch.minimum(self.stats_min, lo)
        self.stats_max = hi if self.stats_max is None else torch.maximum(self.stats_max, hi)
        n = min(flat.numel(), SAMPLE_PER_BATCH)
        pick = flat[torch.randint(flat.numel(), (n,), generator=self._gen)]
        self.sample = pick if self.sample is None else torch.cat([self.sample, pick])
        if self.sample.numel() > SAMPLE_SIZE:
            keep = torch.randperm(self.sample.numel(), generator=self._gen)[:SAMPLE_SIZE]
            self.sample = self.sample[keep]
        self._drop_caches()

    def act_params(self) -> ActParams:
        """The parameters of an activation site's spec (scale, zero point, code spec), from its statistics."""
        spec = self.spec
        if spec is None:
            raise ValueError("the site has no spec")
        if self._params is None:
            kind = kind_of(spec)
            if kind.needs_stats(spec) and (self.stats_min is None or self.sample is None):
                raise RuntimeError(
                    "an activation site has no calibration statistics; run "
                    "mixq.calibrate(qmodel, batches) before applying activation specs"
                )
            self._params = kind.act_params(spec, ActStats(self.stats_min, self.stats_max, self.sample))
        return self._params

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
        spec = self.spec
        if spec is None:
            return x
        if x.dtype in LOW_PRECISION:  # computed in float32, returned in the model's dtype
            return self._quantize(x.float(), spec).to(x.dtype)
        return self._quantize(x, spec)

    def _quantize(self, x: torch.Tensor, spec: QSpec) -> torch.Tensor:
        if self.kind == "weight":
            return self._weight(x, spec)
        kind = kind_of(spec)
        params = self.act_params()
        xq = kind.quantize_act(x.detach(), spec, params, self.channel_axis)
        if torch.is_grad_enabled() and x.requires_grad:
            return fake.straight_through(x, xq, kind.act_mask(x.detach(), spec, params))
        return xq

    def _gram(self) -> torch.Tensor | None:
        return self.gram.float() if self.gram is not None else None

    def _weight(self, w: torch.Tensor, spec: QSpec) -> torch.Tensor:
        kind = kind_of(spec)
        grad = torch.is_grad_enabled() and w.requires_grad
        wq = self.rounding(w, spec) if self.rounding is not None else None
        if wq is not None:
            return fake.straight_through(w, wq, kind.weight_mask(w, spec, self._gram())) if grad else wq
        # The cache is keyed by the weight's values: `w.data.mul_()` and `load_state_dict` do not
        # always bump `w._version`. A value made under inference_mode is not reused outside it
        # (autograd cannot save inference tensors for backward).
        c = self._weight_cache
        if (
            c is None
            or c.w.shape != w.shape
            or c.w.dtype != w.dtype
            or not torch.equal(c.w, w.detach())
            or (c.wq.is_inference() and not torch.is_inference_mode_enabled())
        ):
            wq = kind.quantize_weight(w, spec, self._gram())
            c = self._weight_cache = _WeightCache(w.detach().clone(), wq)
        if grad:
            if c.mask is None:  # the mask's range search runs once per weight value
                c.mask = kind.weight_mask(w, spec, self._gram())
            return fake.straight_through(w, c.wq, c.mask)
        return c.wq


class QLinear(nn.Module):
    """A Linear layer with a weight site and an input-activation site; shares ``m``'s parameters."""

    def __init__(self, m: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = m.in_features, m.out_features
        self.weight = m.weight
        self.bias = m.bias
        self.weight_quant = Quantizer("weight")
        self.input_quant = Quantizer("act", channel_axis=-1)
        object.__setattr__(self, "float_module", m)  # not a submodule: unwrap puts it back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quant(x), self.weight_quant(self.weight), self.bias)

    def input_columns(self, x: torch.Tensor) -> torch.Tensor:
        """Return the input rows as one group, float64 [1, N, in_features] (see QConv2d.input_columns)."""
        return x.reshape(1, -1, self.in_features).double()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class QConv2d(nn.Module):
    """A Conv2d (grouped and depthwise too) with weight and input sites; shares ``m``'s parameters."""

    def __init__(self, m: nn.Conv2d) -> None:
        super().__init__()
        self.in_channels, self.out_channels = m.in_channels, m.out_channels
        self.kernel_size, self.stride, self.padding = m.kernel_size, m.stride, m.padding
        self.dilation, self.groups, self.padding_mode = m.dilation, m.groups, m.padding_mode
        self.weight = m.weight
        self.bias = m.bias
        self.weight_quant = Quantizer("weight")
        self.input_quant = Quantizer("act", channel_axis=1)
        object.__setattr__(self, "float_module", m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m: nn.Conv2d = self.float_module
        return m._conv_forward(self.input_quant(x), self.weight_quant(self.weight), self.bias)

    def input_columns(self, x: torch.Tensor) -> torch.Tensor:
        """Return the im2col input patches per group, [G, N * positions, C_in/G * kh * kw]."""
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            x = F.pad(
                x,
                self.float_module._reversed_padding_repeated_twice,
                mode="constant" if self.padding_mode == "zeros" else self.padding_mode,
            )
            padding = 0
        else:
            padding = self.padding
        cols = F.unfold(x.double(), self.kernel_size, self.dilation, padding, self.stride)
        n, k, positions = cols.shape
        cols = cols.reshape(n, self.groups, k // self.groups, positions)
        return cols.permute(1, 0, 3, 2).reshape(self.groups, n * positions, k // self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, groups={self.groups}"
        )


class Add(nn.Module):
    """``a + b`` as a module, so that :func:`mixq.wrap` can quantize both operands of the sum."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class QAdd(nn.Module):
    """An :class:`Add` with an activation site per operand: ``quant[0](a) + quant[1](b)``.

    With no spec on the sites it computes exactly what :class:`Add` computes.
    """

    def __init__(self, m: Add) -> None:
        super().__init__()
        self.quant = nn.ModuleList([Quantizer("act", channel_axis=1), Quantizer("act", channel_axis=1)])
        object.__setattr__(self, "float_module", m)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.quant[0](a) + self.quant[1](b)


QModule = QLinear | QConv2d
