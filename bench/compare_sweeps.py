"""Compare the rows of two ``run_all`` sweeps, field by field, and record the differences.

A change of shape (a refactor) must leave every benchmark number as it was. Run the sweep of a
task at the commit before the change and at the commit after it (each into a results file of its
own: ``python -m bench.run_all --tasks TASK`` in a checkout of that commit, with the task's rows
removed from its ``bench/results/run_all.json`` so they are computed again), then::

    python -m bench.compare_sweeps BEFORE.json AFTER.json --task mnist-cnn --out NAME

writes ``bench/results/NAME.json``: both sweeps' rows of the task with the sessions (command,
commit, package versions) that made them, and every measured field that differs. With
``--committed REV`` the rows committed at git revision ``REV`` are compared too (a third column
of the record), to tell a change's differences from those already there before it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

from bench.common import ROOT, write
from mixq.cost import BUDGET_KEYS

# What a row measures (its timings excepted): equal fields mean an equal result.
FIELDS = (
    "metric",
    "fp_metric",
    *BUDGET_KEYS,  # avg_weight_bits, size_bytes, size_ratio, bops
    "plan",
    "layers",
    "within_budget",
    "candidates",
    "method_args",
    "val",
)


def rows_of(results: dict[str, Any], task: str) -> dict[str, dict[str, Any]]:
    """The rows of ``task`` in a ``run_all.json`` payload, by row key."""
    return {k: r for k, r in results.get("rows", {}).items() if r.get("task") == task}


def sessions_of(results: dict[str, Any], rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The sessions (provenance) that produced ``rows``."""
    ids = {r.get("session") for r in rows.values()}
    return [s for s in results.get("sessions", []) if s.get("id") in ids]


def differences(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every (row, field) whose value differs between ``a`` and ``b``, and rows only one side has."""
    out = []
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            side = {"before": "present" if key in a else None, "after": "present" if key in b else None}
            out.append({"row": key, "field": "row", **side})
            continue
        out += [
            {"row": key, "field": f, "before": a[key].get(f), "after": b[key].get(f)}
            for f in FIELDS
            if a[key].get(f) != b[key].get(f)
        ]
    return out


def committed(rev: str) -> dict[str, Any]:
    """The ``run_all.json`` committed at git revision ``rev``."""
    out = subprocess.run(
        ["git", "show", f"{rev}:bench/results/run_all.json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", type=Path, help="run_all.json of the sweep before the change")
    ap.add_argument("after", type=Path, help="run_all.json of the sweep after the change")
    ap.add_argument("--task", required=True, help="the task whose rows are compared")
    ap.add_argument(
        "--committed", default=None, help="also compare with the rows committed at this git revision"
    )
    ap.add_argument("--out", required=True, help="write bench/results/OUT.json")
    args = ap.parse_args(argv)
    before_all, after_all = (json.loads(p.read_text()) for p in (args.before, args.after))
    before, after = rows_of(before_all, args.task), rows_of(after_all, args.task)
    if not before or not after:
        raise SystemExit(f"no rows of task {args.task!r} in {args.before if not before else args.after}")
    payload: dict[str, Any] = {
        "task": args.task,
        "fields": list(FIELDS),
        "before": {"sessions": sessions_of(before_all, before), "rows": before},
        "after": {"sessions": sessions_of(after_all, after), "rows": after},
        "differences": differences(before, after),
    }
    if args.committed:
        old = rows_of(committed(args.committed), args.task)
        payload["committed"] = {"rev": args.committed, "rows": old}
        payload["committed_vs_before"] = differences(old, before)
        payload["committed_vs_after"] = differences(old, after)
    path = write(args.out, payload)
    n = len(payload["differences"])
    print(f"{len(before)} rows before, {len(after)} after, {n} fields differ; wrote {path}")
    for d in payload["differences"]:
        print(f"  {d['row']} {d['field']}: {d['before']!r} -> {d['after']!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
