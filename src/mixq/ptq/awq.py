"""AWQ: scale each input channel of a layer by its activation magnitude before quantizing.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan and Han, "AWQ: Activation-aware Weight
Quantization for On-Device LLM Compression and Acceleration", MLSys 2024 (Section 3.2). For
the layers ``W_i`` that read one input ``X`` [N, k] (q, k and v after a norm; gate and up), a
per-input-channel scale

    s = s_X ** alpha,   s_X = mean over tokens of |X|   (per channel)
    alpha* = argmin over alpha in {0, 1/n, ..., (n-1)/n} of
             sum_i || Q(W_i diag(s)) (diag(s)^-1 X) - W_i X ||^2

is folded into the model: the layers' columns are multiplied by ``s`` and the op that produces
``X`` divides its output channels by ``s``, so the float function is unchanged and only the
rounding sees the scaled weights (salient channels get finer steps). ``alpha = 0`` (``s = 1``)
is in the grid, so the chosen scale never has a larger calibration error than no scaling.

Symbol map: ``s_X`` -> the mean of ``|x|`` over the calibration rows, ``alpha`` -> the grid of
``Config.grid`` points, ``Q`` -> each layer's own weight spec from the plan (a mixed plan: each
at its own bits), ``X`` -> the layers' float input (all specs off) on the calibration batches,
kept as its Gram matrix ``G = X^T X`` and ``sum |X|``: the error of a scale is
``sum_i tr(D_i G D_i^T)`` with ``D_i = Q(W_i diag(s)) diag(s)^-1 - W_i`` (the same value, without
a pass over the tokens per ``alpha``).

The producer of ``X``, found without model-specific code and checked numerically:

1. a module whose output *is* the layers' input tensor and that has a 1-D ``weight`` of ``k``
   channels (RMSNorm, LayerNorm: ``weight`` and ``bias`` divided by ``s``);
2. else a quantized linear layer of the same block with ``k`` output channels (e.g. up_proj
   before down_proj, v_proj before o_proj with as many heads as key/value heads): its rows
   (and bias) divided by ``s``.

A candidate is accepted only if folding a random scale in [0.5, 2] leaves the block's output
unchanged (relative 1e-4) on a calibration batch; so ``(1 + weight)`` norms, nonlinear paths
(gate -> down through SiLU) and grouped-query v/o are refused. A group without an accepted
producer is skipped and named.

Deviations, each [DESIGN]:

* The scale is normalized as in the authors' code (``s / sqrt(max(s) min(s))``); the weight
  clipping search of the authors' code is not done.
* ``X`` is the float model's input of the layers (as in the paper); it runs block by block on
  cached inputs (:mod:`mixq.blocks`), or on whole-model forwards for a model without repeated
  blocks. Layers outside the blocks (lm_head) are skipped and named.
* The search ignores input quantizers (weight error only), and ``clip="omse"`` is searched as
  ``"mse"``; after the folds every site's activation statistics (and Gram matrices, for omse)
  are recorded again (:func:`mixq.wrap.calibrate`), since the scaled layers' inputs changed.
* Layers whose weight is tied to another parameter, weight-only sites and non-linear sites
  (convolutions) are skipped and named. AWQ must run before GPTQ and AdaRound: it changes the
  weights whose rounding they fix (an error names the layer otherwise).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mixq import blocks as blk
from mixq.kinds import kind_of
from mixq.plan import QSpec
from mixq.tasks import Task, output_tensor
from mixq.wrap import applied, calibrate, sites

CHECK_RTOL = 1e-4  # a fold must leave the block's output unchanged to this relative error


@dataclass(frozen=True)
class Config:
    """Settings of AWQ.

    Attributes:
        grid: points of the ``alpha`` grid in [0, 1) (20 in the paper's code).
        batches: calibration batches used (0: all of them).
        blockwise: run block by block on cached inputs (False: whole-model forwards).
    """

    grid: int = 20
    batches: int = 0
    blockwise: bool = True

    def __post_init__(self) -> None:
        if self.grid < 1 or self.batches < 0:
            raise ValueError(f"grid must be >= 1 and batches >= 0, got {self}")


def search_spec(spec: QSpec) -> QSpec:
    """The spec the search quantizes with (``omse`` needs Gram matrices: ``mse`` instead)."""
    return dataclasses.replace(spec, clip="mse") if spec.clip == "omse" else spec


def group_error(
    gram: torch.Tensor, weights: Sequence[torch.Tensor], specs: Sequence[QSpec], s: torch.Tensor
) -> float:
    """``sum_i ||Q(W_i diag(s)) (X / s) - W_i X||^2 = sum_i tr(D_i G D_i^T)`` with
    ``D_i = Q(W_i diag(s)) / s - W_i`` and ``G = X^T X`` (``gram`` [k, k])."""
    total = 0.0
    for w, spec in zip(weights, specs, strict=True):
        d = kind_of(spec).quantize_weight(w * s, spec, None) / s - w
        total += float(((d @ gram) * d).double().sum())
    return total


def search_scale(
    gram: torch.Tensor, sx: torch.Tensor, weights: Sequence[torch.Tensor], specs: Sequence[QSpec], grid: int
) -> tuple[torch.Tensor, float, dict[str, float]]:
    """Return the best scale ``s`` [k] (``sx``: the mean of ``|X|`` per channel), its ``alpha``
    and the errors without and with it."""
    specs = [search_spec(sp) for sp in specs]
    best: tuple[float, float, torch.Tensor] | None = None
    before = None
    for i in range(grid):
        alpha = i / grid
        s = sx.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        if alpha == 0:
            s = torch.ones_like(sx)
        err = group_error(gram, weights, specs, s)
        before = err if alpha == 0 else before
        if best is None or err < best[0]:
            best = (err, alpha, s)
    assert best is not None and before is not None
    return best[2], best[1], {"before": before, "after": best[0]}


# -- folding ---------------------------------------------------------------------------------------


@dataclass
class Fold:
    """Divide a producer's output channels by ``s`` and multiply the consumers' columns by it."""

    producer: list[torch.Tensor]  # tensors whose first axis is the channel (norm weight, bias; rows)
    consumers: list[torch.Tensor]  # [out, k] weights

    def apply(self, s: torch.Tensor) -> None:
        with torch.no_grad():
            for p in self.producer:
                p.div_(s.reshape(-1, *([1] * (p.dim() - 1))).to(p.dtype))
            for w in self.consumers:
                w.mul_(s.to(w.dtype))

    def save(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t in self.producer + self.consumers]

    def restore(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for t, v in zip(self.producer + self.consumers, saved, strict=True):
                t.copy_(v)


def _tied(model: nn.Module) -> set[int]:
    """Storage pointers of parameters that more than one module name refers to."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[p.data_ptr()] = seen.get(p.data_ptr(), 0) + 1
    return {ptr for ptr, n in seen.items() if n > 1}


@dataclass
class Capture:
    """What one unit's first forward shows: each group's input and the modules' outputs."""

    order: list[str]  # group leaders in execution order
    members: dict[str, list[str]]
    first: dict[str, torch.Tensor]  # each group's input in the first run
    gram: dict[str, torch.Tensor]  # X^T X over every run [k, k]
    abs_sum: dict[str, torch.Tensor]  # sum of |X| per channel
    count: dict[str, int]
    outputs: list[tuple[str, torch.Tensor]]  # (module name, output) of the first run


def _capture(unit: nn.Module, names: dict[str, nn.Module], runs: Sequence[Callable[[], Any]]) -> Capture:
    cap = Capture([], {}, {}, {}, {}, {}, [])
    first = cap.first
    run_index = 0

    def pre(name: str) -> Callable:
        def fn(_m: nn.Module, args: tuple) -> None:
            raw = args[0]
            x = raw.detach()
            if run_index == 0:
                leader = next((lead for lead, t in first.items() if t is raw), None)
                if leader is None:
                    first[name] = raw
                    cap.order.append(name)
                    cap.members[name] = [name]
                else:
                    cap.members[leader].append(name)
            if name in cap.members:
                rows = x.reshape(-1, x.shape[-1]).float()
                g, a = rows.T @ rows, rows.abs().sum(0)
                cap.gram[name] = cap.gram[name] + g if name in cap.gram else g
                cap.abs_sum[name] = cap.abs_sum[name] + a if name in cap.abs_sum else a
                cap.count[name] = cap.count.get(name, 0) + rows.shape[0]

        return fn

    def post(name: str) -> Callable:
        def fn(_m: nn.Module, _args: tuple, y: Any) -> None:
            if run_index == 0 and isinstance(y, torch.Tensor):
                cap.outputs.append((name, y))

        return fn

    handles = [m.register_forward_pre_hook(pre(n)) for n, m in names.items()]
    handles += [m.register_forward_hook(post(n)) for n, m in unit.named_modules() if n]
    try:
        with torch.no_grad():
            for run_index, run in enumerate(runs):  # noqa: B007 - read by the hooks
                run()
    finally:
        for h in handles:
            h.remove()
    return cap


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(b.abs().max()) or 1.0
    return bool(torch.isfinite(a).all()) and float((a - b).abs().max()) <= CHECK_RTOL * scale


def _producers(
    unit: nn.Module,
    cap: Capture,
    leader: str,
    k: int,
    group: set[str],
    sites_: dict[str, nn.Module],
    tied: set[int],
) -> list[tuple[str, list[torch.Tensor]]]:
    """Candidate producers of the group's input, most likely first: (name, channel tensors)."""
    x = cap.first[leader].reshape(-1, k)
    out = []
    mods = dict(unit.named_modules())
    for name, y in reversed(cap.outputs):
        m = mods[name]
        if y.reshape(-1, y.shape[-1]).data_ptr() != x.data_ptr() or y.shape[-1] != k or name in sites_:
            continue
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() == 1 and w.numel() == k and w.data_ptr() not in tied:
            b = getattr(m, "bias", None)
            out.append((name, [w] + ([b] if isinstance(b, nn.Parameter) and b.shape == w.shape else [])))
    before = cap.order[: cap.order.index(leader)]
    ran = [n for lead in before for n in cap.members[lead]]
    for name in reversed(ran):
        m = sites_[name]
        if name in group or getattr(m, "out_features", None) != k or m.weight.data_ptr() in tied:
            continue
        out.append((name, [m.weight] + ([m.bias] if m.bias is not None else [])))
    return out


def _process_unit(
    qmodel: nn.Module,
    unit: nn.Module,
    names: dict[str, nn.Module],
    runs: Sequence[Callable[[], Any]],
    specs: dict[str, QSpec],
    cfg: Config,
    record: dict[str, Any],
    prefix: str = "",
) -> None:
    tied = _tied(qmodel)
    sites_ = {n: m for n, m in names.items()}
    with applied(qmodel, {}):
        cap = _capture(unit, names, runs)
        ref = output_tensor(runs[0]())
        gen = torch.Generator().manual_seed(0)
        for leader in cap.order:
            group = cap.members[leader]
            why = _refuse(group, sites_, specs, tied)
            if why:
                record["skipped"].update({n: why for n in group})
                continue
            k = cap.gram[leader].shape[0]
            weights = [sites_[n].weight.detach().float() for n in group]
            sx = cap.abs_sum[leader] / cap.count[leader]
            s, alpha, err = search_scale(cap.gram[leader], sx, weights, [specs[n] for n in group], cfg.grid)
            consumers = [sites_[n].weight for n in group]
            test = torch.rand(k, generator=gen) * 1.5 + 0.5
            chosen = None
            for pname, tensors in _producers(unit, cap, leader, k, set(group), sites_, tied):
                fold = Fold(tensors, consumers)
                saved = fold.save()
                fold.apply(test)
                ok = _close(output_tensor(runs[0]()), ref)
                fold.restore(saved)
                if ok:
                    chosen = (pname, fold)
                    break
            if chosen is None:
                record["skipped"].update({n: "no producer of its input to fold a scale into" for n in group})
                continue
            chosen[1].apply(s)
            record["groups"][leader] = {
                "layers": group,
                "producer": chosen[0] if chosen[0] in sites_ else prefix + chosen[0],
                "alpha": alpha,
                "error_before": err["before"],
                "error_after": err["after"],
            }


def _refuse(
    group: list[str], sites_: dict[str, nn.Module], specs: dict[str, QSpec], tied: set[int]
) -> str | None:
    for n in group:
        m = sites_[n]
        if specs.get(n) is None or getattr(m, "weight_only", False):
            return "not a quantized weight in the group (float or weight-only)"
        if getattr(m, "in_features", None) is None or m.weight.dim() != 2:
            return "not a linear layer"
        if m.weight.data_ptr() in tied:
            return "its weight is tied to another parameter"
    return None


def awq(qmodel: nn.Module, task: Task, cfg: Config = Config(), seed: int = 0) -> dict:
    """Search and fold AWQ scales into every foldable layer group of ``qmodel`` (in place).

    Returns:
        A record: per group (named by its first layer) its layers, producer, ``alpha`` and the
        calibration error without and with the scale; skipped layers with the reason; blocks.
    """
    del seed
    all_sites = sites(qmodel)
    for n, m in all_sites.items():
        if m.weight_quant.rounding is not None:
            raise ValueError(
                f"layer {n!r} already has a fixed rounding (gptq, adaround): list awq before them"
            )
    specs = {n: m.weight_quant.spec for n, m in all_sites.items()}
    batches = list(task.calib)[: cfg.batches or None]
    record: dict[str, Any] = {"groups": {}, "skipped": {}, "blocks": None}
    qmodel.eval()
    ids = {id(m) for n, m in all_sites.items() if specs[n] is not None}
    found = (
        blk.find_blocks(qmodel, count=lambda m: sum(id(s) in ids for s in m.modules()))
        if cfg.blockwise
        else None
    )
    if found is None:
        runs = [lambda b=b: task.forward(qmodel, b) for b in batches]
        with blk.no_cache(qmodel):
            _process_unit(qmodel, qmodel, dict(all_sites), runs, specs, cfg, record)
    else:
        record["blocks"] = {"name": found.name, "count": len(found.modules)}
        with applied(qmodel, {}):
            inputs = blk.capture_inputs(qmodel, found.modules[0], batches, task.forward)
            with blk.no_cache(qmodel):  # each block's own masks and position embeddings
                own = [
                    blk.block_arguments(qmodel, found.modules, lambda b=b: task.forward(qmodel, b))
                    for b in batches
                ]
        inside: set[str] = set()
        for k, (bname, block) in enumerate(zip(found.names(), found.modules, strict=True)):
            names = {n: m for n, m in all_sites.items() if n.startswith(bname + ".")}
            inside |= set(names)
            runs = [lambda inp=inp, b=block: blk.call(b, inp) for inp in inputs]
            _process_unit(qmodel, block, names, runs, specs, cfg, record, bname + ".")
            with applied(qmodel, {}):
                following = [a[k + 1] for a in own] if k + 1 < len(found.modules) else None
                inputs = blk.run_block(block, inputs, following)
        del inputs
        outside = {
            n: "outside the repeated blocks" for n in all_sites if n not in inside and specs[n] is not None
        }
        record["skipped"].update(outside)
    needs_gram = any(sp is not None and sp.clip == "omse" for sp in specs.values())
    if any(m.input_quant.spec is not None for m in all_sites.values()) or needs_gram:
        calibrate(qmodel, task.calib, task.forward, gram=needs_gram)
    record["layers"] = sum(len(g["layers"]) for g in record["groups"].values())
    return record
