"""NVIDIA ModelOpt ``auto_quantize`` on a mixq task (run in the ModelOpt venv by bench.compare_peers).

The budget is ModelOpt's ``effective_bits`` (a weight-count average over the quantized layers
where a layer left unquantized counts 16 bits and scales count nothing). The per-layer choice
is read back from the quantizers of the returned model, not from ModelOpt's report.

Settings (JSON): ``method`` ("gradient" or "kl_div"), ``formats`` (names of ModelOpt configs,
or the per-channel weight-only formats ``W8_CHANNEL``, ``W4_CHANNEL``, ``W2_CHANNEL``), ``loss``
("task" or, the default on MiniLM, "contrastive": see ``_common.batches_loss``).
"""

from __future__ import annotations

import copy
import time
from typing import Any

from bench.peers.drivers import _common

DEFAULT_FORMATS = {
    "minilm": ["INT8_WEIGHT_ONLY_CFG", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"],
    "cnn": ["INT8_WEIGHT_ONLY_CFG", "W4_CHANNEL", "W2_CHANNEL"],
}


def channel_cfg(bits: int) -> dict[str, Any]:
    """A weight-only, per-output-channel, symmetric max-calibrated integer format."""
    return {
        "quant_cfg": [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": bits, "axis": 0}},
        ],
        "algorithm": "max",
    }


def resolve(mtq: Any, name: str) -> dict[str, Any]:
    """A ModelOpt config by name (``mtq.<NAME>``) or one of the W<b>_CHANNEL formats."""
    if name.startswith("W") and name.endswith("_CHANNEL"):
        return channel_cfg(int(name[1:-8]))
    if not hasattr(mtq, name):
        raise ValueError(f"unknown ModelOpt format {name!r}")
    return copy.deepcopy(getattr(mtq, name))


def describe(q: Any) -> tuple[Any, str]:
    """Neutral description and a readable name of one ModelOpt TensorQuantizer (None if off)."""
    if q is None or not getattr(q, "is_enabled", False):
        return None, "off"
    nb = q.num_bits
    if isinstance(nb, (tuple, list)):
        bits: int | str = {(4, 3): "fp8_e4m3fn", (5, 2): "fp8_e5m2"}.get(tuple(nb), f"fp{nb}")
    else:
        bits = int(nb)
    blocks = getattr(q, "block_sizes", None) or {}
    group = next((int(v) for k, v in blocks.items() if isinstance(k, int)), None)
    if group is not None:
        gran = "group"
    elif q.axis is None:
        gran = "tensor"
    else:
        gran = "channel"
    sym = not bool(getattr(q, "unsigned", False)) and not bool(getattr(q, "_unsigned", False))
    name = f"{bits}" + (f"/g{group}" if group else f"/{gran}")
    return {"bits": bits, "granularity": gran, "group_size": group, "symmetric": True if sym else sym}, name


def body(args: Any, task: Any, s: dict[str, Any]) -> dict[str, Any]:
    import modelopt.torch.quantization as mtq

    kind = "minilm" if task.name == "minilm" else "cnn"
    names = s.get("formats", DEFAULT_FORMATS[kind])
    method = s.get("method", "gradient")
    model = copy.deepcopy(task.model).eval()
    data = list(task.calib)
    loss_kind = s.get("loss", "contrastive" if task.name == "minilm" else "task")
    loss = _common.batches_loss(task, loss_kind)
    t0 = time.perf_counter()
    model, state = mtq.auto_quantize(
        model,
        constraints={"effective_bits": args.budget},
        quantization_formats=[resolve(mtq, n) for n in names],
        data_loader=data,
        forward_step=lambda m, b: task.forward(m, b),
        loss_func=loss,
        num_calib_steps=len(data),
        num_score_steps=len(data),
        method=method,
        verbose=False,
    )
    seconds = time.perf_counter() - t0
    layers = {}
    for name in _common.quant_layers(task.model):
        mod = model.get_submodule(name)
        w, wname = describe(getattr(mod, "weight_quantizer", None))
        a, aname = describe(getattr(mod, "input_quantizer", None))
        if a is not None:
            a = {"bits": a["bits"], "symmetric": a["symmetric"]}
        layers[name] = {"weight": w, "act": a, "tool_format": f"W{wname} A{aname}"}
    best = state.get("best", {})
    return {
        "model": model,
        "layers": layers,
        "search_seconds": seconds,
        "tool_bits": float(best.get("constraints", {}).get("effective_bits", float("nan"))),
        "tool_bits_name": "effective_bits (unquantized = 16, scales not counted)",
        "tool_settings": {"formats": names, "method": method, "loss": loss_kind, "calib_batches": len(data)},
        "recipe": {str(k): str(v) for k, v in best.get("recipe", {}).items()},
    }


if __name__ == "__main__":
    _common.main("modelopt", "nvidia-modelopt", body, __doc__)
