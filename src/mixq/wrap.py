"""Swap float layers for quantized ones once, then configure them with plans many times.

Residual additions written as :class:`mixq.nn.Add` modules become :class:`mixq.nn.QAdd` sites.
They are not layers of a plan (no weights, nothing to search): one activation spec for every
addition's operands is the plan's ``meta["adds"]`` (a QSpec as a dict, see :func:`with_adds`);
a plan without it leaves the additions in float.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from mixq.nn import Add, QAdd, QConv2d, QLinear, QModule, Quantizer
from mixq.plan import LayerSpec, Plan, QSpec

ADDS = "adds"  # the plan meta key of the residual additions' operand spec

QUANT_MODULES: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: QLinear, nn.Conv2d: QConv2d}


def _set_child(model: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, child)


def wrap(model: nn.Module, skip: Iterable[str] = ()) -> nn.Module:
    """Replace every nn.Linear and nn.Conv2d in ``model`` (in place) by its quantized version.

    The quantized layers share the float layers' parameters and start with no spec, so the
    wrapped model computes exactly what the float model computes.

    Args:
        model: the float model; modified in place and returned.
        skip: exact module names to leave as they are.

    Returns:
        The same model object, wrapped.
    """
    skip = set(skip)
    if any(isinstance(m, (QLinear, QConv2d)) for m in model.modules()):
        raise ValueError("model is already wrapped; call mixq.unwrap(model) first")
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if type(m) in QUANT_MODULES and name and name not in skip
    ]
    if not targets and type(model) in QUANT_MODULES:
        raise ValueError("wrap a model that contains the layer, not a bare layer")
    for name, m in targets:
        _set_child(model, name, QUANT_MODULES[type(m)](m))
    for name, m in list(model.named_modules()):
        if type(m) is Add and name not in skip:
            _set_child(model, name, QAdd(m))
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Put the float layers back (in place); parameters are shared, so nothing is copied."""
    for name, m in list(model.named_modules()):
        if isinstance(m, (QLinear, QConv2d, QAdd)):
            _set_child(model, name, m.float_module)
    return model


def sites(model: nn.Module) -> dict[str, QModule]:
    """Return the quantized layers of a wrapped model by exact module name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (QLinear, QConv2d))}


def add_sites(model: nn.Module) -> dict[str, QAdd]:
    """Return the quantized residual additions of a wrapped model by exact module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QAdd)}


def with_adds(plan: Plan, spec: QSpec | str | None) -> Plan:
    """A copy of ``plan`` whose residual additions quantize both operands with ``spec``.

    ``spec``: a QSpec, a candidate name whose input spec is used ("w8a8" or "a8"), or None
    (float additions).
    """
    meta = {k: v for k, v in plan.meta.items() if k != ADDS}
    if isinstance(spec, str):
        from mixq.plan import parse_candidate

        act = parse_candidate(spec).act
        if act is None:
            raise ValueError(f"candidate {spec!r} has no input spec for the additions; e.g. 'a8' or 'w8a8'")
        spec = act
    if spec is not None:
        meta[ADDS] = spec.to_dict()
    return Plan(dict(plan.layers), meta)


def adds_spec(plan: Plan) -> QSpec | None:
    """The operand spec of a plan's residual additions (None: float)."""
    d = plan.meta.get(ADDS)
    if d is None:
        return None
    try:
        return QSpec.from_dict(d)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"plan meta {ADDS!r} is not a QSpec: {d!r} ({e})") from None


def current_plan(model: nn.Module) -> Plan:
    """Return the specs currently set on the model's sites as a Plan (float layers left out)."""
    layers = {}
    for name, m in sites(model).items():
        spec = LayerSpec(m.weight_quant.spec, m.input_quant.spec)
        if spec.weight is not None or spec.act is not None:
            layers[name] = spec
    add = next((m.quant[0].spec for m in add_sites(model).values()), None)
    return Plan(layers, {ADDS: add.to_dict()} if add is not None else {})


def apply(model: nn.Module, plan: Plan | dict[str, LayerSpec]) -> nn.Module:
    """Set every site of a wrapped model from ``plan``; layers the plan omits become float.

    The residual additions take ``plan.meta["adds"]`` (float when absent, or for a plain dict).
    """
    layers = plan.layers if isinstance(plan, Plan) else plan
    add = adds_spec(plan) if isinstance(plan, Plan) else None
    qlayers = sites(model)
    if not qlayers:
        raise ValueError("model has no quantized layers; call mixq.wrap(model) first")
    Plan(dict(layers)).check_layers(list(qlayers))
    for name, m in qlayers.items():
        spec = layers.get(name)
        m.weight_quant.set_spec(spec.weight if spec else None)
        m.input_quant.set_spec(spec.act if spec else None)
    adds = add_sites(model)
    if add is not None and not adds:
        raise ValueError(
            f"the plan quantizes residual additions (meta {ADDS!r}), but the model has none: "
            "write them as mixq.nn.Add() modules (out = self.add(x, y)) to quantize them"
        )
    for m in adds.values():
        for q in m.quant:
            q.set_spec(add)
    return model


@contextlib.contextmanager
def applied(model: nn.Module, plan: Plan | dict[str, LayerSpec]) -> Iterator[nn.Module]:
    """Apply ``plan`` inside a ``with`` block and restore the previous specs on exit, always."""
    before = current_plan(model)
    try:
        yield apply(model, plan)
    finally:
        apply(model, before)


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any] | None = None,
    gram: bool = False,
) -> int:
    """Record activation statistics of every site's float input over ``batches``.

    The operands of the residual additions (:class:`mixq.nn.QAdd`) are observed too.

    Specs are switched off while observing, so the statistics are those of the float model.
    With ``gram``, each layer also accumulates its input Gram matrix (for clip "omse").

    Returns:
        The number of batches seen; zero batches raise a ValueError.
    """
    qlayers = sites(model)
    if not qlayers:
        raise ValueError("model has no quantized layers; call mixq.wrap(model) first")
    run = forward or (lambda m, b: m(b[0] if isinstance(b, (tuple, list)) else b))
    seen = 0
    acts = [m.input_quant for m in qlayers.values()] + [q for m in add_sites(model).values() for q in m.quant]
    with applied(model, {}), recording_grams(model, list(qlayers) if gram else []):
        for m in qlayers.values():
            if isinstance(m.weight_quant, Quantizer):
                m.weight_quant.set_gram(None)
        for q in acts:
            q.reset_stats()
            q.observing = True
        try:
            with torch.no_grad():  # not inference_mode: statistics are reused under autograd
                for batch in batches:
                    run(model, batch)
                    seen += 1
        finally:
            for q in acts:
                q.observing = False
    if seen == 0:
        raise ValueError("calibration data is empty: pass at least one batch")
    return seen


@contextlib.contextmanager
def recording_grams(model: nn.Module, names: Iterable[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Accumulate the input Gram matrix of layers ``names`` over the forwards inside the block.

    Each layer's Gram matrix (float64 [G, k, k] over its input columns, see
    ``QConv2d.input_columns``) is recorded by a forward pre-hook and handed to its weight site
    (:meth:`mixq.nn.Quantizer.set_gram`) on exit; the record is yielded. A layer that saw no
    input gets None.
    """
    qlayers = sites(model)
    names = list(names)
    grams: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable:
        @torch.no_grad()
        def fn(mod: QModule, args: tuple) -> None:
            cols = mod.input_columns(args[0].detach())
            g = torch.bmm(cols.transpose(1, 2), cols.double())
            grams[name] = g if name not in grams else grams[name] + g

        return fn

    handles = [qlayers[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        yield grams
    finally:
        for h in handles:
            h.remove()
        for n in names:
            qlayers[n].weight_quant.set_gram(grams.get(n))
