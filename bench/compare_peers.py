"""Side by side with the per-layer precision search of other tools, in one run (``make bench-peers``).

Each peer tool runs in a virtual environment of its own (``.peers/<tool>/``, git-ignored, built on
first use from a base venv with torch 2.13.0, then the tool with ``-c constraints.txt``) through a
driver module in ``bench/peers/drivers/``. A driver builds the same mixq task (model, calibration and
validation data, metric), gives the tool the same average-weight-bit target translated into the
tool's own knob, and writes JSON only: the tool's per-layer formats, its own bit count, the
metric of its own quantized model and its search time. The tools' code never enters mixq's
process or dependencies. Two tools have no size knob and are held to the budget by their driver,
which records how (``pick`` in the row): Qualcomm AIMET's AMP (an accuracy-drop target) runs its
whole BitOps/score walk and takes the best-scoring point within B; NNCF 2.19's HAWQ (a BitOps
compression ratio) gets the smallest ratio whose choice fits B.

Then, in mixq's process, every peer result is charged and re-measured the same way:

* its per-layer choice becomes a :class:`mixq.Plan` with the closest mixq candidate per layer
  (``grid=same``: e.g. INT4 per-channel weight-only -> ``w4``, INT4 block-128 -> ``w4g128``,
  ModelOpt W8A8 -> ``w8-a8+sym``, MCT W4 (MSE thresholds) with 8-bit activations -> ``w4+mse-a8``,
  unquantized -> ``float``), and mixq's cost model counts its average weight bits and model size
  with every scale and zero point (a float layer stores fp32);
* the plan is applied with mixq's quantizers and evaluated on the task: the tool's own metric
  beside mixq's metric of the same plan separates the search from the quantizer;
* the same per-layer bit widths with mixq's best weight grid (``grid=mixq``: asymmetric,
  output-MSE ranges, ``+asym+omse``, as in bench/search.json) are evaluated too;
* mixq's own ``sensitivity-ilp`` search runs with the peer's candidate set (``grid=same``) under
  the peer's mixq-counted size as the budget (``--no-mixq-search`` skips it): search against
  search on equal quantizers.

Validation sets: all 10,000 MNIST test images; the first 256 of MiniLM's 1,024 validation
sentences and the first 2,000 Fashion-MNIST test images (two shared cores; recorded per row).

Results: ``bench/results/peers.json`` (rows keyed tool|task|budget; finished rows are kept, so an
interrupted run resumes; a job running in another session is skipped) and
``bench/results/peers.md`` (the table, with mixq's best result at the same or smaller size from
the other bench/results JSONs, and a verdict naming the quantizer or the search where mixq loses).

This module is the entry point and keeps peers.json; the jobs it does live in ``bench/peers/``
(venvs, driver runner, plan translation, mixq's re-measurement, mixq's own results, rendering).

Usage::

    .venv/bin/python -m bench.compare_peers                  # every default job, resuming
    .venv/bin/python -m bench.compare_peers --tools modelopt --tasks mnist-cnn --budgets 3
    .venv/bin/python -m bench.compare_peers --report-only    # rewrite peers.md from peers.json
    .venv/bin/python -m bench.compare_peers --same-grid      # same grid vs mixq's search, all test images
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import sys
import time
from typing import Any

import torch

from bench.common import RESULTS, provenance, set_section, write
from bench.peers import same_grid
from bench.peers.jobs import JOBS, PEERS, Job
from bench.peers.measure import (
    ADAROUND_ITERS,
    PTQ_STEPS,
    get_task,
    methods_label,
    own_grid,
    own_grid_ptq,
    own_methods,
    process,
)
from bench.peers.points import best_mixq, mixq_points
from bench.peers.render import render, summary, verdict
from bench.peers.runner import claim_job, run_driver
from bench.peers.venvs import VENVS

NAME = "peers"
# Validation subsets on two shared cores (recorded in every row): the first 2,000 Fashion-MNIST
# test images, the first 256 of MiniLM's 1,024 validation sentences; MNIST uses all 10,000.
FASHION_VAL = 2000
MINILM_VAL = 256
log = logging.getLogger("peers")


def load_rows() -> dict[str, dict[str, Any]]:
    f = RESULTS / f"{NAME}.json"
    if not f.exists():
        return {}
    return json.loads(f.read_text()).get("rows", {})


def save(new_rows: dict[str, dict[str, Any]], session: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Merge this session's rows into peers.json (under a lock: sessions may overlap); rewrite peers.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    VENVS.mkdir(parents=True, exist_ok=True)
    with open(VENVS / f"{NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        f = RESULTS / f"{NAME}.json"
        prev = json.loads(f.read_text()) if f.exists() else {}
        rows, sessions = prev.get("rows", {}), prev.get("sessions", [])
        ids = [x.get("id") for x in sessions]
        if session["id"] in ids:
            sessions[ids.index(session["id"])] = session
        else:
            sessions.append(session)
        for r in new_rows.values():
            r.setdefault("session", session["id"])
        rows.update(new_rows)
        note = "one row per tool, task and target; see bench/compare_peers.py"
        write(NAME, {"note": note, "sessions": sessions, "rows": rows})
        (RESULTS / f"{NAME}.md").write_text(render(rows))
        set_section(RESULTS / "summary.md", "peers", summary(rows))
    return rows


def new_session(jobs: list[str]) -> dict[str, Any]:
    """A session record: a unique id, the provenance of this run and its jobs."""
    return {"id": time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}", **provenance(), "jobs": jobs}


def loses_without(r: dict[str, Any], field: str, points: list[dict[str, Any]]) -> bool:
    """Does mixq lose this row when its result ``field`` is left out (judging whether to (re)run it)?"""
    return verdict({k: v for k, v in r.items() if k != field}, best_mixq(points, r)).startswith("mixq loses")


def backfill(
    rows: dict[str, dict[str, Any]],
    tools: list[str],
    tasks: list[str],
    ptq: bool = False,
    ptq_steps: list[str] | None = None,
    adaround_iters: int = ADAROUND_ITERS,
    methods: list[str] | None = None,
) -> int:
    """Add mixq's own-grid search to finished rows that lack it (the tools do not run again).

    With ``ptq``: add the own-grid search with ``ptq_steps`` (default: bias correction) to the rows
    mixq loses without them; a row that has that result with these very steps is left alone.
    With ``methods``: add those mixq methods (``own_methods``, then ``ptq_steps`` if given) to the
    rows mixq loses without them.
    """
    if methods:
        return backfill_methods(rows, tools, tasks, methods, list(ptq_steps or []), adaround_iters)
    steps = list(ptq_steps or PTQ_STEPS)
    session = new_session(["backfill-ptq" if ptq else "backfill"])
    points = mixq_points() if ptq else []
    for key, r in rows.items():
        field = "mixq_search_mixq_ptq" if ptq else "mixq_search_mixq"
        if not r.get("ok") or r["tool"] not in tools:
            continue
        if field in r and (not ptq or r[field].get("ptq") == steps):
            continue
        if tasks and r["task"] not in tasks:
            continue
        if ptq and not loses_without(r, field, points):  # judged without any earlier PTQ result
            continue
        val = r.get("val_items") if r["task"] != "mnist-cnn" else 0
        task = get_task(r["task"], val or 0)
        if ptq:
            own_grid_ptq(r, task, steps, adaround_iters)
        else:
            own_grid(r, task)
        log.info("%s: %s %s", key, field, r[field])
        r["backfill_session"] = session["id"]
        save({key: r}, session)
    return 0


def backfill_methods(
    rows: dict[str, dict[str, Any]],
    tools: list[str],
    tasks: list[str],
    methods: list[str],
    steps: list[str],
    adaround_iters: int,
) -> int:
    session = new_session(["backfill-methods"])
    points = mixq_points()
    for key, r in rows.items():
        if not r.get("ok") or r["tool"] not in tools or (tasks and r["task"] not in tasks):
            continue
        todo = [m for m in methods if methods_label(m, steps) not in r.get("mixq_methods", {})]
        if not todo:
            continue
        if not loses_without(r, "mixq_methods", points):  # judged without any earlier method result
            continue
        val = r.get("val_items") if r["task"] != "mnist-cnn" else 0
        own_methods(r, get_task(r["task"], val or 0), todo, steps, adaround_iters)
        log.info("%s: mixq_methods %s", key, {k: v.get("metric") for k, v in r["mixq_methods"].items()})
        r["backfill_session"] = session["id"]
        save({key: r}, session)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tools", default=",".join(PEERS), help=f"comma list of {', '.join(PEERS)}")
    p.add_argument("--tasks", default="", help="comma list of tasks (default: every task of the jobs)")
    p.add_argument("--budgets", default="", help="comma list of target average weight bits")
    p.add_argument("--settings", default="{}", help="tool settings as a JSON object (for every job run)")
    p.add_argument("--fashion-val", type=int, default=FASHION_VAL, help="Fashion-MNIST test images used")
    p.add_argument("--minilm-val", type=int, default=MINILM_VAL, help="MiniLM validation sentences used")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per driver run")
    p.add_argument("--mixq-search", action="store_true", help="run mixq's search (the default)")
    p.add_argument("--no-mixq-search", action="store_true", help="skip mixq's search at each peer's size")
    p.add_argument("--redo", action="store_true", help="recompute rows that already exist")
    p.add_argument("--report-only", action="store_true", help="rewrite peers.md from peers.json")
    p.add_argument(
        "--same-grid",
        action="store_true",
        help="the peer's plan and mixq's search on the peer's candidates, both on all test images "
        "(zoo models; no tool runs; bench/peers/same_grid.py)",
    )
    p.add_argument(
        "--search-args",
        default="{}",
        help="--same-grid: settings of mixq's search over its defaults, a JSON object, e.g. "
        "'{\"select\": \"top1\"}' (results beside the default search's, in the row's same_grid_alt)",
    )
    p.add_argument(
        "--backfill",
        action="store_true",
        help="add the missing 'mixq search, own grid' to finished rows (no tool runs)",
    )
    p.add_argument(
        "--backfill-ptq",
        action="store_true",
        help="add 'mixq search, own grid' + PTQ steps to the rows mixq loses (no tool runs)",
    )
    p.add_argument(
        "--backfill-methods",
        default="",
        help="comma list of mixq methods (e.g. sensitivity-ilp,hawq) run with mixq's sweep "
        "candidates at the peer's size, on the rows mixq loses (no tool runs)",
    )
    p.add_argument(
        "--ptq-steps",
        default="",
        help="mixq PTQ steps (comma list of cle, bias_correction, adaround) of --backfill-ptq "
        f"(default: {','.join(PTQ_STEPS)}) and --backfill-methods (default: none)",
    )
    p.add_argument("--adaround-iters", type=int, default=ADAROUND_ITERS, help="AdaRound steps per layer")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = load_rows()
    if args.report_only:
        (RESULTS / f"{NAME}.md").write_text(render(rows))
        set_section(RESULTS / "summary.md", "peers", summary(rows))
        print(f"wrote {RESULTS / (NAME + '.md')}")
        return 0
    tools = [t for t in args.tools.split(",") if t]
    bad = [t for t in tools if t not in PEERS]
    if bad:
        raise SystemExit(f"unknown tools {bad}; valid: {', '.join(PEERS)}")
    if args.same_grid:
        keys = [k for k in same_grid.order(rows) if rows[k]["tool"] in tools]
        keys = [k for k in keys if not args.tasks or rows[k]["task"] in args.tasks.split(",")]
        keys = [k for k in keys if not args.budgets or f"{rows[k]['budget']:g}" in args.budgets.split(",")]
        session = new_session(["same-grid"])
        search_args = {**same_grid.SEARCH[1], **json.loads(args.search_args)}
        same_grid.run(rows, keys, args.redo, lambda done: save(done, session), search_args)
        return 0
    if args.backfill or args.backfill_ptq or args.backfill_methods:
        return backfill(
            rows,
            tools,
            [t for t in args.tasks.split(",") if t],
            ptq=args.backfill_ptq,
            ptq_steps=[x for x in args.ptq_steps.split(",") if x],
            adaround_iters=args.adaround_iters,
            methods=[x for x in args.backfill_methods.split(",") if x],
        )
    settings = json.loads(args.settings)
    jobs = [j for j in JOBS if j.tool in tools]
    if args.tasks:
        jobs = [j for j in jobs if j.task in args.tasks.split(",")]
    if args.budgets:
        pairs = {(j.tool, j.task) for j in jobs}
        pairs = pairs or {(t, k) for t in tools for k in args.tasks.split(",") if k}
        jobs = [Job(t, k, float(b)) for t, k in sorted(pairs) for b in args.budgets.split(",") if b]
    if settings:
        jobs = [Job(j.tool, j.task, j.budget, settings) for j in jobs]
    session = new_session([j.key for j in jobs])
    done: dict[str, dict[str, Any]] = {}
    for job in jobs:
        rows = load_rows()  # another session may have finished it meanwhile
        if job.key in rows and rows[job.key].get("ok") and not args.redo:
            log.info("%s: done already", job.key)
            continue
        claim = claim_job(job)
        if claim is None:
            log.info("%s: running in another session, skipped", job.key)
            continue
        val = args.minilm_val if job.task == "minilm" else 0
        val = args.fashion_val if job.task.startswith("fashion-") else val
        res = run_driver(job, val, args.timeout)
        log.info(
            "%s: tool ok=%s metric=%s bits=%s search=%.1fs",
            job.key,
            res.get("ok"),
            res.get("metric"),
            res.get("tool_bits"),
            res.get("search_seconds") or 0,
        )
        try:
            done[job.key] = process(job, res, val, not args.no_mixq_search)
        except Exception as e:  # noqa: BLE001 - record and go on with the next job
            log.exception("%s: mixq side failed", job.key)
            done[job.key] = {
                "tool": job.tool,
                "task": job.task,
                "budget": job.budget,
                "ok": False,
                "error": f"mixq side: {type(e).__name__}: {e}",
            }
        rows = save(done, session)
        claim.close()
        r = done[job.key]
        if r.get("ok"):
            log.info(
                "%s: mixq bits %.3f, mixq same-grid metric %.4f, mixq-grid %.4f",
                job.key,
                r["mixq_same"]["avg_weight_bits"],
                r["mixq_same"]["metric"],
                r["mixq_mixq"]["metric"],
            )
    save(done, session)
    print(f"wrote {RESULTS / (NAME + '.json')} and {RESULTS / (NAME + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
