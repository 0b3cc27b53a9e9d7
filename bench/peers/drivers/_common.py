"""Helpers shared by the peer drivers (run inside each peer tool's own virtual environment).

A driver builds the very task mixq benchmarks (``mixq.tasks``: same model, calibration and
validation data, same metric; mixq's source tree is on ``PYTHONPATH``, set by ``bench.peers.runner``),
hands it to its tool, and writes one JSON file: the tool's per-layer choices (a neutral
description of each layer's weight and activation format), the tool's own bit count, the metric
of the tool's own quantized model and the search time. Nothing else crosses the process border.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn


def parser(description: str) -> argparse.ArgumentParser:
    """Arguments every driver takes: task, budget, output file, validation subset."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--task", required=True, help="a mixq built-in task name")
    p.add_argument("--budget", type=float, required=True, help="target average weight bits")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--val", type=int, default=0, help="validation items (0: the task's default)")
    p.add_argument("--settings", default="{}", help="tool settings as a JSON object")
    return p


def build_task(name: str, val: int = 0) -> Any:
    """Build mixq's task ``name``; ``val`` > 0 keeps the first ``val`` test images or sentences."""
    from mixq import tasks

    torch.manual_seed(0)
    return tasks.get(name, val_size=val or None)


def quant_layers(model: nn.Module) -> list[str]:
    """Names of the nn.Linear and nn.Conv2d modules: the layers mixq quantizes."""
    return [n for n, m in model.named_modules() if n and type(m) in (nn.Linear, nn.Conv2d)]


def weight_desc(
    bits: int | str | None,
    granularity: str = "channel",
    group_size: int | None = None,
    symmetric: bool = True,
    clip: str = "minmax",
) -> dict[str, Any] | None:
    """Neutral description of a weight format; ``bits`` an int (integer grid) or a float name;
    ``clip`` how the range is chosen ("minmax": the largest magnitude, "mse": an error search)."""
    if bits is None:
        return None
    return {
        "bits": bits,
        "granularity": granularity,
        "group_size": group_size,
        "symmetric": symmetric,
        "clip": clip,
    }


def act_desc(bits: int | str | None, symmetric: bool = False) -> dict[str, Any] | None:
    """Neutral description of an input-activation format (per tensor)."""
    return None if bits is None else {"bits": bits, "symmetric": symmetric}


def version(dist: str) -> str | None:
    """Installed version of a distribution."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def run(
    tool: str,
    dist: str,
    body: Callable[[argparse.Namespace, Any, dict[str, Any]], dict[str, Any]],
    args: argparse.Namespace,
) -> None:
    """Build the task, call ``body(args, task, settings)``, time it, and write the JSON result.

    ``body`` returns at least ``layers`` (mixq layer name -> {"weight": desc, "act": desc,
    "tool_format": str}), ``search_seconds``, ``tool_bits`` and ``model`` (the tool's quantized
    model, evaluated here with the task's metric). Errors are written to the JSON, not raised.
    """
    t0 = time.perf_counter()
    out: dict[str, Any] = {
        "tool": tool,
        "version": version(dist),
        "task": args.task,
        "budget": args.budget,
        "torch": torch.__version__,
        "val": args.val,
    }
    try:
        settings = json.loads(args.settings)
        if not isinstance(settings, dict):
            raise ValueError(f"--settings must be a JSON object, got {args.settings!r}")
        out["settings"] = settings
        task = build_task(args.task, args.val)
        out["fp_metric"] = task.fp_metric()
        out["metric_name"] = task.metric_name
        res = body(args, task, settings)
        model = res.pop("model")
        t1 = time.perf_counter()
        model.eval()
        out["metric"] = float(task.metric(model, task.val))
        out["eval_seconds"] = time.perf_counter() - t1
        missing = [n for n in quant_layers(task.model) if n not in res["layers"]]
        blank = {"weight": None, "act": None, "tool_format": "not quantized"}
        res["layers"].update({n: dict(blank) for n in missing})
        out.update(res)
        out["ok"] = True
    except Exception as e:  # the benchmark records a failing tool and goes on
        out["ok"] = False
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()[-4000:]
    out["driver_seconds"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k not in ("layers", "traceback")}, default=str))
    if not out["ok"]:
        print(out["traceback"], file=sys.stderr)
        sys.exit(1)


def batches_loss(task: Any, kind: str = "task") -> Callable[[Any, Any], torch.Tensor]:
    """``loss(output, batch)`` for a tool that scores layers by gradients.

    "task": the task's own objective (cross-entropy; MiniLM: 1 - cos to the fp32 embedding, which
    is 0 with a zero gradient at the float model, so gradient scores vanish there).
    "contrastive" (MiniLM): the in-batch contrastive loss the model was trained with,
    cross-entropy of 20 * E E^T against the identity, whose gradient at the float model is not 0.
    """
    if kind not in ("task", "contrastive"):
        raise ValueError(f"unknown loss {kind!r}; valid: task, contrastive")
    if task.name == "minilm" and kind == "contrastive":
        return lambda out, b: torch.nn.functional.cross_entropy(20.0 * out @ out.T, torch.arange(len(out)))
    if task.name == "minilm":
        return lambda out, b: 1.0 - (out * b["target"]).sum(-1).mean()
    return lambda out, b: torch.nn.functional.cross_entropy(out, b[1])


def env_threads() -> None:
    """Keep every tool on the thread count the benchmark sets (OMP_NUM_THREADS)."""
    n = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(max(1, n))


def main(
    tool: str,
    dist: str,
    body: Callable[[argparse.Namespace, Any, dict[str, Any]], dict[str, Any]],
    doc: str | None,
) -> None:
    """A driver's entry point: the benchmark's thread count, the arguments (``parser(doc)``), ``run``."""
    env_threads()
    run(tool, dist, body, parser(doc or tool).parse_args())


def tool_model(task: Any) -> tuple[nn.Module, str]:
    """A copy of the task's model as the tools take it (MiniLM wrapped in ``Hidden``), and the
    prefix that wrapping adds to its layer names."""
    if task.name == "minilm":
        return Hidden(copy.deepcopy(task.model)).eval(), "model."
    return copy.deepcopy(task.model).eval(), ""


class Hidden(torch.nn.Module):
    """MiniLM as the tools take it: tensors in, the last hidden state out (AIMET's
    QuantizationSimModel rejects a model that returns a transformers ModelOutput)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]


class AsTransformer(torch.nn.Module):
    """The quantized ``Hidden`` called as the task calls a transformers model."""

    def __init__(self, hidden: torch.nn.Module) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(last_hidden_state=self.hidden(input_ids, attention_mask))
