"""Packed checkpoints: a quantized model as bit-packed codes in one safetensors file.

This module is the file format only: the tensors, the metadata and the structure records of
the file, written from and read into :class:`~mixq.export.deploy.LayerExport` records; the
deployed model is built by :mod:`mixq.export.deploy`.

Per quantized layer ``L`` the file holds

* ``L.weight.codes``: element codes packed at the element's width (uint8 bytes);
* ``L.weight.scale``: float32 per tensor or output channel, float16 per group, or the E8M0 byte
  (``e + 127``) of each MX block;
* ``L.weight.zero``: asymmetric zero points, packed at the element's width;
* multipoint weights: ``L.weight.codes`` the codes of every point of every channel (channel
  by channel, point by point), ``L.weight.steps`` the first points' float32 steps (one per
  channel, or one per layer) and ``L.weight.extra_steps`` the extra points' float16 steps;
* ``L.input.scale`` (float32) and ``L.input.zero`` (packed) of a quantized input (a SPARQ input:
  those of its 8-bit code, whose spec the metadata holds as ``act_base``);
* ``L.bias`` (float32), or ``L.weight`` (float32) for a float layer;
* per quantized residual addition ``A`` (:class:`mixq.nn.QAdd`), for each operand ``i``:
  ``A.quant.i.scale`` (float32) and ``A.quant.i.zero`` (packed, asymmetric specs), as a
  layer's input, with the operand spec in the metadata (``adds``);

and every other tensor of the model's state dict as it is. The metadata key ``mixq`` holds a
JSON object: the schema, the plan, the task's name, each layer's kind, shape and specs, and
the modules a PTQ step put into the float model (``modules``: CLE's per-channel ``ChannelClamp``
by name, its bounds in the state dict; the run's ``FoldedNorm`` where a batch norm was folded),
which loading puts back into the original architecture.
The payload therefore has the size that :func:`mixq.cost.metrics_of` counts, up to the
padding of each packed tensor to whole bytes.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mixq import tasks
from mixq.export.codes import Encoded
from mixq.export.deploy import LayerExport, collect, collect_adds, deploy, deploy_adds, operand
from mixq.fold import FoldedNorm
from mixq.kinds import kind_of
from mixq.plan import Plan, QSpec
from mixq.ptq.cle import ChannelClamp
from mixq.quant.packing import pack_bits, unpack_bits
from mixq.wrap import sites, unwrap

SCHEMA = 3  # 3: multipoint extra steps in float16; 2: plan_hash and payload; 1 (still read): neither
META_KEY = "mixq"


def plan_hash(plan: Plan | dict[str, Any]) -> str:
    """The sha256 of a plan (its canonical JSON): what a packed file records of its plan."""
    data = plan.to_dict() if isinstance(plan, Plan) else plan
    text = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def payload_hash(tensors: dict[str, torch.Tensor]) -> str:
    """The sha256 of a file's tensors: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


STRUCTURE_TYPES: dict[str, type[nn.Module]] = {"ChannelClamp": ChannelClamp, "FoldedNorm": FoldedNorm}
"""Modules that PTQ steps put into a float model, by the type name a file records."""


def structure(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The modules mixq added to a model (e.g. CLE's ChannelClamp), by name, with their settings."""
    types = {cls: name for name, cls in STRUCTURE_TYPES.items()}
    out = {}
    for name, m in model.named_modules():
        if type(m) in types:
            out[name] = {"type": types[type(m)]}
            if isinstance(m, ChannelClamp):
                out[name]["axis"] = int(m.axis)
    return out


def restore_structure(model: nn.Module, modules: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Put the recorded modules into ``model`` (in place); their buffers come with the state dict."""
    types = STRUCTURE_TYPES
    for name, m in modules.items():
        if not isinstance(m, dict) or m.get("type") not in types:
            raise ValueError(f"module {name!r}: unknown module record {m!r}; known types: {', '.join(types)}")
        new = FoldedNorm() if m["type"] == "FoldedNorm" else _clamp(name, m, tensors)
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            getattr(parent, attr)
        except AttributeError:
            raise ValueError(f"module {name!r} of the export is not in the model") from None
        setattr(parent, attr, new)


def _clamp(name: str, m: dict[str, Any], tensors: dict[str, torch.Tensor]) -> ChannelClamp:
    upper = tensors.get(f"{name}.upper")
    if upper is None:
        raise ValueError(f"export file lacks tensor {name + '.upper'!r} of module {name!r}")
    return ChannelClamp(torch.zeros_like(upper), int(m["axis"]))


def _layer_tensors(lx: LayerExport) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    p = lx.name
    if isinstance(lx.weight, Encoded):
        out.update(kind_of(lx.weight.spec).weight_tensors(lx.weight, f"{p}.weight"))
    else:
        out[f"{p}.weight"] = lx.weight
    if lx.bias is not None:
        out[f"{p}.bias"] = lx.bias
    if lx.act_scale is not None:
        out[f"{p}.input.scale"] = lx.act_scale
        code = lx.act_base or lx.act
        assert code is not None and lx.act_zero is not None
        if not code.symmetric:
            out[f"{p}.input.zero"] = pack_bits(lx.act_zero.to(torch.int64), code.bits)
    return out


def _layer_meta(lx: LayerExport) -> dict[str, Any]:
    w = lx.weight
    return {
        "kind": lx.kind,
        "shape": list(w.shape),
        "weight": w.spec.to_dict() if isinstance(w, Encoded) else None,
        "act": lx.act.to_dict() if lx.act is not None else None,
        **({"act_base": lx.act_base.to_dict()} if lx.act_base is not None else {}),
        "channel_axis": lx.channel_axis,
        "bias": lx.bias is not None,
    }


def _tied_weights(qmodel: nn.Module, layers: dict[str, LayerExport]) -> dict[str, str]:
    """State-dict entries outside the layers that hold a layer's weight tensor and read it as the
    layer's deployed weight: entry -> layer. Such a tensor is stored once (the layer's codes) and
    tied again on loading. An entry is tied when the module holding it is a site quantizing the
    tensor to the very same values (one plan entry: :func:`mixq.wrap.tie_plan`), or a module of a
    deployed model (it reads the deployed weight), or the layer's weight is float; a float module
    reading the float tensor of a quantized layer keeps its own copy.
    """
    qsites = sites(qmodel)
    weight_of = {id(m.weight): n for n, m in qsites.items() if n in layers}
    weight_of.update({id(m.weight): n for n, m in qmodel.named_modules() if n in layers and n not in qsites})
    out: dict[str, str] = {}
    for k, v in qmodel.state_dict(keep_vars=True).items():
        owner, _, attr = k.rpartition(".")
        leader = weight_of.get(id(v))
        if leader is None or owner == leader or attr != "weight":
            continue
        lx = layers[leader]
        if owner in qsites:
            m = qsites[owner]
            with torch.no_grad():
                own = m.weight_quant(m.weight.detach().float())
            if not (own.shape == lx.float_weight().shape and torch.equal(own, lx.float_weight())):
                raise ValueError(
                    f"layers {owner!r} and {leader!r} share one weight tensor but quantize it differently; "
                    "a tied tensor has one precision (mixq.wrap.tie_plan)"
                )
            out[k] = leader
        elif not qsites or not isinstance(lx.weight, Encoded):
            out[k] = leader
    return out


def save_safetensors(qmodel: nn.Module, plan: Plan, path: str | Path) -> Path:
    """Write a wrapped model with its plan applied as a packed safetensors file.

    A weight tensor tied to a layer's (:func:`_tied_weights`) is stored once, as the layer's
    codes; the metadata's ``tied`` names it, and loading ties it again.
    """
    layers = collect(qmodel)
    tied = _tied_weights(qmodel, layers)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in qmodel.state_dict().items():
        owner = k.rpartition(".")[0]
        if k in tied:
            continue
        if owner not in layers and owner.removesuffix(".act") not in layers:  # a deployed layer's input
            tensors[k] = v.detach().clone().contiguous()
    for lx in layers.values():
        tensors.update(_layer_tensors(lx))
    adds = collect_adds(qmodel)
    for lx in adds.values():  # as a layer's input: float32 scale, zero point packed (asymmetric)
        assert lx.act is not None and lx.act_scale is not None and lx.act_zero is not None
        tensors.pop(f"{lx.name}.zero", None)  # a deployed model's float buffer
        tensors[f"{lx.name}.scale"] = lx.act_scale.float().reshape(1).contiguous()
        if not lx.act.symmetric:
            tensors[f"{lx.name}.zero"] = pack_bits(lx.act_zero.reshape(1).to(torch.int64), lx.act.bits)
    meta = {
        "schema": SCHEMA,
        "task": plan.meta.get("task"),
        "plan_hash": plan_hash(plan),
        "payload": payload_hash(tensors),
        "plan": plan.to_dict(),
        "layers": {n: _layer_meta(lx) for n, lx in layers.items()},
        "modules": structure(qmodel),
        **({"tied": tied} if tied else {}),
        **({"adds": {n: lx.act.to_dict() for n, lx in adds.items() if lx.act is not None}} if adds else {}),
    }
    path = Path(path)
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta)})
    return path


def _read_layer(name: str, m: dict[str, Any], t: dict[str, torch.Tensor]) -> LayerExport:
    def take(key: str) -> torch.Tensor:
        if key not in t:
            raise ValueError(f"export file lacks tensor {key!r}")
        return t.pop(key)

    shape = tuple(int(d) for d in m["shape"])
    weight: Encoded | torch.Tensor
    if m["weight"] is not None:
        spec = QSpec.from_dict(m["weight"])
        weight = kind_of(spec).read_weight(spec, shape, take, f"{name}.weight")
    else:
        weight = take(f"{name}.weight").float()
    return _finish_layer(name, m, weight, take)


def _finish_layer(name: str, m: dict[str, Any], weight: Encoded | torch.Tensor, take: Any) -> LayerExport:
    """The input quantizer and the bias of a layer read from a file."""
    act = QSpec.from_dict(m["act"]) if m["act"] is not None else None
    base = QSpec.from_dict(m["act_base"]) if m.get("act_base") is not None else None
    kind = kind_of(act) if act is not None else None
    if kind is not None and kind.act_base != (base is not None):
        raise ValueError(f"layer {name}: a SPARQ input needs its 8-bit code spec (act_base), and only it")
    scale_a = zero_a = None
    if kind is not None and kind.act_scales:
        code = base or act
        scale_a = take(f"{name}.input.scale").float()
        zero_a = (
            unpack_bits(take(f"{name}.input.zero"), code.bits, 1).float()
            if not code.symmetric
            else torch.zeros(1)
        )
    bias = take(f"{name}.bias").float() if m["bias"] else None
    return LayerExport(name, m["kind"], weight, bias, act, scale_a, zero_a, int(m["channel_axis"]), base)


def verify(meta: dict[str, Any], tensors: dict[str, torch.Tensor], plan: Plan | None = None) -> None:
    """Check a file's payload against its recorded checksum, its plan against its recorded hash,
    and (given) ``plan`` against the file's; a schema-1 file records neither and is not checked.

    Raises:
        ValueError: what differs.
    """
    if meta.get("schema", 1) < 2:
        if plan is not None and plan_hash(meta["plan"]) != plan_hash(plan):
            raise ValueError("it holds the model of another plan (its plan differs from the run's plan.json)")
        return
    found = payload_hash(tensors)
    if found != meta.get("payload"):
        raise ValueError(
            f"its payload checksum is {found[:12]}…, the file recorded {str(meta.get('payload'))[:12]}…: "
            "the file is damaged or was altered"
        )
    if plan_hash(meta["plan"]) != meta.get("plan_hash"):
        raise ValueError("its plan does not match the plan hash it recorded: the metadata was altered")
    if plan is not None and meta["plan_hash"] != plan_hash(plan):
        raise ValueError(
            f"it holds the model of another plan (plan hash {meta['plan_hash'][:12]}…, the run's "
            f"plan.json {plan_hash(plan)[:12]}…): it is not this run's model file"
        )


def read_safetensors(
    path: str | Path, plan: Plan | None = None
) -> tuple[dict[str, Any], dict[str, LayerExport], dict[str, torch.Tensor]]:
    """Read a packed file: its metadata, its layers, and the rest of the state dict.

    The payload is checked against the checksum the file records, and the file's plan against
    its recorded hash and against ``plan`` when given (:func:`verify`).

    Raises:
        ValueError: the file is missing, corrupt, altered, of another plan or not a mixq export;
            the message names it.
    """
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
        if meta.get("schema") not in (1, 2, SCHEMA):
            raise ValueError(
                f"unsupported export schema {meta.get('schema')!r}; this mixq reads 1 to {SCHEMA}"
            )
        old_mp = [n for n, m in meta["layers"].items() if (m.get("weight") or {}).get("points")]
        if meta["schema"] < 3 and old_mp:
            raise ValueError(
                f"multipoint layer(s) {old_mp[:3]} were written in the schema-{meta['schema']} layout "
                f"(float32 steps of every point), which this mixq no longer reads; export the run again"
            )
        verify(meta, tensors, plan)
        layers = {n: _read_layer(n, m, tensors) for n, m in meta["layers"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{path}: corrupt mixq metadata or tensors: {e!r}") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return meta, layers, tensors


def _read_adds(adds: dict[str, Any]) -> dict[str, LayerExport]:
    """Operand records of the quantized additions in a file's metadata (values: placeholders)."""
    out = {}
    for op, d in adds.items():
        try:
            spec = QSpec.from_dict(d)
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"addition operand {op}: corrupt spec {d!r} ({e})") from None
        out[op] = operand(op, spec, torch.zeros(1), torch.zeros(1), 1)
    return out


def load_safetensors(path: str | Path, model: nn.Module | None = None, plan: Plan | None = None) -> nn.Module:
    """Rebuild the deployed model of a packed file (verified: see :func:`read_safetensors`);
    see :func:`mixq.export.load`."""
    return deployed(path, *read_safetensors(path, plan), model)


def deployed(
    path: str | Path,
    meta: dict[str, Any],
    layers: dict[str, LayerExport],
    rest: dict[str, torch.Tensor],
    model: nn.Module | None = None,
) -> nn.Module:
    """The deployed model of what :func:`read_safetensors` read from ``path``."""
    if model is None:
        task = meta.get("task")
        if task not in tasks.TASKS:
            raise ValueError(
                f"{path} was exported from task {task!r}, not a built-in one; pass "
                f"model= (the float model) to load it; built-in tasks: {', '.join(tasks.TASKS)}"
            )
        model = tasks.get(task).model
    skeleton = copy.deepcopy(model).eval()
    unwrap(skeleton)
    restore_structure(skeleton, meta.get("modules") or {}, rest)
    adds = _read_adds(meta.get("adds") or {})
    deploy_adds(skeleton, adds)  # placeholders: load_state_dict fills their scales and zeros
    for op, lx in adds.items():  # the zero points as the DeployAdd's float buffers
        assert lx.act is not None
        if lx.act.symmetric:
            rest[f"{op}.zero"] = torch.zeros(1)
        elif f"{op}.zero" in rest:
            rest[f"{op}.zero"] = unpack_bits(rest[f"{op}.zero"], lx.act.bits, 1).float()
    tied = meta.get("tied") or {}
    expected = {k for k in skeleton.state_dict() if k.rpartition(".")[0] not in layers and k not in tied}
    missing, unknown = sorted(expected - set(rest)), sorted(set(rest) - expected)
    if missing or unknown:
        raise ValueError(f"{path} does not fit the model: missing {missing[:5]}, unknown {unknown[:5]}")
    skeleton.load_state_dict(rest, strict=False)
    return tie(deploy(skeleton, layers), tied).eval()


def tie(model: nn.Module, tied: dict[str, str]) -> nn.Module:
    """Make each entry of ``tied`` (a parameter name -> a deployed layer) that layer's weight tensor
    itself (in place): one tensor, as in the model that was saved."""
    for key, leader in tied.items():
        owner, _, attr = key.rpartition(".")
        try:
            layer, module = model.get_submodule(leader), model.get_submodule(owner)
        except AttributeError:
            raise ValueError(f"tied weight {key!r} -> {leader!r}: not in the model") from None
        w = layer.weight
        old = getattr(module, attr, None)
        if not isinstance(old, torch.Tensor) or tuple(old.shape) != tuple(w.shape):
            raise ValueError(
                f"tied weight {key!r} does not fit {leader!r}'s weight of shape {tuple(w.shape)}"
            )
        p = w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=False)
        layer._buffers["weight"] = p
        setattr(module, attr, p)
    return model
