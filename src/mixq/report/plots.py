"""PNG plots of runs: the metric-vs-size Pareto plot, per-layer bit widths, sensitivity heat maps.

matplotlib (the ``report`` extra) is imported lazily, and only its object-oriented API is used
(``Figure`` drawn by the Agg canvas): no pyplot, no global backend switch, no open windows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mixq.report.runs import LayerRow, pareto_front
from mixq.sensitivity.table import Sensitivity

DPI = 100
_MARKERS = "os^Dv<>pP*Xh"


def new_figure(width: float, height: float) -> Any:
    """Return a matplotlib Figure drawn by the Agg canvas; raise a clear ImportError without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("mixq report draws its plots with matplotlib: pip install 'mixq[report]'") from None
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Any, path: Path) -> Path:
    """Write a figure as PNG and return its path."""
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=DPI)
    return path


def size_unit(max_bytes: float) -> tuple[float, str]:
    """Pick a divisor and unit for sizes up to ``max_bytes``.

    >>> size_unit(3e6)
    (1048576.0, 'MiB')
    >>> size_unit(2e5)
    (1024.0, 'KiB')
    """
    return (1024.0**2, "MiB") if max_bytes >= 1024.0**2 else (1024.0, "KiB")


def pareto_plot(records: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Plot metric against model size for every method, with the Pareto front of all points.

    Args:
        records: metrics dicts (``metrics.json`` of each run, or benchmark rows) holding
            ``method``, ``metric``, ``size_bytes``, ``avg_weight_bits`` and optionally
            ``metric_name`` and ``fp_metric``.
        path: the PNG to write.
        title: the plot's title.

    Returns:
        ``path``.
    """
    if not records:
        raise ValueError("pareto_plot needs at least one record")
    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    div, unit = size_unit(max(float(r["size_bytes"]) for r in records))
    methods = list(dict.fromkeys(str(r["method"]) for r in records))
    for k, method in enumerate(methods):
        pts = sorted(
            (float(r["size_bytes"]) / div, float(r["metric"]), float(r["avg_weight_bits"]))
            for r in records
            if r["method"] == method
        )
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker=_MARKERS[k % len(_MARKERS)],
            label=method,
            alpha=0.85,
        )
    points = [(float(r["size_bytes"]) / div, float(r["metric"])) for r in records]
    front = [points[i] for i in pareto_front(points)]
    ax.step(
        [p[0] for p in front],
        [p[1] for p in front],
        where="post",
        color="black",
        linestyle="--",
        linewidth=1,
        label="Pareto front",
    )
    fp = [float(r["fp_metric"]) for r in records if isinstance(r.get("fp_metric"), (int, float))]
    if fp and math.isfinite(fp[0]):
        ax.axhline(fp[0], color="grey", linestyle=":", linewidth=1, label="fp32")
    ax.set_xlabel(f"model size ({unit}, weights with scales + float rest)")
    ax.set_ylabel(str(records[0].get("metric_name", "metric")))
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return save(fig, path)


def bits_plot(layers: Sequence[LayerRow], path: Path, title: str) -> Path:
    """Bar chart of each layer's storage bits per weight, coloured by the chosen candidate.

    Args:
        layers: the plan's rows, in model order.
        path: the PNG to write.
        title: the plot's title.

    Returns:
        ``path``.
    """
    if not layers:
        raise ValueError("bits_plot needs at least one layer")
    fig = new_figure(max(6.0, 0.28 * len(layers) + 2.0), 4.0)
    ax = fig.add_subplot()
    specs = list(dict.fromkeys(r.spec for r in layers))
    colours = {s: f"C{i % 10}" for i, s in enumerate(specs)}
    xs = range(len(layers))
    ax.bar(xs, [r.bits_per_weight for r in layers], color=[colours[r.spec] for r in layers])
    for s in specs:  # one legend entry per candidate
        ax.bar([0], [0], color=colours[s], label=s)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r.name for r in layers], rotation=90, fontsize=7)
    ax.set_ylabel("bits per weight (with scales)")
    ax.set_title(title, fontsize="medium")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return save(fig, path)


def sensitivity_plot(sens: Sensitivity, chosen: dict[str, str], path: Path, title: str) -> Path:
    """Heat map of a sensitivity table [L, C], the chosen candidate of each layer marked.

    Scores can be negative (measured loss changes), so the colour scale is symmetric-log.

    Args:
        sens: the table.
        chosen: layer name -> chosen candidate name (layers or candidates not in ``sens`` are
            not marked).
        path: the PNG to write.
        title: the plot's title.

    Returns:
        ``path``.
    """
    from matplotlib.colors import SymLogNorm

    fig = new_figure(max(5.0, 1.1 * len(sens.candidates) + 3.5), max(3.0, 0.22 * len(sens.layers) + 1.8))
    ax = fig.add_subplot()
    data = sens.single.detach().double().cpu().numpy()  # [L, C]
    finite = data[abs(data) < math.inf]
    peak = float(abs(finite).max()) if finite.size else 1.0
    peak = peak if peak > 0 else 1.0
    norm = SymLogNorm(linthresh=peak * 1e-2, vmin=-peak, vmax=peak)
    im = ax.imshow(data, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
    marks = [
        (sens.candidates.index(c), sens.layers.index(n))
        for n, c in chosen.items()
        if n in sens.layers and c in sens.candidates
    ]
    if marks:
        ax.scatter([m[0] for m in marks], [m[1] for m in marks], s=18, c="black", marker="o", label="chosen")
        ax.legend(fontsize="small", loc="upper right")
    ax.set_xticks(range(len(sens.candidates)))
    ax.set_xticklabels(sens.candidates, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(sens.layers)))
    ax.set_yticklabels(sens.layers, fontsize=7)
    ax.set_title(f"{title}\n{sens.kind} sensitivity, chosen candidates marked", fontsize="medium")
    fig.colorbar(im, ax=ax, label="score (symlog)")
    return save(fig, path)
