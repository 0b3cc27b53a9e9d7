"""Integer biases: each layer's bias on the int32 grid of its accumulator, as integer kernels add it.

An integer kernel (ONNX Runtime's QLinearConv and QGemm, TFLite's int8 conv, gemmlowp) sums
``(q_x - z_x)(q_w - z_w)`` in int32 and adds the bias as an int32 at the accumulator's scale
``s_x s_w`` (Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018, §2.4: "the bias vector is quantized to int32 with
scale S_bias = S_1 S_2 and zero point 0"). mixq's fake-quantized layer adds the float bias ``b``.
This plan step replaces it by ``round(b / (s_x s_w)) s_x s_w`` (per output channel, in float32,
clamped to int32), so that the simulation adds the bias the deployed kernel adds; the exports
write that bias, which the integer kernel's own rounding leaves unchanged.

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


@torch.no_grad()
def int32_bias(qmodel: nn.Module, task: Task, cfg: Config = Config(), seed: int = 0) -> dict:
    """Put every eligible layer's bias on its int32 accumulator grid (in place; specs applied).

    Returns:
        A record: the layers changed, those left (no bias, or not integer per tensor/channel),
        and the largest bias change in units of ``s_x s_w``.
    """
    del task, cfg, seed  # data-free and deterministic
    changed, left, largest = 0, 0, 0.0
    seen: set[int] = set()
    for m in sites(qmodel).values():
        if getattr(m, "weight_only", False):
            continue
        wspec, aspec = m.weight_quant.spec, m.input_quant.spec
        if m.bias is None or not (_integer(wspec, True) and _integer(aspec, False)):
            left += 1
            continue
        sx = m.input_quant.act_params().scale.float().reshape(())  # the site's own, as exported
        step = (sx * weight_scale(m)).float()
        b = m.bias.detach().float()
        k = torch.clamp(torch.round(b / step), *INT32)
        new = (k * step).to(m.bias.dtype)
        largest = max(largest, float((b / step - k).abs().max()))
        if id(m.bias) in seen:  # a bias shared with a layer already on its own grid: give it its own
            m.bias = nn.Parameter(new, requires_grad=m.bias.requires_grad)
            m.float_module.bias = m.bias
        else:
            seen.add(id(m.bias))
            m.bias.copy_(new)
        changed += 1
    return {"layers": changed, "left": left, "max_change_in_steps": largest}
