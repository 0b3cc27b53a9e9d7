"""Batch-norm folding: merge a BatchNorm into the Conv2d or Linear that feeds it.

Deployment runs the folded layer, so quantization must see the folded weights
(docs/methods.md §6.1): ``W' = W * g / sqrt(var + eps)`` per output channel and
``b' = beta + (b - mean) * g / sqrt(var + eps)``. The BatchNorm becomes an Identity.
"""

from __future__ import annotations

import torch
from torch import fx, nn

FOLDABLE = (nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@torch.no_grad()
def fold_pair(layer: nn.Conv2d | nn.Linear, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> None:
    """Fold ``bn`` (in eval mode, running statistics) into ``layer``'s weight and bias in place."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics")
    out = layer.weight.shape[0]
    if bn.num_features != out:
        raise ValueError(f"BatchNorm has {bn.num_features} features but the layer has {out} outputs")
    inv = torch.rsqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(inv)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(inv)
    factor = gamma * inv
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(inv)
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    layer.weight.copy_((layer.weight.double() * factor.reshape(shape)).to(layer.weight.dtype))
    new_bias = (beta + (bias - bn.running_mean.double()) * factor).to(layer.weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias)
    else:
        layer.bias.copy_(new_bias)


def _set(model: nn.Module, name: str, child: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, child)


def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every BatchNorm that directly follows a Conv2d or Linear used nowhere else (in place).

    The pairs are found on the model's FX graph; a model FX cannot trace falls back to
    consecutive children of ``nn.Sequential`` containers.

    Returns:
        The folded (layer name, batch-norm name) pairs.
    """
    if model.training:
        raise ValueError("fold batch norm on a model in eval mode (call model.eval() first)")
    pairs: list[tuple[str, str]] = []
    try:
        graph = fx.symbolic_trace(model).graph
        for node in graph.nodes:
            if node.op != "call_module" or not isinstance(model.get_submodule(node.target), NORMS):
                continue
            prev = node.args[0] if node.args else None
            if (
                isinstance(prev, fx.Node)
                and prev.op == "call_module"
                and isinstance(model.get_submodule(prev.target), FOLDABLE)
                and len(prev.users) == 1
            ):
                pairs.append((str(prev.target), str(node.target)))
    except Exception:  # noqa: BLE001 - any tracing failure: use the structural fallback
        for name, m in model.named_modules():
            if isinstance(m, nn.Sequential):
                kids = list(m.named_children())
                for (a, x), (b, y) in zip(kids, kids[1:], strict=False):
                    if isinstance(x, FOLDABLE) and isinstance(y, NORMS):
                        prefix = f"{name}." if name else ""
                        pairs.append((prefix + a, prefix + b))
    seen_layers = [p[0] for p in pairs]
    pairs = [p for p in pairs if seen_layers.count(p[0]) == 1]  # a layer reused is left alone
    for layer_name, bn_name in pairs:
        fold_pair(model.get_submodule(layer_name), model.get_submodule(bn_name))
        _set(model, bn_name, nn.Identity())
    return pairs
