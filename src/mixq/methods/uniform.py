"""Uniform PTQ: every layer takes the same candidate.

Among the candidates that meet the budget, the one with the lowest calibration loss is chosen
(``select="loss"``), or the one that uses the most bits (``select="bits"``). This is the
baseline every mixed-precision method is compared with, on the same quantizers.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixq.methods.common import Context, MethodOutput, calib_loss, check_choices, uniform_plan

SELECT = ("loss", "bits")


@dataclass(frozen=True)
class Config:
    """Settings of the uniform method.

    Attributes:
        select: how to choose among feasible candidates: "loss" or "bits".
    """

    select: str = "loss"

    def __post_init__(self) -> None:
        check_choices(("select", self.select, SELECT))


def search(ctx: Context, cfg: Config) -> MethodOutput:
    """Pick the best single candidate for all layers within the budget."""
    ctx.check_feasible(uniform=True)
    feasible = [j for j in range(len(ctx.candidates)) if ctx.within_limits([j] * len(ctx.layers))]
    history = []
    if cfg.select == "bits" or len(feasible) == 1:
        best = max(feasible, key=lambda j: float(ctx.costs["weight_bits"][:, j].sum()))
    else:
        losses = {}
        for j in feasible:
            losses[j] = calib_loss(ctx, uniform_plan(ctx, j))
            history.append({"candidate": ctx.candidates[j].name, "calib_loss": losses[j]})
        best = min(feasible, key=lambda j: (losses[j], j))
    return MethodOutput(plan=uniform_plan(ctx, best), history=history)
