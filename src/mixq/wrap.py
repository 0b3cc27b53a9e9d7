"""Swap float layers for quantized ones once, then configure them with plans many times.

Residual additions written as :class:`mixq.nn.Add` modules become :class:`mixq.nn.QAdd` sites.
They are not layers of a plan (no weights, nothing to search): one activation spec for every
addition's operands is the plan's ``meta["adds"]`` (a QSpec as a dict, see :func:`with_adds`);
a plan without it leaves the additions in float.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from mixq.nn import Add, QAdd, QCall, QConv1d, QConv2d, QLinear, QModule, Quantizer
from mixq.plan import LayerSpec, Plan, QSpec

ADDS = "adds"  # the plan meta key of the residual additions' operand spec

QUANT_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QLinear,
    nn.Conv2d: QConv2d,
    nn.Conv1d: QConv1d,
}  # exact types replaced by their own site class (the packed and ONNX exports know the first two)
LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)  # their subclasses become QCall sites
SITE_TYPES = (QLinear, QConv2d, QCall)
FLOAT_SHARE = 0.01  # float tensors holding more of the weights than this raise a warning


def _set_child(model: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, child)


def is_hf_conv1d(m: nn.Module) -> bool:
    """Whether ``m`` is transformers' ``Conv1D`` (GPT-2's layers), matched without importing transformers."""
    t = type(m)
    return t.__name__ == "Conv1D" and t.__module__.startswith("transformers.")


def _why_float(m: nn.Module, parent: nn.Module | None, embeddings: bool) -> str | None:
    """Why layer ``m`` (child of ``parent``) stays float, or None: it gets a site."""
    if isinstance(parent, nn.MultiheadAttention):
        return "read directly by MultiheadAttention (its forward never calls the layer)"
    if isinstance(m, LAYER_TYPES) or is_hf_conv1d(m):
        return None
    if isinstance(m, nn.Embedding):
        return None if embeddings else "embedding (embeddings=False)"
    return f"not a supported layer type: {type(m).__name__}"


def _site(m: nn.Module) -> nn.Module:
    """The site that quantizes layer ``m`` (one :func:`_why_float` gives no reason for)."""
    if type(m) in QUANT_MODULES:
        return QUANT_MODULES[type(m)](m)
    if is_hf_conv1d(m):
        return QLinear(m, transposed=True)
    if isinstance(m, nn.Embedding):
        return QCall(m, "embedding")
    return QCall(m, "linear" if isinstance(m, nn.Linear) else "conv")


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, (*LAYER_TYPES, nn.Embedding)) or is_hf_conv1d(m)


def wrap(model: nn.Module, skip: Iterable[str] = (), embeddings: bool = False) -> nn.Module:
    """Give every quantizable layer of ``model`` (in place) its quantization sites.

    Exact nn.Linear, nn.Conv2d and nn.Conv1d become QLinear, QConv2d and QConv1d; transformers'
    ``Conv1D`` (weight [in, out]) a transposed QLinear; subclasses of nn.Linear, nn.Conv1d and
    nn.Conv2d a QCall that runs their own forward with the fake-quantized weight; with
    ``embeddings``, nn.Embedding (and subclasses) a weight-only QCall, per row. A linear layer
    of nn.MultiheadAttention stays float (its parent reads the weight directly). The sites
    share the float layers' parameters and start with no spec, so the wrapped model computes
    exactly what the float model computes.

    Every other parameter tensor with two or more dimensions stays float and is listed, with
    its reason, by :func:`float_layers`; a warning names them when they hold more than 1 % of
    the model's weights.

    Args:
        model: the float model; modified in place and returned.
        skip: exact module names to leave as they are.
        embeddings: quantize nn.Embedding weights too (weight-only; the input is indices).

    Returns:
        The same model object, wrapped.

    Raises:
        ValueError: the model is wrapped already, is a bare layer, or has nothing to quantize
            (the message names the module types it saw).
    """
    skip = set(skip)
    if any(isinstance(m, SITE_TYPES) for m in model.modules()):
        raise ValueError("model is already wrapped; call mixq.unwrap(model) first")
    if _is_layer(model):
        raise ValueError("wrap a model that contains the layer, not a bare layer")
    modules = dict(model.named_modules())
    done: list[str] = []
    for name, m in modules.items():
        if not name or name in skip or not _is_layer(m) or any(name.startswith(d + ".") for d in done):
            continue
        if _why_float(m, modules[name.rpartition(".")[0]], embeddings) is None:
            _set_child(model, name, _site(m))
            done.append(name)
    if not done:
        seen = sorted({type(m).__name__ for n, m in modules.items() if n})
        raise ValueError(
            f"the model has nothing to quantize: it holds {', '.join(seen) or 'no modules'}; "
            "mixq quantizes nn.Linear, nn.Conv1d, nn.Conv2d (and subclasses), transformers' Conv1D "
            "and, with embeddings=True, nn.Embedding"
        )
    for name, m in list(model.named_modules()):
        if type(m) is Add and name not in skip:
            _set_child(model, name, QAdd(m))
    model.mixq_skipped = tuple(sorted(skip))  # a plain attribute: float_layers names them
    _warn_float(model, skip)
    guard_save_pretrained(model)
    return model


def excluded_layers(model: nn.Module, patterns: Iterable[str], embeddings: bool = False) -> list[str]:
    """The layers of a float model that ``patterns`` exclude (fnmatch on qualified module names).

    Only layers that would get a site (:func:`wrap` with ``embeddings``) are returned; a pattern
    may also name a layer that stays float anyway (an embedding without ``embeddings``).

    Raises:
        ValueError: a pattern matches no layer; the message names it and a few layer names.
    """
    modules = dict(model.named_modules())
    layers = [n for n, m in modules.items() if n and _is_layer(m)]
    out: list[str] = []
    for pat in patterns:
        if not isinstance(pat, str) or not pat:
            raise ValueError(f"exclude patterns are non-empty strings, got {pat!r}")
        hits = [n for n in layers if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            few = ", ".join(layers[:4]) + (f", ... {layers[-1]}" if len(layers) > 4 else "")
            raise ValueError(
                f"exclude pattern {pat!r} matches no layer; layers are named like: {few} "
                "(fnmatch patterns on qualified names, e.g. 'lm_head' or '*.embed_tokens')"
            )
        out += [n for n in hits if n not in out]
    return [n for n in out if _why_float(modules[n], modules[n.rpartition(".")[0]], embeddings) is None]


def tied_sites(model: nn.Module) -> dict[str, str]:
    """Sites of a wrapped model that share their weight tensor with an earlier-chosen site: follower
    -> leader. One tensor has one precision: the leader's weight spec is the group's (the first
    site of the group that is not weight-only, else the first), the cost model counts it once
    (:func:`mixq.cost.probe`), and :func:`tie_plan` gives every follower the leader's weight spec.
    """
    groups: dict[int, list[str]] = {}
    for name, m in sites(model).items():
        w = m.float_module.weight if getattr(m, "transposed", False) else m.weight
        groups.setdefault(id(w), []).append(name)
    qs = sites(model)
    out: dict[str, str] = {}
    for names in groups.values():
        if len(names) < 2:
            continue
        leader = next((n for n in names if not getattr(qs[n], "weight_only", False)), names[0])
        out.update({n: leader for n in names if n != leader})
    return out


def tie_plan(model: nn.Module, plan: Plan, strict: bool = False) -> Plan:
    """``plan`` with each tied site (:func:`tied_sites`) at its leader's weight spec.

    ``strict``: raise instead when the plan gives tied sites different weight specs (a plan given
    by the user, e.g. to ``mixq.evaluate``). The pairs are recorded in ``meta["tied"]``.

    Raises:
        ValueError: (strict) tied sites with different weight specs; the message names both.
    """
    tied = tied_sites(model)
    if not tied:
        return plan
    layers = dict(plan.layers)
    for follower, leader in tied.items():
        lead = layers.get(leader)
        wspec = lead.weight if lead else None
        own = layers.get(follower)
        if strict and (own.weight if own else None) != wspec:
            raise ValueError(
                f"layers {follower!r} and {leader!r} share one weight tensor (tied) but the plan gives "
                f"them different weight specs ({own.weight if own else 'float'} and {wspec or 'float'}); "
                "a tied tensor has one precision"
            )
        act = own.act if own else None
        if wspec is None and act is None:
            layers.pop(follower, None)
        else:
            layers[follower] = LayerSpec(wspec, act)
    return Plan(layers, {**plan.meta, "tied": dict(tied)})


def guard_save_pretrained(model: nn.Module) -> None:
    """Make a transformers model's ``save_pretrained`` refuse (in place) while mixq quantizes it.

    ``save_pretrained`` writes the float weights with no ``quantization_config``: the quantization
    would be lost without a word. The guard raises, naming the export that keeps it; a model
    whose sites hold no spec saves as before, and :func:`unwrap` removes the guard.
    """
    if callable(getattr(type(model), "save_pretrained", None)) and "save_pretrained" not in vars(model):
        model.save_pretrained = functools.partial(_save_pretrained, model)  # picklable (torch.save)


def _save_pretrained(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    quantized = [n for n, m in self.named_modules() if _holds_quantization(m)]
    if not quantized:
        return type(self).save_pretrained(self, *args, **kwargs)
    raise ValueError(
        f"save_pretrained would write float weights and lose mixq's quantization of {len(quantized)} "
        f"layer(s) ({', '.join(quantized[:3])}{', ...' if len(quantized) > 3 else ''}); write a "
        "checkpoint transformers loads with mixq.export.save(result, DIR, format='hf') or "
        "`mixq export RUN_DIR --format hf` (compressed-tensors)"
    )


def _holds_quantization(m: nn.Module) -> bool:
    if isinstance(m, SITE_TYPES):
        return m.weight_quant.spec is not None or m.input_quant.spec is not None
    if isinstance(m, QAdd):
        return any(q.spec is not None for q in m.quant)
    return getattr(m, "quantized", False) is True or getattr(type(m), "mixq_quantizer", False)  # deployed


def float_layers(model: nn.Module, skip: Iterable[str] = ()) -> dict[str, str]:
    """Every parameter tensor of a wrapped model with two or more dimensions that stays float,
    by parameter name, with its reason ("not a supported layer type: X", "skipped by name",
    "embedding (embeddings=False)", "tied to <site>.weight (quantized there)", ...)."""
    skip = set(skip) | set(getattr(model, "mixq_skipped", ()))
    qsites = sites(model)
    owner = {id(m.weight): n for n, m in qsites.items()}
    owner.update({id(m.float_module.weight): n for n, m in qsites.items() if getattr(m, "transposed", False)})
    out: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, SITE_TYPES):
            continue  # its weight is quantized; its other tensors are its own (below)
        for pname, p in m.named_parameters(recurse=False):
            if p.dim() >= 2:
                full = f"{name}.{pname}" if name else pname
                out[full] = _float_reason(model, name, pname, owner.get(id(p)), skip)
    for name, m in qsites.items():
        for pname, p in m.named_parameters(recurse=False):
            if p is not m.weight and p.dim() >= 2:
                out[f"{name}.{pname}"] = f"a parameter of {type(m.float_module).__name__} besides its weight"
    return out


def _float_reason(model: nn.Module, name: str, pname: str, tied: str | None, skip: set[str]) -> str:
    """Why parameter ``pname`` of module ``name`` stays float (``tied``: the site sharing it)."""
    m = model.get_submodule(name)
    if tied is not None:
        return f"tied to {tied}.weight (quantized there; this module reads the float weight)"
    if name in skip or any(name.startswith(s + ".") for s in skip):
        excluded = name in getattr(model, "mixq_excluded", ())
        return "excluded (exclude=...): float, counted at 32 bits" if excluded else "skipped by name"
    if _is_layer(m) and pname == "weight" and name:
        reason = _why_float(m, model.get_submodule(name.rpartition(".")[0]), embeddings=False)
        if reason is not None:
            return reason
    return f"not a supported layer type: {type(m).__name__}"


def _weights(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.dim() >= 2)


def _warn_float(model: nn.Module, skip: Iterable[str]) -> None:
    floats = float_layers(model, skip)
    params = dict(model.named_parameters())
    held = sum(params[n].numel() for n in floats if n in params)
    total = _weights(model)
    if total and held > FLOAT_SHARE * total:
        named = "; ".join(f"{n} ({r})" for n, r in floats.items())
        warnings.warn(
            f"{held / total:.1%} of the model's weights stay float: {named}", UserWarning, stacklevel=3
        )


def unwrap(model: nn.Module) -> nn.Module:
    """Put the float layers back (in place); parameters are shared, so nothing is copied."""
    for name, m in list(model.named_modules()):
        if isinstance(m, (*SITE_TYPES, QAdd)):
            _set_child(model, name, m.float_module)
    model.__dict__.pop("mixq_skipped", None)
    model.__dict__.pop("mixq_excluded", None)
    vars(model).pop("save_pretrained", None)  # the guard of wrap (guard_save_pretrained)
    return model


def sites(model: nn.Module) -> dict[str, QModule]:
    """Return the quantized layers of a wrapped model by exact module name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SITE_TYPES)}


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
    A weight-only site (an embedding: its input is indices) takes only the weight spec.
    """
    layers = plan.layers if isinstance(plan, Plan) else plan
    add = adds_spec(plan) if isinstance(plan, Plan) else None
    qlayers = sites(model)
    if not qlayers:
        raise ValueError("model has no quantized layers; call mixq.wrap(model) first")
    Plan(dict(layers)).check_layers(list(qlayers))
    for name, m in qlayers.items():
        spec = layers.get(name)
        if spec and spec.weight and getattr(m, "weight_only", False):
            check_weight_only(name, spec.weight.clip)
        m.weight_quant.set_spec(spec.weight if spec else None)
        m.input_quant.set_spec(spec.act if spec and not getattr(m, "weight_only", False) else None)
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


def weight_only_plan(model: nn.Module, plan: Plan) -> Plan:
    """``plan`` with the activation spec of each weight-only site (an embedding) dropped, as
    :func:`apply` drops it: the plan records what the site computes."""
    qlayers = sites(model)
    layers = {
        n: LayerSpec(s.weight, None)
        if s.act is not None and getattr(qlayers.get(n), "weight_only", False)
        else s
        for n, s in plan.layers.items()
    }
    return plan if layers == plan.layers else Plan(layers, plan.meta)


def check_weight_only(name: str, clip: str) -> None:
    """Refuse weight clip "omse" on weight-only site ``name`` (an embedding: no float input to measure by)."""
    if clip == "omse":
        raise ValueError(
            f"layer {name!r} is an embedding (its input is indices): clip 'omse' needs float inputs; "
            "valid clips for it: minmax, mse, p<percentile> (or run with embeddings=False)"
        )


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
    grams = [n for n, m in qlayers.items() if not getattr(m, "weight_only", False)] if gram else []
    with applied(model, {}), recording_grams(model, grams):
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
