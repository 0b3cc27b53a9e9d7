"""A REINFORCE controller over one categorical choice per layer (the FLIQS / TuNAS policy).

The policy is ``π_θ(α) = Π_l softmax(θ_l)[α_l]`` with logits ``θ`` [L, C], zero at the start
(uniform). One update on a sampled ``α`` with reward ``R``:

    A = R − b                                      (b: moving-average baseline, b₀ = first R)
    L_RL = −A · log π_θ(α) − λ_H · Σ_l H(π_θ,l)    (entropy bonus, λ_H from a schedule)
    θ ← Adam(β₁ = 0, β₂ = 0.999, ε = 1e-8) step on L_RL
    b ← m · b + (1 − m) · R

Rewards (docs/methods.md §4.2): ``abs``: ``Q + β |C / C₀ − 1|`` and ``mnas``: ``Q · (C / C₀)^β``,
with ``β ≤ 0`` so that a cost away from the target lowers the reward.

This module imports only torch, so it is tested on bandits without a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

REWARDS = ("abs", "mnas")
SCHEDULES = ("cosine", "linear", "constant")


def reward(quality: float, cost: float | None, target: float | None, beta: float, form: str = "abs") -> float:
    """Return the reward of a sampled choice: quality, lowered by the cost's distance to the target.

    ``abs``: ``Q + β |C / C₀ − 1|``; ``mnas``: ``Q · (C / C₀)^β``. Without a cost or a target the
    reward is the quality alone. ``β`` must be ≤ 0 (a larger distance gives a lower reward).

    >>> reward(0.9, 150.0, 100.0, -0.5)
    0.65
    >>> reward(0.9, 50.0, 100.0, -0.5)
    0.65
    >>> round(reward(0.9, 200.0, 100.0, -0.1, "mnas"), 4)
    0.8397
    """
    if form not in REWARDS:
        raise ValueError(f"unknown reward {form!r}; valid: {', '.join(REWARDS)}")
    if beta > 0:
        raise ValueError(f"beta must be <= 0 (the cost term lowers the reward), got {beta}")
    if cost is None or target is None:
        return float(quality)
    if target <= 0:
        raise ValueError(f"the cost target must be positive, got {target}")
    ratio = cost / target
    if form == "abs":
        return float(quality + beta * abs(ratio - 1.0))
    return float(quality * ratio**beta)


def entropy_coef(step: int, start: int, end: int, coef: float, schedule: str = "cosine") -> float:
    """Return the entropy weight ``λ_H`` at ``step``: ``coef`` until ``start``, then decaying to 0 at ``end``.

    cosine: ``coef · ½ (1 + cos(π (t − start) / (end − start)))``; linear: ``coef · (1 − …)``;
    constant: ``coef`` throughout.

    >>> [round(entropy_coef(t, 2, 6, 1.0), 3) for t in range(8)]
    [1.0, 1.0, 1.0, 0.854, 0.5, 0.146, 0.0, 0.0]
    >>> [entropy_coef(t, 0, 4, 1.0, "linear") for t in range(5)]
    [1.0, 0.75, 0.5, 0.25, 0.0]
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown entropy schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if schedule == "constant" or step <= start:
        return coef
    if step >= end:
        return 0.0
    frac = (step - start) / (end - start)
    if schedule == "linear":
        return coef * (1.0 - frac)
    return coef * 0.5 * (1.0 + math.cos(math.pi * frac))


@dataclass(frozen=True)
class Update:
    """What one controller update did."""

    reward: float
    baseline: float
    advantage: float
    entropy: float
    entropy_coef: float


class Controller:
    """REINFORCE over independent categorical choices, one per layer (see the module docstring).

    Args:
        layers: number of choices L.
        arms: options per choice C.
        lr: Adam learning rate of the logits.
        momentum: baseline momentum m.
        seed: seed of the sampling generator.
    """

    def __init__(
        self, layers: int, arms: int, lr: float = 0.05, momentum: float = 0.9, seed: int = 0
    ) -> None:
        if layers < 1 or arms < 1:
            raise ValueError(f"need at least one layer and one arm, got layers={layers}, arms={arms}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"baseline momentum must be in [0, 1), got {momentum}")
        if lr <= 0:
            raise ValueError(f"the controller's learning rate must be positive, got {lr}")
        self.logits = torch.zeros(layers, arms, dtype=torch.float64)
        self.lr = lr
        self.v = torch.zeros_like(self.logits)  # Adam's second moment (β₁ = 0: no first moment)
        self.t = 0
        self.momentum = momentum
        self.baseline: float | None = None
        self.gen = torch.Generator().manual_seed(seed)

    def probs(self) -> torch.Tensor:
        """Return the policy's probabilities [L, C]."""
        return torch.softmax(self.logits, dim=1)

    def sample(self) -> list[int]:
        """Draw one arm per layer from the policy."""
        return torch.multinomial(self.probs(), 1, generator=self.gen).squeeze(1).tolist()

    def entropy(self) -> float:
        """Return the policy's mean per-layer entropy (nats)."""
        return float(self.layer_entropy().mean())

    def layer_entropy(self) -> torch.Tensor:
        """Return each layer's policy entropy [L] (nats; at most ``log C``)."""
        p = self.probs()
        return -(p * torch.log(p.clamp_min(1e-300))).sum(1)

    def max_entropy(self) -> float:
        """Return the entropy of the uniform policy, ``log C``."""
        return math.log(self.logits.shape[1])

    def argmax(self) -> list[int]:
        """Return the most probable arm of each layer."""
        return self.logits.argmax(1).tolist()

    def log_probs(self) -> torch.Tensor:
        """Return ``log π`` [L, C] (no gradient)."""
        return torch.log_softmax(self.logits, dim=1)

    def grad(self, choices: list[int], advantage: float, coef: float) -> torch.Tensor:
        """Return ``∂L_RL/∂θ`` [L, C] in closed form.

        ``∂(−A log π_l(a_l))/∂θ_l = −A (onehot(a_l) − p_l)`` and
        ``∂(−λ H_l)/∂θ_l = λ p_l ⊙ (log p_l + H_l)``.
        """
        if len(choices) != self.logits.shape[0]:
            raise ValueError(f"expected {self.logits.shape[0]} choices, got {len(choices)}")
        logp = self.log_probs()
        p = logp.exp()
        onehot = torch.zeros_like(p).scatter_(1, torch.tensor(choices)[:, None], 1.0)
        ent = -(p * logp).sum(1, keepdim=True)  # [L, 1]
        return -advantage * (onehot - p) + coef * p * (logp + ent)

    def update(self, choices: list[int], r: float, coef: float, lr_scale: float = 1.0) -> Update:
        """Take one REINFORCE step on sampled ``choices`` with reward ``r`` and entropy weight ``coef``.

        Adam with β₁ = 0, β₂ = 0.999, ε = 1e-8: ``v ← β₂ v + (1 − β₂) g²``,
        ``θ ← θ − lr · lr_scale · g / (√(v / (1 − β₂ᵗ)) + ε)`` (``lr_scale``: TuNAS's growing rate).
        """
        b = r if self.baseline is None else self.baseline
        adv = r - b
        g = self.grad(choices, adv, coef)
        self.t += 1
        self.v.mul_(0.999).add_(0.001 * g * g)
        self.logits -= self.lr * lr_scale * g / ((self.v / (1.0 - 0.999**self.t)).sqrt() + 1e-8)
        self.baseline = self.momentum * b + (1.0 - self.momentum) * r
        return Update(r, b, adv, self.entropy(), coef)
