"""Read run directories (written by ``mixq.run(out=...)``) into plain data for a report.

The layout and its readers are :mod:`mixq.rundir`'s; a report needs ``metrics.json``, and
shows ``layers.csv`` and ``sensitivity.safetensors`` where present. Nothing is recomputed: a
report is a pure function of the directories.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixq import rundir
from mixq.rundir import LayerRow
from mixq.sensitivity.table import Sensitivity

__all__ = ["LayerRow", "Run", "budget_label", "load_run", "pareto_front"]


@dataclass(frozen=True)
class Run:
    """What a report shows of one run directory.

    Attributes:
        path: the run directory.
        metrics: the contents of ``metrics.json`` (without its ``schema``).
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
    metrics = rundir.read_metrics(path)
    sens_file = rundir.listed(path, rundir.SENSITIVITY)  # only the run's own, checked
    sens = Sensitivity.load(sens_file) if sens_file is not None else None
    return Run(path, metrics, rundir.read_layers(rundir.listed(path, rundir.LAYERS)), sens)


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
