"""Cross-layer equalization (CLE), a data-free rescaling of consecutive layers.

Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction", ICCV
2019, §4.1. For a layer A whose output channel ``i`` feeds input channel ``i`` of the next layer
B through positively homogeneous operations only (ReLU, max or average pooling, flatten,
identity, dropout, zero/reflection/replication padding), ``f(x / s) = f(x) / s`` for ``s > 0``,
so dividing A's row ``i`` and bias by ``s_i`` and multiplying B's input channel ``i`` by ``s_i``
leaves the network's function unchanged. With ``r1_i`` the range (max |w|) of A's output channel
``i`` and ``r2_i`` that of B's input channel ``i``, the choice ``s_i = sqrt(r1_i / r2_i)`` makes
both ranges ``sqrt(r1_i r2_i)``, which the paper shows maximizes the summed relative precision
of the pair. Chains of layers are equalized by sweeping over the pairs until the scales stop
changing.

Depthwise-separable pairs are included: a depthwise layer's input channel ``i`` is its output
channel ``i``. A convolution feeding a linear layer through a flatten scales each channel's
block of ``H*W`` input features.

ReLU6 (MobileNet) is not positively homogeneous. Options (``Config.relu6``): ``"clamp"``
(default, a mixq choice) replaces it by a per-channel clamp to ``[0, 6 / s_i]``, which keeps the
function exactly; ``"relu"`` replaces it by ReLU as the paper does for MobileNetV2 (changes the
function where activations exceed 6); ``"skip"`` leaves such pairs alone.

A pair that cannot be equalized without changing the function is skipped and named in the
record (``skipped``: ``[first, second, reason]``), never approximated: a layer or a ReLU6 called
at more than one place (a shared module would be rescaled for its other uses too; one ReLU6
module reused through a network is common), a layer subclass with its own forward (it may not
use its weight linearly), a linear layer's multi-dimensional output flattened (its features
interleave the channels). Layers and clamps are leaves of the fx trace. With a calibration batch
(``example``, as in ``mixq.run``) the outputs are compared with the original's after
equalization; should they differ beyond fp32 rounding, every change is undone and named.

Deviations: the paper's bias absorption (§4.1.2) is not implemented. Batch norm between the
layers must be folded first (``mixq.fold``; ``mixq.run`` does it): a BN is not homogeneous.

CLE is a float-model transform: mixq applies it before calibration and before the method
chooses its plan, so ranges and sensitivities are measured on the weights that are quantized.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from mixq.fold import max_abs_diff, outputs_differ
from mixq.progress import progress

log = logging.getLogger(__name__)

LAYERS = (nn.Conv2d, nn.Linear)
# per-channel positively homogeneous modules: f(x / s) = f(x) / s for s > 0 on each channel
HOMOGENEOUS = (
    nn.ReLU,
    nn.Identity,
    nn.Dropout,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.ReflectionPad2d,
    nn.ReplicationPad2d,
    nn.CircularPad2d,
)
ZERO_PADS = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)  # ZeroPad*d among them
HOMOGENEOUS_FUNCS = (F.relu, torch.relu)
RELU6_MODES = ("clamp", "relu", "skip")


@dataclass(frozen=True)
class Config:
    """Settings of cross-layer equalization.

    Attributes:
        relu6: how pairs joined by a ReLU6 are handled: "clamp", "relu" or "skip".
        max_sweeps: passes over all pairs at most.
        tol: stop when every scale of a sweep is within ``1 +- tol``.
    """

    relu6: str = "clamp"
    max_sweeps: int = 100
    tol: float = 1e-4

    def __post_init__(self) -> None:
        if self.relu6 not in RELU6_MODES:
            raise ValueError(f"unknown relu6 {self.relu6!r}; valid: {', '.join(RELU6_MODES)}")
        if self.max_sweeps < 1 or not self.tol > 0:
            raise ValueError(f"max_sweeps must be >= 1 and tol > 0, got {self.max_sweeps}, {self.tol}")


class ChannelClamp(nn.Module):
    """``clamp(x, 0, upper[c])`` per channel: ReLU6 after its channels were rescaled by CLE.

    Args:
        upper: the upper bound per channel [C].
        axis: the channel axis (1 for convolution outputs, -1 for linear outputs).
    """

    def __init__(self, upper: torch.Tensor, axis: int) -> None:
        super().__init__()
        self.register_buffer("upper", upper.detach().clone())
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return torch.minimum(x.clamp_min(0), self.upper.reshape(shape))

    def extra_repr(self) -> str:
        return f"channels={self.upper.numel()}, axis={self.axis}"


@dataclass(frozen=True)
class Pair:
    """Two consecutive layers: ``first``'s output channels are ``second``'s input channels.

    Attributes:
        first, second: module names.
        repeat: input features of ``second`` per channel of ``first`` (``H*W`` after a flatten).
        relu6: names of the ReLU6 modules between them.
    """

    first: str
    second: str
    repeat: int = 1
    relu6: tuple[str, ...] = ()


@dataclass(frozen=True)
class Skipped:
    """Two layers CLE could pair but leaves alone, because equalizing them would change the model.

    Attributes:
        first, second: module names; reason: why.
    """

    first: str
    second: str
    reason: str


def _is_relu6(m: nn.Module) -> bool:
    return isinstance(m, nn.ReLU6) or (isinstance(m, nn.Hardtanh) and m.min_val == 0.0 and m.max_val == 6.0)


def _plain(m: nn.Module) -> bool:
    """A layer whose forward is its class's own (a subclass may change what the weight does)."""
    return type(m).forward in (nn.Conv2d.forward, nn.Linear.forward)


def _homogeneous(m: nn.Module) -> bool:
    return isinstance(m, HOMOGENEOUS) or (isinstance(m, ZERO_PADS) and m.value == 0)


def _link(model: nn.Module, node: fx.Node) -> str | None:
    """What ``node`` is in a chain between two layers: "layer" (the chain's end), "flatten",
    "clamp" (a ReLU6 or a ChannelClamp), "through" (another homogeneous op), or None (the
    chain is not homogeneous)."""
    if node.op == "call_module":
        m = model.get_submodule(str(node.target))
        if isinstance(m, LAYERS):
            return "layer"
        if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            return "flatten"
        if _is_relu6(m) or isinstance(m, ChannelClamp):
            return "clamp"
        return "through" if _homogeneous(m) else None
    if node.op == "call_function" and node.target is torch.flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return "flatten" if start == 1 else None
    return "through" if node.op == "call_function" and node.target in HOMOGENEOUS_FUNCS else None


def _chain(model: nn.Module, node: fx.Node) -> tuple[fx.Node, bool, list[str]] | None:
    """The next layer's node along the single-user homogeneous chain from ``node``, whether the
    chain flattens, and its clamps (ReLU6); None if the chain is not homogeneous."""
    cur, flatten, relu6 = node, False, []
    while True:
        if len(cur.users) != 1:
            return None
        nxt = next(iter(cur.users))
        if nxt.args[:1] != (cur,):
            return None
        link = _link(model, nxt)
        if link is None:
            return None
        if link == "layer":
            return nxt, flatten, relu6
        flatten = flatten or link == "flatten"
        if link == "clamp":
            relu6.append(str(nxt.target))
        cur = nxt


def _follow(model: nn.Module, node: fx.Node, calls: Counter) -> Pair | Skipped | None:
    """The pair from layer ``node`` to the next layer, if the chain between them is homogeneous;
    Skipped when it is but equalizing would change the function."""
    chain = _chain(model, node)
    if chain is None:
        return None
    nxt, flatten, relu6 = chain
    first_name, second_name = str(node.target), str(nxt.target)
    first, second = model.get_submodule(first_name), model.get_submodule(second_name)
    channels = first.weight.shape[0]
    if isinstance(second, nn.Conv2d):
        if flatten or not isinstance(first, nn.Conv2d) or second.in_channels != channels:
            return None
        repeat = 1
    else:
        if isinstance(first, nn.Conv2d) and not flatten:
            return None
        if second.in_features % channels:
            return None
        repeat = second.in_features // channels
    why = _unsafe(model, (first_name, second_name), relu6, calls)
    if why is None and isinstance(first, nn.Linear) and repeat > 1:
        why = "a linear layer's outputs are flattened (features interleave its channels)"
    if why is not None:
        return Skipped(first_name, second_name, why)
    return Pair(first_name, second_name, repeat, tuple(relu6))


def _unsafe(model: nn.Module, layers: tuple[str, str], relu6: list[str], calls: Counter) -> str | None:
    """Why equalizing two layers joined through ``relu6`` would change the function, or None."""
    custom = [n for n in layers if not _plain(model.get_submodule(n))]
    if custom:
        return f"{', '.join(custom)} has its own forward (the rescaled weight may not act linearly)"
    shared = [n for n in (*layers, *relu6) if calls[n] > 1]
    if shared:
        places = ", ".join(f"{n} ({calls[n]} places)" for n in shared)
        return f"called at more than one place: {places}"
    return None


class _Tracer(fx.Tracer):
    """An fx tracer that keeps layers (subclasses too) and clamps as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        clamp = _is_relu6(m) or isinstance(m, ChannelClamp)
        return isinstance(m, LAYERS) or clamp or super().is_leaf_module(m, qualname)


def find_pairs(model: nn.Module) -> list[Pair]:
    """Find consecutive layer pairs on the model's FX graph (none if it cannot be traced)."""
    return [p for p in scan(model) if isinstance(p, Pair)]


def scan(model: nn.Module) -> list[Pair | Skipped]:
    """The consecutive layer pairs of the model's FX graph, and those that must be left alone.

    A pair is skipped when a layer has its own forward, or a layer or a ReLU6 between them is
    called at more than one place (rescaling it would change its other uses), or a linear
    layer's multi-dimensional output is flattened. Nothing when the model cannot be traced.
    """
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure: no pairs, logged
        log.warning("CLE: the model cannot be traced by torch.fx (%s); no pairs", type(e).__name__)
        return []
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    found: list[Pair | Skipped] = []
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(model.get_submodule(str(node.target)), LAYERS):
            item = _follow(model, node, calls)
            if item is not None and item not in found:
                found.append(item)
    return found


def output_ranges(w: torch.Tensor) -> torch.Tensor:
    """Return max |w| per output channel of a weight [out, ...].

    >>> output_ranges(torch.tensor([[1.0, -3.0], [0.5, 0.25]])).tolist()
    [3.0, 0.5]
    """
    return w.detach().abs().reshape(w.shape[0], -1).amax(1)


def input_ranges(layer: nn.Conv2d | nn.Linear, repeat: int = 1) -> torch.Tensor:
    """Return max |w| per input channel of ``layer`` (``repeat`` consecutive features per channel).

    A grouped convolution's input channel ``i`` is channel ``i % (C_in/G)`` of group ``i // (C_in/G)``.
    """
    w = layer.weight.detach().abs()
    if isinstance(layer, nn.Conv2d):
        g = layer.groups
        per_in = w.shape[1]
        return w.reshape(g, w.shape[0] // g, per_in, -1).amax(dim=(1, 3)).reshape(g * per_in)
    return w.reshape(w.shape[0], -1, repeat).amax(dim=(0, 2))


@torch.no_grad()
def scale_input(layer: nn.Conv2d | nn.Linear, s: torch.Tensor, repeat: int = 1) -> None:
    """Multiply input channel ``i`` of ``layer`` by ``s[i]`` in place."""
    w = layer.weight
    if isinstance(layer, nn.Conv2d):
        g = layer.groups
        per_in = w.shape[1]
        view = w.view(g, w.shape[0] // g, per_in, -1)
        view.mul_(s.reshape(g, 1, per_in, 1).to(w.dtype))
    else:
        w.view(w.shape[0], -1, repeat).mul_(s.reshape(1, -1, 1).to(w.dtype))


@torch.no_grad()
def equalize_pair(model: nn.Module, pair: Pair) -> torch.Tensor:
    """Equalize one pair in place and return the scales ``s`` applied (``first`` divided by ``s``)."""
    a = model.get_submodule(pair.first)
    b = model.get_submodule(pair.second)
    r1 = output_ranges(a.weight).double()
    r2 = input_ranges(b, pair.repeat).double()
    ok = (r1 > 0) & (r2 > 0)
    s = torch.where(ok, torch.sqrt(r1 / torch.where(ok, r2, 1.0)), torch.ones_like(r1))
    shape = (-1,) + (1,) * (a.weight.dim() - 1)
    a.weight.div_(s.reshape(shape).to(a.weight.dtype))
    if a.bias is not None:
        a.bias.div_(s.to(a.bias.dtype))
    scale_input(b, s, pair.repeat)
    for name in pair.relu6:
        clamp = model.get_submodule(name)
        clamp.upper.div_(s.to(clamp.upper.dtype))
    return s


def _set(model: nn.Module, name: str, child: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, child)


def _prepare_relu6(model: nn.Module, pairs: list[Pair], mode: str) -> list[Pair]:
    """Replace the ReLU6 modules of ``pairs`` per ``mode``; drop the pairs ``"skip"`` excludes."""
    if mode == "skip":
        return [p for p in pairs if not p.relu6]
    for p in pairs:
        channels = model.get_submodule(p.first).weight.shape[0]
        axis = 1 if isinstance(model.get_submodule(p.first), nn.Conv2d) else -1
        for name in p.relu6:
            m = model.get_submodule(name)
            if isinstance(m, ChannelClamp):
                continue
            new = ChannelClamp(torch.full((channels,), 6.0), axis) if mode == "clamp" else nn.ReLU()
            _set(model, name, new)
    if mode == "relu":
        pairs = [Pair(p.first, p.second, p.repeat) for p in pairs]
    return pairs


def equalize(
    model: nn.Module, cfg: Config = Config(), example: Callable[[nn.Module], Any] | None = None
) -> dict:
    """Equalize every consecutive pair of ``model`` in place (a float model, batch norm folded).

    Args:
        model: a float model in eval mode.
        cfg: the settings.
        example: runs the model on a calibration batch (``lambda m: task.forward(m, batch)``):
            the outputs after equalization are compared with those before, and if they differ
            beyond fp32 rounding (``relu6="relu"`` changes them by design) every change is undone.

    Returns:
        A record: the pairs equalized, the sweeps run, the last sweep's largest |log s|, the
        pairs skipped (``[first, second, reason]``) and, with ``example``, ``max_abs_diff``.
    """
    if model.training:
        raise ValueError("equalize a model in eval mode (call model.eval() first)")
    found = scan(model)
    pairs = [p for p in found if isinstance(p, Pair)]
    skipped = [p for p in found if isinstance(p, Skipped)]
    if cfg.relu6 == "skip":
        skipped += [
            Skipped(p.first, p.second, f"ReLU6 {', '.join(p.relu6)}: relu6='skip'") for p in pairs if p.relu6
        ]
    touched = {n for p in pairs for n in (p.first, p.second, *p.relu6)}
    originals = {n: copy.deepcopy(model.get_submodule(n)) for n in touched} if example is not None else {}
    ref = example(model) if example is not None and pairs else None
    pairs = _prepare_relu6(model, pairs, cfg.relu6)
    sweeps, change = _sweep(model, pairs, cfg)
    record: dict[str, Any] = {
        "pairs": [[p.first, p.second] for p in pairs],
        "sweeps": sweeps,
        "max_log_scale": change,
    }
    if ref is not None:
        out = example(model)
        record["max_abs_diff"] = max_abs_diff(out, ref)
        if cfg.relu6 != "relu" and outputs_differ(out, ref) is not None:
            why = f"equalizing changed the outputs by {record['max_abs_diff']:.3g}: undone"
            log.warning("CLE: %s", why)
            for n, m in originals.items():
                _set(model, n, m)
            skipped += [Skipped(p.first, p.second, why) for p in pairs]
            record.update(pairs=[], sweeps=0, max_log_scale=0.0)
    record["skipped"] = [[p.first, p.second, p.reason] for p in skipped]
    return record


def _sweep(model: nn.Module, pairs: list[Pair], cfg: Config) -> tuple[int, float]:
    """Equalize the pairs over and over until the scales settle; the sweeps run and the last change."""
    if not pairs:
        return 0, 0.0
    sweeps, change = 0, 0.0
    for sweep in progress(range(1, cfg.max_sweeps + 1), "cle", unit="sweep"):
        sweeps, change = sweep, 0.0
        for p in pairs:
            s = equalize_pair(model, p)
            change = max(change, float(s.log().abs().max()))
        if change <= cfg.tol:
            break
    return sweeps, change
