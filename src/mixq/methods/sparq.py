"""SPARQ: post-training sparsity-aware activation quantization on top of an 8-bit model.

Shomron, Gabbay, Kurzum and Weiser, "Post-Training Sparsity-Aware Quantization", NeurIPS 2021
(arXiv 2105.11010). Weights keep their candidate's format (8-bit per channel in the paper);
every post-ReLU activation is quantized to an unsigned 8-bit code and then, dynamically, to a
4-bit window placed by its leading one (bSPARQ), with a zero partner channel giving the other
code all 8 bits (vSPARQ). Numerics: :mod:`mixq.quant.sparq`; format names ``sparq4_*``.

The method takes the candidates with a SPARQ activation (for example ``w8-asparq4_5opt_v``) as
they are, and gives every other candidate the activation format ``Config.act`` (default
``sparq4_5opt_v``) in place of its own, keeping its weight spec and its activation range clip:
SPARQ on top of the candidate's 8-bit model. Among these, it keeps those whose plan meets the
budget and picks the one with the lowest calibration loss (``select="loss"``) or the most
weight bits (``select="bits"``). Per layer:

* a site whose calibrated input has negative values is outside SPARQ (the authors' code raises
  there); the plan gives it the plain 8-bit asymmetric activation (``a8``) with the same range
  clip, so the plan, its cost and the model agree. Those layers are listed in the history and
  in ``plan.meta["sparq"]``.
* with ``float_first_last`` the first and the last quantizable layers stay float, as in the
  authors' setup (first conv and final FC in FP32).

Deviations: ranges come from the site's statistics by the spec's clip (default min/max over
the calibration data), not from the mean of per-image maxima; the weight quantizer is mixq's
(``max|w| / 127``, not ``/ 127.5``); no BN recalibration pass (mixq's Fashion-MNIST tasks fold
BN; see docs/methods.md §5.2); vSPARQ pairs channels 2k, 2k+1 of each layer's input (see
:mod:`mixq.quant.sparq`). A weight-only site (an embedding, ``embeddings=True``: its input is
indices) has no input statistics: it is never a signed-input exception, and its plan entry keeps
the weight spec only.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixq import formats
from mixq.cost import InfeasibleBudgetError, metrics_of
from mixq.formats import ACT_FORMAT_NAMES, Sparq
from mixq.methods.common import Context, MethodOutput, calib_loss, check_choices
from mixq.plan import FLOAT, LayerSpec, Plan, QSpec
from mixq.quant import sparq
from mixq.wrap import calibrate, sites

SELECT = ("loss", "bits")


@dataclass(frozen=True)
class Config:
    """Settings of the sparq method.

    Attributes:
        act: the SPARQ activation format given to candidates without one (sparq4_<option>[_raw][_v]).
        select: how to choose among feasible candidates: "loss" or "bits".
        float_first_last: keep the first and last quantizable layers float (the paper's setup).
    """

    act: str = "sparq4_5opt_v"
    select: str = "loss"
    float_first_last: bool = False

    def __post_init__(self) -> None:
        if self.act not in ACT_FORMAT_NAMES:
            raise ValueError(
                f"unknown SPARQ activation format {self.act!r}; valid: {', '.join(ACT_FORMAT_NAMES)}"
            )
        check_choices(("select", self.select, SELECT))
        if not isinstance(self.float_first_last, bool):
            raise ValueError(f"float_first_last must be a bool, got {self.float_first_last!r}")


def with_sparq(candidate: LayerSpec, act: Sparq) -> LayerSpec:
    """Return ``candidate`` with a SPARQ activation: its own if it has one, else ``act``.

    The candidate's activation range clip (min/max, MSE or percentile) is kept.
    """
    if candidate.act is not None and isinstance(candidate.act.fmt, Sparq):
        return candidate
    a = candidate.act
    clip, pct = (a.clip, a.percentile) if a is not None else ("minmax", 99.99)
    return LayerSpec(
        candidate.weight, QSpec(act, granularity="tensor", symmetric=True, clip=clip, percentile=pct)
    )


def signed_layers(ctx: Context) -> list[str]:
    """Return the layers whose calibrated input has negative values (outside SPARQ).

    Calibrates the model first when no candidate had an activation spec (then mixq.run did not).
    A weight-only site (an embedding: its input is indices) has no input statistics and is left out.
    """
    qlayers = sites(ctx.qmodel)
    names = [n for n in ctx.layers if not getattr(qlayers[n], "weight_only", False)]
    if any(qlayers[n].input_quant.stats_min is None for n in names):
        calibrate(ctx.qmodel, ctx.task.calib, ctx.task.forward)
    return [n for n in names if float(qlayers[n].input_quant.stats_min) < 0]


def sparq_plan(ctx: Context, candidate: LayerSpec, signed: list[str], float_first_last: bool) -> Plan:
    """Return the plan of one SPARQ candidate with the per-layer exceptions applied."""
    assert candidate.act is not None
    fallback = LayerSpec(candidate.weight, sparq.base_spec(candidate.act, signed=True))
    skip = {ctx.layers[0], ctx.layers[-1]} if float_first_last else set()
    layers = {n: fallback if n in signed else candidate for n in ctx.layers if n not in skip}
    return Plan(layers)


def plan_metrics(ctx: Context, plan: Plan) -> dict[str, float]:
    """Return the budget metrics (cost.BUDGET_KEYS) of ``plan``."""
    return metrics_of(ctx.model_costs, [plan.layers.get(n, FLOAT) for n in ctx.layers])


def infeasible_message(budget: dict[str, float], costs: list[dict[str, float]], names: list[str]) -> str:
    """Explain why no SPARQ plan meets ``budget``, naming the smallest feasible value."""
    for k, v in budget.items():
        smallest = min(m[k] for m in costs)
        if smallest > v * (1 + 1e-9):
            return (
                f"budget {k}={v:g} is infeasible with these candidates; the smallest feasible {k} is "
                f"{smallest:.6g} (every layer at the same SPARQ candidate: {', '.join(names)})"
            )
    return f"budgets {budget} are infeasible together for every SPARQ candidate ({', '.join(names)})"


def search(ctx: Context, cfg: Config) -> MethodOutput:
    """Pick one SPARQ candidate for every layer; signed inputs fall back to 8-bit asymmetric."""
    act = formats.parse(cfg.act)
    assert isinstance(act, Sparq)
    cands = list(dict.fromkeys(with_sparq(c, act) for c in ctx.candidates))  # in order, no repeats
    signed = signed_layers(ctx)
    plans = [sparq_plan(ctx, c, signed, cfg.float_first_last) for c in cands]
    costs = [plan_metrics(ctx, p) for p in plans]  # with the fallbacks and float layers
    feasible = [j for j, m in enumerate(costs) if all(m[k] <= v * (1 + 1e-9) for k, v in ctx.budget.items())]
    if not feasible:
        raise InfeasibleBudgetError(infeasible_message(ctx.budget, costs, [c.name for c in cands]))
    history = []
    if cfg.select == "bits" or len(feasible) == 1:
        best = max(feasible, key=lambda j: (costs[j]["avg_weight_bits"], costs[j]["bops"], -j))
    else:
        losses = {j: calib_loss(ctx, plans[j]) for j in feasible}
        history = [{"candidate": cands[j].name, "calib_loss": losses[j]} for j in feasible]
        best = min(feasible, key=lambda j: (losses[j], j))
    plan = plans[best]
    record = {
        "candidate": cands[best].name,
        "signed_layers": signed,
        "signed_fallback": "a8 (8-bit asymmetric per tensor)",
        "float_layers": sorted(set(ctx.layers) - set(plan.layers)),
    }
    plan.meta["sparq"] = record
    history.append(record)
    return MethodOutput(plan=plan, history=history)
