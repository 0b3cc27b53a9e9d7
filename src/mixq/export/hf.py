"""Hugging Face checkpoints in the compressed-tensors format (``mixq.export.save(..., format="hf")``).

A transformers model quantized by mixq is written as a model directory that
``transformers.AutoModelForCausalLM.from_pretrained(dir)`` loads (with the ``compressed-tensors``
package installed; vLLM reads the same format): ``config.json`` with a ``quantization_config``
of ``quant_method`` "compressed-tensors", format "pack-quantized" and status "compressed", and
``model.safetensors`` with, per quantized layer, ``weight_packed`` (the integer codes packed
densely into int32 by compressed-tensors' own packer), ``weight_scale`` (float32),
``weight_zero_point`` (with a zero point) and ``weight_shape``. Every integer weight, symmetric
or with a zero point, has its codes packed at its width.

Symbol map (mixq -> compressed-tensors): a weight spec ``Int(b)`` with granularity "tensor",
"channel" or "group" (``group_size``) -> ``QuantizationArgs(num_bits=b, type="int", strategy=...,
group_size=...)``; one config group per distinct weight spec, its ``targets`` the exact module
names (``re:^name$``); mixq's value ``(v - z) * s`` -> compressed-tensors' ``(q - zp) * s``,
with ``q = v`` for a signed symmetric grid (``symmetric=True``, no zero point) and otherwise
``q = v - 2^(b-1)``, ``zp = z - 2^(b-1)`` (``symmetric=False``): the same integer differences,
so the dequantized weights are the simulation's bit for bit. Float Linear layers are listed in
``ignore``. Parameters shared by several names (tied embeddings) are stored once under their
first name, as transformers ties them again on load; a tie whose members the plan quantizes
differently (a quantized ``lm_head`` on a float embedding) cannot be shared: both are stored
and ``tie_word_embeddings`` is set to False (a warning names them).

[DESIGN] Zero points per channel or group are packed at the weight's width along the output
dimension by compressed-tensors' packer (``pack_to_int32(zp, b, packed_dim=0)``: ``ceil(out b /
32)`` int32 words per group column), but stored in an int32 tensor of the unpacked shape
``[out, groups]`` whose rows past those words are zero (``zp_dtype`` int32). transformers 5.25
builds the module layout on the meta device before loading, where compressed-tensors 0.20 leaves
the zero point unpacked (``[out, groups]``): the compact ``[ceil(out b / 32), groups]`` tensor
that compressed-tensors' own compressor writes is then re-initialised for the size mismatch (a
load-report warning, wrong zero points, wrong logits). compressed-tensors' unpacker reads only
the first words, so this layout decompresses to the same zero points and loads exactly; it costs
4 bytes per group's zero point (1 in the int8 ``naive-quantized`` layout, which stores every
code in a byte). A per-tensor zero point is one int8, as compressed-tensors stores it.

[DESIGN] Weight-only: activation quantizers, multipoint, SPARQ, minifloat and MX weights have
no pack-quantized form here and are refused before anything is written, naming the layers and
what the format holds (use ``format="onnx"`` or the packed safetensors file for them).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixq.export.codes import Encoded, decode_weight
from mixq.export.deploy import LayerExport, collect
from mixq.formats import Int
from mixq.kinds import kind_of
from mixq.nn import QCall, QLinear
from mixq.plan import LayerSpec, QSpec
from mixq.quant.codes import code_to_int
from mixq.wrap import sites, tied_sites

HF_HOLDS = (
    "weight-only integer formats of 1 to 8 bits (int/uint, symmetric or with a zero point) "
    "per tensor, output channel or group, on nn.Linear layers (embeddings stay float)"
)
STRATEGIES = {"tensor": "tensor", "channel": "channel", "group": "group"}
WEIGHTS = "model.safetensors"
PACKED = "pack-quantized"
ZP_DTYPE = {True: torch.int8, False: torch.int32}  # per tensor: one int8; else packed words (docstring)


def _ct() -> Any:
    try:
        import compressed_tensors  # noqa: F401
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    except ImportError:
        raise ImportError("format 'hf' needs compressed-tensors: pip install 'mixq[hf]'") from None
    return pack_to_int32, QuantizationArgs, QuantizationConfig, QuantizationScheme


def _problem(wspec: QSpec | None, aspec: QSpec | None, shape: tuple[int, ...]) -> str | None:
    """Why a layer's specs have no compressed-tensors form, or None."""
    if aspec is not None:
        return f"input {aspec.fmt} (activation quantization)"
    if wspec is None:
        return None
    if not isinstance(wspec.fmt, Int) or wspec.points is not None or kind_of(wspec).name != "integer":
        return "weight " + (
            "multipoint" if wspec.points is not None else f"{kind_of(wspec).name} {wspec.fmt}"
        )
    if wspec.float_zero:  # compressed-tensors' zero points are integers
        return f"weight {LayerSpec(wspec).name}: a float zero point (fzero)"
    if wspec.granularity not in STRATEGIES or not 1 <= wspec.fmt.bits <= 8:
        return f"weight {wspec.fmt} per {wspec.granularity}"
    if wspec.granularity == "group" and shape[-1] % wspec.group_size:
        return f"groups of {wspec.group_size} do not divide its {shape[-1]} inputs"
    return None


def _layers(qmodel: nn.Module) -> dict[str, LayerExport]:
    """The encoded layers of a wrapped or deployed transformers model, every one the format can hold.

    Raises:
        TypeError: ``qmodel`` is no transformers model (no ``config``, no ``save_pretrained``).
        ValueError: naming every layer whose specs the format cannot hold, and what it holds.
    """
    if not (hasattr(qmodel, "config") and hasattr(qmodel, "save_pretrained")):
        raise TypeError(
            f"format 'hf' writes transformers models; got a {type(qmodel).__name__} (formats for "
            "any model: safetensors, onnx)"
        )
    bad = []
    tied = tied_sites(qmodel)
    for n, m in sites(qmodel).items():
        if n in tied and isinstance(m.float_module, nn.Embedding):  # stored as its leader's codes
            continue
        w, a = m.weight_quant.spec, m.input_quant.spec
        why = _problem(w, None if getattr(m, "weight_only", False) else a, tuple(m.weight.shape))
        if why is None and w is not None and isinstance(m, QLinear) and m.transposed:
            why = f"weight {w.fmt} on a transformers Conv1D (compressed-tensors takes nn.Linear)"
        if why is None and isinstance(m, QCall) and w is not None:
            why = f"weight {w.fmt} on a {type(m.float_module).__name__} (compressed-tensors takes nn.Linear)"
        if why is not None:
            bad.append(f"{n}: {why}")
    layers = {} if bad else collect(qmodel)
    for n, lx in layers.items():
        spec = lx.weight.spec if isinstance(lx.weight, Encoded) else None
        why = _problem(spec, lx.act, tuple(lx.weight.shape))
        if why is not None:
            bad.append(f"{n}: {why}")
    if bad:
        raise ValueError(
            f"format 'hf' (compressed-tensors) cannot hold {len(bad)} layer(s): {'; '.join(bad)}. "
            f"It holds {HF_HOLDS}; export these with format='onnx' or 'safetensors'"
        )
    return layers


def _args(spec: QSpec, QuantizationArgs: Any) -> Any:  # noqa: N803
    assert isinstance(spec.fmt, Int)
    signed_sym = spec.symmetric and spec.fmt.signed
    return QuantizationArgs(
        num_bits=spec.fmt.bits,
        type="int",
        symmetric=signed_sym,
        strategy=STRATEGIES[spec.granularity],
        group_size=spec.group_size if spec.granularity == "group" else None,
        scale_dtype=torch.float32,
        zp_dtype=None if signed_sym else ZP_DTYPE[spec.granularity == "tensor"],
    )


def _layer_tensors(name: str, enc: Encoded, pack: Any) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one quantized weight [out, in] (see the module docstring)."""
    spec = enc.spec
    assert isinstance(spec.fmt, Int)
    bits = spec.fmt.bits
    out_dim = enc.shape[0]
    v = code_to_int(enc.codes, spec.fmt, spec.symmetric).reshape(enc.shape)
    z = enc.zero if enc.zero is not None else torch.zeros_like(enc.scale)
    if spec.granularity == "tensor":
        scale, zero = enc.scale.reshape(1), z.reshape(1)
    else:
        scale, zero = enc.scale.reshape(out_dim, -1), z.reshape(out_dim, -1)
    t = {f"{name}.weight_scale": scale.float().contiguous()}
    if spec.symmetric and spec.fmt.signed:
        q = v
    else:
        half = 1 << (bits - 1)
        q = v - half
        zp = (zero - half).round().to(torch.int8)
        if spec.granularity != "tensor":  # packed words in the unpacked shape (module docstring)
            words = pack(zp, bits, packed_dim=0)
            zp = torch.zeros(zp.shape, dtype=torch.int32)
            zp[: words.shape[0]] = words
        t[f"{name}.weight_zero_point"] = zp.contiguous()
    t[f"{name}.weight_packed"] = pack(q.round().to(torch.int8), bits).contiguous()
    t[f"{name}.weight_shape"] = torch.tensor(enc.shape)
    return t


def _ties(model: nn.Module, quantized: set[str]) -> tuple[list[list[str]], list[list[str]]]:
    """The parameters shared by several names (tied): ``(kept, untied)``, each a list of name groups.

    A group is found by identity (``data_ptr``) in a wrapped model. A deployed model (loaded from
    a packed file) holds copies: its input and output embeddings form a group when the config
    ties them and both hold the same values. A group is kept tied when no member is quantized.
    """
    by_ptr: dict[tuple, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if p.numel() and p.device.type != "meta":
            by_ptr.setdefault((p.data_ptr(), p.dtype, tuple(p.shape), tuple(p.stride())), []).append(n)
    groups = [names for names in by_ptr.values() if len(names) > 1]
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not groups and getattr(text, "tie_word_embeddings", False):
        emb, out = _embedding_names(model)
        if emb and out and torch.equal(model.get_submodule(emb).weight, model.get_submodule(out).weight):
            groups.append([f"{emb}.weight", f"{out}.weight"])
    kept, untied = [], []
    for names in groups:
        layers = {n.removesuffix(".weight") for n in names}
        (untied if layers & quantized else kept).append(names)
    return kept, untied


def _embedding_names(model: nn.Module) -> tuple[str | None, str | None]:
    names = {id(m): n for n, m in model.named_modules()}
    try:
        emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None
    return names.get(id(emb)), names.get(id(out))


def save_hf(qmodel: nn.Module, path: str | Path) -> Path:
    """Write a transformers model quantized by mixq (wrapped with its plan applied, or deployed
    from a packed file) as a compressed-tensors model directory; see the module docstring.

    Returns:
        The directory written.

    Raises:
        ValueError: a layer's spec has no compressed-tensors form (all such layers named).
    """
    layers = _layers(qmodel)
    pack, QuantizationArgs, QuantizationConfig, QuantizationScheme = _ct()  # noqa: N806
    from safetensors.torch import save_file

    quantized = {n: lx.weight for n, lx in layers.items() if isinstance(lx.weight, Encoded)}
    state = {k: v.detach() for k, v in qmodel.state_dict().items()}
    kept, untied = _ties(qmodel, set(quantized))
    for n, lead in tied_sites(qmodel).items():  # an embedding tied to a quantized layer: its values
        if lead in quantized and n not in layers and f"{n}.weight" in state:
            state[f"{n}.weight"] = decode_weight(quantized[lead]).to(state[f"{n}.weight"].dtype)
            warnings.warn(
                f"{n} is tied to the quantized {lead}: stored as its dequantized values (float), "
                "as transformers 5.25 with compressed-tensors 0.20 cannot load a quantized nn.Embedding",
                stacklevel=2,
            )
    for names in kept:  # stored once, under the first name; transformers ties them again on load
        for n in names[1:]:
            state.pop(n, None)
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[QSpec, list[str]] = {}
    for name, enc in quantized.items():
        tensors.update(_layer_tensors(name, enc, pack))
        state.pop(f"{name}.weight")
        groups.setdefault(enc.spec, []).append(name)
    dtype = getattr(qmodel, "dtype", None)  # a PreTrainedModel's: its first parameter's
    for k, v in state.items():
        tensors[k] = v.contiguous().clone()
        if k.removesuffix(".weight") in layers and dtype is not None:  # a deployed float layer: float32
            tensors[k] = tensors[k].to(dtype)
    config_groups = {
        f"group_{i}": QuantizationScheme(
            targets=[f"re:^{_re_escape(n)}$" for n in names],
            weights=_args(spec, QuantizationArgs),
            format=PACKED,
        )
        for i, (spec, names) in enumerate(groups.items())
    }
    qcfg = QuantizationConfig(
        config_groups=config_groups,
        format=PACKED,
        quantization_status="compressed",
        ignore=[n for n in layers if n not in quantized],  # the float Linear layers
    )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(qmodel.config)
    if untied:
        warnings.warn(
            "tied parameters quantized differently are stored separately (tie_word_embeddings=False): "
            + "; ".join(", ".join(names) for names in untied),
            stacklevel=2,
        )
        config.tie_word_embeddings = False
        if hasattr(config, "get_text_config"):
            config.get_text_config().tie_word_embeddings = False
    config.quantization_config = {**qcfg.to_dict(), "quant_method": "compressed-tensors"}
    config.save_pretrained(out)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    gen = getattr(qmodel, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)
    return out


def _re_escape(name: str) -> str:
    return name.replace(".", r"\.")
