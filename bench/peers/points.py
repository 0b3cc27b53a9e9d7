"""mixq's own results in the other bench/results JSONs, and its best one at a peer's size."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from bench.common import RESULTS

log = logging.getLogger("peers")

# Result files of post-training methods (no training), scanned for rows at a matching size.
MIXQ_FILES = ("search", "run_all", "clado", "multipoint", "uniform", "ptq")
# Exhaustive enumerations pick the best plan by its validation metric (an oracle, not a method).
SKIP_KEYS = ("exhaustive", "exhaustive_check")
# Methods that train the weights (quantization-aware training): not compared with post-training tools;
# mixq's own are those whose registry record says so (Method.trains), "qat" is bench/fliqs.py's label.
TRAINED_LABELS = ("qat",)


def trained_methods() -> tuple[str, ...]:
    """The labels of result rows that trained the weights."""
    from mixq.methods import METHODS

    return (*(m for m, r in METHODS.items() if r.trains), *TRAINED_LABELS)


def _has_act(cands: list[str]) -> bool | None:
    from mixq.plan import parse_candidate

    try:
        return any(parse_candidate(c).act is not None for c in cands) if cands else None
    except ValueError:
        return None


def _context(x: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    """``ctx`` with what the dict ``x`` says of the rows below it: validation items, candidates."""
    ctx = dict(ctx)
    for k in ("val_images", "val_items", "val"):  # "val": run_all's rows
        if isinstance(x.get(k), int):
            ctx["val"] = x[k]
    if isinstance(x.get("info"), dict) and isinstance(x["info"].get("val_images"), int):
        ctx.setdefault("val", x["info"]["val_images"])
    if isinstance(x.get("candidates"), list):
        ctx["cands"] = [c for c in x["candidates"] if isinstance(c, str)]
    return ctx


def _is_row(x: dict[str, Any]) -> bool:
    """Whether a dict is one result (a metric, average weight bits and a size)."""
    return "avg_weight_bits" in x and "size_bytes" in x and isinstance(x.get("metric"), (int, float))


def _point(x: dict[str, Any], ctx: dict[str, Any], path: list[str], src: str) -> dict[str, Any] | None:
    """The point of the result row ``x`` (None for a method that trains)."""
    cands = x.get("candidates") if isinstance(x.get("candidates"), list) else ctx.get("cands", [])
    if isinstance(x.get("candidate"), str):
        cands = [x["candidate"]]
    task = x.get("task") or ctx.get("task")
    label = x.get("method") or x.get("label") or x.get("setting") or x.get("run") or "/".join(path[-2:])
    if str(label) in trained_methods():
        return None
    return {
        "source": f"{src}.json",
        "task": task,
        "method": str(label),
        "metric": float(x["metric"]),
        "avg_weight_bits": float(x["avg_weight_bits"]),
        "size_bytes": float(x["size_bytes"]),
        "val": ctx.get("val"),
        "act": _has_act(cands),
        "candidates": cands,
        "where": "/".join(path),
    }


def _walk(x: Any, ctx: dict[str, Any], path: list[str], src: str, points: list[dict[str, Any]]) -> None:
    """Append the points of every result row in the JSON value ``x`` (at ``path`` in ``src``)."""
    if isinstance(x, dict):
        ctx = _context(x, ctx)
        if _is_row(x):
            point = _point(x, ctx, path, src)
            if point is not None:
                points.append(point)
            return
        for k, v in x.items():
            if k in SKIP_KEYS:
                continue
            sub = dict(ctx)
            if path and path[-1] == "tasks":
                sub["task"] = k
            _walk(v, sub, [*path, str(k)], src, points)
    elif isinstance(x, list):
        for i, v in enumerate(x):
            _walk(v, ctx, [*path, str(i)], src, points)


def mixq_points() -> list[dict[str, Any]]:
    """Every mixq result row (task, method, metric, size, bits, validation items, activations)."""
    points: list[dict[str, Any]] = []
    for name in MIXQ_FILES:
        f = RESULTS / f"{name}.json"
        if f.exists():
            try:
                _walk(json.loads(f.read_text()), {}, [], name, points)
            except json.JSONDecodeError:
                log.warning("skipping unreadable %s", f)
    return points


def default_val(task: str) -> int | None:
    return {
        "mnist-cnn": 10_000,
        "fashion-resnet20": 10_000,
        "fashion-mobilenetv2": 10_000,
        "minilm": 1024,
    }.get(task)


def best_mixq(points: list[dict[str, Any]], row: dict[str, Any]) -> dict[str, Any] | None:
    """mixq's best row at or below the peer's mixq-counted size: same task, validation set, activations."""
    size = row["mixq_same"]["size_bytes"]
    act = any(v.startswith("a") or "-a" in v or re.search(r"\da\d", v) for v in row["plan_same"].values())
    val = row.get("val_items") or default_val(row["task"])
    ok = [
        p
        for p in points
        if p["task"] == row["task"]
        and (p["val"] or default_val(p["task"])) == val
        and p["act"] == act
        and p["size_bytes"] <= size * (1 + 1e-6)
    ]
    return max(ok, key=lambda p: (p["metric"], -p["size_bytes"])) if ok else None
