"""DDQ: bit-widths, ranges and steps learned in quantization-aware training.

Zhang et al., "Differentiable Dynamic Quantization with Mixed Precision and Adaptive
Resolution", ICML 2021 (arXiv 2106.02295); docs/methods.md §2. The quantizer is in
:mod:`mixq.quant.ddq`. The method runs in two phases over one training budget
(``steps`` or ``epochs`` of ``mixq.train``):

1. **Search** (``search_frac`` of the steps): every weight site becomes a DDQ quantizer with
   2^B levels (B = the largest candidate weight bits) and monotone bit gates; activations get
   their own DDQ quantizer when the candidates differ in activation bits, otherwise mixq's
   integer grid with a learned range. The loss is the task loss plus the resource regularizer
   ``λ · Σ_k ρ(C_k(b) / limit_k − 1)`` (ρ a hinge or squared hinge) on every budgeted cost
   (weight bits, size, BOPs), with ``C_k(b)`` the per-layer cost tables as functions of the
   learned bits. Bits start at the budget's uniform bit-width (``init_bits="budget"``) or at B.
2. **Read-out and projection** (``readout``): with ``"sensitivity"`` (the default) the
   trained search model scores every (layer, candidate): the task loss on ``readout_batches``
   training batches with that layer on the candidate's deployable integer grid (the one the
   fine-tune starts from) and every other layer at its learned bits (``ΔL_lj``, minus the loss
   with the learned quantizers everywhere); the exact ILP
   (``mixq.search.ilp``) then minimizes ``Σ_l ΔL_l,j(l)`` under the budgets, so a sensitive layer
   gets more bits and budget left unused by the learned bits is spent where it lowers the loss
   most (a plan below the budget is one where no more bits measured a lower loss; recorded as
   ``budget_use`` and ``unused_budget``). ``"distance"`` is the plain projection minimizing
   ``Σ_l (β_l − bits_l)²``. Either way the plan meets the budget exactly even when training
   ended slightly above it.
3. **Deployment fine-tune** (the remaining steps): each layer's weights and input use mixq's
   integer grid at the chosen bits with a learned range (the ``uniform`` levels collapse to
   it; ``learned`` levels are dropped for it). At the end the learned weight grid is baked
   into the weights and each activation site's statistics are set to the learned range, so
   ``mixq.run``'s evaluation of the plan on ``ctx.qmodel`` computes what was trained (weights
   equal to a float rounding error).

With ``learn_bits=False`` the search is skipped: the largest uniform candidate within the
budget is trained for all the steps (uniform QAT with a learned step, LSQ-style: the baseline).

Deviations [DESIGN]: monotone gates ``g_i = H(β − i + ½)`` with a triangular surrogate for
H'; deployment on mixq's integer grids (restricted symmetric weights, affine activations) after
a fine-tune instead of DDQ's merged grid; training batches are ``task.train`` (or the
calibration batches when a task has none); batch norm is expected folded (frozen otherwise).
A weight-only site (an embedding, ``embeddings=True``: its input is indices) gets no input
quantizer; with learned input bits its own are left out of the projection's distance.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from mixq import search
from mixq.methods.common import Context, MethodOutput, check_choices, check_length
from mixq.plan import LayerSpec
from mixq.quant.ddq import LEVEL_MODES, DDQQuantizer, LearnedInt, check_int_spec, init_range
from mixq.train import BN_MODES, Checkpoint, Hook, TrainConfig, train
from mixq.wrap import apply, sites

log = logging.getLogger(__name__)

PENALTIES = ("hinge", "square")
INIT_BITS = ("budget", "max")
READOUTS = ("sensitivity", "distance")


@dataclass(frozen=True)
class Config:
    """Settings of DDQ.

    Attributes:
        steps: training steps in all (0: use ``epochs``).
        epochs: passes over the training batches when ``steps`` is 0.
        search_frac: fraction of the steps that learn the bit-widths (the rest fine-tunes).
        learn_bits: False trains the uniform plan only (LSQ-style uniform QAT).
        levels: "uniform" (learned range and step) or "learned" (every level learned).
        init_bits: start the bits at the budget's uniform width ("budget") or at the largest ("max").
        lam: weight λ of the resource regularizer.
        penalty: "hinge" or "square" (squared hinge).
        alpha: gradient-correction weight α (0: off).
        lr: learning rate of the model's weights and biases.
        lr_range: learning rate of the quantizers' ranges and levels.
        lr_bits: learning rate of the bit-width parameters β.
        bn: batch norm during training: "freeze" or "train".
        readout: "sensitivity" (measured loss per layer and candidate into the ILP) or
            "distance" (the candidate nearest the learned bits, projected onto the budget).
        readout_batches: training batches of the sensitivity read-out.
        readout_confidence: κ ≥ 0: the ILP minimizes ``Σ_l ΔL_l + κ · se(ΔL_l)``, an upper
            confidence bound, so a candidate whose measured gain is within noise is not taken
            for it (0: the mean alone).
        time_limit: seconds for the ILP projection (None: until optimal).
    """

    steps: int = 0
    epochs: float = 1.0
    search_frac: float = 0.5
    learn_bits: bool = True
    levels: str = "uniform"
    init_bits: str = "budget"
    lam: float = 1.0
    penalty: str = "hinge"
    alpha: float = 0.0
    lr: float = 1e-4
    lr_range: float = 1e-3
    lr_bits: float = 0.05
    bn: str = "freeze"
    readout: str = "sensitivity"
    readout_batches: int = 2
    readout_confidence: float = 0.0
    time_limit: float | None = 60.0

    def __post_init__(self) -> None:
        check_choices(
            ("levels", self.levels, LEVEL_MODES),
            ("penalty", self.penalty, PENALTIES),
            ("init_bits", self.init_bits, INIT_BITS),
            ("bn", self.bn, BN_MODES),
            ("readout", self.readout, READOUTS),
        )
        if self.readout_batches < 1:
            raise ValueError(f"readout_batches must be >= 1, got {self.readout_batches}")
        if not 0.0 <= self.search_frac < 1.0:
            raise ValueError(
                f"search_frac must be in [0, 1) (the last steps fine-tune), got {self.search_frac}"
            )
        check_length(self.steps, self.epochs)
        if min(self.lam, self.alpha, self.lr, self.lr_range, self.lr_bits, self.readout_confidence) < 0:
            raise ValueError("lam, alpha, readout_confidence and the learning rates must be >= 0")


# -- candidates and costs ------------------------------------------------------------------------


def check_candidates(candidates: list[LayerSpec]) -> None:
    """Raise a ValueError unless every candidate is an integer spec DDQ can train and deploy."""
    for c in candidates:
        if c.weight is None:
            raise ValueError(f"ddq needs a weight format in every candidate, got {c.name!r}")
        check_int_spec(c.weight, "weight")
        if c.act is not None:
            check_int_spec(c.act, "act")
    if len({c.act is None for c in candidates}) > 1:
        raise ValueError("ddq needs every candidate to quantize activations, or none of them")


def bits_of(candidates: list[LayerSpec]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return the weight bits [C] and the activation bits [C] (None without activations)."""
    wb = torch.tensor([float(c.weight.bits) for c in candidates], dtype=torch.float64)
    if candidates[0].act is None:
        return wb, None
    return wb, torch.tensor([float(c.act.bits) for c in candidates], dtype=torch.float64)


def soft_costs(ctx: Context, wbits: torch.Tensor, abits: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Return each budgeted cost as a differentiable function of per-layer bits [L].

    Weight and size bits are ``numel · b_w`` plus each layer's fixed part (scales, biases, read
    from the cost table); BOPs are ``MACs · b_w · b_a`` (b_a = 32 without activation specs).
    """
    cw, ca = bits_of(ctx.candidates)
    numel = torch.tensor([float(i.numel) for i in ctx.model_costs.infos], dtype=torch.float64)
    macs = torch.tensor([float(i.macs) for i in ctx.model_costs.infos], dtype=torch.float64)
    ab = abits if abits is not None else (torch.full_like(wbits, float(ca[0])) if ca is not None else 32.0)
    out = {}
    for k in ctx.limits:
        if k == "bops":
            out[k] = (macs * wbits * ab).sum()
        else:
            fixed = ctx.costs[k][:, 0] - numel * cw[0]
            out[k] = (numel * wbits + fixed).sum()
    return out


def budget_bits(ctx: Context) -> float:
    """Return the largest uniform weight bit-width (real-valued) whose costs meet every budget."""
    cw, _ = bits_of(ctx.candidates)
    hi = float(cw.max())
    lo = float(cw.min())
    if all(
        float(v) <= ctx.limits[k]
        for k, v in soft_costs(ctx, torch.full((len(ctx.layers),), hi, dtype=torch.float64), None).items()
    ):
        return hi
    for _ in range(40):  # bisection: the costs grow with the bits
        mid = 0.5 * (lo + hi)
        bits = torch.full((len(ctx.layers),), mid, dtype=torch.float64)
        ok = all(float(v) <= ctx.limits[k] for k, v in soft_costs(ctx, bits, None).items())
        lo, hi = (mid, hi) if ok else (lo, mid)
    return lo


def project(
    ctx: Context, wbits: torch.Tensor, abits: torch.Tensor | None, time_limit: float | None
) -> tuple[list[int], dict]:
    """Pick one candidate per layer closest to the learned bits, within the budget (exact ILP)."""
    cw, ca = bits_of(ctx.candidates)
    scores = (wbits[:, None] - cw[None, :]) ** 2
    if abits is not None and ca is not None:
        scores = scores + ((abits[:, None] - ca[None, :]) ** 2).nan_to_num(0.0)  # NaN: weight-only
    return choose(ctx, scores, time_limit)


def readout_scores(ctx: Context, installed: Installed, batches: list) -> torch.Tensor:
    """The mean ``ΔL`` [L, C] of :func:`readout_table`."""
    return readout_table(ctx, installed, batches)[0]


@torch.no_grad()
def readout_table(ctx: Context, installed: Installed, batches: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``ΔL`` [L, C]: the loss with one layer deployed at each candidate, the others as learned.

    ``installed`` holds the search quantizers on ``ctx.qmodel``. Layer l at candidate j gets the
    deployable quantizers of j (:func:`deploy_pair`: mixq's integer grid, squared-error range), the
    grid the fine-tune starts from, while every other layer keeps its DDQ quantizer at its learned
    bits; the search quantizers are put back after. Each row is the loss minus the loss with the
    learned quantizers everywhere, so the ILP's objective is the sum of per-layer loss changes (a
    separable, first-order model of the plan's loss).

    Returns the mean over the batches and its standard error (the per-batch differences' standard
    deviation over √B; zeros with one batch): both [L, C].
    """
    model = ctx.qmodel
    was_training = model.training
    model.eval()

    def loss() -> torch.Tensor:
        return torch.tensor([float(ctx.task.loss(model, b)) for b in batches], dtype=torch.float64)

    try:
        base = loss()
        out = torch.zeros(len(ctx.layers), len(ctx.candidates), len(batches), dtype=torch.float64)
        for i, name in enumerate(ctx.layers):
            m = installed.layers[name]
            acts: dict = {}  # the input quantizer depends on the act spec only: built once per layer
            for j, spec in enumerate(ctx.candidates):
                wq, aq = deploy_pair(m, spec, installed.saved[name][1], acts.get(spec.act))
                acts[spec.act] = aq
                m.weight_quant, m.input_quant = wq, aq
                out[i, j] = loss() - base
            m.weight_quant, m.input_quant = installed.quantizers[name]
    finally:
        model.train(was_training)
    se = out.std(-1) / math.sqrt(len(batches)) if len(batches) > 1 else torch.zeros_like(out[..., 0])
    return out.mean(-1), se


def choose(ctx: Context, scores: torch.Tensor, time_limit: float | None) -> tuple[list[int], dict]:
    """Minimize ``Σ_l scores[l, j(l)]`` under the budgets (exact ILP; the argmin without budgets)."""
    if not ctx.limits:
        choices = scores.argmin(1).tolist()
        return choices, {
            "solver": "argmin",
            "objective": float(scores.gather(1, torch.tensor(choices)[:, None]).sum()),
        }
    problem = search.Problem(
        scores=scores, costs={k: ctx.costs[k] for k in ctx.limits}, budgets=dict(ctx.limits)
    )
    sol = search.ilp(problem, time_limit=time_limit)
    return list(sol.choices), {"solver": "ilp", "status": sol.status, "objective": sol.objective}


def budget_use(ctx: Context, choices: list[int], readout: str) -> dict:
    """Record how much of each budget the plan uses and, below 98 %, why no larger plan was taken."""
    use = {
        k: float(ctx.costs[k][torch.arange(len(choices)), torch.tensor(choices)].sum()) / v
        for k, v in ctx.limits.items()
    }
    out: dict = {"budget_use": use}
    if use and min(use.values()) < 0.98:
        out["unused_budget"] = (
            "the exact ILP minimizes the summed measured loss changes under the budget: no plan that "
            "spends more of it measured a lower loss"
            if readout == "sensitivity"
            else "the plan nearest the learned bits: training learned fewer bits than the budget allows"
        )
    return out


# -- installing quantizers on the wrapped model ---------------------------------------------------


def _rows(spec_granularity: str, weight: torch.Tensor) -> int:
    return weight.shape[0] if spec_granularity == "channel" else 1


def deploy_quantizers(ctx: Context, choices: list[int]) -> dict[str, tuple[nn.Module, nn.Module]]:
    """Build the deployable (weight, input) quantizers of each layer at its chosen candidate."""
    qlayers = sites(ctx.qmodel)
    return {
        name: deploy_pair(qlayers[name], ctx.candidates[j])
        for name, j in zip(ctx.layers, choices, strict=True)
    }


def deploy_pair(
    m: nn.Module, spec: LayerSpec, site_input: nn.Module | None = None, act: nn.Module | None = None
) -> tuple[nn.Module, nn.Module]:
    """The deployable (weight, input) quantizers of site ``m`` at ``spec``, ranges of least squared error.

    ``site_input``: the site's own input quantizer (its calibration sample), when another is installed;
    ``act``: an input quantizer already built for ``spec.act`` (used as is).
    """
    rows = _rows(spec.weight.granularity, m.weight)
    lo, hi = init_range(m.weight, spec.weight, rows)
    wq = LearnedInt(spec.weight, "weight", lo, hi)
    aq: nn.Module = nn.Identity()
    if act is not None:
        aq = act
    elif spec.act is not None and not getattr(m, "weight_only", False):  # an embedding reads indices
        alo, ahi = init_range((site_input if site_input is not None else m.input_quant).sample, spec.act, 1)
        aq = LearnedInt(spec.act, "act", alo, ahi)
    return wq, aq


def search_quantizers(ctx: Context, cfg: Config, start_bits: float) -> dict[str, tuple[nn.Module, nn.Module]]:
    """Build the DDQ (weight, input) quantizers of the search phase."""
    cw, ca = bits_of(ctx.candidates)
    qlayers = sites(ctx.qmodel)
    top = int(cw.argmax())
    out = {}
    for name in ctx.layers:
        m = qlayers[name]
        wspec = ctx.candidates[top].weight
        rows = _rows(wspec.granularity, m.weight)
        amax = m.weight.detach().float().reshape(rows, -1).abs().amax(1)
        wq = DDQQuantizer(rows, int(cw.max()), int(cw.min()), -amax, amax, cfg.levels, cfg.alpha)
        with torch.no_grad():
            wq.beta.fill_(start_bits)
        aq: nn.Module = nn.Identity()
        if ca is not None and not getattr(m, "weight_only", False):  # an embedding reads indices
            aspec = ctx.candidates[int(ca.argmax())].act
            alo, ahi = init_range(m.input_quant.sample, aspec, 1)
            if int(ca.max()) == int(ca.min()):
                aq = LearnedInt(aspec, "act", alo, ahi)
            else:
                aq = DDQQuantizer(1, int(ca.max()), int(ca.min()), alo, ahi, cfg.levels, cfg.alpha)
        out[name] = (wq, aq)
    return out


class Installed:
    """Put quantizers in the place of the sites of a wrapped model; ``restore`` puts the sites back."""

    def __init__(self, model: nn.Module, quantizers: dict[str, tuple[nn.Module, nn.Module]]) -> None:
        self.layers = {n: m for n, m in sites(model).items() if n in quantizers}
        self.saved = {n: (m.weight_quant, m.input_quant) for n, m in self.layers.items()}
        self.quantizers = quantizers
        for n, m in self.layers.items():
            m.weight_quant, m.input_quant = quantizers[n]

    def restore(self) -> None:
        """Put the original sites back."""
        for n, m in self.layers.items():
            m.weight_quant, m.input_quant = self.saved[n]


def param_groups(
    model: nn.Module, quantizers: dict[str, tuple[nn.Module, nn.Module]], cfg: Config
) -> list[dict]:
    """Optimizer groups: the model's own parameters, the quantizers' ranges/levels, the bits β."""
    qparams = {id(p) for pair in quantizers.values() for q in pair for p in q.parameters()}
    own = [p for p in model.parameters() if id(p) not in qparams and p.requires_grad]
    ranges, betas = [], []
    for pair in quantizers.values():
        for q in pair:
            for pname, p in q.named_parameters():
                (betas if pname == "beta" else ranges).append(p)
    return [
        {"params": own, "lr": cfg.lr},
        {"params": ranges, "lr": cfg.lr_range},
        {"params": betas, "lr": cfg.lr_bits},
    ]


def finish(ctx: Context, installed: Installed) -> None:
    """Bake the learned weight grids into the weights, set activation ranges, restore the sites."""
    qlayers = sites(ctx.qmodel)
    installed.restore()
    for name, (wq, aq) in installed.quantizers.items():
        m = qlayers[name]
        wq.bake(m.weight)
        if isinstance(aq, LearnedInt):
            lo, hi = aq.lo.detach().reshape(()), aq.hi.detach().reshape(())
            m.input_quant.set_range(lo.clone(), hi.clone())
        m.weight_quant.set_spec(None)
        m.input_quant.set_spec(None)


def learned_bits(
    quantizers: dict[str, tuple[nn.Module, nn.Module]],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return the clamped β of each layer's weight quantizer [L] and input quantizer (or None).

    A weight-only layer (an embedding) among layers with learned input bits gets NaN input bits:
    :func:`project` then leaves its activation out of the distance.
    """
    w, a = [], []
    for wq, aq in quantizers.values():
        w.append(float(wq.beta.detach().clamp(wq.min_bits, wq.max_bits)))
        a.append(
            float(aq.beta.detach().clamp(aq.min_bits, aq.max_bits))
            if isinstance(aq, DDQQuantizer)
            else math.nan
        )
    wt = torch.tensor(w, dtype=torch.float64)
    learned = any(isinstance(aq, DDQQuantizer) for _, aq in quantizers.values())
    return wt, (torch.tensor(a, dtype=torch.float64) if learned else None)


def regularizer(ctx: Context, cfg: Config, quantizers: dict[str, tuple[nn.Module, nn.Module]]):  # noqa: ANN201
    """Return the training hook: clamp β, then ``λ Σ_k ρ(C_k(b) / limit_k − 1)``."""
    pairs = [quantizers[n] for n in ctx.layers]

    def hook(step: int, model: nn.Module) -> torch.Tensor | None:
        with torch.no_grad():
            for pair in pairs:
                for q in pair:
                    if isinstance(q, DDQQuantizer):
                        q.beta.clamp_(q.min_bits - 0.49, q.max_bits + 0.49)
        if not ctx.limits or cfg.lam == 0:
            return None
        wb = torch.stack([p[0].soft_bits() for p in pairs]).double()
        ab = (  # a weight-only layer (an embedding, no MACs) has no input quantizer: 0 bits
            torch.stack(
                [
                    p[1].soft_bits().double() if isinstance(p[1], DDQQuantizer) else wb.new_zeros(())
                    for p in pairs
                ]
            )
            if any(isinstance(p[1], DDQQuantizer) for p in pairs)
            else None
        )
        total = torch.zeros((), dtype=torch.float64)
        for k, c in soft_costs(ctx, wb, ab).items():
            r = torch.relu(c / ctx.limits[k] - 1.0)
            total = total + (r if cfg.penalty == "hinge" else r * r)
        return (cfg.lam * total).float()

    return hook


# -- the method -----------------------------------------------------------------------------------


def _phase(
    ctx: Context, cfg: Config, quantizers: dict, steps: int, hook: Hook | None, name: str
) -> tuple[Installed, dict]:
    installed = Installed(ctx.qmodel, quantizers)
    tcfg = TrainConfig(steps=steps, bn=cfg.bn, seed=ctx.seed, log_every=1)  # every step: the loss curve
    batches = train_batches(ctx)
    ckpt = ctx.out / "train" / name if ctx.out is not None else None
    try:
        res = train(
            ctx.qmodel,
            ctx.task.loss,
            batches,
            param_groups(ctx.qmodel, quantizers, cfg),
            tcfg,
            hook=hook,
            checkpoint_dir=Checkpoint(ckpt, f"{ctx.key}:{name}" if ctx.key else None) if ckpt else None,
            desc=f"ddq {name}",
        )
    except BaseException:
        installed.restore()
        raise
    losses = [h["loss"] for h in res.history]
    info = {
        "phase": name,
        "steps": res.steps,
        "resumed_from": res.resumed_from,
        "seconds": res.seconds,
        "images": res.steps * _batch_size(batches),
        "first_loss": losses[0] if losses else math.nan,
        "last_loss": losses[-1] if losses else math.nan,
        "loss_curve": [round(v, 5) for v in losses],
    }
    return installed, info


def train_batches(ctx: Context) -> list:
    """The training batches: ``task.train``, or the calibration batches when the task has none."""
    return getattr(ctx.task, "train", None) or ctx.task.calib


def _batch_size(batches: list) -> int:
    b = batches[0]
    x = b[0] if isinstance(b, (tuple, list)) else b
    return int(x.shape[0]) if isinstance(x, torch.Tensor) else 1


def search_ddq(ctx: Context, cfg: Config) -> MethodOutput:
    """The ``ddq`` method (see the module docstring)."""
    check_candidates(ctx.candidates)
    ctx.check_feasible(uniform=not cfg.learn_bits)
    batches = train_batches(ctx)
    total = cfg.steps or max(1, math.ceil(cfg.epochs * len(batches)))
    apply(ctx.qmodel, {})
    history: list[dict] = []
    cw, _ = bits_of(ctx.candidates)
    if cfg.learn_bits:
        if total < 2:
            raise ValueError(f"ddq needs at least 2 training steps (search and fine-tune), got {total}")
        n_search = max(1, min(total - 1, int(round(cfg.search_frac * total))))
        start = float(cw.max()) if cfg.init_bits == "max" else budget_bits(ctx)
        quantizers = search_quantizers(ctx, cfg, start)
        t0 = time.perf_counter()
        installed, info = _phase(ctx, cfg, quantizers, n_search, regularizer(ctx, cfg, quantizers), "search")
        wb, ab = learned_bits(quantizers)
        try:
            if cfg.readout == "sensitivity":
                scores, se = readout_table(
                    ctx, installed, [batches[i % len(batches)] for i in range(cfg.readout_batches)]
                )
                choices, proj = choose(ctx, scores + cfg.readout_confidence * se, cfg.time_limit)
                proj["scores"], proj["scores_se"] = (
                    {
                        n: {c.name: float(v) for c, v in zip(ctx.candidates, row, strict=True)}
                        for n, row in zip(ctx.layers, table, strict=True)
                    }
                    for table in (scores, se)
                )
            else:
                choices, proj = project(ctx, wb, ab, cfg.time_limit)
        finally:
            installed.restore()
        proj.update(budget_use(ctx, choices, cfg.readout), readout=cfg.readout)
        info.update(
            proj,
            start_bits=start,
            learned_bits={n: float(b) for n, b in zip(ctx.layers, wb, strict=True)},
            seconds_with_projection=time.perf_counter() - t0,
        )
        if ab is not None:
            info["learned_act_bits"] = {
                n: float(b) for n, b in zip(ctx.layers, ab, strict=True) if not math.isnan(b)
            }
        history.append(info)
        n_tune = total - n_search
    else:
        feasible = [j for j in range(len(ctx.candidates)) if ctx.within_limits([j] * len(ctx.layers))]
        best = max(feasible, key=lambda j: float(ctx.costs["weight_bits"][:, j].sum()))
        choices = [best] * len(ctx.layers)
        n_tune = total
    plan = ctx.plan_of(choices)
    quantizers = deploy_quantizers(ctx, choices)  # n_tune >= 1: the deployed grids are always trained
    installed, info = _phase(ctx, cfg, quantizers, n_tune, None, "finetune")
    history.append(info)
    finish(ctx, installed)
    plan.meta.update(
        {
            "ddq": {
                "steps": total,
                "learn_bits": cfg.learn_bits,
                "evaluated": "integer grids at the plan's bits, learned ranges baked in",
            }
        }
    )
    log.info("ddq: plan %s", {n: s.name for n, s in plan.layers.items()})
    return MethodOutput(plan=plan, history=history)
