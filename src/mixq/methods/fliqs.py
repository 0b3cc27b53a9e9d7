"""FLIQS: one-shot search over integer and floating-point formats by reinforcement learning.

Dotzel et al., "One-Shot Mixed-Precision Floating-Point and Integer Quantization Search",
AutoML 2024 (arXiv 2308.03290); docs/methods.md §4. The search runs inside one quantization-aware
training run (``steps`` or ``epochs`` of ``mixq.train``) and ends with a plan and trained
weights that need no retraining:

* **Choice sites.** Every layer's two mixq sites (``weight_quant``, ``input_quant``) switch
  between the candidates of the search space; the candidates share the layer's weights (the
  float module's parameters). ``space`` keeps the integer candidates (``int``), the
  floating-point ones (``fp``) or all of them (``joint``); ``float`` belongs to every space.
* **Weight steps.** Each training step samples one candidate per layer from the policy, sets it
  on the sites (the hook runs before the forward pass) and trains the shared weights through
  mixq's straight-through fake quantization.
* **Controller** (:mod:`mixq.search.rl`): per-layer logits, REINFORCE with a moving-average
  baseline and Adam(β₁ = 0). After the warm-up (``warmup`` of the search steps, controller
  frozen and formats sampled uniformly) each step also samples a plan, measures its quality ``Q``
  (the task metric on a held-out calibration batch, in [0, 1]) and its cost ``C`` (BOPs = MACs ×
  weight bits × activation bits, size or weight bits: the budgeted cost), and updates the policy
  with ``R = Q + β |C / C₀ − 1|`` (β ≤ 0, C₀ the budget) plus an entropy bonus whose weight
  decays on a cosine schedule from the end of the warm-up to the end of the search. As in TuNAS
  the controller's learning rate grows geometrically over the search, ``rl_lr · g^progress``
  (``rl_lr_growth`` g = 10 by default), so the policy settles before the fixed-plan tail; the
  history records every layer's entropy and argmax probability over time.
* **Read-out.** The final plan is the per-layer argmax; when it breaks the budget it is
  projected onto the budget by the exact ILP (``mixq.search.ilp``) maximizing ``Σ_l log π_l``.
  The last ``fix_frac`` of the steps train that plan alone. Since training ran through mixq's own
  sites, ``mixq.run``'s evaluation of the plan computes what was trained.

A search space of one candidate is uniform QAT with the same recipe (the benchmark's baseline).

Deviations [DESIGN]: no per-format learned clipping: weight scales follow each channel's
current max, activation ranges the calibration statistics (each format derives its own scale
from them); batch norm is expected folded (frozen otherwise), so formats cannot mix BN
statistics; the reward batch comes from the calibration batches (training images, never the
validation set; with a task that has no training batches the two coincide); the controller's
learning rate grows ``rl_lr_growth``× over the search (TuNAS: 10×); a fixed-plan tail; the
quality is centred per reward batch (``quality_baseline="batch"``, :class:`BatchCentre`) before
it enters the reward, since the calibration batches differ more than the plans do.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from mixq import cost, search
from mixq.kinds import kind_of_format
from mixq.methods.common import Context, MethodOutput, check_choices, check_length
from mixq.plan import LayerSpec
from mixq.search.rl import REWARDS, SCHEDULES, Controller, entropy_coef, reward
from mixq.train import BN_MODES, TrainConfig, set_train_mode, train
from mixq.wrap import sites

log = logging.getLogger(__name__)

SPACES = ("joint", "int", "fp")
QUALITY_BASELINES = ("batch", "shared")
COSTS = ("auto", "bops", "size_bits", "weight_bits")


@dataclass(frozen=True)
class Config:
    """Settings of FLIQS.

    Attributes:
        steps: training steps in all (0: use ``epochs``).
        epochs: passes over the training batches when ``steps`` is 0.
        space: candidates searched: "joint" (all), "int" (integer formats) or "fp" (floating point).
        warmup: fraction of the search steps with the controller frozen (uniform sampling).
        fix_frac: fraction of all steps, at the end, that train the final plan alone.
        beta: cost weight β ≤ 0 of the reward.
        reward: "abs" (``Q + β|C/C₀ − 1|``) or "mnas" (``Q · (C/C₀)^β``).
        cost: the cost in the reward: "auto" (the budgeted one: BOPs first, then size, then
            weight bits), "bops", "size_bits" or "weight_bits".
        entropy: initial entropy weight λ_H0.
        schedule: entropy schedule: "cosine", "linear" or "constant".
        momentum: moving-average baseline momentum.
        rl_lr: Adam learning rate of the controller's logits (at the end of the warm-up).
        rl_lr_growth: factor by which the controller's learning rate grows over the search
            (geometrically; 1: constant).
        rl_batches: calibration batches per reward measurement.
        quality_baseline: "batch" (Q is centred on a moving average of Q kept per reward batch,
            so a plan is compared with plans measured on the same images) or "shared" (raw Q,
            one moving-average baseline for all batches).
        metric_scale: divides the task metric into the quality Q (0: 100 for a metric in %, else 1).
        lr: learning rate of the model's weights (Adam, warm-up then cosine).
        bn: batch norm during training: "freeze" or "train".
        time_limit: seconds for the ILP projection (None: until optimal).
    """

    steps: int = 0
    epochs: float = 1.0
    space: str = "joint"
    warmup: float = 0.25
    fix_frac: float = 0.1
    beta: float = -0.5
    reward: str = "abs"
    cost: str = "auto"
    entropy: float = 0.02
    schedule: str = "cosine"
    momentum: float = 0.9
    rl_lr: float = 0.1
    rl_lr_growth: float = 10.0
    rl_batches: int = 1
    quality_baseline: str = "batch"
    metric_scale: float = 0.0
    lr: float = 1e-4
    bn: str = "freeze"
    time_limit: float | None = 60.0

    def __post_init__(self) -> None:
        check_choices(
            ("space", self.space, SPACES),
            ("reward", self.reward, REWARDS),
            ("cost", self.cost, COSTS),
            ("schedule", self.schedule, SCHEDULES),
            ("bn", self.bn, BN_MODES),
            ("quality_baseline", self.quality_baseline, QUALITY_BASELINES),
        )
        check_length(self.steps, self.epochs)
        for name, value in (("warmup", self.warmup), ("fix_frac", self.fix_frac)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} is a fraction in [0, 1), got {value}")
        if self.beta > 0:
            raise ValueError(f"beta must be <= 0 (the cost term lowers the reward), got {self.beta}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.rl_lr <= 0 or self.lr < 0 or self.entropy < 0 or self.metric_scale < 0:
            raise ValueError("rl_lr must be > 0; lr, entropy and metric_scale >= 0")
        if self.rl_lr_growth < 1.0:
            raise ValueError(f"rl_lr_growth must be >= 1 (1: a constant rate), got {self.rl_lr_growth}")
        if self.rl_batches < 1:
            raise ValueError(f"rl_batches must be >= 1, got {self.rl_batches}")


# -- search spaces and costs ----------------------------------------------------------------------


def kind_of(spec: LayerSpec) -> str:
    """Return "float", "int", "fp" or "mixed" for the formats of a candidate's two parts.

    >>> from mixq.plan import parse_candidate
    >>> [kind_of(parse_candidate(c)) for c in ("w4a8", "wfp4_e2m1-afp8_e4m3fn", "w4-afp8_e4m3fn", "float")]
    ['int', 'fp', 'mixed', 'float']
    """
    kinds = set()
    for part in (spec.weight, spec.act):
        if part is None:
            continue
        kinds.add(kind_of_format(part.fmt).family(part.fmt))
    if not kinds:
        return "float"
    return kinds.pop() if len(kinds) == 1 else "mixed"


def space_arms(candidates: list[LayerSpec], space: str) -> list[int]:
    """Return the indices of the candidates in search space ``space`` (``float`` is in every space)."""
    check_choices(("space", space, SPACES))
    arms = [j for j, c in enumerate(candidates) if space == "joint" or kind_of(c) in (space, "float")]
    if not arms:
        names = ", ".join(c.name for c in candidates)
        raise ValueError(f"no candidate is in search space {space!r}; candidates: {names}")
    return arms


def cost_key(ctx: Context, choice: str) -> str | None:
    """Return the cost table the reward uses (None: no budget, no cost term).

    The target C₀ is the budget on that cost, so an explicit ``choice`` needs a budget on it.
    """
    if choice != "auto":
        if choice not in ctx.limits:
            raise ValueError(
                f"cost {choice!r} needs a budget on it (bops: 'bops'; size_bits: 'size_bytes' or "
                f"'size_ratio'; weight_bits: 'avg_weight_bits'); the budget is {ctx.budget}"
            )
        return choice
    return next((k for k in ("bops", "size_bits", "weight_bits") if k in ctx.limits), None)


def check_feasible(ctx: Context, arms: list[int]) -> None:
    """Raise (naming the smallest feasible budget) if no plan over ``arms`` meets the budget."""
    table = {k: v[:, arms] for k, v in ctx.costs.items()}
    cost.check_feasible(ctx.model_costs, table, ctx.budget)


# -- read-out -------------------------------------------------------------------------------------


def read_out(
    ctx: Context, arms: list[int], logp: torch.Tensor, time_limit: float | None
) -> tuple[list[int], dict]:
    """Return the final candidate per layer: the argmax, or its projection onto the budget.

    Args:
        ctx: the run.
        arms: candidate indices of the search space (the columns of ``logp``).
        logp: the policy's log-probabilities [L, A].
        time_limit: seconds for the ILP.

    Returns:
        Candidate indices into ``ctx.candidates`` and a record of how they were chosen.
    """
    best = logp.argmax(1).tolist()
    choices = [arms[a] for a in best]
    if ctx.within_limits(choices):
        return choices, {"readout": "argmax"}
    problem = search.Problem(
        scores=-logp, costs={k: ctx.costs[k][:, arms] for k in ctx.limits}, budgets=dict(ctx.limits)
    )
    sol = search.ilp(problem, time_limit=time_limit)
    changed = sum(int(a != b) for a, b in zip(best, sol.choices, strict=True))
    return [arms[a] for a in sol.choices], {"readout": "ilp", "status": sol.status, "changed_layers": changed}


# -- the search loop ------------------------------------------------------------------------------


def set_choices(qlayers: list[nn.Module], specs: list[LayerSpec]) -> None:
    """Put one candidate on each layer's weight and input sites."""
    for m, spec in zip(qlayers, specs, strict=True):
        m.weight_quant.set_spec(spec.weight)
        m.input_quant.set_spec(spec.act)


class BatchCentre:
    """Centre each reward batch's quality on its own moving average: ``Q − Q̄_b + mean_b' Q̄_b'``.

    The reward batches differ in difficulty by more than the plans do (fashion-resnet20: 0.90 vs
    0.95 top-1 on its two calibration batches of 256 images, plans within about 0.01), so with one
    shared baseline the advantage mostly says which batch was drawn. Centring per batch is a
    control variate: it removes the batch's offset and keeps the differences between plans
    measured on the same images. A batch seen for the first time counts as average (``Q̄_b = Q``).
    """

    def __init__(self, momentum: float) -> None:
        self.momentum = momentum
        self.means: dict[int, float] = {}

    def __call__(self, batch: int, q: float) -> float:
        """Return the centred quality of ``q`` measured on reward batch ``batch``; update its mean."""
        mean = self.means.get(batch, q)
        others = [v for k, v in self.means.items() if k != batch] + [mean]
        centred = q - mean + sum(others) / len(others)
        self.means[batch] = self.momentum * mean + (1.0 - self.momentum) * q
        return centred


class Search:
    """The training hook of FLIQS: sample formats, update the controller, fix the plan at the end."""

    def __init__(self, ctx: Context, cfg: Config, arms: list[int], total: int) -> None:
        self.ctx, self.cfg, self.arms = ctx, cfg, arms
        qlayers = sites(ctx.qmodel)
        self.qlayers = [qlayers[n] for n in ctx.layers]
        self.n_fix = int(round(cfg.fix_frac * total))
        self.n_search = total - self.n_fix
        self.n_warm = int(round(cfg.warmup * self.n_search))
        self.controller = Controller(len(ctx.layers), len(arms), cfg.rl_lr, cfg.momentum, ctx.seed)
        self.key = cost_key(ctx, cfg.cost)
        self.target = ctx.limits.get(self.key) if self.key is not None else None
        self.arm_costs = ctx.costs[self.key][:, arms] if self.key is not None else None  # [L, A]
        scale = cfg.metric_scale or (100.0 if "%" in ctx.task.metric_name else 1.0)
        self.scale = scale
        self.final: list[int] | None = None
        self.readout: dict = {}
        self.records: list[dict] = []
        self.rl_step = 0
        self.centre = BatchCentre(cfg.momentum) if cfg.quality_baseline == "batch" else None

    def specs(self, picks: list[int]) -> list[LayerSpec]:
        """Return the candidates of per-layer arm indices."""
        return [self.ctx.candidates[self.arms[a]] for a in picks]

    def cost_of(self, picks: list[int]) -> float | None:
        """Return the reward's cost of per-layer arm indices."""
        if self.arm_costs is None:
            return None
        return float(self.arm_costs[torch.arange(len(picks)), torch.tensor(picks)].sum())

    def quality(self, model: nn.Module) -> float:
        """Measure Q on the next held-out calibration batches (evaluation mode)."""
        calib = self.ctx.task.calib
        batches = [
            calib[(self.rl_step * self.cfg.rl_batches + i) % len(calib)] for i in range(self.cfg.rl_batches)
        ]
        model.eval()
        try:
            return float(self.ctx.task.metric(model, batches)) / self.scale
        finally:
            set_train_mode(model, self.cfg.bn)

    def finish_search(self) -> list[int]:
        """Fix the final plan (argmax, projected onto the budget when needed)."""
        if self.final is None:
            self.final, self.readout = read_out(
                self.ctx, self.arms, self.controller.log_probs(), self.cfg.time_limit
            )
        return self.final

    def __call__(self, step: int, model: nn.Module) -> None:
        if step >= self.n_search:
            set_choices(self.qlayers, [self.ctx.candidates[j] for j in self.finish_search()])
            return None
        c = self.controller
        if step >= self.n_warm:
            picks = c.sample()
            set_choices(self.qlayers, self.specs(picks))
            batch = (self.rl_step * self.cfg.rl_batches) % len(self.ctx.task.calib)
            q, cst = self.quality(model), self.cost_of(picks)
            qc = self.centre(batch, q) if self.centre is not None else q
            r = reward(qc, cst, self.target, self.cfg.beta, self.cfg.reward)
            coef = entropy_coef(step, self.n_warm, self.n_search, self.cfg.entropy, self.cfg.schedule)
            progress = (step - self.n_warm) / max(1, self.n_search - self.n_warm)
            u = c.update(picks, r, coef, self.cfg.rl_lr_growth**progress)
            self.rl_step += 1
            every = max(1, (self.n_search - self.n_warm) // 20)
            if (step - self.n_warm) % every == 0 or step == self.n_search - 1:
                p = c.probs()
                self.records.append(
                    {
                        "step": step,
                        "quality": q,
                        "reward_batch": batch,
                        "quality_centred": qc,
                        "cost_ratio": cst / self.target if self.target else math.nan,
                        "reward": r,
                        "baseline": u.baseline,
                        "entropy": c.entropy(),
                        "entropy_coef": coef,
                        "argmax_mass": float(p.max(1).values.mean()),
                        "rl_lr": c.lr * self.cfg.rl_lr_growth**progress,
                        "layer_entropy": [round(float(v), 4) for v in c.layer_entropy()],
                        "layer_argmax": [round(float(v), 4) for v in p.max(1).values],
                    }
                )
        set_choices(self.qlayers, self.specs(c.sample()))
        return None


def search_fliqs(ctx: Context, cfg: Config) -> MethodOutput:
    """The ``fliqs`` method (see the module docstring)."""
    arms = space_arms(ctx.candidates, cfg.space)
    check_feasible(ctx, arms)
    batches = getattr(ctx.task, "train", None) or ctx.task.calib
    total = cfg.steps or max(1, math.ceil(cfg.epochs * len(batches)))
    hook = Search(ctx, cfg, arms, total)
    tcfg = TrainConfig(steps=total, bn=cfg.bn, seed=ctx.seed, log_every=max(1, total // 20))
    params = [p for p in ctx.qmodel.parameters() if p.requires_grad]
    # No checkpoint: the controller's state is not in it, so a resumed search would differ.
    res = train(
        ctx.qmodel, ctx.task.loss, batches, [{"params": params, "lr": cfg.lr}], tcfg, hook=hook, desc="fliqs"
    )
    choices = hook.finish_search()
    plan = ctx.plan_of(choices)
    c = hook.controller
    probs = c.probs()
    losses = [h["loss"] for h in res.history]
    info = {
        "phase": "search",
        "space": cfg.space,
        "arms": [ctx.candidates[j].name for j in arms],
        "steps": res.steps,
        "search_steps": hook.n_search,
        "warmup_steps": hook.n_warm,
        "fixed_steps": hook.n_fix,
        "seconds": res.seconds,
        "images": res.steps * _batch_size(batches),
        "first_loss": losses[0] if losses else math.nan,
        "last_loss": losses[-1] if losses else math.nan,
        "cost": hook.key,
        "target": hook.target,
        "final_entropy": c.entropy(),
        "max_entropy": c.max_entropy(),
        "final_entropy_ratio": c.entropy() / c.max_entropy() if c.max_entropy() > 0 else 0.0,
        "final_argmax_mass": float(probs.max(1).values.mean()),
        "probs": {
            n: {ctx.candidates[j].name: float(p) for j, p in zip(arms, row, strict=True)}
            for n, row in zip(ctx.layers, probs, strict=True)
        },
        "controller": hook.records,
        **hook.readout,
    }
    plan.meta.update(
        {
            "fliqs": {
                "space": cfg.space,
                "steps": res.steps,
                "cost": hook.key,
                "evaluated": "the trained weights through mixq's sites",
            }
        }
    )
    log.info("fliqs: plan %s", plan.summary())
    return MethodOutput(plan=plan, history=[info])


def _batch_size(batches: list) -> int:
    b = batches[0]
    x = b[0] if isinstance(b, (tuple, list)) else b
    return int(x.shape[0]) if isinstance(x, torch.Tensor) else 1
