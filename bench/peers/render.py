"""The verdict of a peer row, ``peers.md`` and the ``peers`` block of ``bench/results/summary.md``."""

from __future__ import annotations

import math
from typing import Any

from bench.peers import same_grid
from bench.peers.points import best_mixq, default_val, mixq_points


def _m(v: Any, task: str) -> str:
    if not isinstance(v, (int, float)):
        return "–"
    return f"{v:.4f}" if task == "minilm" else f"{v:.2f}"


def verdict(r: dict[str, Any], best: dict[str, Any] | None) -> str:
    """Does mixq (its best result at <= the peer's size, or its search with the peer's candidates)
    reach the tool's own metric, and if not, is the gap in the quantizer or in the search?

    quantizer/calibration: the tool's own quantized model beats the same plan on mixq's
    quantizers set to the tool's grid (ranges and rounding differ); search: the tool's plan on
    mixq's quantizers beats mixq's own search with the same candidates at the same size.
    """
    tol = 5e-4 if r["task"] == "minilm" else 0.05
    tool, same = r.get("tool_metric"), r["mixq_same"]["metric"]
    srch = (r.get("mixq_search") or {}).get("metric")
    own = (r.get("mixq_search_mixq") or {}).get("metric")
    ptq = (r.get("mixq_search_mixq_ptq") or {}).get("metric")
    ours = [x for x in (best["metric"] if best else None, srch, own) if x is not None]
    meth = {k: v["metric"] for k, v in (r.get("mixq_methods") or {}).items() if "metric" in v}
    if tool is None or not (ours or ptq is not None or meth):
        return "no mixq result at this size"
    if ours and max(ours) >= tool - tol:
        return "mixq ≥ tool" if max(ours) > tool + tol else "tie"
    if meth and max(meth.values()) >= tool - tol:  # mixq's own methods and candidates at this size
        k = max(meth, key=lambda k: meth[k])
        m = r["mixq_methods"][k]
        return (
            "mixq ≥ tool" if meth[k] > tool + tol else "tie"
        ) + f" with mixq {k}: {_m(meth[k], r['task'])} at {m['avg_weight_bits']:.2f} b"
    if ptq is not None and ptq >= tool - tol:  # only with the calibration step the tool also runs
        p = r["mixq_search_mixq_ptq"]
        return (
            ("mixq ≥ tool" if ptq > tool + tol else "tie")
            + f" with {'+'.join(p['ptq'])}: {_m(ptq, r['task'])} at {p['avg_weight_bits']:.2f} b"
            + (f" (without: mixq loses by {tool - max(ours):.4g})" if ours else "")
        )
    why = []
    if tool - same > tol:
        why.append(f"quantizer/calibration (+{tool - same:.4g} for the tool's own quantizer on its plan)")
    if srch is not None and same - srch > tol:
        why.append(f"search (+{same - srch:.4g} for the tool's plan over mixq's search, same candidates)")
    if ptq is not None:
        why.append(f"mixq's search with {'+'.join(r['mixq_search_mixq_ptq']['ptq'])}: {_m(ptq, r['task'])}")
    if meth:
        why.append("mixq's methods: " + ", ".join(f"{k} {_m(v, r['task'])}" for k, v in meth.items()))
    gap = tool - max([*ours, *([ptq] if ptq is not None else []), *meth.values()])
    n = r.get("val_items") or default_val(r["task"])
    if r["task"] != "minilm" and n:  # top-1 in %: the sampling error of one model's accuracy on n items
        se = 100 * math.sqrt(tool / 100 * (1 - tool / 100) / n)
        if gap < se:
            why.append(f"the gap is below one standard error of a top-1 on {n} images ({se:.2f} points)")
    return f"mixq loses by {gap:.4g}: " + ("; ".join(why) or "neither alone (both small)")


def _tool(r: dict[str, Any]) -> str:
    extra = ", ".join(f"{k}={v}" for k, v in sorted((r.get("settings") or {}).items()))
    return f"{r['tool']} {r.get('tool_version') or ''}" + (f" ({extra})" if extra else "")


def _pick(r: dict[str, Any]) -> str:
    """How a tool without a size knob was held to the budget (the driver's ``pick``), for the table."""
    pick = r.get("pick")
    if not isinstance(pick, dict):
        return ""
    vals = [
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in pick.items()
        if k != "rule" and isinstance(v, (int, float, str))
    ]
    return f" (pick: {', '.join(vals)})" if vals else ""


def _error(r: dict[str, Any]) -> str:
    """A failed row's error, with the timeout when the driver was stopped by it."""
    err, tail = str(r.get("error", "")), str(r.get("log_tail", ""))
    return f"{err} ({tail.splitlines()[0]})" if tail.startswith("timed out") else err


def _cell(text: Any, n: int) -> str:
    """``text`` on one line of a Markdown table cell, at most ``n`` characters."""
    return " ".join(str(text).split()).replace("|", "/")[:n]


def best_of_mixq(r: dict[str, Any], best: dict[str, Any] | None) -> tuple[float, str] | None:
    """mixq's best metric at the peer's mixq-counted size, and where it comes from."""
    got = []
    if best:
        got.append((best["metric"], f"{best['method']} ({best['source']})"))
    labels = {
        "mixq_search": "search, the peer's candidates",
        "mixq_search_mixq": "search, own grid",
        "mixq_search_mixq_ptq": "search, own grid + PTQ",
    }
    for key, label in labels.items():
        if "metric" in (r.get(key) or {}):
            got.append((r[key]["metric"], label))
    got += [(v["metric"], k) for k, v in (r.get("mixq_methods") or {}).items() if "metric" in v]
    return max(got, key=lambda x: x[0]) if got else None


def summary(rows: dict[str, dict[str, Any]]) -> str:
    """The peers block of bench/results/summary.md: one line per tool, task and target."""
    points = mixq_points()
    out = [
        "## Peer tools beside mixq (`make bench-peers`)",
        "",
        "Written by `bench/compare_peers.py` from `peers.json` (details, per-layer plans and the columns' "
        "meaning: `peers.md`). Sizes are counted by mixq's cost model for every tool (scales and "
        "zero points included); mixq's best is its best post-training result at or below the "
        "tool's mixq-counted size on the same validation items.",
        "",
        "| task | tool | target B | val items | tool metric | mixq-counted bits | mixq best ≤ size "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = ["mnist-cnn", "fashion-resnet20", "fashion-mobilenetv2", "minilm"]
    for r in sorted(
        rows.values(),
        key=lambda r: (order.index(r["task"]) if r["task"] in order else 9, r["tool"], r["budget"], _tool(r)),
    ):
        head = f"| {r['task']} | {_tool(r)} | {r['budget']:g} | {r.get('val_items') or '–'} |"
        if not r.get("ok"):
            out.append(f"{head} failed: {_cell(_error(r), 100)} ||||")
            continue
        best = best_mixq(points, r)
        ours = best_of_mixq(r, best)
        o_txt = f"{_m(ours[0], r['task'])} ({ours[1]})" if ours else "–"
        tool, bits = _m(r.get("tool_metric"), r["task"]), r["mixq_same"]["avg_weight_bits"]
        out.append(f"{head} {tool} | {bits:.2f} | {o_txt} | {verdict(r, best)} |")
    return "\n".join(out) + "\n"


def render(rows: dict[str, dict[str, Any]]) -> str:
    """The Markdown table of every peer row beside mixq."""
    points = mixq_points()
    out = [
        "# Peers: per-layer precision search of other tools beside mixq",
        "",
        "Written by `bench/compare_peers.py` from `bench/results/peers.json`. Every tool ran in its own "
        "venv on the same mixq task (model, calibration and validation data, metric). Columns:",
        "",
        "- **tool metric**: the tool's own quantized model; **tool bits**: the tool's own count "
        "(its own conventions, see peers.json `tool_bits_name`).",
        "- **mixq bits / size**: the tool's per-layer choice converted to the closest mixq candidates "
        "(`plan_same`) and counted by mixq's cost model (scales and zero points included; a layer "
        "left unquantized counts as fp32).",
        "- **mixq same grid**: that plan applied with mixq's quantizers (same grid as the tool); "
        "**mixq grid**: the same bit widths with mixq's `+asym+omse` weights (its bits differ slightly).",
        "- **mixq search**: mixq `sensitivity-ilp` with the peer's candidates under the peer's "
        "mixq-counted size; **mixq search, own grid**: the same with the `+asym+omse` versions of the "
        "peer's candidates (zero points charged), i.e. mixq's own quantizer and search at the peer's size.",
        "- **mixq best ≤ size**: mixq's best post-training result (QAT methods left out) in the other "
        "bench/results JSONs with the same task, validation set and activation regime, at or below the "
        "peer's mixq-counted size.",
        "- **verdict**: whether mixq (best ≤ size, or either search) reaches the tool's own metric "
        "(within 0.05 points of top-1, 0.0005 of cosine: a tie); if not, "
        "whether the gap is the tool's quantizer/calibration (tool metric vs mixq same grid) or its "
        "search (mixq same grid vs mixq search). Where mixq loses, its own-grid search is run again "
        "with its bias correction on the plan (`--backfill-ptq`; the tools' pipelines correct biases "
        "too, MCT by default), and the verdict says whether that closes the gap.",
        "- **mixq methods, own candidates**: where mixq loses, mixq's own methods with the candidates "
        "and settings of its sweep (bench/run_all.py), at the peer's mixq-counted size on the same "
        "validation items, optionally followed by PTQ steps (`--backfill-methods`).",
        "",
    ]
    order = ["mnist-cnn", "minilm", "fashion-resnet20", "fashion-mobilenetv2"]
    tasks = sorted({r["task"] for r in rows.values()}, key=lambda t: (order.index(t) if t in order else 9, t))
    for task in tasks:
        trs = [r for r in rows.values() if r["task"] == task]
        fp = next((r.get("fp_metric") for r in trs if r.get("fp_metric") is not None), None)
        mname = next((r.get("metric_name") for r in trs if r.get("metric_name")), "metric")
        vals = [r.get("val_items") for r in trs if r.get("val_items")]
        val = max(set(vals), key=vals.count) if vals else None  # the most rows' (others: marked)
        fp = next(
            (r.get("fp_metric") for r in trs if r.get("fp_metric") is not None and r.get("val_items") == val),
            fp,
        )
        out += [
            f"## {task}",
            "",
            f"{mname}; fp32 {_m(fp, task)}; {val or '?'} validation items"
            + (" (rows marked [n] on n items)." if len(set(vals)) > 1 else "."),
            "",
            "| tool | target B | tool bits | tool metric | search s | mixq bits | mixq size (B) | "
            "mixq same grid | mixq grid (bits) | mixq search | mixq search, own grid | "
            "mixq best ≤ size | mixq methods, own candidates | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(trs, key=lambda r: (r["tool"], r["budget"])):
            mark = (
                f" [{r['val_items']}; fp32 {_m(r.get('fp_metric'), task)}]"
                if r.get("val_items") not in (None, val)
                else ""
            )
            if not r.get("ok"):
                out.append(
                    f"| {_tool(r)}{mark} | {r['budget']:g} | failed: {_cell(_error(r), 120)} ||||||||||||"
                )
                continue
            same, mg = r["mixq_same"], r["mixq_mixq"]
            srch = r.get("mixq_search")
            s_txt = f"{_m(srch['metric'], task)} ({srch['avg_weight_bits']:.2f} b)" if srch else "–"
            own = r.get("mixq_search_mixq")
            o_txt = "infeasible (zero points)" if own else "–"
            if own and "metric" in own:
                o_txt = f"{_m(own['metric'], task)} ({own['avg_weight_bits']:.2f} b)"
            best = best_mixq(points, r)
            b_txt = (
                f"{_m(best['metric'], task)} ({best['method']}, {best['avg_weight_bits']:.2f} b, "
                f"{best['source']})"
                if best
                else "no mixq result at ≤ this size"
            )
            meth = {k: v for k, v in (r.get("mixq_methods") or {}).items() if "metric" in v}
            m_txt = (
                "; ".join(
                    f"{k} {_m(v['metric'], task)} ({v['avg_weight_bits']:.2f} b)" for k, v in meth.items()
                )
                or "–"
            )
            out.append(
                f"| {_tool(r)}{mark} | {r['budget']:g} | "
                f"{r.get('tool_bits', 0):.2f} | "
                f"{_m(r.get('tool_metric'), task)} | {r.get('search_seconds', 0):.1f} | "
                f"{same['avg_weight_bits']:.3f} | {same['size_bytes']:.0f} | {_m(same['metric'], task)} | "
                f"{_m(mg['metric'], task)} ({mg['avg_weight_bits']:.2f}) | {s_txt} | {o_txt} | "
                f"{b_txt} | {m_txt} | "
                f"{verdict(r, best)} |"
            )
        out += ["", *same_grid.render(trs)]
        out += ["Per-layer choices (mixq candidates, grid=same):", ""]
        for r in sorted(trs, key=lambda r: (r["tool"], r["budget"])):
            if r.get("ok"):
                counts: dict[str, int] = {}
                for c in r["plan_same"].values():
                    counts[c] = counts.get(c, 0) + 1
                detail = ", ".join(f"{c}: {n}" for c, n in sorted(counts.items()))
                if len(r["plan_same"]) <= 8:
                    detail = ", ".join(f"{n}={c}" for n, c in r["plan_same"].items())
                out.append(f"- {_tool(r)} B={r['budget']:g}: {detail}{_pick(r)}")
        notes = sorted({r["note"] for r in trs if r.get("note")})
        rules = {
            f"{r['tool']} picks its point by the rule: {r['pick']['rule']}"
            for r in trs
            if r.get("ok") and isinstance(r.get("pick"), dict) and r["pick"].get("rule")
        }
        notes += sorted(rules)
        out += ["", *(f"Note: {n}." for n in notes)] if notes else []
        out.append("")
    return "\n".join(out) + "\n"
