"""Cost model: parameters, MACs, storage size with every scale and zero point, BOPs, budgets.

Conventions (the same for every method, peer tool and export):

* weight storage bits of a layer = numel * element bits + scales + zero points, where a
  per-tensor or per-channel scale is float32 (32 bits), a per-group scale float16 (16 bits), an
  MX block scale E8M0 (8 bits), and an asymmetric zero point has the element's bits. A float
  layer stores float32 weights (32 bits each).
* ``avg_weight_bits`` = sum of weight storage bits / sum of weights, over the quantizable layers.
* ``size_bytes`` = the whole model: quantizable weights as above, plus float32 biases, plus the
  activation scale (32 bits) and zero point of each quantized input (the operands of quantized
  residual additions too), plus every other parameter of the model in float32 (the weights
  that stay float, ``metrics.float_layers``, among them; a float copy tied to a quantized
  layer's weight counts too).
  ``size_ratio`` = size_bytes / the float32 model's size.
* ``bops`` = sum over layers of MACs per sample * weight element bits * activation element bits,
  32 for float (docs/methods.md §6.3). MACs come from a probe forward on one batch. A SPARQ
  activation counts window plus window-position bits (:func:`spec_bits`), not just its 4 bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mixq.kinds import FLOAT_BITS, kind_of
from mixq.nn import QAdd, QCall, QLinear
from mixq.plan import LayerSpec, QSpec
from mixq.search.problem import InfeasibleBudgetError
from mixq.wrap import float_layers, is_hf_conv1d, sites, tied_sites

BUDGET_KEYS = ("avg_weight_bits", "size_bytes", "size_ratio", "bops")
COST_KEYS = ("weight_bits", "size_bits", "bops")
BUDGET_COST = {
    "avg_weight_bits": "weight_bits",
    "size_bytes": "size_bits",
    "size_ratio": "size_bits",
    "bops": "bops",
}


@dataclass(frozen=True)
class LayerInfo:
    """Static facts about one quantizable layer."""

    name: str
    kind: str  # "linear" | "conv" | "embedding"
    weight_shape: tuple[int, ...]
    bias: int  # number of bias elements
    macs: float  # per sample
    tied_to: str | None = None  # the site whose weight tensor this one shares: counted there, once

    @property
    def numel(self) -> int:
        """Number of weights."""
        return math.prod(self.weight_shape)

    @property
    def out_channels(self) -> int:
        """Rows sharing a per-channel scale."""
        return self.weight_shape[0]

    @property
    def row_len(self) -> int:
        """Weights per output channel (the reduction length)."""
        return self.numel // self.weight_shape[0]


def probe(
    model: nn.Module, batch: Any, forward: Callable[[nn.Module, Any], Any] | None = None
) -> list[LayerInfo]:
    """Run one batch through a wrapped model and record each layer's shape and MACs per sample.

    A site sharing its weight tensor with another (:func:`mixq.wrap.tied_sites`) gets ``tied_to``:
    its weights are counted once, at the other. The layers excluded from quantization (the
    model's ``mixq_excluded``, set by :func:`mixq.api.prepare`) are probed too and kept as the
    model's ``mixq_fixed`` (:func:`model_costs` counts them as float).
    """
    run = forward or (lambda m, b: m(b[0] if isinstance(b, (tuple, list)) else b))
    excluded = getattr(model, "mixq_excluded", ())
    tied = tied_sites(model)
    qlayers = {**sites(model), **{n: model.get_submodule(n) for n in excluded}}
    outs: dict[str, tuple[int, int]] = {}  # name -> (output elements over all calls, first dim)
    batch_sizes: list[int] = []

    def hook(name: str) -> Callable:
        def fn(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
            numel, first = outs.get(name, (0, out.shape[0]))
            outs[name] = (numel + out.numel(), first)  # a layer called twice does twice the work

        return fn

    def model_input(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        t = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() > 0]
        if t and not batch_sizes:
            batch_sizes.append(t[0].shape[0])

    handles = [m.register_forward_hook(hook(n)) for n, m in qlayers.items()]
    handles.append(model.register_forward_pre_hook(model_input, with_kwargs=True))
    try:
        with torch.no_grad():
            run(model, batch)
    finally:
        for h in handles:
            h.remove()
    infos = []
    for name, m in qlayers.items():
        shape = tuple(m.weight.shape)
        if is_hf_conv1d(m):
            shape = shape[::-1]  # [out, in], as its site sees it
        numel_out, first_dim = outs.get(name, (0, 1))
        # The batch is the first dimension of the model's input (a layer may see [B * T, ...]).
        batch_size = batch_sizes[0] if batch_sizes else first_dim
        kind = layer_kind(m)
        if kind == "linear":
            macs = numel_out * shape[1]  # numel_out counts every token
        elif kind == "conv":
            macs = numel_out * math.prod(shape[1:])
        else:
            macs = 0  # an embedding looks rows up: no multiply-accumulate
        infos.append(
            LayerInfo(
                name=name,
                kind=kind,
                weight_shape=shape,
                bias=0 if getattr(m, "bias", None) is None else m.bias.numel(),
                macs=macs / max(1, batch_size),
                tied_to=tied.get(name),
            )
        )
    model.mixq_fixed = tuple(i for i in infos if i.name in excluded)
    return [i for i in infos if i.name not in excluded]


def layer_kind(m: nn.Module) -> str:
    """A site's (or an excluded float layer's) kind in the cost model: "linear", "conv" or "embedding"."""
    if isinstance(m, QCall):
        return m.layout
    if isinstance(m, nn.Embedding):
        return "embedding"
    return "linear" if isinstance(m, (QLinear, nn.Linear)) or is_hf_conv1d(m) else "conv"


def weight_bits(info: LayerInfo, spec: QSpec | None) -> float:
    """Storage bits of a layer's weights under ``spec``, scales and zero points included.

    The spec's format kind counts them (:meth:`mixq.kinds.Kind.weight_bits`).

    >>> from mixq.plan import parse_candidate
    >>> info = LayerInfo("fc", "linear", (4, 256), 4, 1024.0)
    >>> weight_bits(info, parse_candidate("w4").weight)    # 1024*4 + 4 fp32 scales
    4224.0
    >>> weight_bits(info, parse_candidate("w4g128+asym").weight)  # + 8 fp16 scales, 8 4-bit zps
    4256.0
    """
    if spec is None:
        return float(info.numel * FLOAT_BITS)
    return kind_of(spec).weight_bits(spec, info)


def multipoint_bits(info: LayerInfo, spec: QSpec) -> float:
    """Storage bits of multipoint weights (QSpec.points): every point's codes and every step.

    Channel j with n_j points stores n_j * row_len codes of ``elem`` bits, a float32 first step
    and n_j − 1 float16 extra steps; with granularity "tensor" the first point of every channel
    shares one float32 step (:mod:`mixq.kinds.multipoint`).

    >>> from mixq.plan import QSpec
    >>> from mixq.formats import Int
    >>> info = LayerInfo("fc", "linear", (4, 256), 4, 1024.0)
    >>> multipoint_bits(info, QSpec(Int(4), points=(1, 1, 2, 1)))  # 5 * 256 * 4 + 4 * 32 + 16
    5264.0
    """
    return weight_bits(info, spec)


def act_param_bits(spec: QSpec | None) -> float:
    """Storage bits of an input-activation quantizer's parameters (scale and zero point)."""
    return 0.0 if spec is None else kind_of(spec).act_param_bits(spec)


def spec_bits(spec: QSpec | None) -> float:
    """Element bits used in BOPs (32 for float).

    A SPARQ activation counts its 4 window bits plus the window-position bits (and vSPARQ's
    mode bit per pair), ``formats.bits``: 7 for sparq4_5opt, 7.5 for sparq4_5opt_v.
    """
    return FLOAT_BITS if spec is None else kind_of(spec).bop_bits(spec)


def layer_bops(info: LayerInfo, spec: LayerSpec) -> float:
    """BOPs of one layer: MACs x weight bits x input bits, or what the weight's kind counts
    (multipoint: a low-bit dot product per point, a float32 merge per extra point)."""
    if spec.weight is None:
        return info.macs * FLOAT_BITS * spec_bits(spec.act)
    return kind_of(spec.weight).bops(info, spec.weight, spec_bits(spec.act))


def layer_costs(info: LayerInfo, spec: LayerSpec) -> dict[str, float]:
    """Return the weight bits, the size bits and the BOPs of one layer at ``spec``.

    A layer tied to another (``info.tied_to``) stores no weights of its own: 0 weight bits.
    """
    wb = 0.0 if info.tied_to else weight_bits(info, spec.weight)
    return {
        "weight_bits": wb,
        "size_bits": wb + info.bias * FLOAT_BITS + act_param_bits(spec.act),
        "bops": layer_bops(info, spec),
    }


def cost_table(infos: Sequence[LayerInfo], candidates: Sequence[LayerSpec]) -> dict[str, torch.Tensor]:
    """Return each cost in COST_KEYS as a float64 tensor [L, C] (layers x candidates)."""
    table = {k: torch.zeros(len(infos), len(candidates), dtype=torch.float64) for k in COST_KEYS}
    for i, info in enumerate(infos):
        for j, c in enumerate(candidates):
            for k, v in layer_costs(info, c).items():
                table[k][i, j] = v
    return table


@dataclass(frozen=True)
class ModelCosts:
    """Fixed facts of a model needed to turn budgets into per-layer constraints."""

    infos: tuple[LayerInfo, ...]
    other_params: int  # parameters outside the quantizable layers' weights and biases
    n_adds: int = 0  # residual additions (mixq.nn.QAdd sites), two quantizable operands each
    # The excluded layers (exclude=...): float in every budget; their parameters are in other_params.
    fixed: tuple[LayerInfo, ...] = ()

    @property
    def n_weights(self) -> int:
        """Weights in the quantizable layers (a tied tensor once), the excluded ones included."""
        return sum(i.numel for i in self.infos if not i.tied_to) + sum(i.numel for i in self.fixed)

    @property
    def fixed_weight_bits(self) -> float:
        """Weight bits of the excluded layers (float32)."""
        return float(sum(i.numel for i in self.fixed) * FLOAT_BITS)

    @property
    def fixed_bops(self) -> float:
        """BOPs of the excluded layers (float weights and inputs)."""
        return float(sum(i.macs for i in self.fixed) * FLOAT_BITS * FLOAT_BITS)

    @property
    def fp32_bytes(self) -> float:
        """Size of the float32 model in bytes."""
        return 4.0 * (self.other_params + sum((0 if i.tied_to else i.numel) + i.bias for i in self.infos))


def model_costs(model: nn.Module, infos: Sequence[LayerInfo]) -> ModelCosts:
    """Count the parameters outside the quantizable layers of a wrapped model.

    A float tensor tied to a quantized layer's weight (:func:`mixq.wrap.float_layers`, "tied
    to ...") counts too: the module that reads it needs the float copy.
    """
    inside = {id(p) for m in sites(model).values() for p in (m.weight, m.bias) if p is not None}
    other = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    params = dict(model.named_parameters(remove_duplicate=False))
    other += sum(params[n].numel() for n, why in float_layers(model).items() if why.startswith("tied to"))
    n_adds = sum(isinstance(m, QAdd) for m in model.modules())
    return ModelCosts(tuple(infos), other, n_adds, tuple(getattr(model, "mixq_fixed", ())))


def metrics_of(mc: ModelCosts, specs: Sequence[LayerSpec], adds: QSpec | None = None) -> dict[str, float]:
    """Return avg_weight_bits, size_bytes, size_ratio and bops of per-layer ``specs``.

    ``adds``: the operand spec of the residual additions (a plan's ``meta["adds"]``), whose
    scales and zero points count in ``size_bytes`` like a layer input's.
    """
    tot = {k: 0.0 for k in COST_KEYS}
    for info, spec in zip(mc.infos, specs, strict=True):
        for k, v in layer_costs(info, spec).items():
            tot[k] += v
    tot["size_bits"] += 2 * mc.n_adds * act_param_bits(adds)
    size_bytes = tot["size_bits"] / 8 + 4.0 * mc.other_params
    return {
        "avg_weight_bits": (tot["weight_bits"] + mc.fixed_weight_bits) / mc.n_weights,
        "size_bytes": size_bytes,
        "size_ratio": size_bytes / mc.fp32_bytes,
        "bops": tot["bops"] + mc.fixed_bops,
    }


def check_budget(budget: dict[str, float]) -> dict[str, float]:
    """Validate a budget dict: known keys, finite positive values."""
    if not isinstance(budget, dict):
        raise ValueError(f"budget must be a dict such as {{'avg_weight_bits': 4}}, got {budget!r}")
    out = {}
    for k, v in budget.items():
        if k not in BUDGET_KEYS:
            raise ValueError(f"unknown budget {k!r}; valid: {', '.join(BUDGET_KEYS)}")
        try:
            if isinstance(v, bool):  # float(True) is 1.0: a flag is no budget
                raise TypeError
            v = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"budget {k}={v!r} is not a number") from None
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"budget {k}={v} must be a finite positive number")
        out[k] = v
    return out


def to_limit(mc: ModelCosts, key: str, value: float) -> float:
    """Express budget ``key`` = ``value`` as a bound on a sum of per-layer costs (BUDGET_COST)."""
    if key == "avg_weight_bits":
        return value * mc.n_weights - mc.fixed_weight_bits
    if key == "size_bytes":
        return 8 * (value - 4.0 * mc.other_params)
    if key == "size_ratio":
        return 8 * (value * mc.fp32_bytes - 4.0 * mc.other_params)
    return value - mc.fixed_bops


def budget_limits(mc: ModelCosts, budget: dict[str, float]) -> dict[str, float]:
    """Turn user budgets into upper bounds on sums of per-layer costs (keys of COST_KEYS)."""
    limits: dict[str, float] = {}
    for k, v in check_budget(budget).items():
        cost_key = BUDGET_COST[k]
        limits[cost_key] = min(limits.get(cost_key, math.inf), to_limit(mc, k, v))
    return limits


def from_limit(mc: ModelCosts, key: str, total: float) -> float:
    """Express a sum of per-layer costs ``total`` in the units of budget ``key``."""
    if key == "avg_weight_bits":
        return (total + mc.fixed_weight_bits) / mc.n_weights
    if key == "size_bytes":
        return total / 8 + 4.0 * mc.other_params
    if key == "size_ratio":
        return (total / 8 + 4.0 * mc.other_params) / mc.fp32_bytes
    return total + mc.fixed_bops


def check_feasible(
    mc: ModelCosts, table: dict[str, torch.Tensor], budget: dict[str, float], uniform: bool = False
) -> None:
    """Raise InfeasibleBudgetError naming the smallest feasible budget when ``budget`` is too tight.

    Args:
        mc: the model's fixed costs.
        table: per-layer costs [L, C] from :func:`cost_table`.
        budget: the user's budget.
        uniform: every layer takes the same candidate (the uniform method).
    """
    for k, v in check_budget(budget).items():
        cost = table[BUDGET_COST[k]]
        smallest = float(cost.sum(0).min()) if uniform else float(cost.min(1).values.sum())
        smallest_user = from_limit(mc, k, smallest)
        if smallest_user > v * (1 + 1e-9):
            raise InfeasibleBudgetError(
                f"budget {k}={v:g} is infeasible with these candidates; the smallest feasible "
                f"{k} is {smallest_user:.6g}" + (" (every layer at the same candidate)" if uniform else ""),
                {k: smallest_user},
                [k],
            )
    if uniform and len(budget) > 1:  # each budget alone is feasible; all of them at once?
        limits = budget_limits(mc, budget)
        n_cands = next(iter(table.values())).shape[1]
        if not any(
            all(float(table[k][:, j].sum()) <= v * (1 + 1e-9) for k, v in limits.items())
            for j in range(n_cands)
        ):
            raise InfeasibleBudgetError(
                f"budgets {', '.join(f'{k}={v:g}' for k, v in budget.items())} are infeasible together: "
                "no single candidate meets all of them (every layer at the same candidate)"
            )
