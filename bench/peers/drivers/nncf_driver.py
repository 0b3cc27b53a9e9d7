"""NNCF weight compression with an INT4/INT8 mix on a mixq task (run in the NNCF venv by bench.compare_peers).

``nncf.compress_weights(mode=INT4_SYM, ratio=r, group_size=128, ...)`` puts the share ``r`` of
the weights in INT4 (symmetric, groups of 128 along the input dimension), choosing the layers by
a sensitivity metric, and the rest in INT8 (asymmetric, per output channel). The target average
weight bits B becomes ``r = (8 - B) / 4`` (scales not counted). The per-layer choice is read back
from the compressed weights of the returned model.

Settings (JSON): ``sensitivity_metric`` (an ``nncf.SensitivityMetric`` name, default
``HESSIAN_INPUT_ACTIVATION``), ``group_size`` (default 128), ``all_layers`` (default true).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from bench.peers.drivers import _common


def body(args: Any, task: Any, s: dict[str, Any]) -> dict[str, Any]:
    import nncf

    model = copy.deepcopy(task.model).eval()
    names = _common.quant_layers(model)
    ratio = min(1.0, max(0.0, (8.0 - args.budget) / 4.0))
    group = int(s.get("group_size", 128))
    metric = getattr(nncf.SensitivityMetric, s.get("sensitivity_metric", "HESSIAN_INPUT_ACTIVATION"))
    if task.name == "minilm":
        items = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in task.calib]
        ignored = nncf.IgnoredScope(patterns=[".*embeddings.*"])
    else:
        items = [b[0] for b in task.calib]
        ignored = None
    before = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    kw = {"ignored_scope": ignored} if ignored is not None else {}
    t0 = time.perf_counter()
    if ratio == 0.0:  # ratio 0 means "all INT4" to NNCF: an all-INT8 model is its own mode
        qmodel = nncf.compress_weights(
            model, mode=nncf.CompressWeightsMode.INT8_ASYM, dataset=nncf.Dataset(items), **kw
        )
    else:
        qmodel = nncf.compress_weights(
            model,
            mode=nncf.CompressWeightsMode.INT4_SYM,
            ratio=ratio,
            group_size=group,
            dataset=nncf.Dataset(items),
            sensitivity_metric=metric,
            all_layers=bool(s.get("all_layers", True)),
            **kw,
        )
    seconds = time.perf_counter() - t0
    layers, bits_total, n_total = {}, 0.0, 0
    for n in names:
        fmt = _compressed_format(qmodel, n, before[n], group)
        layers[n] = {"weight": fmt[0], "act": None, "tool_format": fmt[1]}
        if fmt[0] is not None:
            bits_total += fmt[0]["bits"] * before[n].numel()
            n_total += before[n].numel()
    return {
        "model": qmodel,
        "layers": layers,
        "search_seconds": seconds,
        "tool_bits": bits_total / max(1, n_total),
        "tool_bits_name": "weight-count average of the element bits (scales not counted)",
        "tool_settings": {
            "ratio": ratio,
            "group_size": group,
            "sensitivity_metric": str(metric),
            "all_layers": bool(s.get("all_layers", True)),
            "calib_batches": len(items),
        },
    }


def _compressed_format(qmodel: Any, name: str, w0: torch.Tensor, group: int) -> tuple[Any, str]:
    """How NNCF stored a layer's weight: read from the decompressor hooked on it (its class
    says INT4/INT8 and symmetric or not; its scale's shape gives the groups)."""
    key = name.replace(".", ":") + ":weight"
    decs = [m for n, m in qmodel.named_modules() if key + "__" in n and "Decompressor" in type(m).__name__]
    if not decs:
        w = qmodel.get_submodule(name).weight
        if w.dtype.is_floating_point and torch.equal(w.detach(), w0):
            return None, "float"
        raise RuntimeError(f"layer {name}: weight {tuple(w.shape)} {w.dtype} changed but has no decompressor")
    dec = decs[0]
    cls = type(dec).__name__
    bits = 4 if cls.upper().startswith("INT4") else 8 if cls.upper().startswith("INT8") else None
    if bits is None:
        raise RuntimeError(f"layer {name}: unknown NNCF decompressor {cls}")
    sym = "Asymmetric" not in cls
    scale = getattr(dec, "_scale", None)
    if scale is not None and scale.dim() == 3 and scale.shape[1] > 1:
        gsize = w0.shape[1] // scale.shape[1]
        return _common.weight_desc(bits, "group", gsize, sym), f"{cls} g{gsize}"
    if scale is not None and scale.dim() == 3:  # a single group spans the whole row
        return _common.weight_desc(bits, "channel", None, sym), f"{cls} (one group per row)"
    return _common.weight_desc(bits, "channel", None, sym), cls


if __name__ == "__main__":
    _common.main("nncf", "nncf", body, __doc__)
