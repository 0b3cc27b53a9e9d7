"""The run directory: what ``mixq.run(..., out=DIR)`` writes, and how it is read back.

One module owns the layout, so the writer (``mixq.run``), the report (``mixq.report``) and
the export (``mixq.export.rebuild``) agree on it:

* ``plan.json``: the plan (:meth:`mixq.Plan.save`);
* ``metrics.json``: the :class:`~mixq.metrics.Metrics` of the run, plus ``"schema"``: the
  version of this layout (:data:`SCHEMA`); a directory written before it had one reads as 0;
* ``layers.csv``: one row per quantizable layer, columns :data:`LAYER_COLUMNS`;
* ``report.md``: a readable summary;
* ``model.safetensors``: the quantized model as a packed export (absent when the plan has no
  packed form);
* ``sensitivity.safetensors``: the method's sensitivity table, when it measured one;
* ``recipe.json``: the settings of a run started from the command line.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixq import cost
from mixq.metrics import Metrics
from mixq.plan import FLOAT, LayerSpec, Plan

log = logging.getLogger(__name__)

SCHEMA = 1  # the version of the layout written; 0: a directory written before it was recorded
PLAN = "plan.json"
METRICS = "metrics.json"
LAYERS = "layers.csv"
REPORT = "report.md"
MODEL = "model.safetensors"
SENSITIVITY = "sensitivity.safetensors"
RECIPE = "recipe.json"
REQUIRED_METRICS = ("task", "method", "metric", "avg_weight_bits", "size_bytes")


@dataclass(frozen=True)
class LayerRow:
    """One row of ``layers.csv``: a layer, its chosen candidate and its storage bits."""

    name: str
    kind: str
    weight_shape: str
    params: int
    spec: str
    weight_bits: float
    macs: float = 0.0

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per weight, scales and zero points included."""
        return self.weight_bits / self.params if self.params else math.nan


# layers.csv, one definition: (column, its text in the file, how it is read back)
_COLUMNS: tuple[tuple[str, Callable[[LayerRow], str], Callable[[str], Any]], ...] = (
    ("layer", lambda r: r.name, str),
    ("kind", lambda r: r.kind, str),
    ("weight_shape", lambda r: r.weight_shape, str),
    ("params", lambda r: str(r.params), int),
    ("macs", lambda r: f"{r.macs:.0f}", float),
    ("spec", lambda r: r.spec, str),
    ("weight_bits", lambda r: f"{r.weight_bits:.0f}", float),
)
LAYER_COLUMNS = tuple(name for name, _, _ in _COLUMNS)
_FIELD = {"layer": "name"}  # the LayerRow field of a column, where the names differ


def layer_rows(infos: Sequence[cost.LayerInfo], plan: Plan) -> list[LayerRow]:
    """The rows of ``layers.csv`` of a plan: every quantizable layer, float ones included."""
    rows = []
    for info in infos:
        spec: LayerSpec = plan.layers.get(info.name, FLOAT)
        rows.append(
            LayerRow(
                info.name,
                info.kind,
                "x".join(map(str, info.weight_shape)),
                info.numel,
                spec.name,
                cost.weight_bits(info, spec.weight),
                info.macs,
            )
        )
    return rows


# -- write ---------------------------------------------------------------------------------------


def write_run(out: Path, result: Any, infos: Sequence[cost.LayerInfo]) -> None:
    """Write plan.json, metrics.json, layers.csv, report.md, model.safetensors (and
    sensitivity.safetensors, when the method measured one) of a Result."""
    out.mkdir(parents=True, exist_ok=True)
    result.plan.save(out / PLAN)
    write_metrics(out, result.metrics)
    rows = layer_rows(infos, result.plan)
    lines = [",".join(LAYER_COLUMNS)] + [",".join(text(r) for _, text, _ in _COLUMNS) for r in rows]
    (out / LAYERS).write_text("\n".join(lines) + "\n")
    (out / REPORT).write_text(render_report(result.metrics, rows))
    write_model(out, result)
    if result.sensitivity is not None:
        result.sensitivity.save(out / SENSITIVITY)


def write_metrics(out: Path, metrics: Metrics) -> None:
    """Write ``metrics.json``: the schema version, then the metrics."""
    data = {"schema": SCHEMA, **metrics.to_dict()}
    (out / METRICS).write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_model(out: Path, result: Any) -> Path | None:
    """Write the quantized model to ``out/model.safetensors`` (a packed export), or say why not.

    It makes the run directory self-sufficient: ``mixq export`` and ``mixq eval`` load it, so
    weights changed by PTQ steps or QAT come back exactly. A plan with no packed form (the
    export raises ValueError) leaves no file, and a warning.
    """
    from mixq.export.packed import save_safetensors

    path = out / MODEL
    path.unlink(missing_ok=True)  # never leave another run's model behind
    try:
        return save_safetensors(result.model, result.plan, path)
    except ValueError as e:
        log.warning("run directory %s holds no %s: %s", out, MODEL, e)
        return None


REPORT_KEYS = (
    "task",
    "method",
    "candidates",
    "budget",
    "metric_name",
    "metric",
    "fp_metric",
    "avg_weight_bits",
    "size_bytes",
    "size_ratio",
    "bops",
    "seconds",
    "eval_seconds",
)


def render_report(metrics: Metrics, rows: Sequence[LayerRow]) -> str:
    """Render a readable Markdown report of one run."""

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else str(v)

    m = metrics.to_dict()
    out = [f"# mixq run: {metrics.task} / {metrics.method}", "", "| key | value |", "|---|---|"]
    out += [f"| {k} | {fmt(m[k])} |" for k in REPORT_KEYS if k in m]
    out += ["", "## Per-layer plan", "", "| layer | kind | weight shape | spec | bits/weight |"]
    out += ["|---|---|---|---|---|"]
    out += [
        f"| `{r.name}` | {r.kind} | {r.weight_shape} | {r.spec} | {r.bits_per_weight:.3f} |" for r in rows
    ]
    if metrics.float_layers:  # weights no site quantizes (mixq.wrap.float_layers)
        out += ["", "## Float weights", "", "| parameter | why float |", "|---|---|"]
        out += [f"| `{n}` | {why} |" for n, why in metrics.float_layers.items()]
    return "\n".join([*out, ""])


# -- read ----------------------------------------------------------------------------------------


def _run_dirs_below(path: Path, limit: int = 5) -> list[str]:
    found = sorted(str(p.parent) for p in path.glob(f"*/{METRICS}"))
    found += sorted(str(p.parent) for p in path.glob(f"*/*/{METRICS}"))
    return found[:limit]


def read_json(file: Path) -> Any:
    """Read a JSON file of a run directory, raising a ValueError that names a malformed one."""
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None


def schema_of(data: dict[str, Any], file: Path) -> int:
    """The layout version a ``metrics.json`` object records (0 before it was recorded)."""
    version = data.get("schema", 0)
    if not isinstance(version, int) or version < 0:
        raise ValueError(f"{file}: schema must be a non-negative integer, got {version!r}")
    if version > SCHEMA:
        raise ValueError(f"{file} has schema {version}, newer than this mixq reads ({SCHEMA}): upgrade mixq")
    return version


def read_metrics(path: Path, required: Sequence[str] = REQUIRED_METRICS) -> dict[str, Any]:
    """Read and check ``metrics.json`` of a run directory (without its ``schema``), as a dict.

    Raises:
        ValueError: the directory is missing, has no metrics.json, or it is malformed or lacks
            one of ``required``.
    """
    if not path.is_dir():
        raise ValueError(f"run directory {str(path)!r} does not exist or is not a directory")
    file = path / METRICS
    if not file.is_file():
        below = _run_dirs_below(path)
        hint = f"; run directories below it: {', '.join(below)}" if below else ""
        raise ValueError(
            f"{str(path)!r} is not a run directory: it has no metrics.json (a run directory is "
            f"what `mixq run --out DIR` writes: metrics.json, plan.json, layers.csv){hint}"
        )
    metrics = read_json(file)
    if not isinstance(metrics, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(metrics).__name__}")
    schema_of(metrics, file)
    metrics.pop("schema", None)
    missing = [k for k in required if k not in metrics]
    if missing:
        raise ValueError(f"{file} lacks {missing}; a run's metrics.json has {', '.join(required)}")
    return metrics


def load_metrics(path: str | Path) -> Metrics:
    """Read ``metrics.json`` of a run directory as :class:`~mixq.metrics.Metrics`."""
    return Metrics.from_dict(read_metrics(Path(path)))


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
                LayerRow(**{_FIELD.get(name, name): parse(r[name]) for name, _, parse in _COLUMNS})
                for r in reader
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"{file} has a malformed row: {e}") from None


def read_plan(path: Path) -> Plan:
    """Load ``plan.json`` of a run directory."""
    return Plan.load(path / PLAN)
