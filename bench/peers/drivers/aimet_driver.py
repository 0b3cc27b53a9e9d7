"""Qualcomm AIMET automatic mixed precision (AMP) on a mixq task (run in AIMET's venv by bench.compare_peers).

AMP has no size budget: it sorts the layers' quantizer groups by the score drop each one causes at
a lower candidate (phase 1), then walks down that order, lowering one group more at every step
and scoring the cumulative configuration (phase 2, a BitOps-vs-score Pareto list); its own knob,
``allowed_accuracy_drop``, says where to stop on that walk. The adapter here runs the whole walk
(``allowed_accuracy_drop=None`` with the brute-force phase-2 search, so every point is scored) and
stops it at the size budget instead: of the walk's points whose weight-count average of the weight
bits is at most B (scales not counted), it takes the one with the best phase-2 score (a tie goes
to the point with more bits), sets the layers' weight bit widths to it and recomputes the encodings.

Both AMP callbacks score on the task's calibration batches (never on validation data): the task
metric by default, or ``score="loss"`` (the negative task loss, finer-grained on small sets).

Setup as in peers.md §6: ``QuantizationSimModel`` with AIMET's per-channel default config (weights
symmetric per output channel, op outputs quantized per tensor), candidates W8/W4/W2 with 8-bit
activations, min-max ranges (``post_training_tf``).

Settings (JSON): ``score`` ("metric" or "loss"), ``phase1_batches`` (calibration batches scored in
phase 1, default all), ``quant_scheme`` (an AIMET ``QuantScheme`` name, default
``post_training_tf``), ``weight_bits`` (the candidates' weight bits, default [8, 4, 2]).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from bench.peers.drivers import _common


def walk(
    path: list[tuple[float, float, list[str], int]],
    sizes: dict[str, int],
    start: int,
    names: dict[str, str] | None = None,
    uncounted: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """The configurations along AMP's phase-2 walk.

    Args:
        path: AMP's Pareto list in walk order, each entry ``(relative BitOps, phase-2 score, names of
            the modules whose weights the step lowers, their new weight bits)``; entry i holds the
            cumulative configuration of steps 0..i.
        sizes: weights per layer (the layers the budget counts).
        start: every layer's weight bits before the walk (AMP's baseline candidate).
        names: AIMET module name -> layer name, where they differ.
        uncounted: modules whose weights AIMET quantizes but mixq does not count (MiniLM's
            LayerNorm weights): their steps are replayed in ``other``, outside the average.

    Returns:
        One dict per entry: ``index``, ``bitops``, ``score``, ``bits`` (layer -> weight bits),
        ``avg_bits`` (weight-count average over ``sizes``), ``other`` (uncounted module -> weight
        bits, for those lowered so far).
    """
    if not sizes:
        raise ValueError("no layers to count: sizes is empty")
    names = names or {}
    bits = dict.fromkeys(sizes, start)
    other: dict[str, int] = {}
    n = sum(sizes.values())
    points = []
    for i, (bitops, score, modules, wbits) in enumerate(path):
        for m in modules:
            layer = names.get(m, m)
            if layer in bits:
                bits[layer] = int(wbits)
            elif m in uncounted:
                other[m] = int(wbits)
            else:
                raise ValueError(f"AMP step {i} lowers {m!r}, not one of the counted layers {sorted(bits)}")
        avg = sum(bits[k] * sizes[k] for k in sizes) / n
        points.append(
            {
                "index": i,
                "bitops": float(bitops),
                "score": float(score),
                "bits": dict(bits),
                "avg_bits": avg,
                "other": dict(other),
            }
        )
    return points


def pick(points: list[dict[str, Any]], budget: float) -> dict[str, Any]:
    """The walk's point with the best score whose average weight bits fit ``budget`` (a tie goes to
    the point with more bits, then the earlier one)."""
    fit = [p for p in points if p["avg_bits"] <= budget + 1e-9 and math.isfinite(p["score"])]
    if not fit:
        low = min((p["avg_bits"] for p in points), default=float("nan"))
        raise ValueError(f"no point of AMP's walk fits {budget:g} average weight bits (lowest: {low:.3f})")
    return max(fit, key=lambda p: (p["score"], p["avg_bits"], -p["index"]))


def walk_cache(args: Any, task: Any, s: dict[str, Any], model: torch.nn.Module) -> Path:
    """AMP's results directory, shared by every budget of one task, validation set and settings.

    The walk does not depend on the budget, and AMP keeps its phase-1 scores and each scored
    phase-2 point in ``<dir>/.cache`` (``clean_start=False`` resumes from them): a second budget
    reuses the walk, and a run stopped by the timeout resumes where it stopped. The directory is
    emptied when its key (AIMET version, task, validation items, settings, a checksum of the
    weights) differs from the one it was made with.
    """
    with torch.no_grad():
        checksum = float(sum(p.double().abs().sum() for p in model.parameters()))
    key = {
        "aimet": _common.version("aimet-torch"),
        "task": task.name,
        "val": args.val,
        "settings": s,
        "weights_abs_sum": checksum,
    }
    tag = re.sub(r"[^A-Za-z0-9_.=-]+", "", "_".join(f"{k}={v}" for k, v in sorted(s.items())))
    results = Path(args.out).parent / f"aimet_{task.name}_val{args.val}{'_' + tag if tag else ''}.amp"
    stamp = results / "key.json"
    if not stamp.exists() or json.loads(stamp.read_text()) != key:
        shutil.rmtree(results, ignore_errors=True)
        results.mkdir(parents=True)
        stamp.write_text(json.dumps(key))
    return results


def body(args: Any, task: Any, s: dict[str, Any]) -> dict[str, Any]:
    import aimet_torch
    from aimet_torch.common.amp.utils import AMPSearchAlgo
    from aimet_torch.common.defs import CallbackFunc, QuantizationDataType, QuantScheme
    from aimet_torch.mixed_precision import choose_mixed_precision
    from aimet_torch.quantsim import QuantizationSimModel

    unknown = set(s) - {"score", "phase1_batches", "quant_scheme", "weight_bits"}
    if unknown:
        raise ValueError(
            f"unknown settings {sorted(unknown)}; valid: score, phase1_batches, quant_scheme, weight_bits"
        )
    score_kind = s.get("score", "metric")
    if score_kind not in ("metric", "loss"):
        raise ValueError(f"unknown score {score_kind!r}; valid: metric, loss")
    wbits = [int(b) for b in s.get("weight_bits", [8, 4, 2])]
    scheme = getattr(QuantScheme, s.get("quant_scheme", "post_training_tf"))
    model, prefix = _common.tool_model(task)
    text = bool(prefix)
    names = _common.quant_layers(model)
    sizes = {n: model.get_submodule(n).weight.numel() for n in names}
    calib = list(task.calib)
    p1 = calib[: int(s.get("phase1_batches", len(calib)))]
    if text:
        dummy: Any = (calib[0]["input_ids"][:1], calib[0]["attention_mask"][:1])
    else:
        dummy = calib[0][0][:1] if isinstance(calib[0], (tuple, list)) else calib[0]

    def as_task_model(m: torch.nn.Module) -> torch.nn.Module:
        return _common.AsTransformer(m) if text else m

    def fwd(m: torch.nn.Module, _: Any) -> None:
        with torch.no_grad():
            for b in calib:
                task.forward(as_task_model(m), b)

    def scorer(batches: list[Any]) -> Any:
        def score(m: torch.nn.Module, _: Any) -> float:
            m.eval()
            with torch.no_grad():
                if score_kind == "metric":
                    return float(task.metric(as_task_model(m), batches))
                return -sum(float(task.loss(as_task_model(m), b)) for b in batches) / len(batches)

        return score

    cfg = Path(aimet_torch.__file__).parent / "common" / "quantsim_config" / "default_config_per_channel.json"
    results = walk_cache(args, task, s, model)
    cached = (results / ".cache" / "pareto_list.pkl").exists()  # the walk (or part of it) was scored before
    t0 = time.perf_counter()
    sim = QuantizationSimModel(
        model,
        dummy,
        quant_scheme=scheme,
        default_param_bw=max(wbits),
        default_output_bw=8,
        config_file=str(cfg),
    )
    sim.compute_encodings(fwd, None)
    cands = [((8, QuantizationDataType.int), (b, QuantizationDataType.int)) for b in wbits]
    pareto = choose_mixed_precision(
        sim,
        dummy,
        cands,
        CallbackFunc(scorer(p1)),
        CallbackFunc(scorer(calib)),
        None,
        str(results),
        clean_start=False,
        forward_pass_callback=CallbackFunc(fwd),
        amp_search_algo=AMPSearchAlgo.BruteForce,
    )
    if not pareto:
        raise RuntimeError("AMP returned no Pareto list (it exits early when one candidate meets the target)")
    path = [(bo, sc, list(g.parameter_quantizers), int(c[1][0])) for bo, sc, g, c in pareto]
    qmods = dict(sim.model.named_modules())
    pqs = {n: getattr(m, "param_quantizers", None) for n, m in qmods.items()}  # a ModuleDict each
    weighted = [n for n, q in pqs.items() if q is not None and "weight" in q and q["weight"] is not None]
    uncounted = tuple(n for n in weighted if n not in sizes)  # e.g. LayerNorm weights
    points = walk(path, sizes, max(wbits), uncounted=uncounted)
    chosen = pick(points, args.budget)
    for layer, b in chosen["bits"].items():
        qmods[layer].param_quantizers["weight"].bitwidth = b
    for m in uncounted:  # AMP leaves the walk's last configuration: set the chosen point's
        qmods[m].param_quantizers["weight"].bitwidth = chosen["other"].get(m, max(wbits))
    sim.compute_encodings(fwd, None)
    seconds = time.perf_counter() - t0
    layers: dict[str, Any] = {}
    for layer in names:
        q = qmods[layer].param_quantizers["weight"]
        per_channel = q.get_scale() is not None and q.get_scale().numel() > 1
        gran = "channel" if per_channel else "tensor"
        # the grid's step as a fraction of the largest weight (AIMET symmetric: max|w| / 2^(b-1))
        w = model.get_submodule(layer).weight.detach().flatten(1)
        div = float((w.abs().amax(1) / q.get_scale().detach().flatten()).median())
        layers[layer.removeprefix(prefix)] = {
            # AIMET quantizes the model input and op outputs (8-bit, asymmetric per tensor): a layer's
            # input is the quantized output of the op before it, mixq's 8-bit input quantizer.
            "weight": _common.weight_desc(int(q.bitwidth), gran, symmetric=bool(q.symmetric)),
            "act": _common.act_desc(8, symmetric=False),
            "tool_format": f"W{int(q.bitwidth)}/{gran}/{'sym' if q.symmetric else 'asym'}"
            f" (step max|w|/{div:.3g}) A8",
        }
    return {
        "model": as_task_model(sim.model),
        "layers": layers,
        "search_seconds": seconds,
        "tool_bits": chosen["avg_bits"],
        "tool_bits_name": "weight-count average of the weight bits (scales not counted)",
        "tool_settings": {
            "candidates": [f"W{b}A8" for b in wbits],
            "score": score_kind,
            "phase1_batches": len(p1),
            "phase2_batches": len(calib),
            "quant_scheme": str(scheme),
            "allowed_accuracy_drop": None,
            "amp_search_algo": "BruteForce",
            "walk_from_cache": cached,
        },
        "pick": {
            "rule": "best phase-2 score among the walk's points with average weight bits <= B",
            "index": chosen["index"],
            "score": chosen["score"],
            "bitops": chosen["bitops"],
            "walk_points": len(points),  # weights AIMET quantizes and mixq keeps float:
            "uncounted_lowered": chosen["other"],
        },
        "pareto": [{k: p[k] for k in ("index", "bitops", "score", "avg_bits")} for p in points],
        "note": "AIMET's symmetric weights step by max|w| / 2^(b-1) over the codes -2^(b-1) .. 2^(b-1) - 1 "
        "(W2: -max, -max/2, 0, max/2); mixq's symmetric grid steps by max|w| / (2^(b-1) - 1) (W2: -max, 0, "
        "max), so AIMET's plans on mixq's symmetric grid (mixq same grid) lose most at 2 bits",
    }


if __name__ == "__main__":
    _common.main("aimet", "aimet-torch", body, __doc__)
