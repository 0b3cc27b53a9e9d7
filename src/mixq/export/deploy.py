"""The deploy-model builder: a wrapped model with its plan applied as deployed modules.

It owns the :class:`LayerExport` record (a layer's encoded weight, bias and input quantizer),
collecting those records from a wrapped model's sites (:func:`collect`, :func:`collect_adds`
for the operands of quantized residual additions) and building the deployed model from them
(:func:`deploy`, :func:`deploy_model`: the ``Deploy*`` modules of :mod:`mixq.export.modules`).
The packed file (:mod:`mixq.export.packed`), the ONNX writer (:mod:`mixq.export.qdq`) and the
integer emulation (:mod:`mixq.export.integer`) build on it; it reads and writes no file.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from mixq.export.codes import Encoded, act_export, act_params, decode_weight, encode_weight
from mixq.export.modules import ActQuant, DeployAdd, DeployCall, DeployConv2d, DeployLinear
from mixq.kinds import kind_of
from mixq.nn import LOW_PRECISION, Add, QAdd, QCall, QConv2d, QLinear
from mixq.plan import QSpec
from mixq.wrap import guard_save_pretrained, is_hf_conv1d, sites, tied_sites


@dataclass(frozen=True)
class LayerExport:
    """Everything a deployed layer holds.

    Attributes:
        name: exact module name.
        kind: "linear", "conv" (Conv2d and Conv1d), "call" (a subclass of nn.Linear or an
            nn.Embedding, deployed as its own forward: weight [out, in] or [rows, dim], not
            transposed), or "add": one operand of a quantized residual addition (the ``act*``
            fields only; ``weight`` is empty, see :func:`collect_adds`).
        weight: the encoded weight, or the float32 weight of a float layer.
        bias: float32 bias or None.
        act: the input spec, or None (float input).
        act_scale, act_zero: per-tensor input scale and zero point [1] (None for MX or float).
        channel_axis: the input's channel axis (MX blocks run along it, vSPARQ pairs across it).
        act_base: a SPARQ input's 8-bit code spec (``mixq.quant.sparq.base_spec``), else None.
    """

    name: str
    kind: str
    weight: Encoded | torch.Tensor
    bias: torch.Tensor | None
    act: QSpec | None
    act_scale: torch.Tensor | None
    act_zero: torch.Tensor | None
    channel_axis: int
    act_base: QSpec | None = None

    def float_weight(self) -> torch.Tensor:
        """The deployed float32 weight (dequantized from the codes for a quantized layer)."""
        return decode_weight(self.weight) if isinstance(self.weight, Encoded) else self.weight


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.float().view(torch.int32), b.float().view(torch.int32))


def deployed_layers(model: nn.Module) -> dict[str, LayerExport]:
    """The layers of a deployed model (from :func:`deploy` or ``mixq.export.load``), by name."""
    deployed = (DeployLinear, DeployConv2d, DeployCall)
    return {n: m.layer_export for n, m in model.named_modules() if isinstance(m, deployed)}


@torch.no_grad()
def collect(qmodel: nn.Module) -> dict[str, LayerExport]:
    """Encode every quantized layer of a wrapped model with its plan applied.

    A deployed model (:func:`deploy`) gives the layers it was built from.

    Raises:
        RuntimeError: a decoded weight differs from the fake-quantized one (a mixq bug).
    """
    if not sites(qmodel) and deployed_layers(qmodel):
        return deployed_layers(qmodel)
    layers = {}
    tied = tied_sites(qmodel)  # a follower is stored as its leader's weight (export.packed)
    for name, m in sites(qmodel).items():
        if name in tied and getattr(m, "weight_only", False):  # an embedding tied to a layer: no record
            continue
        if not m.exportable:
            float_type = type(m.float_module).__name__
            raise ValueError(
                f"layer {name}: a {float_type} cannot be exported yet; the packed and ONNX exports "
                "take nn.Linear, nn.Conv2d and transformers' Conv1D layers"
            )
        wspec, aspec = m.weight_quant.spec, m.input_quant.spec
        if wspec is not None:
            gram = m.weight_quant.gram.float() if m.weight_quant.gram is not None else None
            w = m.weight.detach()
            w = w.float() if w.dtype in LOW_PRECISION else w  # as the site computes (Quantizer.forward)
            wq = m.weight_quant(w)
            own = getattr(m.weight_quant.rounding, "encode", None)  # a grid of its own (GPTQ groups)
            weight: Encoded | torch.Tensor | None = own(w, wspec) if own is not None else None
            weight = weight if weight is not None else encode_weight(w, wspec, gram, wq)
            if not _same_bits(decode_weight(weight), wq):
                raise RuntimeError(f"layer {name}: the codes do not rebuild the fake-quantized weight")
        else:
            weight = m.weight.detach().float().clone()
        try:
            scale, zero, base = act_export(m.input_quant)  # the site's own values
        except ValueError as e:
            raise ValueError(f"layer {name}: {e}") from None
        layers[name] = LayerExport(
            name=name,
            kind=_kind(m),
            weight=weight,
            bias=None if m.bias is None else m.bias.detach().float().clone(),
            act=aspec,
            act_scale=scale,
            act_zero=zero,
            channel_axis=m.input_quant.channel_axis,
            act_base=base,
        )
    return layers


def _kind(m: nn.Module) -> str:
    """A site's LayerExport kind (see :class:`LayerExport`)."""
    if isinstance(m, QLinear):
        return "linear"
    if isinstance(m, QCall) and not isinstance(m.float_module, nn.Conv1d | nn.Conv2d):
        return "call"
    return "conv"


@torch.no_grad()
def collect_adds(model: nn.Module) -> dict[str, LayerExport]:
    """The quantized operands of a model's residual additions, as input-only layer records.

    Each operand is a :class:`LayerExport` of kind "add" named ``{addition}.quant.{i}`` with its
    spec, scale and zero point (no weight): from a wrapped model's :class:`~mixq.nn.QAdd` sites
    with a spec, or a deployed model's :class:`~mixq.export.modules.DeployAdd` modules.
    """
    out: dict[str, LayerExport] = {}
    for name, m in model.named_modules():
        if isinstance(m, QAdd):
            params = []
            for i, q in enumerate(m.quant):
                if q.spec is None:
                    continue
                if not kind_of(q.spec).add_operand:
                    raise ValueError(
                        f"addition {name}: operand format {q.spec.fmt} is not exportable; "
                        "supported: integer and fp8 formats per tensor"
                    )
                try:
                    params.append((i, q.spec, *act_params(q), q.channel_axis))
                except ValueError as e:
                    raise ValueError(f"addition {name}: {e}") from None
        elif isinstance(m, DeployAdd):
            params = [(i, a.spec, a.scale, a.zero, a.channel_axis) for i, a in enumerate(m.quant)]
        else:
            continue
        for i, spec, scale, zero, axis in params:
            out[f"{name}.quant.{i}"] = operand(f"{name}.quant.{i}", spec, scale, zero, axis)
    return out


def operand(name: str, spec: QSpec, scale: torch.Tensor, zero: torch.Tensor, axis: int) -> LayerExport:
    """The record of one operand of a quantized addition: an input quantizer, no weight."""
    return LayerExport(name, "add", torch.empty(0), None, spec, scale, zero, axis)


def deploy_adds(skeleton: nn.Module, adds: dict[str, LayerExport]) -> None:
    """Replace each quantized addition of ``skeleton`` (in place) by a DeployAdd."""
    names = sorted({op.rpartition(".quant.")[0] for op in adds})
    for name in names:
        ops = [adds.get(f"{name}.quant.{i}") for i in range(2)]
        if any(lx is None for lx in ops):
            got = [o for o in adds if o.startswith(f"{name}.quant.")]
            raise ValueError(f"addition {name}: both operands need a quantizer, the export has {got}")
        try:
            old = skeleton.get_submodule(name)
        except AttributeError:
            raise ValueError(f"addition {name!r} of the export is not in the model") from None
        if not isinstance(old, Add | QAdd | DeployAdd):
            raise ValueError(f"addition {name}: the model has {type(old).__name__}, the export an Add")
        acts = [ActQuant(lx.act, lx.act_scale, lx.act_zero, lx.channel_axis, lx.name) for lx in ops]
        parent_name, _, attr = name.rpartition(".")
        setattr(skeleton.get_submodule(parent_name) if parent_name else skeleton, attr, DeployAdd(acts))


def deploy(
    skeleton: nn.Module, layers: dict[str, LayerExport], adds: dict[str, LayerExport] | None = None
) -> nn.Module:
    """Replace each named float layer of ``skeleton`` (in place) by its deployed version.

    ``adds``: the quantized operands of residual additions (:func:`collect_adds`); their
    additions become DeployAdd modules.
    """
    deploy_adds(skeleton, adds or {})
    for name, lx in layers.items():
        parent_name, _, attr = name.rpartition(".")
        parent = skeleton.get_submodule(parent_name) if parent_name else skeleton
        old = getattr(parent, attr)
        if isinstance(old, (QLinear, QConv2d, QCall)):
            old = old.float_module
        transposed = lx.kind == "linear" and is_hf_conv1d(old)  # x @ W + b, W [in, out]: a Linear
        expected = {"linear": nn.Linear, "conv": nn.Conv1d | nn.Conv2d}.get(lx.kind, nn.Linear | nn.Embedding)
        if not (transposed or isinstance(old, expected)):
            raise ValueError(f"layer {name}: the model has {type(old).__name__}, the export a {lx.kind}")
        dtype = old.weight.dtype  # the model's: decoded in float32, cast as the site casts
        w = lx.float_weight().to(dtype)
        shape = tuple(old.weight.shape)[::-1] if transposed else tuple(old.weight.shape)
        if shape != tuple(w.shape):
            raise ValueError(f"layer {name}: weight shape {tuple(w.shape)} does not fit the model's {shape}")
        act = None
        if lx.act is not None:
            act = ActQuant(lx.act, lx.act_scale, lx.act_zero, lx.channel_axis, name, lx.act_base)
        quantized = isinstance(lx.weight, Encoded)
        bias = None if lx.bias is None else lx.bias.to(dtype)
        if lx.kind == "linear":
            new: nn.Module = DeployLinear(w, bias, act, name, quantized)
        elif lx.kind == "call" or type(old).forward is not nn.Conv2d.forward:  # the layer's own forward
            new = DeployCall(copy.deepcopy(old), w, bias, act, name, quantized)
        else:
            new = DeployConv2d(old, w, bias, act, name, quantized)
        new.layer_export = lx  # a plain attribute: what the layer was built from
        setattr(parent, attr, new)
    guard_save_pretrained(skeleton)  # a transformers model: save_pretrained would lose the codes
    return skeleton


def deploy_model(qmodel: nn.Module) -> tuple[nn.Module, dict[str, LayerExport]]:
    """Return a deployed copy of a wrapped model (plan applied) and its encoded layers.

    A model that is already deployed is copied as it is.
    """
    layers = collect(qmodel)
    if not sites(qmodel):
        return copy.deepcopy(qmodel), layers
    return deploy(copy.deepcopy(qmodel), layers, collect_adds(qmodel)), layers
