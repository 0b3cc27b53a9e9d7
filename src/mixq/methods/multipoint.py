"""Multipoint PTQ: extra low-bit points for the output channels that need them most.

Liu, Ye, Zhou and Liu, "Post-training Quantization with Multiple Points: Mixed Precision
without Mixed Precision", AAAI 2021 (arXiv 2002.09049); docs/methods.md §1. Numerics in
:mod:`mixq.quant.multipoint`. The method:

1. takes a base plan: the plan of another method on the same candidates and budget
   (``base_method``, default "uniform"), or a plan file (``base_plan``), so points go on top of
   a mixed-precision plan too;
2. for every layer whose base weight spec is a signed integer (symmetric, or asymmetric: the
   first point keeps the base's zero point) per channel or per tensor, gives each output
   channel one point, then adds points one at a time where they
   remove the most output error ``e_j = (w_j − w̃_j) H (w_j − w̃_j)ᵀ`` (``H`` the layer's input
   Gram matrix on the calibration batches: the exact squared error of channel j's output), until
   ``ratio`` · C_out extra points, the threshold ``tau`` or ``n_max`` points per channel;
3. writes the counts into the plan (``QSpec.points``), so the model, the cost model (every
   code and every float32 step counted) and the plan JSON all see the same representation.

Variants: ``variant="channel"`` (every point has its own per-channel step) and ``"layer"``
(the first point of every channel uses one layer-wide step, the per-layer baseline; extra points
carry per-channel steps: a [DESIGN] reading of the paper's per-layer setting).

Budget: the base plan meets the budget by itself, and the points only fill what it leaves. If the
allocation at ``ratio`` would break the budget (size, average bits or BOPs: every point and
step counted), every layer's allocation is cut back to the largest common fraction of its
output channels that fits (the greedy allocation capped earlier is a prefix of the uncapped
one, so this is exact). ``ratio=None`` with a budget therefore spends the budget the base plan
leaves, e.g. candidates ``["w3"]`` and ``avg_weight_bits=3.3``: w3 everywhere plus points.

Deviations [DESIGN]: layers are processed independently on the float model's inputs (not
sequentially on the quantized prefix). Activation specs of the base plan are kept as they are.
A weight-only site (an embedding, ``embeddings=True``) has no float input, hence no Gram matrix:
it keeps its base spec, named in the history and in ``meta["multipoint"]["weight_only_kept"]``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mixq import cost
from mixq.formats import Int
from mixq.kinds.multipoint import STEP_BITS
from mixq.methods.common import Context, MethodOutput, calib_loss, check_choices
from mixq.plan import LayerSpec, Plan, QSpec
from mixq.progress import progress
from mixq.quant import multipoint as mp
from mixq.wrap import applied, recording_grams, sites

VARIANTS = {"channel": "channel", "layer": "tensor"}  # variant -> granularity of the first point

log = logging.getLogger(__name__)


AUTO_BASES = ("uniform", "sensitivity-ilp")  # the base methods ``base_method="auto"`` measures


@dataclass(frozen=True)
class Config:
    """Settings of multipoint PTQ.

    Attributes:
        ratio: extra points per layer as a fraction of its output channels (ρ); None: no cap.
        tau: stop a layer when max_j e_j <= tau * mean_j e_j^(1) (None: off).
        n_max: the most points a channel may get.
        variant: "channel" or "layer" (the first point's step is per channel or layer-wide).
        key: which channel gets the next point: "gain" (largest error reduction) or "error".
        base_method: the method whose plan the points go on top of (not "multipoint"), or
            "auto": each of ``AUTO_BASES`` at the budget less the points' bits, points added,
            the one with the lowest calibration loss kept (recorded in the history and meta).
        base_plan: a plan JSON file to use as the base instead of ``base_method``.
        gram_batches: calibration batches for the layers' input Gram matrices (0: all).
    """

    ratio: float | None = 0.05
    tau: float | None = None
    n_max: int = 4
    variant: str = "channel"
    key: str = "gain"
    base_method: str = "auto"
    base_plan: str | None = None
    gram_batches: int = 0

    def __post_init__(self) -> None:
        for name, v in (("ratio", self.ratio), ("tau", self.tau)):
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0
            ):
                raise ValueError(f"{name} must be None or a finite number >= 0, got {v!r}")
        if (
            isinstance(self.n_max, bool)
            or not isinstance(self.n_max, int)
            or not 1 <= self.n_max <= mp.MAX_POINTS
        ):
            raise ValueError(f"n_max must be an integer in 1..{mp.MAX_POINTS}, got {self.n_max!r}")
        check_choices(("key", self.key, mp.KEYS), ("variant", self.variant, VARIANTS))
        if self.base_method == "multipoint":
            raise ValueError(
                "base_method cannot be 'multipoint'; use e.g. 'auto', 'uniform' or 'sensitivity-ilp'"
            )
        if (
            isinstance(self.gram_batches, bool)
            or not isinstance(self.gram_batches, int)
            or self.gram_batches < 0
        ):
            raise ValueError(f"gram_batches must be an integer >= 0 (0: all), got {self.gram_batches!r}")
        if self.base_plan is not None and not isinstance(self.base_plan, str):
            raise ValueError(f"base_plan must be the path of a plan JSON file, got {self.base_plan!r}")


def eligible(spec: LayerSpec | None) -> bool:
    """Whether a layer spec's weights can take points: a signed integer grid (symmetric or
    asymmetric), per channel or tensor."""
    w = spec.weight if spec is not None else None
    return (
        w is not None
        and isinstance(w.fmt, Int)
        and w.fmt.signed
        and w.granularity in ("channel", "tensor")
        and w.points is None
    )


def run_base(ctx: Context, name: str) -> tuple[Plan, list[dict[str, Any]]]:
    """Return the plan of base method ``name`` on ``ctx`` and its history."""
    METHODS = ctx.methods  # the registry, passed in: it imports this module

    if name not in METHODS or name == "multipoint":
        valid = ["auto", *(m for m in METHODS if m != "multipoint")]
        raise ValueError(f"unknown base_method {name!r}; valid: {', '.join(valid)}")
    base = METHODS[name]
    out = base.search(ctx, base.config())
    return out.plan, [{"base_method": name, "history": out.history}]


def collect_gram(ctx: Context, names: list[str], batches: int) -> None:
    """Accumulate the input Gram matrix of layers ``names`` on the float model (activation stats kept)."""
    data = list(ctx.task.calib)[: batches or None]
    with applied(ctx.qmodel, {}), recording_grams(ctx.qmodel, names), torch.no_grad():
        for batch in progress(data, "multipoint gram", unit="batch"):
            ctx.task.forward(ctx.qmodel, batch)


def point_bits(ctx: Context, cfg: Config) -> float:
    """Weight bits that ``ratio`` extra points per layer add at the fewest bits of an eligible
    candidate (codes and float32 steps): what the base gives up under ``base_method="auto"``."""
    bits = [c.weight.bits for c in ctx.candidates if eligible(c)]  # type: ignore[union-attr]
    if cfg.ratio is None or not bits:
        return 0.0
    total = 0.0
    for info in ctx.model_costs.infos:
        extra = math.floor(cfg.ratio * info.out_channels + 1e-9)
        total += extra * (info.row_len * min(bits) + STEP_BITS)
    return total


def search(ctx: Context, cfg: Config) -> MethodOutput:
    """Put multipoint weights on top of the base plan (``auto``: the better of the measured bases)."""
    memo: dict[tuple, mp.Allocation] = {}
    if cfg.base_plan is not None:
        plan = Plan.load(cfg.base_plan, ctx.layers)
        return on_base(ctx, cfg, plan, [{"base_plan": cfg.base_plan}], cfg.base_plan, memo)
    if cfg.base_method != "auto":
        plan, history = run_base(ctx, cfg.base_method)
        return on_base(ctx, cfg, plan, history, cfg.base_method, memo)
    bases = AUTO_BASES if len(ctx.candidates) > 1 and ctx.limits else AUTO_BASES[:1]
    tried = []
    extra = point_bits(ctx, cfg) if "weight_bits" in ctx.limits else 0.0
    for name in bases:
        reduced = None
        if extra > 0:
            limits = {**ctx.limits, "weight_bits": ctx.limits["weight_bits"] - extra}
            try:  # the base at the budget less the points' bits, so the points fit beside it
                plan, history = run_base(dataclasses.replace(ctx, limits=limits), name)
                reduced = limits["weight_bits"] / ctx.model_costs.n_weights
            except ValueError:  # InfeasibleBudgetError, or no candidate fits: the full budget
                pass
        if reduced is None:
            plan, history = run_base(ctx, name)
        out = on_base(ctx, cfg, plan, history, name, memo)
        loss = calib_loss(ctx, out.plan)
        tried.append((loss, name, reduced, out))
    loss, name, _, out = min(tried, key=lambda t: t[0])
    choice = [{"base_method": n, "calib_loss": lo, "base_budget_avg_weight_bits": r} for lo, n, r, _ in tried]
    why = "lowest calibration loss with the points added" if len(tried) > 1 else "one candidate or no budget"
    out.plan.meta["multipoint"]["base_choice"] = {"tried": choice, "chosen": name, "why": why}
    return MethodOutput(
        plan=out.plan, history=[{"base_choice": choice, "chosen": name, "why": why}, *out.history]
    )


def on_base(
    ctx: Context, cfg: Config, base: Plan, history: list[dict[str, Any]], base_name: str, memo: dict
) -> MethodOutput:
    """Put multipoint weights on top of the plan ``base``, layer by layer."""
    qlayers = sites(ctx.qmodel)
    # A weight-only site (an embedding) reads indices: no input Gram matrix, so no output error to
    # place points by; it keeps its base spec, named in the history and the plan's meta.
    weight_only = [n for n in ctx.layers if getattr(qlayers[n], "weight_only", False)]
    if weight_only:
        history.append({"multipoint": "weight-only layers keep the base plan", "layers": weight_only})
    targets = [n for n in ctx.layers if eligible(base.layers.get(n)) and n not in weight_only]
    if not targets:  # e.g. the budget forced float-format or group-wise weights everywhere
        log.warning(
            "multipoint: no layer of the base plan has a signed integer weight spec per channel or "
            "per tensor (candidates such as 'w4', 'w3+asym' or 'w3a8'); the base plan is kept"
        )
        history.append({"multipoint": "no eligible layer; base plan kept"})
        meta = {"multipoint": {"layers": 0, "base": base_name}}
        return MethodOutput(plan=Plan(dict(base.layers), meta), history=history)
    if any(qlayers[n].weight_quant.gram is None for n in targets):
        collect_gram(ctx, targets, cfg.gram_batches)
    first = VARIANTS[cfg.variant]
    allocs: dict[str, mp.Allocation] = {}
    wspecs: dict[str, QSpec] = {}
    for name in progress(targets, "multipoint", unit="layer"):
        m, spec = qlayers[name], base.layers[name]
        assert spec.weight is not None
        wspec = dataclasses.replace(spec.weight, granularity=first)
        key = (name, wspec)
        if key not in memo:
            w = m.weight.detach().float().reshape(m.weight.shape[0], -1)
            gram = m.weight_quant.gram
            start = mp.base_start(w, wspec, gram)
            search = mp.Search("best", first, cfg.key, mp.STEP_DTYPE)
            memo[key] = mp.allocate(w, wspec.bits, gram, cfg.ratio, cfg.tau, cfg.n_max, search, start)
        allocs[name], wspecs[name] = memo[key], wspec

    def plan_at(fraction: float) -> dict[str, LayerSpec]:
        """The plan with each layer's allocation stopped at ``fraction`` of its output channels."""
        layers = dict(base.layers)
        for name, alloc in allocs.items():
            k = min(alloc.extra, math.floor(fraction * len(alloc.points.counts) + 1e-9))
            wspec = dataclasses.replace(wspecs[name], points=alloc.counts_at(k))
            layers[name] = LayerSpec(wspec, base.layers[name].act)
        return layers

    full = max(a.extra / len(a.points.counts) for a in allocs.values())
    fraction, layers = fit_budget(ctx, plan_at, full)
    if layers is None:
        log.warning(
            "multipoint: even one point per channel (variant %r) exceeds the budget %s; the base plan "
            "is kept",
            cfg.variant,
            ctx.budget,
        )
        history.append({"multipoint": "one point per channel exceeds the budget; base plan kept"})
        meta = {"multipoint": {"layers": 0, "base": base_name}}
        return MethodOutput(plan=Plan(dict(base.layers), meta), history=history)
    total = channels = 0
    for name, alloc in allocs.items():
        counts = layers[name].weight.points  # type: ignore[union-attr]
        k = sum(counts) - len(counts)
        e1, e = float(alloc.first_errors.sum()), float(alloc.errors.sum())
        total, channels = total + sum(counts), channels + len(counts)
        history.append(
            {
                "layer": name,
                "bits": wspecs[name].bits,
                "clip": wspecs[name].clip,
                "channels": len(counts),
                "extra_points": k,
                "avg_points": sum(counts) / len(counts),
                "max_points": max(counts),
                "stop": alloc.stop if k == alloc.extra else "total budget",
                "output_error_one_point": e1,  # after the cut for the budget: not measured
                "output_error": e if k == alloc.extra else None,
                "relative_output_error": (e / e1 if e1 > 0 else 0.0) if k == alloc.extra else None,
            }
        )
    meta = {
        "multipoint": {
            "ratio": cfg.ratio,
            "tau": cfg.tau,
            "n_max": cfg.n_max,
            "variant": cfg.variant,
            "key": cfg.key,
            "base": base_name,
            "layers": len(targets),
            "avg_points": total / channels,
            "extra_points": total - channels,
            "step_dtype": f"first point: the base scale (float32); extra points: {mp.STEP_DTYPE}",
            "budget_ratio": fraction if fraction < full else None,
            "gram_batches": cfg.gram_batches,
            "error_inputs": "float model, calibration Gram matrices",
        }
    }
    if weight_only:
        meta["multipoint"]["weight_only_kept"] = weight_only
    return MethodOutput(plan=Plan(layers, meta), history=history)


def fit_budget(
    ctx: Context, plan_at: Callable[[float], dict[str, LayerSpec]], full: float
) -> tuple[float, dict[str, LayerSpec] | None]:
    """Return the largest extra-point fraction (<= ``full``) whose plan meets every budget, and the plan.

    The cost of a plan grows with the fraction (every extra point adds its codes, step and BOPs),
    so a bisection finds it; ``(0.0, None)`` when even one point per channel breaks the budget.
    """

    def fits(layers: dict[str, LayerSpec]) -> bool:
        specs = [layers[n] for n in ctx.layers]
        tot: dict[str, float] = {}
        for info, spec in zip(ctx.model_costs.infos, specs, strict=True):
            for k, v in cost.layer_costs(info, spec).items():
                tot[k] = tot.get(k, 0.0) + v
        return all(tot[k] <= v * (1 + 1e-9) for k, v in ctx.limits.items())

    layers = plan_at(full)
    if not ctx.limits or fits(layers):
        return full, layers
    if not fits(lo_plan := plan_at(0.0)):
        return 0.0, None
    lo, hi = 0.0, full
    for _ in range(40):  # fractions below 1e-12 of a layer's channels change nothing
        mid = (lo + hi) / 2
        if fits(mid_plan := plan_at(mid)):
            lo, lo_plan = mid, mid_plan
        else:
            hi = mid
    return lo, lo_plan


def deploy(qmodel: nn.Module) -> nn.Module:
    """Return a copy of a wrapped model whose multipoint layers are channel-split layers.

    Every layer whose weight spec has points becomes its input site (when it quantizes its
    input) followed by :class:`mixq.quant.multipoint.ChannelSplit`; other layers are unchanged.
    """
    model = copy.deepcopy(qmodel)
    for name, m in sites(model).items():
        spec = m.weight_quant.spec
        if spec is None or spec.points is None:
            continue
        if not m.exportable:
            raise ValueError(f"layer {name}: a {type(m.float_module).__name__} has no channel-split form yet")
        split = mp.split_layer(m, mp.spec_points(m.weight, spec, m.weight_quant.gram))
        new: nn.Module = split if m.input_quant.spec is None else nn.Sequential(m.input_quant, split)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return model
