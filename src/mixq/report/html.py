"""Render run directories as one HTML page with PNG plots: ``report.html`` in an output folder.

The page holds, per task, the metric-vs-size Pareto plot of every method in the runs and the
table of runs; then, per run, its per-layer bit-width chart, its sensitivity heat map when it
has one, and its per-layer table. Images are PNG files next to ``report.html``, linked by
relative paths, so the folder can be moved or served as is. A small inline script checks, on
load, that every image decoded, and writes the count into ``#image-check`` (its
``data-loaded`` and ``data-total`` attributes), which a headless browser can read back.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mixq.report import plots
from mixq.report.runs import Run, budget_label, load_run
from mixq.sensitivity.table import Sensitivity

REPORT = "report.html"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td.l, th.l { text-align: left; }
img { max-width: 100%; display: block; margin: 0.5em 0; border: 1px solid #eee; }
#image-check { color: #666; font-size: 0.85em; }
"""

_CHECK_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var p = document.getElementById("image-check");
  p.setAttribute("data-loaded", String(ok));
  p.setAttribute("data-total", String(imgs.length));
  p.textContent = ok + " of " + imgs.length + " images loaded";
});
"""


def slug(text: str) -> str:
    """Turn a name into a safe file-name part.

    >>> slug("fashion-resnet20 / hawq")
    'fashion-resnet20-hawq'
    """
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-") or "x"


def fmt(value: Any, digits: int = 4) -> str:
    """Format a table cell: floats to ``digits`` decimals, the rest as text."""
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    """Render an HTML table; the first ``left`` columns are left-aligned text."""

    def cell(tag: str, i: int, v: Any) -> str:
        cls = ' class="l"' if i < left else ""
        return f"<{tag}{cls}>{html.escape(fmt(v))}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "\n".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}\n</table>"


def plan_summary(run: Run) -> str:
    """Count the layers per chosen candidate, e.g. ``w4a8: 3, w8a8: 2``."""
    counts: dict[str, int] = {}
    for r in run.layers:
        counts[r.spec] = counts.get(r.spec, 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in counts.items())


def runs_table(runs: Sequence[Run]) -> str:
    """The comparison table of runs of one task."""
    header = [
        "method",
        "budget",
        "metric",
        "fp32",
        "avg w bits",
        "size (bytes)",
        "size ratio",
        "BOPs",
        "search s",
        "eval s",
        "plan",
    ]
    rows = []
    for run in runs:
        m = run.metrics
        rows.append(
            [
                m["method"],
                budget_label(m),
                m["metric"],
                m.get("fp_metric", ""),
                m["avg_weight_bits"],
                f"{float(m['size_bytes']):.0f}",
                m.get("size_ratio", ""),
                f"{float(m.get('bops', 0)):.3g}",
                fmt(m.get("seconds", ""), 1),
                fmt(m.get("eval_seconds", ""), 1),
                plan_summary(run),
            ]
        )
    return table(header, rows, left=2)


def layers_table(run: Run) -> str:
    """The per-layer table of one run; with a sensitivity table, the chosen candidate's score ± SE."""
    rows = [[r.name, r.kind, r.weight_shape, r.params, r.spec, fmt(r.bits_per_weight, 3)] for r in run.layers]
    head = ["layer", "kind", "weight shape", "params", "candidate", "bits/weight"]
    sens = run.sensitivity
    if sens is not None:
        head.append("sensitivity ± SE")
        below = {(h["layer"], h["candidate"]) for h in sens.below_noise()}
        for row, r in zip(rows, run.layers, strict=True):
            row.append(score_text(sens, r.name, r.spec, (r.name, r.spec) in below))
    return table(head, rows, left=3)


def score_text(sens: Sensitivity, layer: str, candidate: str, below: bool) -> str:
    """``score ± se`` of one layer at its candidate ("" when not in the table); below −2 SE marked."""
    if layer not in sens.layers or candidate not in sens.candidates:
        return ""
    score, se = sens.score(layer, candidate), sens.error(layer, candidate)
    text = f"{score:.3g}" if math.isnan(se) else f"{score:.3g} ± {se:.2g}"
    return text + (" (below −2 SE)" if below else "")


def image(src: str, alt: str) -> str:
    """An <img> with a relative ``src``."""
    return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">'


def task_section(task: str, runs: Sequence[Run], out: Path) -> str:
    """Pareto plot and run table of one task."""
    name = f"pareto-{slug(task)}.png"
    plots.pareto_plot([r.metrics for r in runs], out / name, f"{task}: metric vs size")
    metric_name = runs[0].metrics.get("metric_name", "metric")
    return "\n".join(
        [
            f"<h2>{html.escape(task)}</h2>",
            f"<p>metric: {html.escape(str(metric_name))}; {len(runs)} runs.</p>",
            image(name, f"Pareto plot of {task}"),
            runs_table(runs),
        ]
    )


def run_section(i: int, run: Run, out: Path) -> str:
    """Bit-width chart, sensitivity heat map and per-layer table of one run."""
    parts = [
        f'<h3 id="run-{i}">{html.escape(run.label)}</h3>',
        f"<p>run directory: <code>{html.escape(str(run.path))}</code>; candidates: "
        f"{html.escape(', '.join(map(str, run.metrics.get('candidates', []))))}</p>",
    ]
    if run.layers:
        name = f"run{i:02d}-bits.png"
        plots.bits_plot(run.layers, out / name, f"{run.label}\nbits per weight of each layer")
        parts.append(image(name, f"bit widths of {run.label}"))
    else:
        parts.append("<p>no layers.csv: no per-layer chart.</p>")
    if run.sensitivity is not None:
        name = f"run{i:02d}-sensitivity.png"
        plots.sensitivity_plot(run.sensitivity, {r.name: r.spec for r in run.layers}, out / name, run.label)
        parts.append(image(name, f"sensitivity of {run.label}"))
    if run.layers:
        parts.append(
            f"<details><summary>per-layer plan ({len(run.layers)} layers)</summary>\n"
            f"{layers_table(run)}\n</details>"
        )
    return "\n".join(parts)


def render(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Render a report of run directories into ``out/report.html`` with its PNG plots.

    Args:
        run_dirs: directories written by ``mixq.run(..., out=...)``; they may mix tasks.
        out: the folder to write ``report.html`` and the PNGs to (created if missing).

    Returns:
        The path of ``report.html``.

    Raises:
        ValueError: no run directory, or one that is missing or malformed (named).
        ImportError: matplotlib is not installed.
    """
    if not run_dirs:
        raise ValueError("give at least one run directory (written by `mixq run --out DIR`)")
    runs = [load_run(d) for d in run_dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    by_task: dict[str, list[Run]] = {}
    for run in runs:
        by_task.setdefault(str(run.metrics["task"]), []).append(run)
    body = [
        f"<h1>mixq report: {len(runs)} runs, {len(by_task)} tasks</h1>",
        '<p id="image-check" data-loaded="0" data-total="0">images not checked yet</p>',
    ]
    body += [task_section(task, task_runs, out) for task, task_runs in by_task.items()]
    body.append("<h2>Runs</h2>")
    body += [run_section(i, run, out) for i, run in enumerate(runs)]
    page = "\n".join(
        [
            "<!doctype html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            "<title>mixq report</title>",
            f"<style>{_STYLE}</style>",
            "</head>",
            "<body>",
            *body,
            f"<script>{_CHECK_SCRIPT}</script>",
            "</body>",
            "</html>",
            "",
        ]
    )
    path = out / REPORT
    path.write_text(page, encoding="utf-8")
    return path
