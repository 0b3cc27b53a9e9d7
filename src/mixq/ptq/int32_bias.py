"""Integer biases: each layer's bias on the int32 grid of its accumulator, as integer kernels add it.

An integer kernel (ONNX Runtime's QLinearConv and QGemm, TFLite's int8 conv, gemmlowp) sums
``(q_x - z_x)(q_w - z_w)`` in int32 and adds the bias as an int32 at the accumulator's scale
``s_x s_w`` (Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018, §2.4: "the bias vector is quantized to int32 with
scale S_bias = S_1 S_2 and zero point 0"). mixq's fake-quantized layer adds the float bias ``b``.
This plan step replaces it by ``round(b / (s_x s_w)) s_x s_w`` (per output channel, in float32,
clamped to int32), so that the simulation adds the bias the deployed kernel adds; the exports
write that bias, which the integer kernel's own rounding leaves unchanged. A bias shared by two
layers is rounded once per layer from its original values (never a rounded value rounded again).
A float16/bfloat16 bias holds the nearest value of its dtype (see :func:`on_grid`): it is exact
only in float32/float64, and the record names the layers where it is not (``off_grid``).

Symbol map: ``S_1`` -> the input site's scale ``s_x`` (per tensor), ``S_2`` -> the weight's scale
``s_w`` (per tensor or output channel, from the weight's codes as the exports encode them).

It changes only layers with an integer input quantized per tensor and an integer weight per
tensor or channel (a grouped weight has no single accumulator scale); others keep their bias.

[DESIGN] A plan step, not a default of the simulation: it changes the quantized model (by at
most half a step of ``s_x s_w`` per bias), so every accuracy measured without it stays as it
was. It must be the last plan step (a later one would move the biases off the grid again), and
the layers' input ranges must not change after it (their scales set the grid).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mixq.formats import Int
from mixq.kinds import kind_of
from mixq.tasks import Task
from mixq.wrap import sites

INT32 = (-(2**31), 2**31 - 1)


@dataclass(frozen=True)
class Config:
    """Settings of the int32 bias step (none: the grid is the accumulator's)."""


def _integer(spec: object, weight: bool) -> bool:
    if spec is None or not isinstance(getattr(spec, "fmt", None), Int) or spec.points is not None:
        return False
    if kind_of(spec).name != "integer":
        return False
    return spec.granularity in (("tensor", "channel") if weight else ("tensor",))


def weight_scale(m: nn.Module) -> torch.Tensor:
    """The weight's scale per output channel (float32), from its codes as the exports encode them."""
    spec = m.weight_quant.spec
    w = m.weight.detach().float()
    own = getattr(m.weight_quant.rounding, "encode", None)  # a grid of its own (GPTQ)
    enc = own(w, spec) if own is not None else None
    if enc is None:
        gram = m.weight_quant.gram.float() if m.weight_quant.gram is not None else None
        enc = kind_of(spec).encode(w, spec, gram, m.weight_quant(w))  # as mixq.export.codes does
    return enc.scale.float().reshape(-1)


def on_grid(b: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bias on the grid ``k * step`` in ``b``'s dtype, and the integers ``k`` ONNX Runtime adds.

    ``k = round(b / step)`` in float32, clamped to int32. A float32 (or float64) bias holds
    ``k * step`` exactly (a float32 product, as the exports write it), and ORT's own rounding of it
    gives back ``k``. A float16 or bfloat16 bias cannot in general hold ``k * step``: it holds the
    value of its dtype nearest to it, which is no farther from ``k * step`` than ``b`` itself, so
    ORT (which rounds the exported float32 value) still finds ``k``; but the simulation then adds a
    value off the grid by up to half the dtype's spacing there (with ``|k|`` above about 2^8,
    bfloat16's spacing exceeds the step and the bias stays as it was).
    """
    k = torch.clamp(torch.round(b.float() / step), *INT32)
    return (k * step).to(b.dtype), k


@torch.no_grad()
def int32_bias(qmodel: nn.Module, task: Task, cfg: Config = Config(), seed: int = 0) -> dict:
    """Put every eligible layer's bias on its int32 accumulator grid (in place; specs applied).

    A bias shared by several layers is rounded from its original values for each of them; the
    first keeps the shared tensor, each later one gets its own (their grids differ).

    Returns:
        A record: the layers changed, those left (no bias, or not integer per tensor/channel),
        the largest bias change in units of ``s_x s_w``, and the layers whose bias dtype (float16,
        bfloat16) cannot hold the grid values exactly (``off_grid``).
    """
    del task, cfg, seed  # data-free and deterministic
    changed, left, largest = 0, 0, 0.0
    off_grid: list[str] = []
    original: dict[int, torch.Tensor] = {}  # a bias's values before any layer moved it
    for name, m in sites(qmodel).items():
        if getattr(m, "weight_only", False):
            continue
        wspec, aspec = m.weight_quant.spec, m.input_quant.spec
        if m.bias is None or not (_integer(wspec, True) and _integer(aspec, False)):
            left += 1
            continue
        sx = m.input_quant.act_params().scale.float().reshape(())  # the site's own, as exported
        step = (sx * weight_scale(m)).float()
        shared = id(m.bias) in original
        b = original.setdefault(id(m.bias), m.bias.detach().clone())
        new, k = on_grid(b, step)
        largest = max(largest, float((b.float() / step - k).abs().max()))
        if not torch.equal(new.float(), (k * step).float()):
            off_grid.append(name)
        if shared:  # a bias shared with a layer already on its own grid: give it its own
            m.bias = nn.Parameter(new, requires_grad=m.bias.requires_grad)
            m.float_module.bias = m.bias
        else:
            m.bias.copy_(new)
        changed += 1
    return {"layers": changed, "left": left, "max_change_in_steps": largest, "off_grid": off_grid}
