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

import torch
import torch.nn.functional as F
from torch import nn

from mixq import formats
from mixq.formats import Mx, Sparq
from mixq.plan import QSpec
from mixq.quant import fake, multipoint, sparq

SAMPLE_SIZE = 1 << 16  # activation values kept per site for percentile and MSE ranges
SAMPLE_PER_BATCH = 1 << 13


class Quantizer(nn.Module):
    """A quantization site for a weight or an input activation.

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
        self._gen = torch.Generator().manual_seed(0)
        self._cache: tuple | None = None
        self.gram: torch.Tensor | None = None  # weights: the layer's input Gram matrix [G, k, k]
        self.collect_gram = False
        # weights: (spec, float weight, quantized weight) set by a PTQ step such as AdaRound
        self.fixed: tuple[QSpec, torch.Tensor, torch.Tensor] | None = None

    def set_spec(self, spec: QSpec | None) -> None:
        """Set the spec (None: pass through) and drop cached values."""
        if spec is not None and not isinstance(spec, QSpec):
            raise TypeError(f"expected a QSpec or None, got {type(spec).__name__}")
        if spec is not None and self.kind == "weight" and isinstance(spec.fmt, Sparq):
            raise ValueError(f"{spec.fmt} is an activation format; a weight site cannot use it")
        if spec != self.spec:
            self.spec = spec
            self._cache = None

    def extra_repr(self) -> str:
        return f"kind={self.kind}, spec={self.spec}"

    # -- activation statistics -------------------------------------------------------------
    def reset_stats(self) -> None:
        """Forget recorded statistics."""
        self.stats_min = self.stats_max = self.sample = None
        self._gen.manual_seed(0)
        self._cache = None

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
        self._cache = None

    def _act_params(self, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stats_min is None or self.sample is None:
            raise RuntimeError(
                "an activation site has no calibration statistics; run "
                "mixq.calibrate(qmodel, batches) before applying activation specs"
            )
        row = self.sample.reshape(1, -1)
        if spec.clip == "minmax":
            return fake.scale_zero(self.stats_min.reshape(1), self.stats_max.reshape(1), spec)
        return fake.calibrate_rows(row, spec)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
        spec = self.spec
        if spec is None:
            return x
        if self.kind == "weight":
            return self._weight(x, spec)
        if isinstance(spec.fmt, Mx):
            xq = formats.mx_quantize(x, spec.fmt, axis=self.channel_axis)
            return fake.straight_through(x, xq, torch.ones_like(x, dtype=torch.bool))
        if isinstance(spec.fmt, Sparq):
            return self._sparq(x, spec)
        if self._cache is None:
            self._cache = self._act_params(spec)
        scale, zero = self._cache
        rows = x.reshape(1, -1)
        xq = fake.quantize_rows(rows.detach(), scale, zero, spec).reshape(x.shape)
        if torch.is_grad_enabled() and x.requires_grad:
            inside = fake.clip_mask(rows, scale[:, None], zero[:, None], spec).reshape(x.shape)
            return fake.straight_through(x, xq, inside)
        return xq

    def sparq_params(self) -> tuple[torch.Tensor, torch.Tensor, QSpec]:
        """Return (scale, zero point, 8-bit base spec) of a site with a SPARQ activation spec.

        The base spec is unsigned 8-bit for a non-negative site and, for a site whose calibrated
        minimum is negative (outside SPARQ), the plain 8-bit asymmetric code (see `sparq_fallback`).
        """
        spec = self.spec
        if spec is None or not isinstance(spec.fmt, Sparq):
            raise ValueError(f"site has no SPARQ activation spec (spec: {spec})")
        if self._cache is None:
            if self.stats_min is None:
                self._act_params(spec)  # raises the missing-calibration error
            base = sparq.base_spec(spec, signed=bool(self.stats_min < 0))
            self._cache = (*self._act_params(base), base)
        return self._cache

    @property
    def sparq_fallback(self) -> bool:
        """Whether this SPARQ site is signed and falls back to the plain 8-bit asymmetric code."""
        return not self.sparq_params()[2].symmetric

    def _sparq(self, x: torch.Tensor, spec: QSpec) -> torch.Tensor:
        scale, zero, base = self.sparq_params()
        rows = x.reshape(1, -1)
        if base.symmetric:
            xq = sparq.fake_quantize(x.detach(), scale[0], spec.fmt, self.channel_axis)
        else:
            xq = fake.quantize_rows(rows.detach(), scale, zero, base).reshape(x.shape)
        if torch.is_grad_enabled() and x.requires_grad:
            inside = fake.clip_mask(rows, scale[:, None], zero[:, None], base).reshape(x.shape)
            return fake.straight_through(x, xq, inside)
        return xq

    @torch.no_grad()
    def add_gram(self, cols: torch.Tensor) -> None:
        """Accumulate the Gram matrix of a layer's input columns ``cols`` [G, N, k]."""
        g = torch.bmm(cols.transpose(1, 2), cols.double())
        self.gram = g if self.gram is None else self.gram + g
        self._cache = None

    def fix_weight(self, spec: QSpec, w: torch.Tensor, wq: torch.Tensor) -> None:
        """Use ``wq`` as the quantized weight while the spec is ``spec`` and the weight equals ``w``.

        PTQ steps that choose the rounding (AdaRound) store their result here, so it survives later
        forwards and plan switches; another spec or changed weights fall back to plain rounding.
        """
        if wq.shape != w.shape:
            raise ValueError(
                f"fixed weight shape {tuple(wq.shape)} differs from the weight's {tuple(w.shape)}"
            )
        self.fixed = (spec, w.detach().clone(), wq.detach().clone())

    def _weight(self, w: torch.Tensor, spec: QSpec) -> torch.Tensor:
        f = self.fixed
        if f is not None and f[0] == spec and f[1].shape == w.shape and torch.equal(f[1], w.detach()):
            if torch.is_grad_enabled() and w.requires_grad:
                return fake.straight_through(w, f[2], self._weight_mask(w, spec))
            return f[2]
        # The cache is keyed by the weight's values: `w.data.mul_()` and `load_state_dict` do not
        # always bump `w._version`. A value made under inference_mode is not reused outside it
        # (autograd cannot save inference tensors for backward).
        c = self._cache
        if (
            c is None
            or c[0].shape != w.shape
            or c[0].dtype != w.dtype
            or not torch.equal(c[0], w.detach())
            or (c[1].is_inference() and not torch.is_inference_mode_enabled())
        ):
            gram = self.gram.float() if self.gram is not None else None
            wq_new = (multipoint.quantize_weight(w, spec) if spec.points is not None
                      else fake.quantize_weight(w, spec, gram))  # fmt: skip
            self._cache = (w.detach().clone(), wq_new)
        wq = self._cache[1]
        if torch.is_grad_enabled() and w.requires_grad:
            if len(self._cache) == 2:  # the mask's range search runs once per weight value
                self._cache = (*self._cache, self._weight_mask(w, spec))
            return fake.straight_through(w, wq, self._cache[2])
        return wq

    def _weight_mask(self, w: torch.Tensor, spec: QSpec) -> torch.Tensor:
        if isinstance(spec.fmt, Mx) or spec.points is not None:  # multipoint: nothing is clipped
            return torch.ones_like(w, dtype=torch.bool)
        rows = fake.to_rows(w.detach().float(), spec)
        gram = self.gram.float() if self.gram is not None else None
        error = fake.output_error(gram, spec, w.shape[0]) if gram is not None else None
        scale, zero = fake.calibrate_rows(rows.data, spec, error)
        inside = fake.clip_mask(rows.data, scale[:, None], zero[:, None], spec)
        return fake.from_rows(rows, inside.to(w.dtype)).bool()


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
        if self.weight_quant.collect_gram:
            self.weight_quant.add_gram(x.detach().reshape(1, -1, self.in_features).double())
        return F.linear(self.input_quant(x), self.weight_quant(self.weight), self.bias)

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
        if self.weight_quant.collect_gram:
            self.weight_quant.add_gram(self.input_columns(x.detach()))
        return m._conv_forward(self.input_quant(x), self.weight_quant(self.weight), self.bias)

    def input_columns(self, x: torch.Tensor) -> torch.Tensor:
        """Return the im2col input patches per group, [G, N * positions, C_in/G * kh * kw]."""
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            x = F.pad(x, self.float_module._reversed_padding_repeated_twice, mode="constant"
                      if self.padding_mode == "zeros" else self.padding_mode)  # fmt: skip
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
