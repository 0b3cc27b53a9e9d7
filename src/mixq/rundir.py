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
* ``recipe.json``: the settings of a run started from the command line;
* ``run.json`` (schema 2): the run's configuration and its key (:func:`config_key`), written
  first; ``store.sqlite`` and ``train/`` (finished sensitivity jobs, QAT checkpoints) are the
  resumable work of that configuration;
* ``manifest.json`` (schema 2): written last, the files of the run with their sha256.

A directory holds one run (:func:`writing`): a run takes the lock file ``.lock`` (its PID; a
second writer fails at once, the lock of a process that is gone is replaced), refuses a
directory of another configuration unless ``overwrite`` (which clears it, but for the
sensitivity store, reusable by design: its entries are keyed per job, and it is cleared too when
the directory's run was of another task or mixq version), resumes one of the same configuration
(keeping only ``run.json``, ``store.sqlite`` and ``train/``), and writes the manifest when every
file is written. Readers (:func:`listed`) use only the files the
manifest lists, after checking their checksums; a schema-2 directory without a manifest is an
interrupted (or running) run and is refused. Directories of schema 0 and 1 have no manifest
and read as before.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixq import cost
from mixq.metrics import Metrics
from mixq.plan import FLOAT, LayerSpec, Plan

log = logging.getLogger(__name__)

SCHEMA = 2  # the layout written; 1: no run.json, manifest or lock; 0: no schema recorded
PLAN = "plan.json"
METRICS = "metrics.json"
LAYERS = "layers.csv"
REPORT = "report.md"
MODEL = "model.safetensors"
SENSITIVITY = "sensitivity.safetensors"
RECIPE = "recipe.json"
CONFIG = "run.json"
MANIFEST = "manifest.json"
LOCK = ".lock"
STORE = "store.sqlite"
TRAIN = "train"
RESUMABLE = (CONFIG, STORE, f"{STORE}-wal", f"{STORE}-shm", f"{STORE}-journal", TRAIN)
"""What a resumed run keeps: its configuration and its finished work (jobs, QAT checkpoints)."""
_STORE_FILES = RESUMABLE[1:5]
STORE_KEYS = ("task", "model", "calib", "mixq")
"""What a run's configuration must share with the directory's run for ``overwrite`` to keep the
sensitivity store, which is reusable by design: its jobs are keyed per job (model, data, job)."""
_KNOWN = (PLAN, METRICS, LAYERS, REPORT, MODEL, SENSITIVITY, RECIPE, MANIFEST, *RESUMABLE)
OVERWRITE_HINT = "pass --overwrite (overwrite=True) to clear it and start over, or choose another --out"
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


# -- one run per directory -----------------------------------------------------------------------


class RunDirError(ValueError):
    """A run directory that cannot be written or read as asked (another run's, locked, damaged)."""


def config_key(config: dict[str, Any]) -> str:
    """The sha256 of a run's configuration (canonical JSON): the key of everything it writes.

    >>> config_key({"b": 1, "a": [2]}) == config_key({"a": [2], "b": 1})
    True
    """
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two configurations, one ``key: old there, new here`` per key.

    >>> differences({"seed": 0, "budget": {"bops": 3}}, {"seed": 0, "budget": {"bops": 6}})
    ["budget: {'bops': 3} there, {'bops': 6} here"]
    """
    keys = list(dict.fromkeys([*old, *new]))
    norm = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731 (tuples as lists, as stored)
    differ = [k for k in keys if norm(old.get(k)) != norm(new.get(k))]
    return [f"{k}: {old.get(k)!r} there, {new.get(k)!r} here" for k in differ]


def check_out(out: str | Path) -> Path:
    """``out`` as a Path, refusing a file or a path below a file (one line, naming it)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"out {str(out)!r} is a file, not a directory: choose a directory for the run")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise RunDirError(f"out {str(out)!r} lies below the file {str(parent)!r}: choose a directory")
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _lock_owner(lock: Path) -> int | None:
    try:
        text = lock.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def acquire(out: Path, fresh_s: float = 10.0) -> Path:
    """Take ``out/.lock`` for this process (its PID in the file), replacing a stale lock.

    A lock whose process is alive (this one included) raises at once; the lock of a process
    that is gone, or an unreadable one older than ``fresh_s`` seconds, is replaced with a warning.
    """
    lock = out / LOCK
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = _lock_owner(lock)
            with contextlib.suppress(FileNotFoundError):
                young = time.time() - lock.stat().st_mtime < fresh_s
                if (pid is not None and _alive(pid)) or (pid is None and young):
                    raise RunDirError(
                        f"{out} is being written by another mixq run (pid {pid}, lock file {lock}); "
                        "wait for it to finish or choose another --out"
                    ) from None
                log.warning("replacing the stale lock %s of process %s, which is gone", lock, pid)
                lock.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return lock
    raise RunDirError(f"could not take the lock {lock}: other processes keep replacing it")


def release(lock: Path) -> None:
    """Remove a lock this process holds (a lock another process took over is left alone)."""
    if _lock_owner(lock) == os.getpid():
        lock.unlink(missing_ok=True)


def _clear(out: Path, keep: Sequence[str] = ()) -> None:
    for p in out.iterdir():
        if p.name == LOCK or p.name in keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _store_reusable(out: Path, config: dict[str, Any]) -> bool:
    """Whether ``out``'s sensitivity store may serve ``config`` after an overwrite: its jobs are
    keyed by the fingerprints of the model and the data (not by the loss or mixq's version), so
    it is kept unless the directory's run was of another task or mixq version."""
    old = read_json(out / CONFIG) if (out / CONFIG).is_file() else None
    if not isinstance(old, dict) or not isinstance(old.get("config"), dict):
        return old is None  # a store put there without a recorded run (e.g. merged by a sweep)
    return all(old["config"].get(k) == config.get(k) for k in STORE_KEYS)


def _claim(out: Path, config: dict[str, Any], key: str, overwrite: bool) -> None:
    """Make ``out`` (locked by this process) ready for the run of ``config``, or refuse."""
    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    if entries == [CONFIG]:  # a run that stopped before it wrote anything (e.g. an infeasible budget)
        entries = []
    if entries and overwrite:
        if not any(e in _KNOWN for e in entries):
            raise RunDirError(
                f"--overwrite: {out} is not a mixq run directory (it holds {', '.join(entries[:5])}); "
                "it is not cleared: choose another --out"
            )
        keep = _STORE_FILES if _store_reusable(out, config) else ()
        log.warning("overwrite: clearing %s (%s)", out, ", ".join(e for e in entries if e not in keep))
        if any(e in keep for e in entries):
            log.warning(
                "keeping %s: its jobs are keyed by model and data, only matching ones are reused", STORE
            )
        _clear(out, keep=keep)
    elif entries and (out / CONFIG).is_file():
        old = read_json(out / CONFIG)
        if not isinstance(old, dict) or old.get("key") != key:
            diffs = differences(old.get("config", {}), config) if isinstance(old, dict) else []
            what = "; ".join(diffs) if diffs else "its run.json does not match"
            raise RunDirError(f"{out} holds another run ({what}): {OVERWRITE_HINT}")
        work = [e for e in entries if e in RESUMABLE and e != CONFIG]
        log.warning(
            "resuming the run in %s (same configuration; reusing %s); --overwrite starts over",
            out,
            ", ".join(work) or "no finished work",
        )
        _clear(out, keep=RESUMABLE)
    elif entries:
        old_run = any(e in _KNOWN for e in entries)
        what = "a run of an earlier mixq (no run.json)" if old_run else "other files"
        raise RunDirError(f"{out} is not empty: it holds {what} ({', '.join(entries[:5])}); {OVERWRITE_HINT}")
    _write_json(out / CONFIG, {"schema": SCHEMA, "key": key, "config": config})


@contextlib.contextmanager
def writing(out: str | Path, config: dict[str, Any], overwrite: bool = False) -> Iterator[str]:
    """Hold ``out`` for one run of ``config``: check it, lock it, claim it; yield the run's key.

    The run writes its files inside the block and ends with :func:`write_manifest`; the lock is
    released when the block ends, whatever happened.
    """
    out = check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = acquire(out)
    try:
        key = config_key(config)
        _claim(out, config, key, overwrite)
        yield key
    finally:
        release(lock)


def _write_json(file: Path, data: Any) -> None:
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(file)


def checksum(file: Path) -> str:
    """The sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with file.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(out: Path, key: str, names: Sequence[str]) -> None:
    """Write ``manifest.json`` (last): the run's key and the checksum of each of its files."""
    files = {n: checksum(out / n) for n in sorted(set(names)) if (out / n).is_file()}
    _write_json(out / MANIFEST, {"schema": SCHEMA, "key": key, "files": files})


def manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of a run directory; None for a directory of schema 0 or 1 (it has none).

    Raises:
        RunDirError: a schema-2 directory without a manifest (an interrupted or running run),
            or a malformed or newer one.
    """
    file = path / MANIFEST
    if file.is_file():
        data = read_json(file)
        if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
            raise RunDirError(f"{file} is malformed: it must hold an object with 'files'")
        schema_of(data, file)
        return data
    incomplete = (path / CONFIG).is_file()
    if not incomplete and (path / METRICS).is_file():
        data = read_json(path / METRICS)
        incomplete = isinstance(data, dict) and schema_of(data, path / METRICS) >= 2
    if incomplete:
        raise RunDirError(
            f"{path} holds an incomplete run (no {MANIFEST}): it was interrupted or is still "
            "running; run it again to resume, or with --overwrite to start over"
        )
    return None


def listed(path: str | Path, name: str) -> Path | None:
    """The file ``name`` of a run directory if the run wrote it, checked against its checksum.

    Returns None when the manifest does not list it (or, in a directory of schema 0 or 1,
    when it does not exist).

    Raises:
        RunDirError: the file was changed, replaced or removed after the run (it names it).
    """
    path = Path(path)
    m = manifest(path)
    file = path / name
    if m is None:
        return file if file.is_file() else None
    if name not in m["files"]:
        return None
    if not file.is_file():
        raise RunDirError(f"{file} is listed in the run's {MANIFEST} but missing")
    found, recorded = checksum(file), m["files"][name]
    if found != recorded:
        raise RunDirError(
            f"{file} differs from the run's {MANIFEST} (sha256 {found[:12]}…, recorded "
            f"{str(recorded)[:12]}…): it was changed or replaced after the run"
        )
    return file


def add_file(out: str | Path, name: str, write: Callable[[Path], Any]) -> Any:
    """Write one more file into a finished run directory (under its lock) and list it.

    ``write(path)`` writes the file; a directory of schema 0 or 1 just gets it.
    """
    out = Path(out)
    lock = acquire(out)
    try:
        m = manifest(out)
        result = write(out / name)
        if m is not None:
            write_manifest(out, m.get("key", ""), [*m["files"], name])
        return result
    finally:
        release(lock)


# -- write ---------------------------------------------------------------------------------------


def write_run(out: Path, result: Any, infos: Sequence[cost.LayerInfo], key: str | None = None) -> None:
    """Write plan.json, metrics.json, layers.csv, report.md, model.safetensors (and
    sensitivity.safetensors, when the method measured one) of a Result; with the run's ``key``
    (inside :func:`writing`), then the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in (SENSITIVITY, MANIFEST):
        (out / stale).unlink(missing_ok=True)
    result.plan.save(out / PLAN)
    write_metrics(out, result.metrics)
    rows = layer_rows(infos, result.plan)
    lines = [",".join(LAYER_COLUMNS)] + [",".join(text(r) for _, text, _ in _COLUMNS) for r in rows]
    (out / LAYERS).write_text("\n".join(lines) + "\n")
    (out / REPORT).write_text(render_report(result.metrics, rows))
    write_model(out, result)
    if result.sensitivity is not None:
        result.sensitivity.save(out / SENSITIVITY)
    if key is not None:
        write_manifest(out, key, [CONFIG, PLAN, METRICS, LAYERS, REPORT, MODEL, SENSITIVITY])


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
    *cost.BUDGET_KEYS,  # avg_weight_bits, size_bytes, size_ratio, bops
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
    file = listed(path, METRICS)
    if file is None:
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


def read_layers(file: Path | None) -> tuple[LayerRow, ...]:
    """Read ``layers.csv``; a missing file gives no rows, a malformed one raises a ValueError."""
    if file is None or not file.is_file():
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
    """Load ``plan.json`` of a run directory (one the run wrote: see :func:`listed`)."""
    file = listed(path, PLAN)
    if file is None:
        raise FileNotFoundError(f"{path} is not a run directory: no {PLAN}")
    return Plan.load(file)
