"""Quantization sites and the quantized layers that hold them.

A :class:`Quantizer` is a site that applies one :class:`~mixq.plan.QSpec` (or nothing) to a
tensor. :class:`QLinear`, :class:`QConv2d`, :class:`QConv1d` and :class:`QCall` (any layer whose
own forward reads its weight: subclasses, embeddings) share their parameters with the float
module they replace and hold two sites: ``weight_quant`` and ``input_quant``. With no spec on
either site they compute exactly what the float module computes. :mod:`mixq.wrap` picks the
class for each layer.

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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

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
        if _tracing():  # torch.export / torch.compile: the weight is a graph input, no cache
            return kind.quantize_weight(w, spec, self._gram())
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


def _tracing() -> bool:
    """Whether torch.export or torch.compile is tracing (data-dependent checks cannot run)."""
    return torch.compiler.is_exporting() or torch.compiler.is_compiling()


class QLinear(nn.Module):
    """A Linear layer with a weight site and an input-activation site; shares ``m``'s parameters.

    ``transposed``: ``m`` stores its weight as [in, out] and computes ``x @ weight + bias``
    (transformers' ``Conv1D``, GPT-2's layers). The site's weight is then a Parameter on the
    same storage seen as [out, in], so per-output-channel scales run along the output axis and
    every method sees a Linear; an in-place change reaches ``m``'s weight. It exports as a
    Linear layer (:class:`mixq.export.modules.DeployLinear` in place of ``m``).
    """

    exportable = True  # the packed and ONNX exports take it (mixq.export.deploy)

    def __init__(self, m: nn.Module, transposed: bool = False) -> None:
        super().__init__()
        if transposed:
            self.in_features, self.out_features = m.weight.shape
            self.weight = nn.Parameter(m.weight.detach().t(), requires_grad=m.weight.requires_grad)
        else:
            self.in_features, self.out_features = m.in_features, m.out_features
            self.weight = m.weight
        self.transposed = transposed
        self.bias = m.bias
        self.weight_quant = Quantizer("weight")
        self.input_quant = Quantizer("act", channel_axis=-1)
        object.__setattr__(self, "float_module", m)  # not a submodule: unwrap puts it back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_quant(self.weight)
        if self.transposed:  # a contiguous [out, in] weight, as the deployed layer's (same kernel, same bits)
            w = w.contiguous()
        return F.linear(self.input_quant(x), w, self.bias)

    def forward_with(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """The layer's output for input ``x`` with weight ``w`` and bias ``b`` (no input site)."""
        return F.linear(x, w, b)

    def input_columns(self, x: torch.Tensor) -> torch.Tensor:
        """Return the input rows as one group, float64 [1, N, in_features] (see QConv2d.input_columns)."""
        return x.reshape(1, -1, self.in_features).double()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class QConv2d(nn.Module):
    """A Conv2d (grouped and depthwise too) with weight and input sites; shares ``m``'s parameters."""

    exportable = True

    def __init__(self, m: nn.Conv2d | nn.Conv1d) -> None:
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

    def forward_with(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """The layer's output for input ``x`` with weight ``w`` and bias ``b`` (no input site)."""
        return self.float_module._conv_forward(x, w, b)

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


class QConv1d(QConv2d):
    """A Conv1d (weight [out, in/groups, k]) with weight and input sites; shares ``m``'s parameters.

    The packed and ONNX exports run it as the layer's own forward (``DeployCall``).
    """

    def input_columns(self, x: torch.Tensor) -> torch.Tensor:
        """Return the input patches per group, [G, N * positions, C_in/G * k] (a Conv2d of height 1)."""
        m = self.float_module
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x, padding = F.pad(x, m._reversed_padding_repeated_twice, mode=mode), 0
        else:
            padding = self.padding[0]
        x = x.double().unsqueeze(2)  # [N, C, 1, L]
        cols = F.unfold(x, (1, *self.kernel_size), (1, *self.dilation), (0, padding), (1, *self.stride))
        n, k, positions = cols.shape
        cols = cols.reshape(n, self.groups, k // self.groups, positions)
        return cols.permute(1, 0, 3, 2).reshape(self.groups, n * positions, k // self.groups)


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_WEIGHT_FUNCS: dict[Callable, tuple[str, ...]] = {
    F.linear: ("input", "weight", "bias"),
    F.conv1d: _CONV_ARGS,
    F.conv2d: _CONV_ARGS,
}  # the calls whose weight operand QCall.input_columns looks for, with their arguments in order

LAYOUTS = ("linear", "conv", "embedding")  # what a QCall's weight is: [out, in], [out, in/g, *k], [rows, dim]


class QCall(nn.Module):
    """A site around any layer whose own ``forward`` reads ``self.weight``: subclasses of
    nn.Linear, nn.Conv1d and nn.Conv2d with a forward of their own (e.g. a "same"-padding conv
    that pads, then calls ``F.conv2d(x, self.weight, ...)``), and nn.Embedding (weight-only).

    The layer's own forward runs (``torch.func.functional_call``) with the fake-quantized
    weight in place of ``weight``, after the input site. The site holds the layer's parameters,
    buffers and children under their own names, so the wrapped model's state_dict keys are the
    float model's; the layer itself is ``float_module`` (not a submodule; unwrap puts it back).
    With no spec it computes exactly what the layer computes.

    An embedding's input is indices: its input site is never applied (``weight_only``). The packed
    and ONNX exports take every QCall (``mixq.export.modules.DeployCall`` runs the layer's own
    forward with the dequantized weight).
    """

    exportable = True

    def __init__(self, m: nn.Module, layout: str) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
        self.layout = layout
        self.weight_only = layout == "embedding"
        for name, p in m._parameters.items():
            setattr(self, name, p)
        for name, b in m._buffers.items():
            self.register_buffer(name, b, persistent=name not in m._non_persistent_buffers_set)
        for name, child in m._modules.items():
            self.add_module(name, child)
        if "bias" not in m._parameters:
            self.bias = None
        if layout == "linear":
            self.in_features, self.out_features = m.in_features, m.out_features
        elif layout == "conv":
            self.in_channels, self.out_channels, self.groups = m.in_channels, m.out_channels, m.groups
        self.weight_quant = Quantizer("weight")
        self.input_quant = Quantizer("act", channel_axis=1 if layout == "conv" else -1)
        object.__setattr__(self, "float_module", m)

    def _tensors(self, w: torch.Tensor, b: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        m = self.float_module
        out: dict[str, torch.Tensor | None] = {n: getattr(self, n) for n in m._parameters}
        out.update({n: getattr(self, n) for n in m._buffers})
        out["weight"] = w
        if "bias" in m._parameters:
            out["bias"] = b
        return {k: v for k, v in out.items() if v is not None}

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.weight_only:
            x = self.input_quant(x)
        w = self.weight_quant(self.weight)
        return torch.func.functional_call(self.float_module, self._tensors(w, self.bias), (x, *args), kwargs)

    def forward_with(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """The layer's own output for input ``x`` with weight ``w`` and bias ``b`` (no input site)."""
        return torch.func.functional_call(self.float_module, self._tensors(w, b), (x,))

    def input_columns(self, x: torch.Tensor) -> torch.Tensor:
        """The input columns of the conv or linear operation the layer's own forward runs on
        input ``x`` (see QConv2d.input_columns): its forward runs once more, and the call that
        reads the weight (``F.linear``, ``F.conv1d``, ``F.conv2d``) gives the operand and the
        stride, padding, dilation and groups, a padding the forward adds itself included."""
        if self.layout == "embedding":
            raise ValueError("an embedding's input is indices: it has no input Gram matrix")
        func, a = self._weight_call(x)
        if func is F.linear:
            return a["input"].reshape(1, -1, self.in_features).double()
        cls, plain = (QConv1d, nn.Conv1d) if func is F.conv1d else (QConv2d, nn.Conv2d)
        w = a["weight"]
        conv = plain(
            w.shape[1] * a.get("groups", 1),
            w.shape[0],
            tuple(w.shape[2:]),
            a.get("stride", 1),
            a.get("padding", 0),
            a.get("dilation", 1),
            a.get("groups", 1),
            bias=False,
            device="meta",
        )
        return cls(conv).input_columns(a["input"])

    @torch.no_grad()
    def _weight_call(self, x: torch.Tensor) -> tuple[Callable, dict[str, object]]:
        """The function and the arguments, by name, of the first linear or conv call that reads
        the weight while the layer's own forward runs on ``x``."""
        calls: list[tuple[Callable, dict[str, object]]] = []
        weight = self.weight

        class Capture(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in _WEIGHT_FUNCS and not calls:
                    named = dict(zip(_WEIGHT_FUNCS[func], args, strict=False)) | kwargs
                    if named.get("weight") is weight:
                        calls.append((func, named))
                return func(*args, **kwargs)

        with Capture():
            torch.func.functional_call(self.float_module, self._tensors(weight, self.bias), (x,))
        if not calls:
            raise ValueError(
                f"the forward of {type(self.float_module).__name__} calls no F.linear, F.conv1d or "
                "F.conv2d with its weight: mixq cannot find its input columns (clip 'omse')"
            )
        return calls[0]

    def extra_repr(self) -> str:
        return f"{type(self.float_module).__name__}, layout={self.layout}"


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


QModule = QLinear | QConv2d | QCall
