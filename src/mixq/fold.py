"""Batch-norm folding: merge a BatchNorm into the convolution or linear layer that feeds it.

Deployment runs the folded layer, so quantization must see the folded weights
(docs/methods.md §6.1): ``W' = W * g / sqrt(var + eps)`` per output channel and
``b' = beta + (b - mean) * g / sqrt(var + eps)``. The BatchNorm becomes an Identity.

A pair is folded only when the graph shows that the BatchNorm's input is the layer's output
and nothing else uses that output, and each of the two modules is called at one place. The
graph comes from ``torch.fx`` (the layers and norms, subclasses included, kept as leaves); a
model fx cannot trace is traced by running it once on an example batch (:func:`fold_model`),
with module hooks and a ``TorchFunctionMode`` that sees every use of the layer's output. With
an example batch the folded model's outputs are checked against the original's; a pair that
breaks the check is unfolded again and named.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
RTOL = 1e-4  # the check of the folded outputs: |folded - original| <= rtol * max |original| + ATOL,
ATOL = 1e-5  # rtol = max(RTOL, EPS_RTOL * the eps of the outputs' dtype) (bf16 and fp16 round more)
EPS_RTOL = 8
# functions that read a tensor's metadata, not its values: not a use of a layer's output
_META = frozenset({"__get__", "dim", "size", "numel", "ndimension", "is_floating_point", "type"})


@torch.no_grad()
def fold_pair(layer: nn.Module, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> None:
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


class FoldedNorm(nn.Identity):
    """Where a batch norm was folded into the layer before it: an identity that a packed export
    records (``mixq.export.packed.STRUCTURE_TYPES``), so loading into the original model folds it."""


def _set(model: nn.Module, name: str, child: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, child)


class _Tracer(fx.Tracer):
    """An fx tracer that keeps layers and norms (subclasses with their own forward too) as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, FOLDABLE + NORMS) or super().is_leaf_module(m, qualname)


def _fx_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """The (layer, norm) pairs on the model's fx graph; raises when fx cannot trace it."""
    graph = _Tracer().trace(model)
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), NORMS):
            continue
        prev = node.args[0] if node.args else None
        if (
            isinstance(prev, fx.Node)
            and prev.op == "call_module"
            and isinstance(model.get_submodule(prev.target), FOLDABLE)
            and len(prev.users) == 1
            and calls[str(prev.target)] == 1
            and calls[str(node.target)] == 1
        ):
            pairs.append((str(prev.target), str(node.target)))
    return pairs


def _tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors in a nest of tuples, lists and dicts (a ``ModelOutput`` is a dict)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return [t for x in obj for t in _tensors(x)]
    return []


class _Uses(TorchFunctionMode):
    """Records, for every tensor passed to a torch function, the module whose forward passed it."""

    def __init__(self, stack: list[str], produced: dict[int, str]) -> None:
        super().__init__()
        self.stack, self.produced = stack, produced
        self.uses: dict[str, set[str]] = defaultdict(set)  # layer -> modules using its output

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") not in _META:
            for t in _tensors((args, kwargs)):
                if id(t) in self.produced:  # alive now, so the id is the layer's output's
                    self.uses[self.produced[id(t)]].add(self.stack[-1])
        return func(*args, **kwargs)


def _forward_pairs(model: nn.Module, example: Callable[[nn.Module], Any]) -> list[tuple[str, str]]:
    """The (layer, norm) pairs seen by running ``example(model)`` once with hooks."""
    stack, calls = ["<outside>"], Counter()
    produced: dict[int, str] = {}  # id of a layer's output -> the layer
    keep: list[torch.Tensor] = []  # the layers' outputs stay alive, so their ids stay unique
    norm_inputs: dict[str, list[str | None]] = defaultdict(list)  # norm -> the layer feeding it

    def pre(name: str, m: nn.Module) -> Callable:
        def hook(_m: nn.Module, args: tuple) -> None:
            stack.append(name)
            calls[name] += 1
            if isinstance(m, NORMS) and args and isinstance(args[0], torch.Tensor):
                norm_inputs[name].append(produced.get(id(args[0])))

        return hook

    def post(name: str, m: nn.Module) -> Callable:
        def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
            stack.pop()
            if isinstance(m, FOLDABLE) and isinstance(out, torch.Tensor):
                produced[id(out)] = name
                keep.append(out)

        return hook

    handles = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(pre(name, m)))
        handles.append(m.register_forward_hook(post(name, m)))
    mode = _Uses(stack, produced)
    try:
        with torch.no_grad(), mode:
            returned = {produced.get(id(t)) for t in _tensors(example(model))}
    finally:
        for h in handles:
            h.remove()
    pairs = []
    for bn, layers in norm_inputs.items():
        layer = layers[0]
        inside_bn = all(u == bn or u.startswith(bn + ".") for u in mode.uses[layer])
        if (
            len(layers) == 1
            and layer is not None
            and calls[layer] == 1
            and inside_bn
            and layer not in returned
        ):
            pairs.append((layer, bn))
    return pairs


def _fold(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    for layer_name, bn_name in pairs:
        fold_pair(model.get_submodule(layer_name), model.get_submodule(bn_name))
        _set(model, bn_name, FoldedNorm())


def _foldable(model: nn.Module, pair: tuple[str, str]) -> str | None:
    """Why the pair cannot be folded (no running statistics, feature counts differ), or None."""
    layer, bn = model.get_submodule(pair[0]), model.get_submodule(pair[1])
    if bn.running_mean is None or bn.running_var is None:
        return "no running statistics"
    if bn.num_features != layer.weight.shape[0]:
        return f"{bn.num_features} features after {layer.weight.shape[0]} outputs"
    return None


def _norms(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, NORMS)]


def outputs_differ(a: Any, b: Any) -> float | None:
    """Max |a - b| over two outputs' tensors, or None when every one is within the fp32 tolerance
    (``|a - b| <= rtol * max |b| + ATOL``, ``rtol`` per dtype; other tensors must be equal)."""
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb):
        return float("inf")
    worst, bad = 0.0, False
    for x, y in zip(ta, tb, strict=True):
        if x.shape != y.shape or not x.is_floating_point():
            bad = bad or x.shape != y.shape or not torch.equal(x, y)
            continue
        d = float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
        worst = max(worst, d)
        rtol = max(RTOL, EPS_RTOL * torch.finfo(y.dtype).eps)
        bad = bad or d > rtol * float(y.double().abs().max() if y.numel() else 0.0) + ATOL
    return worst if bad else None


def fold_model(model: nn.Module, example: Callable[[nn.Module], Any] | None = None) -> dict[str, Any]:
    """Fold every BatchNorm that follows a conv or linear layer, in place, and say what was done.

    Args:
        model: a model in eval mode.
        example: runs the model on a calibration batch (``lambda m: task.forward(m, batch)``):
            the fallback trace where fx fails, and the check that the outputs are unchanged.

    Returns:
        A record: ``folded`` ([layer, norm] pairs), ``kept`` ({norm: why it stays}), ``traced``
        ("fx", "forward" or None), ``max_abs_diff`` (of the check, None without ``example``).
    """
    if model.training:
        raise ValueError("fold batch norm on a model in eval mode (call model.eval() first)")
    norms = _norms(model)
    record: dict[str, Any] = {"folded": [], "kept": {}, "traced": None, "max_abs_diff": None}
    if not norms:
        return record
    try:
        pairs, record["traced"] = _fx_pairs(model), "fx"
    except Exception as e:  # noqa: BLE001 - any fx failure: trace by running the model
        if example is None:
            reason = f"not traceable by torch.fx ({type(e).__name__}) and no example batch"
            return _kept(record, norms, reason)
        try:
            pairs, record["traced"] = _forward_pairs(model, example), "forward"
        except Exception as e2:  # noqa: BLE001 - the forward failed: nothing is folded
            return _kept(record, norms, f"not traceable ({type(e).__name__}, {type(e2).__name__})")
    kept = {bn: why for layer, bn in pairs if (why := _foldable(model, (layer, bn)))}
    pairs = [p for p in pairs if p[1] not in kept]
    if example is not None and pairs:
        pairs, kept_check, record["max_abs_diff"] = _checked(model, pairs, example)
        kept.update(kept_check)
    else:
        _fold(model, pairs)
    record["folded"] = [list(p) for p in pairs]
    folded = {bn for _, bn in pairs}
    unmatched = "not after a conv or linear layer whose output only it uses"
    record["kept"] = {bn: kept.get(bn, unmatched) for bn in norms if bn not in folded}
    for bn, why in record["kept"].items():
        log.info("batch norm %s not folded: %s", bn, why)
    return record


def _kept(record: dict[str, Any], norms: list[str], reason: str) -> dict[str, Any]:
    log.warning("batch norm not folded (%d modules kept): the model is %s", len(norms), reason)
    record["kept"] = dict.fromkeys(norms, reason)
    return record


@torch.no_grad()
def _checked(
    model: nn.Module, pairs: list[tuple[str, str]], example: Callable[[nn.Module], Any]
) -> tuple[list[tuple[str, str]], dict[str, str], float]:
    """Fold ``pairs`` and check the outputs on the example; on a mismatch fold them one by one."""
    ref = example(model)
    originals = {n: copy.deepcopy(model.get_submodule(n)) for p in pairs for n in p}
    _fold(model, pairs)
    out = example(model)
    if outputs_differ(out, ref) is None:
        return pairs, {}, max_abs_diff(out, ref)
    for n, m in originals.items():
        _set(model, n, copy.deepcopy(m))
    ok, kept = [], {}
    for pair in pairs:
        _fold(model, [pair])
        d = outputs_differ(example(model), ref)
        if d is None:
            ok.append(pair)
            continue
        kept[pair[1]] = f"folding into {pair[0]} changed the outputs (max |diff| {d:.3g})"
        log.warning("batch norm %s not folded into %s: the outputs changed by %.3g", pair[1], pair[0], d)
        for n in pair:
            _set(model, n, copy.deepcopy(originals[n]))
    return ok, kept, max_abs_diff(example(model), ref)


def max_abs_diff(a: Any, b: Any) -> float:
    """Max |a - b| over the tensors of two outputs."""
    pairs = zip(_tensors(a), _tensors(b), strict=False)
    diffs = ((x.detach().double() - y.detach().double()).abs().max() for x, y in pairs if x.numel())
    return max((float(d) for d in diffs), default=0.0)


def fold_batchnorm(
    model: nn.Module, example: Callable[[nn.Module], Any] | None = None
) -> list[tuple[str, str]]:
    """Fold every BatchNorm that directly follows a conv or linear layer used nowhere else (in place).

    The folded norms become plain ``nn.Identity`` modules, as the built-in tasks' models hold
    them (:func:`fold_model`, which ``mixq.run`` calls, leaves a :class:`FoldedNorm`).

    Returns:
        The folded (layer name, batch-norm name) pairs (:func:`fold_model` says what was kept).
    """
    pairs = [(layer, bn) for layer, bn in fold_model(model, example)["folded"]]
    for _, bn in pairs:
        _set(model, bn, nn.Identity())
    return pairs
