"""Sony MCT mixed-precision PTQ on a mixq task (run in the MCT venv by bench.compare_peers).

The budget is MCT's weight memory in bytes, set to (weights of the Conv2d/Linear layers) x B / 8;
MCT's default target platform offers 8, 4 and 2-bit per-channel weights with 8-bit
activations, and solves the allocation as an integer program. The per-layer choice is read
back from the quantization wrappers of the returned model.

Settings (JSON): ``num_of_images`` (images for the sensitivity, default 64), ``hessian``
(use MCT's Hessian-weighted distance, default false).
"""

from __future__ import annotations

import time
import traceback
from typing import Any

import torch

from bench.peers.drivers import _common


def body(args: Any, task: Any, s: dict[str, Any]) -> dict[str, Any]:
    import model_compression_toolkit as mct

    model, prefix = _common.tool_model(task)  # MiniLM: tensors in, the last hidden state out
    text = bool(prefix)
    names = _common.quant_layers(model)
    n_weights = sum(model.get_submodule(n).weight.numel() for n in names)
    images = None if text else torch.cat([b[0] for b in task.calib])

    def repr_gen():  # one 64-image batch (MiniLM: one calibration batch) per call
        if images is None:
            for b in task.calib:
                yield [b["input_ids"], b["attention_mask"]]
            return
        for i in range(0, len(images), 64):
            yield [images[i : i + 64]]

    mp = {"num_of_images": int(s.get("num_of_images", 64))}
    if s.get("hessian"):
        mp["use_hessian_based_scores"] = True
    core = mct.core.CoreConfig(mixed_precision_config=mct.core.MixedPrecisionQuantizationConfig(**mp))
    ru = mct.core.ResourceUtilization(weights_memory=n_weights * args.budget / 8)
    t0 = time.perf_counter()
    try:
        qmodel, _info = mct.ptq.pytorch_post_training_quantization(
            model, repr_gen, target_resource_utilization=ru, core_config=core
        )
    except Exception as e:
        if "torch/fx" in traceback.format_exc():  # MCT reads the model by tracing it with torch.fx
            raise RuntimeError(f"MCT's torch.fx trace of the model failed: {type(e).__name__}: {e}") from e
        raise
    seconds = time.perf_counter() - t0
    by_param = {}  # the wrapped float weight identifies the layer
    for name in names:
        by_param[name] = model.get_submodule(name).weight.detach()
    layers: dict[str, Any] = {}
    total_bits = 0.0
    for mod_name, mod in qmodel.named_modules():
        wq = getattr(mod, "weights_quantizers", None)
        inner = getattr(mod, "layer", None)
        if not wq or inner is None or "weight" not in wq:
            continue
        q = wq["weight"]
        bits = int(q.num_bits)
        w = inner.weight.detach()
        match = [n for n in names if n.replace(".", "_") == mod_name or n == mod_name]
        if not match:
            match = [n for n in names if by_param[n].shape == w.shape and torch.equal(by_param[n], w)]
        if len(match) != 1:
            raise RuntimeError(f"cannot map MCT layer {mod_name!r} to one model layer (got {match})")
        per_channel = bool(getattr(q, "per_channel", True))
        layers[match[0].removeprefix(prefix)] = {
            # MCT's default weight thresholds minimise the quantization MSE; its 8-bit activations
            # are per tensor (unsigned after ReLU: asymmetric with a zero offset).
            "weight": _common.weight_desc(bits, "channel" if per_channel else "tensor", clip="mse"),
            "act": _common.act_desc(8, symmetric=False),
            "tool_format": f"W{bits}/{'channel' if per_channel else 'tensor'} A8 ({type(q).__name__})",
        }
        total_bits += bits * w.numel()
    return {
        "model": _common.AsTransformer(qmodel) if text else qmodel,
        "layers": layers,
        "search_seconds": seconds,
        "tool_bits": total_bits / n_weights,
        "tool_bits_name": "weight-memory bits / weights (scales not counted)",
        "tool_settings": {"weights_memory_bytes": n_weights * args.budget / 8, **mp},
    }


if __name__ == "__main__":
    _common.main("mct", "model-compression-toolkit", body, __doc__)
