"""A small quantization-aware training loop shared by the QAT methods (DDQ, FLIQS, fine-tuning).

``train(model, loss, batches, groups, cfg)`` runs ``cfg.steps`` optimizer steps (or
``cfg.epochs`` passes over ``batches``), with a linear warm-up then cosine decay of every
group's learning rate, batch norm frozen or trained, an optional per-step ``hook`` (a controller
or regularizer that returns an extra loss term) and progress through :mod:`mixq.progress`.

With a checkpoint directory, the model, the optimizer and the loop's position are saved after
every epoch (and at the end) as plain tensors and numbers, read back with
``torch.load(weights_only=True)``; calling ``train`` again with the same settings (and ``key``) resumes
where the last checkpoint stopped, announced by a warning; a checkpoint of another ``key`` is
refused. Batches are visited in a per-epoch order drawn from ``cfg.seed``,
so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixq.progress import Bar

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd")
BN_MODES = ("freeze", "train")
CHECKPOINT = "train_state.pt"
_HINT = "a method's steps or epochs setting shortens it (e.g. --method-arg steps=200)"

Hook = Callable[[int, nn.Module], "torch.Tensor | None"]


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train`.

    Attributes:
        steps: optimizer steps; 0 means ``epochs`` passes over the batches.
        epochs: passes over the batches when ``steps`` is 0 (may be fractional).
        optimizer: "adam" or "sgd" (Nesterov momentum).
        momentum: SGD momentum.
        weight_decay: applied to groups that do not set their own.
        warmup: fraction of the steps with a linear learning-rate warm-up (then cosine to zero).
        bn: "freeze" keeps batch-norm layers in eval mode (running statistics fixed), "train"
            updates them.
        grad_clip: clip the global gradient norm to this value (0: off).
        seed: seed of the batch order.
        log_every: steps between history records.
    """

    steps: int = 0
    epochs: float = 1.0
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup: float = 0.05
    bn: str = "freeze"
    grad_clip: float = 0.0
    seed: int = 0
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        if self.bn not in BN_MODES:
            raise ValueError(f"unknown bn mode {self.bn!r}; valid: {', '.join(BN_MODES)}")
        if self.steps < 0 or self.epochs <= 0 and self.steps == 0:
            raise ValueError(f"need steps > 0 or epochs > 0, got steps={self.steps}, epochs={self.epochs}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")

    def total_steps(self, batches_per_epoch: int) -> int:
        """Return the number of optimizer steps for ``batches_per_epoch`` batches per epoch."""
        return self.steps if self.steps else max(1, math.ceil(self.epochs * batches_per_epoch))


@dataclass(frozen=True)
class Checkpoint:
    """Where :func:`train` checkpoints (``dir``) and what produced it (``key``, e.g. the run's
    configuration key: recorded in the checkpoint, and a checkpoint of another key is refused;
    None: not checked)."""

    dir: str | Path
    key: str | None = None


@dataclass
class TrainResult:
    """What :func:`train` did: steps run (in total and in this call), losses, wall time."""

    steps: int
    resumed_from: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Return the learning-rate factor at ``step``: linear warm-up, then cosine decay to zero.

    >>> [round(lr_factor(s, 2, 6), 3) for s in range(6)]
    [0.5, 1.0, 1.0, 0.854, 0.5, 0.146]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / span))


def make_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Build the optimizer of ``cfg`` over parameter ``groups`` (each with "params" and "lr")."""
    for g in groups:
        if "params" not in g or "lr" not in g:
            raise ValueError(f"every parameter group needs 'params' and 'lr'; got keys {sorted(g)}")
    groups = [dict(g, params=list(g["params"])) for g in groups]  # generators are read once
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("no parameters to train")
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        groups,
        lr=groups[0]["lr"],
        momentum=cfg.momentum,
        nesterov=cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )


def batch_order(n: int, epoch: int, seed: int) -> list[int]:
    """Return the order in which epoch ``epoch`` visits ``n`` batches (fixed by ``seed``)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def set_train_mode(model: nn.Module, bn: str) -> None:
    """Put ``model`` in training mode, batch norm frozen in eval mode when ``bn == "freeze"``."""
    model.train()
    if bn == "freeze":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _save(
    path: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    step: int,
    total: int,
    history: list[dict[str, float]],
    key: str | None,
) -> None:
    tmp = path.with_suffix(".tmp")
    keys = sorted({k for h in history for k in h})
    hist = {k: torch.tensor([h.get(k, math.nan) for h in history], dtype=torch.float64) for k in keys}
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "total": total,
            "history": hist,
            "key": key or "",
        },
        tmp,
    )
    tmp.replace(path)


def _load(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer, total: int, key: str | None
) -> tuple[int, list]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if key is not None and state.get("key", "") != key:
        raise ValueError(
            f"checkpoint {path} was written by another configuration (key "
            f"{state.get('key', '')[:16] or 'none'!r}, this run's {key[:16]!r}): pass overwrite=True "
            "(mixq run --overwrite) to start over, or use another checkpoint directory"
        )
    if int(state["total"]) != total:
        raise ValueError(
            f"checkpoint {path} is for {int(state['total'])} steps, this run has {total}; "
            "use another checkpoint directory or the same training length"
        )
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    hist = state["history"]
    n = len(next(iter(hist.values()))) if hist else 0
    history = [{k: float(v[i]) for k, v in hist.items() if not math.isnan(float(v[i]))} for i in range(n)]
    return int(state["step"]), history


def train(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batches: Sequence[Any],
    groups: list[dict[str, Any]],
    cfg: TrainConfig,
    hook: Hook | None = None,
    checkpoint_dir: str | Path | Checkpoint | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` on ``batches`` and return what was done.

    Each step: ``extra = hook(step, model)`` (before the forward pass, so a controller can set
    the model up), ``loss = loss_fn(model, batch) (+ extra)``, backward, optional gradient
    clipping, optimizer step; learning rate ``group lr × lr_factor(step)``.

    Args:
        model: the model (its parameters are updated in place).
        loss_fn: ``loss_fn(model, batch)`` -> scalar loss.
        batches: the training batches (a sequence: one epoch is one pass over it).
        groups: optimizer parameter groups, each with "params" and "lr" (more keys allowed).
        cfg: the loop's settings.
        hook: called at the start of each step with (step, model), before the forward pass; may
            return an extra loss term (a regularizer) or None, and may update its own state or
            the model's configuration (a controller).
        checkpoint_dir: where to save after each epoch and at the end, and to resume from; a
            :class:`Checkpoint` also gives the key the checkpoint records and must match.
        desc: the progress bar's label.

    Returns:
        A TrainResult with the history of (step, loss, extra, lr) every ``cfg.log_every`` steps.
    """
    if len(batches) == 0:
        raise ValueError("no training batches")
    n = len(batches)
    total = cfg.total_steps(n)
    opt = make_optimizer(groups, cfg)
    base_lrs = [g["lr"] for g in opt.param_groups]
    warmup = int(cfg.warmup * total)
    step, history = 0, []
    ckpt = None
    if not isinstance(checkpoint_dir, Checkpoint):
        checkpoint_dir = Checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    key = checkpoint_dir.key if checkpoint_dir is not None else None
    if checkpoint_dir is not None:
        Path(checkpoint_dir.dir).mkdir(parents=True, exist_ok=True)
        ckpt = Path(checkpoint_dir.dir) / CHECKPOINT
        if ckpt.exists():
            step, history = _load(ckpt, model, opt, total, key)
            log.warning("resumed %s at step %d of %d from %s", desc, step, total, ckpt)
    resumed_from = step
    params = [p for g in opt.param_groups for p in g["params"]]
    set_train_mode(model, cfg.bn)
    t0 = time.perf_counter()
    with Bar(total, desc, unit="step", per_line=n, line_unit="epoch", start=step, hint=_HINT) as bar:
        while step < total:
            epoch, pos = divmod(step, n)
            batch = batches[batch_order(n, epoch, cfg.seed)[pos]]
            for g, lr in zip(opt.param_groups, base_lrs, strict=True):
                g["lr"] = lr * lr_factor(step, warmup, total)
            extra = hook(step, model) if hook is not None else None  # first: it may set up the forward
            loss = loss_fn(model, batch)
            full = loss if extra is None else loss + extra
            if not torch.isfinite(full):
                raise FloatingPointError(f"the training loss is {float(full)} at step {step}")
            opt.zero_grad(set_to_none=True)
            full.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            if step % cfg.log_every == 0 or step == total:
                rec = {"step": float(step), "loss": float(loss.detach()), "lr": opt.param_groups[0]["lr"]}
                if extra is not None:
                    rec["extra"] = float(extra.detach())
                history.append(rec)
                bar.set(loss=f"{float(loss.detach()):.4f}")
            bar.update()
            if ckpt is not None and (step % n == 0 or step == total):
                _save(ckpt, model, opt, step, total, history, key)
    model.eval()
    return TrainResult(
        steps=step, resumed_from=resumed_from, history=history, seconds=time.perf_counter() - t0
    )


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Return the settings as a plain dict (for run records)."""
    return asdict(cfg)
