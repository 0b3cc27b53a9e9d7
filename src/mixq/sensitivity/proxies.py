"""Data-free sensitivity: the squared weight quantization error ``‖Q_c(W_l) − W_l‖²``."""

from __future__ import annotations

import torch
from torch import nn

from mixq.plan import LayerSpec, as_layer_spec
from mixq.quant import fake
from mixq.sensitivity.table import Sensitivity
from mixq.wrap import sites


def check_layers(qmodel: nn.Module, layers: list[str]) -> dict[str, nn.Module]:
    """Return the sites named by ``layers``; raise naming any layer the model does not have."""
    qlayers = sites(qmodel)
    if not qlayers:
        raise ValueError("model has no quantized layers; call mixq.wrap(model) first")
    if not layers:
        raise ValueError("give at least one layer")
    missing = [n for n in layers if n not in qlayers]
    if missing:
        raise ValueError(f"unknown layers {missing[:5]}; the model's layers are: {list(qlayers)[:20]}")
    return {n: qlayers[n] for n in layers}


def weight_error(site: nn.Module, spec: LayerSpec) -> float:
    """Return ``‖Q(W) − W‖²`` of one site's weight under ``spec`` (zero for a float weight).

    Uses the site's Gram matrix for clip "omse", as the site itself does.
    """
    if spec.weight is None:
        return 0.0
    w = site.weight.detach()
    gram = site.weight_quant.gram
    wq = fake.quantize_weight(w, spec.weight, gram.float() if gram is not None else None)
    return float((wq.double() - w.double()).pow(2).sum())


def proxy(qmodel: nn.Module, layers: list[str], candidates: list[str | LayerSpec]) -> Sensitivity:
    """Score each layer and candidate by the squared weight error, without data.

    ``single[l, c] = ‖Q_c(W_l) − W_l‖²₂``: the perturbation term of HAWQ-V2 (Dong et al., 2020)
    and HAWQ-V3 (Yao et al., 2021) without its curvature weight.

    Args:
        qmodel: a wrapped model.
        layers: exact names of the layers to score.
        candidates: candidate names or specs.

    Returns:
        A Sensitivity of kind "proxy".
    """
    qlayers = check_layers(qmodel, layers)
    specs = [as_layer_spec(c) for c in candidates]
    single = torch.tensor(
        [[weight_error(qlayers[n], s) for s in specs] for n in layers], dtype=torch.float64
    )  # [L, C]
    return Sensitivity(list(layers), [s.name for s in specs], single, kind="proxy")
