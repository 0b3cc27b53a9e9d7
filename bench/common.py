"""Shared bits of the benchmark scripts: provenance of every result file."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mixq.metrics import WITHIN, Metrics

ROOT = Path(__file__).resolve().parent.parent  # the repository
RESULTS = ROOT / "bench" / "results"
PACKAGES = ("torch", "numpy", "scipy", "transformers", "onnx", "onnxruntime")


def command() -> str:
    """The command line of this run: ``python -m bench.X ...`` for a module run as a script."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = spec.name.removesuffix(".__main__") if spec is not None and spec.name else None
    args = ["-m", name, *sys.argv[1:]] if name else sys.argv
    return " ".join([Path(sys.executable).name, *args])


def provenance() -> dict[str, Any]:
    """Return the command, git commit, package versions and machine of this run."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True, text=True
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", True
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            versions[p] = None
    return {
        "command": command(),
        "git_commit": commit,
        "src_dirty": dirty,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "versions": versions,
    }


def write(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` with provenance to bench/results/NAME.json and return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"provenance": provenance(), **payload}, indent=2) + "\n")
    return path


def write_rows(name: str, doc: dict[str, Any]) -> Path:
    """Write ``doc`` to bench/results/NAME.json whole or not at all (a temporary file renamed):
    the row-by-row benchmarks rewrite their file after each row, and another process may read it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return path


def save_row(name: str, key: str, rec: dict[str, Any]) -> Path:
    """Add one finished row to bench/results/NAME.json (read again first: another process may have
    added rows) with fresh provenance, written whole (:func:`write_rows`)."""
    path = RESULTS / f"{name}.json"
    doc = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    doc["rows"][key] = rec
    doc["provenance"] = provenance()
    return write_rows(name, doc)


MEASURES = ("metric", "avg_weight_bits", "size_bytes", "bops", "seconds", "eval_seconds")


def measures(metrics: Metrics) -> dict[str, Any]:
    """A run's measures as a results row lists them (:data:`MEASURES`, in that order)."""
    return {k: getattr(metrics, k) for k in MEASURES}


def task_entry(task: Any, fp32: float, rows: list[dict], t0: float, **fields: Any) -> dict[str, Any]:
    """A task's entry in a results JSON: its metric, fp32 value and info, ``fields``, the rows and
    the wall seconds since ``t0`` (``time.perf_counter()``), in that order."""
    return {
        "metric_name": task.metric_name,
        "fp32": fp32,
        "info": task.info,
        **fields,
        "rows": rows,
        "wall_seconds": time.perf_counter() - t0,
    }


def merge_parts(
    parts: list[str], row_key: Callable[[dict[str, Any]], Any], add: tuple[str, ...] = ()
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Combine the ``tasks`` of part files (bench/results/PART.json, one run each, e.g. in parallel).

    A task's first part gives its entry; a later part of the same task adds the rows whose
    ``row_key`` the entry lacks, and its values of the ``add`` fields. Returns (tasks, the parts'
    provenances).
    """
    tasks: dict[str, Any] = {}
    provenances = []
    for part in parts:
        doc = json.loads((RESULTS / f"{part}.json").read_text())
        for name, entry in doc["tasks"].items():
            if name not in tasks:
                tasks[name] = entry
                continue
            seen = {row_key(r) for r in tasks[name]["rows"]}
            tasks[name]["rows"] += [r for r in entry["rows"] if row_key(r) not in seen]
            for k in add:
                tasks[name][k] += entry[k]
        provenances.append(doc["provenance"])
    return tasks, provenances


def within(metrics: Metrics) -> dict[str, bool]:
    """A run's budget flags as metrics.json writes them (``within_<key>``), for a result row."""
    return {f"{WITHIN}{k}": v for k, v in (metrics.within or {}).items()}


def part_args(ap: argparse.ArgumentParser, name: str) -> None:
    """Add ``--out`` (this command's result file) and ``--merge`` (part files into NAME.json)."""
    ap.add_argument("--out", default=name, help="result name under bench/results/")
    ap.add_argument("--merge", default="", help=f"comma-separated part names to merge into {name}.json")


def run_parts(
    args: argparse.Namespace,
    merge: Callable[[list[str]], Path],
    run_task: Callable[[str, argparse.Namespace, dict[str, Any]], None],
) -> dict[str, Any] | None:
    """Merge the ``--merge`` part files, or run ``run_task`` on each of ``--tasks`` on one thread.

    Returns the tasks' results (``run_task`` adds its task's), or None after a merge.
    """
    if args.merge:
        print(f"wrote {merge(args.merge.split(','))}")
        return None
    import torch

    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    for task_name in args.tasks.split(","):
        run_task(task_name, args, results)
    return results


def _marks(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def section(text: str, name: str) -> str:
    """The block ``name`` of a Markdown text (between its start and end markers, markers included)."""
    start, end = _marks(name)
    i, j = text.find(start), text.find(end)
    return text[i : j + len(end)] if i >= 0 and j > i else ""


def set_section(path: Path, name: str, body: str) -> Path:
    """Put ``body`` in the block ``name`` of the Markdown file ``path`` (replaced, or appended).

    Two scripts write bench/results/summary.md: run_all.py the whole file, compare_peers.py its
    ``peers`` block; each keeps the other's part.
    """
    start, end = _marks(name)
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else ""
    old = section(text, name)
    text = text.replace(old, block) if old else text.rstrip("\n") + ("\n\n" if text else "") + block
    path.write_text(text + ("" if text.endswith("\n") else "\n"))
    return path


def paired_stderr(wrong_a: list[int], wrong_b: list[int], n: int) -> tuple[float, float]:
    """Top-1 of A minus top-1 of B in %, and one standard error of that difference, from the
    indices of the images each gets wrong among the same ``n`` test images: with the per-image
    differences ``d_i = correct_A(i) − correct_B(i)``, ``100 · mean(d)`` and ``100 · sd(d) / sqrt(n)``
    (sd with ``n − 1``). Images both get right or both get wrong add no variance, so the paired
    error is smaller than the unpaired ``hypot`` of the two binomial errors when A and B agree.

    >>> [round(v, 2) for v in paired_stderr([0, 1], [1, 2, 3], 10)]  # A gains images 2, 3; loses 0
    [10.0, 17.95]
    """
    a, b = set(wrong_a), set(wrong_b)
    gain, loss = len(b - a), len(a - b)  # images only B gets wrong / only A gets wrong
    mean = (gain - loss) / n
    var = (gain * (1 - mean) ** 2 + loss * (1 + mean) ** 2 + (n - gain - loss) * mean**2) / (n - 1)
    return 100.0 * mean, 100.0 * (var / n) ** 0.5
