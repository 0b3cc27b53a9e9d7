"""Reports of run directories: an HTML page with the Pareto plot, bit widths, sensitivity, tables.

``render(run_dirs, out)`` writes ``out/report.html`` and its PNG plots; ``mixq report RUN_DIR
[RUN_DIR ...] --out DIR`` does the same from the command line. Needs matplotlib (the
``report`` extra), imported only when a plot is drawn.
"""

from mixq.report.html import REPORT, render
from mixq.report.plots import bits_plot, pareto_plot, sensitivity_plot
from mixq.report.runs import LayerRow, Run, budget_label, load_run, pareto_front

__all__ = [
    "REPORT",
    "LayerRow",
    "Run",
    "bits_plot",
    "budget_label",
    "load_run",
    "pareto_front",
    "pareto_plot",
    "render",
    "sensitivity_plot",
]
