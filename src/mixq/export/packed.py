"""Packed checkpoints: a quantized model as bit-packed codes in one safetensors file.

Per quantized layer ``L`` the file holds

* ``L.weight.codes``: element codes packed at the element's width (uint8 bytes);
* ``L.weight.scale``: float32 per tensor or output channel, float16 per group, or the E8M0 byte
  (``e + 127``) of each MX block;
* ``L.weight.zero``: asymmetric zero points, packed at the element's width;
* ``L.input.scale`` (float32) and ``L.input.zero`` (packed) of a quantized input;
* ``L.bias`` (float32), or ``L.weight`` (float32) for a float layer;

and every other tensor of the model's state dict as it is. The metadata key ``mixq`` holds a
JSON object: the schema, the plan, the task's name and each layer's kind, shape and specs.
The payload therefore has the size that :func:`mixq.cost.metrics_of` counts, up to the
padding of each packed tensor to whole bytes.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixq.export.codes import E8M0_BIAS, Encoded, act_params, decode_weight, encode_weight
from mixq.export.modules import ActQuant, DeployConv2d, DeployLinear
from mixq.export.packing import pack_bits, unpack_bits
from mixq.formats import Mx
from mixq.nn import QConv2d, QLinear
from mixq.plan import Plan, QSpec
from mixq.wrap import sites, unwrap

SCHEMA = 1
META_KEY = "mixq"


@dataclass(frozen=True)
class LayerExport:
    """Everything a deployed layer holds.

    Attributes:
        name: exact module name.
        kind: "linear" or "conv".
        weight: the encoded weight, or the float32 weight of a float layer.
        bias: float32 bias or None.
        act: the input spec, or None (float input).
        act_scale, act_zero: per-tensor input scale and zero point [1] (None for MX or float).
        channel_axis: the input's channel axis (MX blocks run along it).
    """

    name: str
    kind: str
    weight: Encoded | torch.Tensor
    bias: torch.Tensor | None
    act: QSpec | None
    act_scale: torch.Tensor | None
    act_zero: torch.Tensor | None
    channel_axis: int

    def float_weight(self) -> torch.Tensor:
        """The deployed float32 weight (dequantized from the codes for a quantized layer)."""
        return decode_weight(self.weight) if isinstance(self.weight, Encoded) else self.weight


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.float().view(torch.int32), b.float().view(torch.int32))


@torch.no_grad()
def collect(qmodel: nn.Module) -> dict[str, LayerExport]:
    """Encode every quantized layer of a wrapped model with its plan applied.

    Raises:
        RuntimeError: a decoded weight differs from the fake-quantized one (a mixq bug).
    """
    layers = {}
    for name, m in sites(qmodel).items():
        wspec, aspec = m.weight_quant.spec, m.input_quant.spec
        if wspec is not None:
            gram = m.weight_quant.gram.float() if m.weight_quant.gram is not None else None
            wq = m.weight_quant(m.weight)
            weight: Encoded | torch.Tensor = encode_weight(m.weight, wspec, gram, wq)
            if not _same_bits(decode_weight(weight), wq):
                raise RuntimeError(f"layer {name}: the codes do not rebuild the fake-quantized weight")
        else:
            weight = m.weight.detach().float().clone()
        scale = zero = None
        if aspec is not None and not isinstance(aspec.fmt, Mx):
            try:
                scale, zero = act_params(m.input_quant)
            except ValueError as e:
                raise ValueError(f"layer {name}: {e}") from None
        layers[name] = LayerExport(
            name=name,
            kind="linear" if isinstance(m, QLinear) else "conv",
            weight=weight,
            bias=None if m.bias is None else m.bias.detach().float().clone(),
            act=aspec,
            act_scale=scale,
            act_zero=zero,
            channel_axis=m.input_quant.channel_axis,
        )
    return layers


def deploy(skeleton: nn.Module, layers: dict[str, LayerExport]) -> nn.Module:
    """Replace each named float layer of ``skeleton`` (in place) by its deployed version."""
    for name, lx in layers.items():
        parent_name, _, attr = name.rpartition(".")
        parent = skeleton.get_submodule(parent_name) if parent_name else skeleton
        old = getattr(parent, attr)
        if isinstance(old, (QLinear, QConv2d)):
            old = old.float_module
        expected = nn.Linear if lx.kind == "linear" else nn.Conv2d
        if not isinstance(old, expected):
            raise ValueError(f"layer {name}: the model has {type(old).__name__}, the export a {lx.kind}")
        w = lx.float_weight()
        if tuple(old.weight.shape) != tuple(w.shape):
            raise ValueError(
                f"layer {name}: weight shape {tuple(w.shape)} does not fit the model's "
                f"{tuple(old.weight.shape)}"
            )
        act = None
        if lx.act is not None:
            act = ActQuant(lx.act, lx.act_scale, lx.act_zero, lx.channel_axis, name)
        quantized = isinstance(lx.weight, Encoded)
        if lx.kind == "linear":
            new: nn.Module = DeployLinear(w, lx.bias, act, name, quantized)
        else:
            new = DeployConv2d(old, w, lx.bias, act, name, quantized)
        setattr(parent, attr, new)
    return skeleton


def deploy_model(qmodel: nn.Module) -> tuple[nn.Module, dict[str, LayerExport]]:
    """Return a deployed copy of a wrapped model (plan applied) and its encoded layers."""
    layers = collect(qmodel)
    return deploy(copy.deepcopy(qmodel), layers), layers


# -- safetensors --------------------------------------------------------------------------------


def _layer_tensors(lx: LayerExport) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    p = lx.name
    if isinstance(lx.weight, Encoded):
        enc, spec = lx.weight, lx.weight.spec
        out[f"{p}.weight.codes"] = pack_bits(enc.codes, spec.bits)
        if isinstance(spec.fmt, Mx):
            out[f"{p}.weight.scale"] = (enc.scale + E8M0_BIAS).to(torch.uint8)
        elif spec.granularity == "group":
            out[f"{p}.weight.scale"] = enc.scale.to(torch.float16)
        else:
            out[f"{p}.weight.scale"] = enc.scale.float()
        if enc.zero is not None:
            out[f"{p}.weight.zero"] = pack_bits(enc.zero.to(torch.int64), spec.bits)
    else:
        out[f"{p}.weight"] = lx.weight
    if lx.bias is not None:
        out[f"{p}.bias"] = lx.bias
    if lx.act_scale is not None:
        out[f"{p}.input.scale"] = lx.act_scale
        assert lx.act is not None
        if not lx.act.symmetric:
            out[f"{p}.input.zero"] = pack_bits(lx.act_zero.to(torch.int64), lx.act.bits)
    return out


def _layer_meta(lx: LayerExport) -> dict[str, Any]:
    w = lx.weight
    return {
        "kind": lx.kind,
        "shape": list(w.shape),
        "weight": w.spec.to_dict() if isinstance(w, Encoded) else None,
        "act": lx.act.to_dict() if lx.act is not None else None,
        "channel_axis": lx.channel_axis,
        "bias": lx.bias is not None,
    }


def save_safetensors(qmodel: nn.Module, plan: Plan, path: str | Path) -> Path:
    """Write a wrapped model with its plan applied as a packed safetensors file."""
    from safetensors.torch import save_file

    layers = collect(qmodel)
    tensors: dict[str, torch.Tensor] = {}
    own = {f"{n}.{k}" for n in layers for k in ("weight", "bias")}
    for k, v in qmodel.state_dict().items():
        if k not in own:
            tensors[k] = v.detach().clone().contiguous()
    for lx in layers.values():
        tensors.update(_layer_tensors(lx))
    meta = {
        "schema": SCHEMA,
        "task": plan.meta.get("task"),
        "plan": plan.to_dict(),
        "layers": {n: _layer_meta(lx) for n, lx in layers.items()},
    }
    path = Path(path)
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta)})
    return path


def _rows_of(spec: QSpec, shape: list[int]) -> tuple[int, ...]:
    """Shape of a weight's scale under ``spec``."""
    out, k = shape[0], 1
    for d in shape[1:]:
        k *= d
    if isinstance(spec.fmt, Mx):
        return (out, -(-k // spec.fmt.block))
    if spec.granularity == "tensor":
        return (1,)
    if spec.granularity == "channel":
        return (out,)
    assert spec.group_size is not None
    return (out * -(-k // spec.group_size),)


def _read_layer(name: str, m: dict[str, Any], t: dict[str, torch.Tensor]) -> LayerExport:
    def take(key: str) -> torch.Tensor:
        if key not in t:
            raise ValueError(f"export file lacks tensor {key!r}")
        return t.pop(key)

    shape = [int(d) for d in m["shape"]]
    numel = 1
    for d in shape:
        numel *= d
    weight: Encoded | torch.Tensor
    if m["weight"] is not None:
        spec = QSpec.from_dict(m["weight"])
        codes = unpack_bits(take(f"{name}.weight.codes"), spec.bits, numel).reshape(shape)
        raw = take(f"{name}.weight.scale")
        if tuple(raw.shape) != _rows_of(spec, shape):
            raise ValueError(
                f"{name}.weight.scale has shape {tuple(raw.shape)}, expected {_rows_of(spec, shape)}"
            )
        scale = raw.to(torch.int64) - E8M0_BIAS if isinstance(spec.fmt, Mx) else raw.float()
        zero = None
        if not spec.symmetric:
            zero = unpack_bits(take(f"{name}.weight.zero"), spec.bits, scale.numel()).float()
        weight = Encoded(spec, tuple(shape), codes, scale, zero)
    else:
        weight = take(f"{name}.weight").float()
    act = QSpec.from_dict(m["act"]) if m["act"] is not None else None
    scale_a = zero_a = None
    if act is not None and not isinstance(act.fmt, Mx):
        scale_a = take(f"{name}.input.scale").float()
        zero_a = (
            unpack_bits(take(f"{name}.input.zero"), act.bits, 1).float()
            if not act.symmetric
            else torch.zeros(1)
        )
    bias = take(f"{name}.bias").float() if m["bias"] else None
    return LayerExport(name, m["kind"], weight, bias, act, scale_a, zero_a, int(m["channel_axis"]))


def read_safetensors(
    path: str | Path,
) -> tuple[dict[str, Any], dict[str, LayerExport], dict[str, torch.Tensor]]:
    """Read a packed file: its metadata, its layers, and the rest of the state dict.

    Raises:
        ValueError: the file is missing, corrupt or not a mixq export; the message names it.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no export file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    if META_KEY not in header:
        raise ValueError(f"{path} is a safetensors file but not a mixq export (no '{META_KEY}' metadata)")
    try:
        meta = json.loads(header[META_KEY])
        if meta.get("schema") != SCHEMA:
            raise ValueError(f"unsupported export schema {meta.get('schema')!r}; this mixq reads {SCHEMA}")
        layers = {n: _read_layer(n, m, tensors) for n, m in meta["layers"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{path}: corrupt mixq metadata or tensors: {e!r}") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return meta, layers, tensors


def load_safetensors(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the deployed model of a packed file; see :func:`mixq.export.load`."""
    meta, layers, rest = read_safetensors(path)
    if model is None:
        from mixq import tasks

        task = meta.get("task")
        if task not in tasks.TASKS:
            raise ValueError(
                f"{path} was exported from task {task!r}, not a built-in one; pass "
                f"model= (the float model) to load it; built-in tasks: {', '.join(tasks.TASKS)}"
            )
        model = tasks.get(task).model
    skeleton = copy.deepcopy(model).eval()
    unwrap(skeleton)
    expected = {k for k in skeleton.state_dict() if k.rpartition(".")[0] not in layers}
    missing, unknown = sorted(expected - set(rest)), sorted(set(rest) - expected)
    if missing or unknown:
        raise ValueError(f"{path} does not fit the model: missing {missing[:5]}, unknown {unknown[:5]}")
    skeleton.load_state_dict(rest, strict=False)
    return deploy(skeleton, layers).eval()
