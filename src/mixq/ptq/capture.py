"""Capture one layer's input or output over calibration batches, stopping the forward early.

PTQ steps that work layer by layer (bias correction, AdaRound) need what one layer sees or
produces on the calibration data. The forward pass is cut short once that layer has run: a
forward hook raises :class:`_Stop`, which :func:`run_until_all` catches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


class _Stop(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a hook once the wanted layer has run."""


def channel_axis(module: nn.Module) -> int:
    """Return the channel axis of ``module``'s output: 1 for convolutions, -1 for linear layers."""
    return 1 if isinstance(module, nn.Conv2d) or hasattr(module, "in_channels") else -1


def channel_sums(y: torch.Tensor, axis: int) -> tuple[torch.Tensor, int]:
    """Return the per-channel sum of ``y`` along every axis but ``axis`` and the count per channel.

    >>> channel_sums(torch.ones(2, 3, 4, 4), 1)
    (tensor([32., 32., 32.], dtype=torch.float64), 32)
    """
    y = y.detach().double().movedim(axis, -1)
    flat = y.reshape(-1, y.shape[-1])
    return flat.sum(0), flat.shape[0]


def run_until(
    model: nn.Module,
    module: nn.Module,
    batches: Sequence[Any],
    forward: Callable[[nn.Module, Any], Any],
    record: Callable[[tuple, torch.Tensor], None],
) -> None:
    """Run ``model`` on each batch, calling ``record(inputs, output)`` when ``module`` runs; the
    rest of each forward pass is skipped (the layer is the only thing needed)."""
    run_until_all(model, {"": module}, batches, forward, lambda _n, inputs, output: record(inputs, output))


def run_until_all(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Sequence[Any],
    forward: Callable[[nn.Module, Any], Any],
    record: Callable[[str, tuple, torch.Tensor], None],
) -> None:
    """Run ``model`` on each batch, calling ``record(name, inputs, output)`` as each of ``modules``
    runs; the rest of a batch's forward pass is skipped once every one of them has run."""
    fired: set[str] = set()

    def hook(name: str, inputs: tuple, output: torch.Tensor) -> None:
        record(name, inputs, output)
        fired.add(name)
        if len(fired) == len(modules):
            raise _Stop

    handles = [m.register_forward_hook(lambda _m, i, y, n=n: hook(n, i, y)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                fired.clear()
                try:
                    forward(model, batch)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()


def layer_io(
    model: nn.Module,
    name: str,
    batches: Sequence[Any],
    forward: Callable[[nn.Module, Any], Any],
    what: str,
) -> torch.Tensor:
    """Return the concatenated input (``what="input"``) or output of layer ``name`` over ``batches``.

    Linear layers' tensors are flattened to rows ``[N, features]`` (tokens of a sequence count as
    rows); convolution tensors keep their shape ``[N, C, H, W]``.
    """
    if what not in ("input", "output"):
        raise ValueError(f"unknown what {what!r}; valid: 'input', 'output'")
    module = model.get_submodule(name)
    conv = channel_axis(module) == 1
    parts: list[torch.Tensor] = []

    def record(inputs: tuple, output: torch.Tensor) -> None:
        t = (inputs[0] if what == "input" else output).detach()
        parts.append(t.clone() if conv else t.reshape(-1, t.shape[-1]).clone())

    run_until(model, module, batches, forward, record)
    if not parts:
        raise ValueError(f"layer {name!r} never ran on the calibration batches")
    return torch.cat(parts)
