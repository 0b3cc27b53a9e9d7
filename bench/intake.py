"""Intake on real architectures (issue #25, item 8): what mixq finds in a model as users ship it.

For the tiny architectures of tests/test_architectures.py (Llama, Qwen2, Gemma-3, GPT-2 and BERT
from ``transformers`` configs with random weights; the library-style conv net with "same"-padding
``nn.Conv2d`` subclasses, a shared ReLU6, depthwise blocks, squeeze-excitation and ZeroPad2d)
and for the zoo (mnist-cnn, fashion-resnet20 and fashion-mobilenetv2 from their unfolded zoo
models, minilm): the layers found, the share of the weights they hold (``weights_covered_pct``:
the sites' weights over those plus every tensor of ``float_layers``, tied float copies
included), the batch norms folded from the graph, CLE's pairs and skipped pairs, and the seconds
of each preparation step (recorded, not asserted; the machine may be shared).

Then the Fashion models rebuilt with conv subclasses: every ``nn.Conv2d`` replaced by a
:class:`SubConv2d` (a subclass with its own forward calling ``F.conv2d``, same weights), run
through uniform and sensitivity-ilp at one budget (256 calibration and 2,000 validation images)
beside the plain model: the plans and measures of both and whether they are equal.

    .venv/bin/python -m bench.intake
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import mixq
from bench.common import ROOT, write
from mixq import api, tasks, zoo
from mixq.fold import NORMS, fold_model
from mixq.ptq import cle

ARCHS = ("llama", "qwen2", "gemma3", "gpt2", "bert", "conv-net")  # tests/test_architectures.py's
ZOO = ("mnist-cnn", "fashion-resnet20", "fashion-mobilenetv2", "minilm")
FASHION = ("fashion-resnet20", "fashion-mobilenetv2")
CANDIDATES = ["w4a8", "w8a8"]
REBUILD_CANDIDATES = ["w2a8", "w4a8", "w8a8"]
REBUILD_BUDGET = {"avg_weight_bits": 5.0}
REBUILD_VAL = 2_000
REBUILD_CALIB = 256  # one calibration batch: sensitivity-ilp measures on it (a few minutes in all)
MEASURED = ("metric", "avg_weight_bits", "size_bytes", "bops")


def architectures() -> Any:
    """tests/test_architectures.py as a module: the tiny architectures are the tests' own."""
    path = ROOT / "tests" / "test_architectures.py"
    spec = importlib.util.spec_from_file_location("mixq_test_architectures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class SubConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` subclass with its own forward (no "same" padding: the same function)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def with_subclass_convs(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose every exact ``nn.Conv2d`` is a :class:`SubConv2d` with its weights."""
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if type(m) is nn.Conv2d:
            if m.padding_mode != "zeros":
                raise ValueError(f"{name}: padding_mode {m.padding_mode!r}; SubConv2d pads with zeros")
            sub = SubConv2d(
                m.in_channels,
                m.out_channels,
                m.kernel_size,
                m.stride,
                m.padding,
                m.dilation,
                m.groups,
                m.bias is not None,
            )
            sub.load_state_dict(m.state_dict())
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, sub.eval())
    return model


def intake(task: mixq.Task) -> dict[str, Any]:
    """What the preparation of ``task`` finds, and its seconds per step."""
    model = copy.deepcopy(task.model).eval()
    example = lambda m: task.forward(m, task.calib[0])  # noqa: E731 - the fold's and CLE's check
    norms = sum(isinstance(m, NORMS) for m in model.modules())
    t0 = time.perf_counter()
    fold = fold_model(model, example)
    t1 = time.perf_counter()
    equalized = copy.deepcopy(model)
    record = cle.equalize(equalized, cle.Config(), example=example)
    t2 = time.perf_counter()
    folded = dataclasses.replace(task, model=model, _fp_metric=None)
    qmodel, _ = api.prepare(folded, [mixq.plan.parse_candidate(c) for c in CANDIDATES])
    t3 = time.perf_counter()
    sites = mixq.sites(qmodel)
    floats = mixq.float_layers(qmodel)
    params = dict(qmodel.named_parameters(remove_duplicate=False))
    covered = sum(m.weight.numel() for m in sites.values())
    stay = sum(params[n].numel() for n in floats)
    return {
        "layers_found": len(sites),
        "site_types": sorted({type(m).__name__ for m in sites.values()}),
        "weights_quantized": covered,
        "weights_float": stay,
        "weights_covered_pct": 100.0 * covered / (covered + stay),
        "float_layers": floats,
        "batch_norms": norms,
        "layers_folded": len(fold["folded"]),
        "bn_kept": fold["kept"],
        "bn_traced": fold["traced"],
        "cle_pairs": len(record["pairs"]),
        "cle_skipped": len(record["skipped"]),
        "cle_max_abs_diff": record.get("max_abs_diff"),
        "fold_seconds": t1 - t0,
        "cle_seconds": t2 - t1,
        "prepare_seconds": t3 - t2,  # copy, wrap, calibrate (w4a8, w8a8), probe
    }


def zoo_task(name: str) -> mixq.Task:
    """The zoo task, the Fashion models with their batch norm (the task folds it; here the graph
    fold does), on a small validation set (the intake reads only calibration data)."""
    task = tasks.get(name, val_size=256)
    if name in FASHION:
        task = dataclasses.replace(task, model=zoo.load(name).eval(), _fp_metric=None)
    return task


def run_row(task: mixq.Task, method: str) -> dict[str, Any]:
    r = mixq.run(task, method, REBUILD_CANDIDATES, REBUILD_BUDGET, cache=mixq.Cache())
    return {
        "plan": {n: s.name for n, s in r.plan.layers.items()},
        **{k: getattr(r.metrics, k) for k in MEASURED},
        "layers": r.metrics.layers,
        "seconds": r.metrics.seconds,
    }


def rebuilt(name: str) -> dict[str, Any]:
    """The plain Fashion model and its conv-subclass rebuild through uniform and sensitivity-ilp."""
    plain = tasks.get(name, val_size=REBUILD_VAL, calib_size=REBUILD_CALIB)
    sub = dataclasses.replace(plain, model=with_subclass_convs(plain.model), _fp_metric=None)
    out: dict[str, Any] = {
        "convs_replaced": sum(isinstance(m, SubConv2d) for m in sub.model.modules()),
        "val_images": REBUILD_VAL,
        "calib_images": REBUILD_CALIB,
        "candidates": REBUILD_CANDIDATES,
        "budget": REBUILD_BUDGET,
        "methods": {},
    }
    for method in ("uniform", "sensitivity-ilp"):
        a, b = run_row(plain, method), run_row(sub, method)
        same_plan = a["plan"] == b["plan"]
        same = {k: a[k] == b[k] for k in MEASURED}
        out["methods"][method] = {"plain": a, "subclass": b, "same_plan": same_plan, "same_measures": same}
        print(f"{name:20s} {method:16s} plan equal {same_plan}, measures equal {same}", flush=True)
    return out


def main() -> None:
    t0 = time.perf_counter()
    arch = architectures()
    models: dict[str, Any] = {}
    for name in ARCHS:
        models[name] = {
            "source": "tests/test_architectures.py (tiny, random weights)",
            **intake(arch.make_task(name)),
        }
        print(f"{name:20s} {models[name]['layers_found']:3d} layers", flush=True)
    for name in ZOO:
        models[name] = {"source": "zoo", **intake(zoo_task(name))}
        print(f"{name:20s} {models[name]['layers_found']:3d} layers", flush=True)
    rebuild = {name: rebuilt(name) for name in FASHION}
    path = write(
        "intake",
        {
            "candidates_prepared": CANDIDATES,
            "models": models,
            "subclass_rebuild": rebuild,
            "wall_seconds": time.perf_counter() - t0,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
