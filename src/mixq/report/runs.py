"""Read run directories (written by ``mixq.run(out=...)``) into plain data for a report.

A run directory holds ``metrics.json`` (required here), ``layers.csv`` (the per-layer plan),
``plan.json`` and, when the method measured one, ``sensitivity.safetensors``. Nothing is
recomputed: a report is a pure function of the directories.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixq.sensitivity.table import Sensitivity

REQUIRED_METRICS = ("task", "method", "metric", "avg_weight_bits", "size_bytes")
LAYER_COLUMNS = ("layer", "kind", "weight_shape", "params", "macs", "spec", "weight_bits")


@dataclass(frozen=True)
class LayerRow:
    """One row of ``layers.csv``: a layer, its chosen candidate and its storage bits."""

    name: str
    kind: str
    weight_shape: str
    params: int
    spec: str
    weight_bits: float

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per weight, scales and zero points included."""
        return self.weight_bits / self.params if self.params else math.nan


@dataclass(frozen=True)
class Run:
    """What a report shows of one run directory.

    Attributes:
        path: the run directory.
        metrics: the contents of ``metrics.json``.
        layers: the rows of ``layers.csv`` (empty when the file is absent).
        sensitivity: the table of ``sensitivity.safetensors``, or None.
    """

    path: Path
    metrics: dict[str, Any]
    layers: tuple[LayerRow, ...]
    sensitivity: Sensitivity | None

    @property
    def label(self) -> str:
        """A short name: ``task / method / budget``."""
        return f"{self.metrics['task']} / {self.metrics['method']} / {budget_label(self.metrics)}"


def budget_label(metrics: dict[str, Any]) -> str:
    """Render a run's budget, e.g. ``avg_weight_bits<=3``; ``unconstrained`` when empty.

    >>> budget_label({"budget": {"avg_weight_bits": 3.0}})
    'avg_weight_bits<=3'
    >>> budget_label({"budget": {}})
    'unconstrained'
    """
    budget = metrics.get("budget") or {}
    if not isinstance(budget, dict) or not budget:
        return "unconstrained"
    return ", ".join(f"{k}<={v:g}" if isinstance(v, (int, float)) else f"{k}<={v}" for k, v in budget.items())


def _run_dirs_below(path: Path, limit: int = 5) -> list[str]:
    found = sorted(str(p.parent) for p in path.glob("*/metrics.json"))
    found += sorted(str(p.parent) for p in path.glob("*/*/metrics.json"))
    return found[:limit]


def read_metrics(path: Path) -> dict[str, Any]:
    """Read and check ``metrics.json`` of a run directory, raising a ValueError that names the problem."""
    if not path.is_dir():
        raise ValueError(f"run directory {str(path)!r} does not exist or is not a directory")
    file = path / "metrics.json"
    if not file.is_file():
        below = _run_dirs_below(path)
        hint = f"; run directories below it: {', '.join(below)}" if below else ""
        raise ValueError(
            f"{str(path)!r} is not a run directory: it has no metrics.json (a run directory is "
            f"what `mixq run --out DIR` writes: metrics.json, plan.json, layers.csv){hint}"
        )
    try:
        metrics = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(metrics, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(metrics).__name__}")
    missing = [k for k in REQUIRED_METRICS if k not in metrics]
    if missing:
        raise ValueError(f"{file} lacks {missing}; a run's metrics.json has {', '.join(REQUIRED_METRICS)}")
    return metrics


def read_layers(file: Path) -> tuple[LayerRow, ...]:
    """Read ``layers.csv``; a missing file gives no rows, a malformed one raises a ValueError."""
    if not file.is_file():
        return ()
    with file.open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != LAYER_COLUMNS:
            raise ValueError(f"{file} has columns {reader.fieldnames}; expected {list(LAYER_COLUMNS)}")
        try:
            return tuple(
                LayerRow(
                    r["layer"],
                    r["kind"],
                    r["weight_shape"],
                    int(r["params"]),
                    r["spec"],
                    float(r["weight_bits"]),
                )  # fmt: skip
                for r in reader
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"{file} has a malformed row: {e}") from None


def load_run(path: str | Path) -> Run:
    """Load one run directory for a report.

    Args:
        path: a directory written by ``mixq.run(..., out=path)`` or ``mixq run --out``.

    Returns:
        A :class:`Run`.

    Raises:
        ValueError: the directory is missing, has no metrics.json, or holds malformed files.
    """
    path = Path(path)
    metrics = read_metrics(path)
    sens_file = path / "sensitivity.safetensors"
    sens = Sensitivity.load(sens_file) if sens_file.is_file() else None
    return Run(path, metrics, read_layers(path / "layers.csv"), sens)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Return the indices of the points (size, metric) no other point beats: smaller size, higher metric.

    A point is dominated when another has size <= and metric >= with one of them strict.
    Indices come in increasing size; among equal points the first is kept.

    >>> pareto_front([(1.0, 50.0), (2.0, 90.0), (2.0, 80.0), (3.0, 85.0), (4.0, 95.0)])
    [0, 1, 4]
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front: list[int] = []
    best = -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front
