"""NNCF 2.19 HAWQ precision initialization on a mixq task (run in the NNCF 2.19 venv by bench.compare_peers).

NNCF 2.19 is the last release with HAWQ for PyTorch (legacy tracing: ``NNCF_TORCH_LEGACY_TRACING=1``;
``target_device="TRIAL"``, since the CPU hardware config allows 8 bits only). HAWQ ranks the weighted
layers by their average Hessian trace, enumerates the bit-width sequences that keep that order,
and among the sequences whose compression ratio BitOps(INT8) / BitOps(sequence) is at least its
knob ``compression_ratio`` picks the one with the least trace-weighted quantization noise. BitOps
count FLOPs times max(weight bits, activation bits), so a layer's input activations take its
weight bits (bit widths of adjacent quantizers are tied).

Budget -> knob: the knob is the smallest ratio at which HAWQ's own choice has a weight-count
average of the weight bits (scales not counted) at most B. It is found inside one run: the driver
wraps HAWQ's choice step, replays HAWQ's rule at every distinct ratio of its enumerated sequences
(ascending), and keeps the first whose choice fits B; the knob and the choice are recorded.

MiniLM: the calibration batches go in as keyword inputs, HAWQ's loss is 1 - cos of the pooled
embedding to the fp32 one, and the embeddings are left out (as in the NNCF 3.4 driver).

Quantizers: symmetric weights per output channel (NNCF's default is per tensor) and symmetric
activations per tensor, min-max ranges on the calibration batches.

Settings (JSON): ``bits`` (candidate bit widths, default [2, 4, 8]), ``iter_number`` (Hutchinson
iterations, default 200), ``num_data_points`` (samples for the traces, default 100),
``bn_adaptation`` (NNCF's batch-norm adaptation on the calibration images, default false),
``per_channel`` (weights per output channel, default true).
"""

from __future__ import annotations

import bisect
import copy
import os
import re
import time
from typing import Any

import torch

from bench.peers.drivers import _common


def layer_of(node_name: str) -> str:
    """A module name from an NNCF node name: ``Net/Sequential[features]/NNCFConv2d[0]/conv2d_0``
    -> ``features.0`` (the bracketed scope parts, joined with dots)."""
    parts = re.findall(r"\[([^\]]+)\]", node_name)
    if not parts:
        raise ValueError(f"cannot read a module name from NNCF node {node_name!r}")
    return ".".join(parts)


def hawq_choice(metrics: list[float], ratios: list[float], ratio: float) -> int:
    """HAWQ's rule: the sequence with the least metric among those with compression ratio >= ``ratio``."""
    order = sorted(range(len(ratios)), key=lambda i: ratios[i])
    start = bisect.bisect_left([ratios[i] for i in order], ratio)
    if start == len(order):
        raise ValueError(f"no sequence reaches compression ratio {ratio:g} (max {max(ratios):g})")
    return min(order[start:], key=lambda i: (metrics[i], i))


def knob_for_budget(
    metrics: list[float], ratios: list[float], avg_bits: list[float], budget: float
) -> tuple[float, int]:
    """The smallest ratio (of those the sequences reach) whose HAWQ choice has average weight bits
    at most ``budget``, and that choice's index."""
    for r in sorted(set(ratios)):
        i = hawq_choice(metrics, ratios, r)
        if avg_bits[i] <= budget + 1e-9:
            return r, i
    low = min(avg_bits)
    raise ValueError(f"no compression ratio gives {budget:g} average weight bits (lowest: {low:.3f})")


def _sentences(task: Any) -> tuple[Any, int, list[dict[str, Any]], dict[str, Any], list[str]]:
    """MiniLM for NNCF: its calibration batches as keyword inputs (an init data loader), the input
    info, HAWQ's loss (1 - cos of the pooled embedding to the fp32 one) and the ignored embeddings."""
    from nncf.torch.initialization import PTInitializingDataLoader

    class Sentences(PTInitializingDataLoader):
        batch_size = len(task.calib[0]["input_ids"])

        def get_inputs(self, b: Any) -> tuple[tuple, dict]:
            return (), {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}

        def get_target(self, b: Any) -> Any:
            return b

    def cos_loss(out: Any, b: Any, _: Any) -> torch.Tensor:
        mask = b["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
        pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return 1.0 - (torch.nn.functional.normalize(pooled, dim=-1) * b["target"]).sum(-1).mean()

    seq = task.calib[0]["input_ids"].shape[1]
    info = [{"sample_size": [1, seq], "type": "long", "keyword": k} for k in ("input_ids", "attention_mask")]
    n = sum(len(b["input_ids"]) for b in task.calib)
    # NNCF needs a criterion to run HAWQ; criterion_fn computes the loss and ignores it
    crit = {"criterion": torch.nn.MSELoss(), "criterion_fn": cos_loss}
    return Sentences(task.calib), n, info, crit, ["{re}.*embeddings.*"]


def body(args: Any, task: Any, s: dict[str, Any]) -> dict[str, Any]:
    os.environ["NNCF_TORCH_LEGACY_TRACING"] = "1"
    # the first run compiles NNCF's C++ quantization kernels (1-2 min on two busy cores; kept in
    # TORCH_EXTENSIONS_DIR): no load timeout
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
    from nncf import NNCFConfig
    from nncf.torch import create_compressed_model, register_default_init_args
    from nncf.torch.quantization.precision_init.hawq_init import HAWQPrecisionInitializer

    unknown = set(s) - {"bits", "iter_number", "num_data_points", "bn_adaptation", "per_channel"}
    if unknown:
        raise ValueError(
            f"unknown settings {sorted(unknown)}; valid: bits, iter_number, num_data_points, "
            "bn_adaptation, per_channel"
        )
    bits = sorted(int(b) for b in s.get("bits", [2, 4, 8]))
    per_channel = bool(s.get("per_channel", True))
    model = copy.deepcopy(task.model).eval()
    names = _common.quant_layers(model)
    sizes = {n: model.get_submodule(n).weight.numel() for n in names}
    n_w = sum(sizes.values())
    if task.name == "minilm":  # keyword inputs; HAWQ's loss: 1 - cos of the pooled embedding to fp32's
        loader, n_init, info, crit, ignored = _sentences(task)
    else:
        xs = torch.cat([b[0] for b in task.calib])
        ys = torch.cat([b[1] for b in task.calib])
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=64)
        n_init, info = len(xs), {"sample_size": [1, *xs.shape[1:]]}
        crit, ignored = {"criterion": torch.nn.CrossEntropyLoss()}, []
    init: dict[str, Any] = {
        "range": {"num_init_samples": n_init, "type": "min_max"},
        "precision": {
            "type": "hawq",
            "bits": bits,
            "compression_ratio": 1.0,
            "iter_number": int(s.get("iter_number", 200)),
            "num_data_points": int(s.get("num_data_points", 100)),
        },
        "batchnorm_adaptation": {"num_bn_adaptation_samples": n_init if s.get("bn_adaptation") else 0},
    }
    cfg = NNCFConfig.from_dict(
        {
            "input_info": info,
            "target_device": "TRIAL",
            "compression": {
                "algorithm": "quantization",
                "initializer": init,
                "weights": {"per_channel": per_channel},
                **({"ignored_scopes": ignored} if ignored else {}),
            },
        }
    )
    cfg = register_default_init_args(cfg, loader, **crit)

    seen: dict[str, Any] = {}
    orig_ratios = HAWQPrecisionInitializer.get_compression_ratio_per_qconfig_sequence

    def ratios_hook(self: Any, sequences: Any, traces_order: Any) -> list[float]:
        ratios = orig_ratios(self, sequences, traces_order)
        qids = list(self._weight_quantizations_by_execution_order.keys())
        layer_ids = [layer_of(q.target_node_name) for q in qids]
        bad = [n for n in layer_ids if n not in sizes]
        if bad:
            raise ValueError(f"HAWQ weight quantizers {bad} are not the model's layers {sorted(sizes)}")
        avg, per_layer = [], []
        for seq in sequences:
            b = [c.num_bits for c in traces_order.get_execution_order_configs(seq)]
            per_layer.append(dict(zip(layer_ids, b, strict=True)))
            avg.append(sum(bi * sizes[n] for n, bi in zip(layer_ids, b, strict=True)) / n_w)
        seen.update(ratios=list(ratios), avg=avg, per_layer=per_layer)
        return ratios

    def choose_hook(metrics: list[Any], ratios: list[float], _ratio: float) -> int:
        m = [float(x) for x in metrics]
        knob, i = knob_for_budget(m, ratios, seen["avg"], args.budget)
        seen.update(knob=knob, index=i, metric=m[i], sequences=len(m))
        return i

    HAWQPrecisionInitializer.get_compression_ratio_per_qconfig_sequence = ratios_hook
    HAWQPrecisionInitializer.choose_qconfig_sequence = staticmethod(choose_hook)
    t0 = time.perf_counter()
    ctrl, qmodel = create_compressed_model(model, cfg)
    seconds = time.perf_counter() - t0
    if "knob" not in seen:
        raise RuntimeError("HAWQ did not reach its choice step (no weighted layers quantized?)")
    layers: dict[str, Any] = {}
    for group in ctrl.groups_of_adjacent_quantizers:
        acts = [q for _, q in group.activation_quantizers]
        for qid, wq in group.weight_quantizers:
            name = layer_of(qid.target_node_name)
            a = max(acts, key=lambda q: q.num_bits) if acts else None
            w_sym = type(wq).__name__.startswith("Symmetric")
            a_sym = a is not None and type(a).__name__.startswith("Symmetric")
            layers[name] = {
                "weight": _common.weight_desc(
                    int(wq.num_bits), "channel" if wq.per_channel else "tensor", symmetric=w_sym
                ),
                # an unsigned symmetric activation grid (0 .. 2^b - 1 times max/(2^b - 1), after a
                # ReLU) is mixq's asymmetric grid on non-negative inputs (zero point 0)
                "act": _common.act_desc(int(a.num_bits), symmetric=bool(a.signed) and a_sym)
                if a is not None
                else None,
                "tool_format": f"W{wq.num_bits}/{'channel' if wq.per_channel else 'tensor'}"
                f"/{'sym' if w_sym else 'asym'} A{a.num_bits if a is not None else '-'}"
                + (f"/{'signed' if a.signed else 'unsigned'}" if a is not None else ""),
            }
    got = {n: layers[n]["weight"]["bits"] for n in layers}
    want = seen["per_layer"][seen["index"]]
    if got != want:
        raise RuntimeError(f"the model's weight bits {got} differ from HAWQ's choice {want}")
    return {
        "model": qmodel,
        "layers": layers,
        "search_seconds": seconds,
        "tool_bits": sum(got[n] * sizes[n] for n in got) / n_w,
        "tool_bits_name": "weight-count average of the weight bits (scales not counted)",
        "tool_settings": {
            "bits": bits,
            "compression_ratio": seen["knob"],
            "target_device": "TRIAL",
            "iter_number": init["precision"]["iter_number"],
            "num_data_points": init["precision"]["num_data_points"],
            "range": "min_max",
            "bn_adaptation": bool(s.get("bn_adaptation")),
            "per_channel_weights": per_channel,
        },
        "pick": {
            "rule": "smallest compression_ratio whose HAWQ choice has average weight bits <= B",
            "compression_ratio": seen["knob"],
            "index": seen["index"],
            "hawq_metric": seen["metric"],
            "sequences": seen["sequences"],
            "ratio_range": [min(seen["ratios"]), max(seen["ratios"])],
        },
        "note": "NNCF 2.19's HAWQ counts BitOps = FLOPs x max(weight bits, activation bits), so it gives a "
        "layer's input activations the layer's weight bits (A4 at W4, A2 at W2); 'mixq best ≤ size' uses "
        "8-bit activations, so only 'mixq same grid' and 'mixq search' compare at the tool's activation bits",
    }


if __name__ == "__main__":
    _common.main("nncf219", "nncf", body, __doc__)
