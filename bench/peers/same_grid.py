"""Same grid, search against search, on every test image: ``python -m bench.compare_peers --same-grid``.

For each peer row (zoo models: mnist-cnn, fashion-resnet20, fashion-mobilenetv2), in mixq's process:

* **same grid**: the peer's plan converted to mixq's candidates (``plan_same``) on mixq's quantizers;
* **mixq search**: ``SEARCH`` with the peer's own candidate set under the peer's mixq-counted size:
  sensitivity-ilp's measured KL scores, the exact ILP, the capped starts (the ILP again with at
  most k layers at the cheapest candidate, every k, each distinct plan measured on the
  calibration batches) and ``refine`` measured neighbour plans. Every choice is made on the 512
  calibration images (KL to the float outputs); the test images only measure the result.

Both plans are evaluated on all validation images (10,000 test images) with their per-image
correctness, so the difference comes with a paired standard error. The tool's own metric stays as
recorded (``tool_metric``, on the row's ``val_items``). Results go to ``row[FIELD]`` in peers.json,
one row at a time (resumable: a row that has them with this very search is skipped unless
``redo``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import ROOT

log = logging.getLogger("peers")

FIELD = "same_grid_full"
ZOO = ("mnist-cnn", "fashion-resnet20", "fashion-mobilenetv2")
SEARCH: tuple[str, dict[str, Any]] = ("sensitivity-ilp", {"caps": True, "refine": 32})
SEARCH_VAL = 8  # validation images of the search's own run (its plan is evaluated on all after)


class Top1Recorder:
    """Top-1 (%) as ``mixq.tasks.top1``, keeping each call's per-image correctness (``calls``)."""

    outputs = "logits"

    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []

    def __call__(self, model: torch.nn.Module, batches: Any) -> float:
        from mixq.tasks import default_forward, labels_of, logits_of

        hits = []
        with torch.inference_mode():
            for b in batches:
                hits.append(logits_of(default_forward(model, b)).argmax(-1) == labels_of(b))
        correct = torch.cat(hits)
        self.calls.append(correct)
        return 100.0 * float(correct.sum()) / max(1, correct.numel())


def full_task(name: str) -> Any:
    """The task on all its validation images, its metric recording per-image correctness."""
    from mixq import tasks

    torch.manual_seed(0)
    task = tasks.get(name)
    task.metric = Top1Recorder()
    task.fp_metric()  # computed once here: each evaluation below makes exactly one metric call
    return task


def evaluate_paired(task: Any, plan: Any, cache: Any) -> tuple[dict[str, Any], torch.Tensor]:
    """``mixq.evaluate`` of ``plan``: its numbers and per-image correctness."""
    import mixq

    t0 = time.perf_counter()
    before = len(task.metric.calls)
    m = mixq.evaluate(task, plan, cache).metrics
    (correct,) = task.metric.calls[before:]
    assert abs(100.0 * float(correct.sum()) / correct.numel() - m.metric) < 1e-9
    out = {
        "metric": m.metric,
        "avg_weight_bits": m.avg_weight_bits,
        "size_bytes": m.size_bytes,
        "seconds": time.perf_counter() - t0,
    }
    return out, correct


def paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean of ``b − a`` in points (%) and its standard error over the images (paired)."""
    d = b.double() - a.double()
    return 100.0 * float(d.mean()), 100.0 * float(d.std(unbiased=True)) / math.sqrt(d.numel())


def search(
    task: Any, cands: list[str], size_bytes: float, cache: Any, args: dict[str, Any] | None = None
) -> tuple[Any, Path]:
    """``SEARCH`` (its method with ``args``, default its own) with ``cands`` under ``size_bytes`` on
    ``task``'s calibration images (its run's own validation: the first ``SEARCH_VAL`` images; the
    plan is evaluated on all of them after)."""
    import mixq

    method, args = SEARCH[0], SEARCH[1] if args is None else args
    x, y = task.val[0]
    small = dataclasses.replace(task, val=[(x[:SEARCH_VAL], y[:SEARCH_VAL])])
    out = ROOT / "runs" / "peers" / task.name / "same-grid-search"  # one store for every candidate set
    budget = {"size_bytes": size_bytes * (1 + 1e-9)}
    res = mixq.run(
        small, method=method, candidates=cands, budget=budget, method_args=args, out=out, cache=cache,
        overwrite=True,
    )  # fmt: skip
    return res, out


def same_plan(row: dict[str, Any]) -> Any:
    """The peer's plan on mixq's candidates (``plan_same``; float layers left out)."""
    from mixq.plan import Plan, parse_candidate

    specs = {n: parse_candidate(c) for n, c in row["plan_same"].items()}
    return Plan({n: s for n, s in specs.items() if s.weight is not None or s.act is not None})


def alt_key(args: dict[str, Any]) -> str:
    """The key in ``row[ALT]`` of a search with other ``args`` than ``SEARCH``'s."""
    return json.dumps(args, sort_keys=True)


ALT = "same_grid_alt"  # row[ALT][alt_key(args)]: the same cell with another search's settings


def run(
    rows: dict[str, dict[str, Any]],
    keys: list[str],
    redo: bool,
    save: Any,
    args: dict[str, Any] | None = None,
) -> None:
    """Remeasure ``keys`` in order, saving each row as it finishes (``save({key: row})``).

    ``args``: the search's settings instead of ``SEARCH``'s; such results go to ``row[ALT]``, beside
    the default search's ``row[FIELD]``.
    """
    import mixq

    args = SEARCH[1] if args is None else args
    task, cache = None, None
    for key in keys:
        r = rows[key]
        alt = args != SEARCH[1]
        done = r.get(ALT, {}).get(alt_key(args)) if alt else r.get(FIELD)
        if done and done["search"]["method_args"] == args and not redo:
            log.info("%s: same grid done already", key)
            continue
        if task is None or task.name != r["task"]:
            task, cache = None, None  # one task in memory at a time
            task, cache = full_task(r["task"]), mixq.Cache()
        t0 = time.perf_counter()
        d = remeasure(r, task, cache, args)
        d["wall_seconds"] = time.perf_counter() - t0
        if alt:
            r.setdefault(ALT, {})[alt_key(args)] = d
        else:
            r[FIELD] = d
        log.info(
            "%s: same grid %.2f, search %.2f (%+.2f ± %.2f), %.0f s",
            key, d["same"]["metric"], d["search"]["metric"], d["diff"], d["paired_se"], d["wall_seconds"],
        )  # fmt: skip
        save({key: r})


def remeasure(
    row: dict[str, Any], task: Any, cache: Any, args: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The row's same-grid plan and mixq's search (``args``: its settings, default ``SEARCH``'s), both
    on all of ``task``'s validation images."""
    method, args = SEARCH[0], SEARCH[1] if args is None else args
    same, c_same = evaluate_paired(task, same_plan(row), cache)
    cands = sorted(set(row["plan_same"].values()))
    t0 = time.perf_counter()
    res, out = search(task, cands, row["mixq_same"]["size_bytes"], cache, args)
    wall = time.perf_counter() - t0
    found, c_found = evaluate_paired(task, res.plan, cache)
    diff, se = paired(c_same, c_found)
    hist = res.history[0] if res.history else {}
    capped, refined = hist.get("capped") or {}, hist.get("refined") or {}
    chosen_caps = next(
        (m["caps"] for m in capped.get("measured", []) if m["choices"] == capped.get("chosen")), []
    )
    n = int(c_same.numel())
    return {
        "val_items": n,
        "same": {**same, "se": _se(same["metric"], n)},
        "search": {
            **found,
            "se": _se(found["metric"], n),
            "method": method,
            "method_args": args,
            "candidates": cands,
            "search_seconds": res.metrics.seconds,
            "run_seconds": wall,
            "plan": {k: s.name for k, s in res.plan.layers.items()},
            "summary": res.plan.summary(),
            "capped_plans": len(capped.get("measured", [])),
            "chosen_caps": chosen_caps,
            "solver_loss": (capped.get("measured") or [{}])[0].get("loss"),
            "capped_loss": min((m["loss"] for m in capped.get("measured", [])), default=None),
            "refined_loss": refined.get("chosen_loss"),
            "refine_measured": len(refined.get("measured", [])),
            "selected": {k: v for k, v in (hist.get("selected") or {}).items() if k != "measured"},
            "run_dir": str(out.relative_to(ROOT)),
        },
        "diff": diff,
        "paired_se": se,
    }


def _se(metric: float, n: int) -> float:
    p = metric / 100.0
    return 100.0 * math.sqrt(p * (1 - p) / n)


def _caps(m: dict[str, Any]) -> str:
    """The cap that gave the chosen start: "solver" (its own plan), else "L<g> ≤ k" (the least k)."""
    if m.get("capped_loss") is None or m["capped_loss"] >= m["solver_loss"]:
        return "solver"
    g, k = min(m["chosen_caps"], key=lambda c: (c[1], c[0]))
    return f"L{g} ≤ {k}"


def verdict(r: dict[str, Any]) -> str:
    """search ≥ same grid, within noise (less than 2 paired standard errors below), or loses."""
    d = r[FIELD]
    if d["diff"] >= 0:
        return "search ≥ peer's plan"
    if -d["diff"] <= 2 * d["paired_se"]:
        return f"within noise ({-d['diff'] / d['paired_se']:.1f} SE below)"
    return f"search loses ({-d['diff'] / d['paired_se']:.1f} SE)"


def order(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Row keys of the zoo models: the cells the former search lost first, cheaper tasks first."""

    def lost(r: dict[str, Any]) -> bool:
        srch = (r.get("mixq_search") or {}).get("metric")
        return srch is not None and r["mixq_same"]["metric"] - srch > 0.05

    keys = [k for k, r in rows.items() if r.get("ok") and r["task"] in ZOO]
    return sorted(keys, key=lambda k: (not lost(rows[k]), ZOO.index(rows[k]["task"]), k))


def render(rows: list[dict[str, Any]]) -> list[str]:
    """The same-grid table of one task's rows (Markdown lines; empty when none has the field)."""
    done = [r for r in rows if FIELD in r]
    if not done:
        return []
    n = done[0][FIELD]["val_items"]
    out = [
        f"Same grid, search against search, on all {n} test images (`--same-grid`): the peer's plan on "
        "mixq's quantizers against mixq's search with the peer's candidates at the peer's "
        f"mixq-counted size (`{SEARCH[0]}` with {', '.join(f'{k}={v}' for k, v in SEARCH[1].items())}; "
        "chosen on the calibration images only). ± one standard error; the difference's is paired "
        "(image by image). Start: the solver's plan, or the capped plan measured best: `Lg ≤ k`, at "
        "most k layers at weight-bit levels 0..g (L0: the cheapest candidates, L1: up to the next).",
        "",
        "| tool | target B | mixq bits | same grid | mixq search (bits) | search − same | caps chosen "
        "| measured KL: solver → capped → refined | search s | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(done, key=lambda r: (r["tool"], r["budget"])):
        d = r[FIELD]
        s, m = d["same"], d["search"]
        kl = " → ".join(
            f"{x:.4g}" for x in (m["solver_loss"], m["capped_loss"], m["refined_loss"]) if x is not None
        )
        caps = _caps(m)
        extra = ", ".join(f"{k}={v}" for k, v in sorted((r.get("settings") or {}).items()))
        tool = f"{r['tool']}" + (f" ({extra})" if extra else "")
        out.append(
            f"| {tool} | {r['budget']:g} | {s['avg_weight_bits']:.3f} | {s['metric']:.2f} ± {s['se']:.2f} | "
            f"{m['metric']:.2f} ± {m['se']:.2f} ({m['avg_weight_bits']:.3f}) | "
            f"{d['diff']:+.2f} ± {d['paired_se']:.2f} | {caps} | {kl} | {m['search_seconds']:.0f} | "
            f"{verdict(r)} |"
        )
    alts = [(r, k, d) for r in done for k, d in sorted((r.get(ALT) or {}).items())]
    if alts:
        out += [
            "",
            "The same cells with other settings of the search (`--search-args`; same peer plan, same "
            "images):",
            "",
            "| tool | target B | search settings | same grid | mixq search (bits) | search − same "
            "| verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for r, k, d in sorted(alts, key=lambda t: (t[0]["tool"], t[0]["budget"], t[1])):
            s, m = d["same"], d["search"]
            out.append(
                f"| {r['tool']} | {r['budget']:g} | `{k}` | {s['metric']:.2f} ± {s['se']:.2f} | "
                f"{m['metric']:.2f} ± {m['se']:.2f} ({m['avg_weight_bits']:.3f}) | "
                f"{d['diff']:+.2f} ± {d['paired_se']:.2f} | {verdict({FIELD: d})} |"
            )
    return [*out, ""]
