"""Command-line interface: ``mixq run | demo | eval | list | export | report``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from mixq import __version__, cost, ptq, rundir, tasks
from mixq.export import FORMATS
from mixq.methods import METHODS
from mixq.options import Recipe

# `mixq demo` (`make demo`): about two minutes on 2 cores. The real MNIST CNN on the first
# DEMO_VAL_SIZE test images (calibrated on DEMO_CALIB_SIZE training images), a few methods at two
# budgets; every method on every task over a budget sweep is the benchmark (`make bench`).
DEMO_TASK = "mnist-cnn"
DEMO_VAL_SIZE, DEMO_CALIB_SIZE = 2000, 256
DEMO_METHODS = ["uniform", "sensitivity-ilp"]
DEMO_CANDIDATES = ["w2+asym-a8", "w4+asym-a8", "w8a8"]
DEMO_BUDGETS = [3.0, 5.0]
DEMO_QAT_CANDIDATES = DEMO_CANDIDATES  # training methods (not in the demo) learn these ranges


def _key_values(items: list[str], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} {item!r} must look like KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _table(rows: list[dict[str, Any]]) -> str:
    head = f"{'method':<16} {'budget':<24} {'avg_w_bits':>10} {'size_bytes':>12} {'metric':>9} {'seconds':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['method']:<16} {r['budget']:<24} {r['avg_weight_bits']:>10.3f} "
            f"{r['size_bytes']:>12.0f} {r['metric']:>9.4f} {r['seconds']:>8.2f}"
        )
    return "\n".join(lines)


def _names(text: str) -> list[str]:
    return [c for c in text.split(",") if c]


def _ptq_args(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in _key_values(items, "--ptq-arg").items():
        step, dot, name = key.partition(".")
        if not dot or not name:
            raise ValueError(f"--ptq-arg {key!r} must look like STEP.KEY=VALUE, e.g. adaround.iters=2000")
        out.setdefault(step, {})[name] = value
    return out


# recipe key: (the option of `mixq run` that sets it, how its text becomes the value)
_RUN_OPTIONS: dict[str, tuple[str, Any]] = {
    "task": ("task", None),
    "method": ("method", None),
    "candidates": ("candidates", _names),
    "budget": ("budget", lambda v: _key_values(v, "--budget")),
    "method_args": ("method_arg", lambda v: _key_values(v, "--method-arg")),
    "seed": ("seed", None),
    "out": ("out", None),
    "ptq": ("ptq", _names),
    "ptq_args": ("ptq_arg", _ptq_args),
    "executor": ("executor", None),
    "adds": ("adds", None),
    "embeddings": ("embeddings", None),
    "exclude": ("exclude", None),
    "fold_bn": ("fold_bn", None),
    "target": ("target", None),
}
_EMPTY_IS_GIVEN = ("seed", "ptq", "fold_bn")  # --seed 0, --ptq "" (no steps), --no-fold-bn are settings too


def _command_line_settings(args: argparse.Namespace, recipe: Recipe) -> dict[str, Any]:
    """The recipe keys the command line sets (they override the recipe file's)."""
    settings = {}
    for key, (option, convert) in _RUN_OPTIONS.items():
        value = getattr(args, option)
        if value is None or not (value or key in _EMPTY_IS_GIVEN):
            continue
        settings[key] = convert(value) if convert else value
    if args.address or args.workers is not None:
        if settings.get("executor", recipe.options.executor) != "ray":
            raise ValueError("--address and --workers need --executor ray")
        given = {k: v for k, v in (("address", args.address), ("workers", args.workers)) if v is not None}
        settings["executor_args"] = {**(recipe.options.executor_args or {}), **given}
    return settings


def cmd_run(args: argparse.Namespace) -> int:
    import mixq

    recipe = Recipe.from_toml(args.recipe) if args.recipe else Recipe()
    recipe = recipe.merged(_command_line_settings(args, recipe))
    if recipe.task is None:
        raise ValueError("name a task with --task or in the recipe")
    out = Path(recipe.options.out if recipe.options.out is not None else "runs/latest")
    options = dataclasses.replace(recipe.options, out=out, overwrite=args.overwrite)
    res = mixq.run(recipe.task, recipe.method, recipe.candidates, recipe.budget, options=options)
    text = json.dumps(recipe.to_dict(), indent=2, default=str) + "\n"
    rundir.add_file(out, rundir.RECIPE, lambda path: path.write_text(text))
    m = res.metrics
    print(_table([{**m.to_dict(), "budget": json.dumps(m.budget)}]))
    print(f"wrote {out}/plan.json, metrics.json, layers.csv, report.md")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import mixq
    from mixq.progress import duration
    from mixq.report import render

    out = Path(args.out)
    start = time.perf_counter()
    task = mixq.tasks.get(DEMO_TASK, val_size=DEMO_VAL_SIZE, calib_size=DEMO_CALIB_SIZE)
    n_runs = len(DEMO_METHODS) * len(DEMO_BUDGETS)
    print(
        f"mixq demo: the real MNIST CNN ({DEMO_TASK}, top-1 % on the first {task.info['val_images']} "
        f"MNIST test images), {', '.join(DEMO_METHODS)} at avg_weight_bits <= "
        f"{', '.join(f'{b:g}' for b in DEMO_BUDGETS)}: {n_runs} runs, "
        f"candidates {', '.join(DEMO_CANDIDATES)}",
        flush=True,
    )
    t0 = time.perf_counter()
    fp = task.fp_metric()
    rows = [
        {
            "method": "fp32",
            "budget": "-",
            "avg_weight_bits": 32.0,
            "size_bytes": 4.0 * sum(p.numel() for p in task.model.parameters()),
            "metric": fp,
            "seconds": time.perf_counter() - t0,
        }
    ]
    print(f"fp32: {fp:.2f} % ({duration(rows[0]['seconds'])})", flush=True)
    cache = mixq.Cache()  # one model, prepared and searched once for every method and budget
    run_dirs = []
    for method in DEMO_METHODS:
        m = METHODS[method]
        for b in DEMO_BUDGETS:
            run_dirs.append(out / f"{method}-avg{b:g}")
            res = mixq.run(
                task,
                method=method,
                candidates=DEMO_QAT_CANDIDATES if m.trains else DEMO_CANDIDATES,
                budget={"avg_weight_bits": b},
                cache=cache,
                method_args=dict(m.demo_args),
                out=run_dirs[-1],
            )
            rows.append({**res.metrics.to_dict(), "budget": f"avg_weight_bits<={b:g}"})
            print(
                f"[{len(run_dirs)}/{n_runs}] {method} at avg_weight_bits <= {b:g}: "
                f"top-1 {res.metrics.metric:.2f} %, {res.metrics.avg_weight_bits:.2f} bits "
                f"({duration(time.perf_counter() - start)} so far)",
                flush=True,
            )
    table = _table(rows)
    print(table)
    (out / "summary.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    (out / "summary.txt").write_text(table + "\n")
    report = render(run_dirs, out / "report")
    print(
        f"run directories: {out}/<method>-avg<bits>/ (plan.json, metrics.json, layers.csv, report.md, "
        f"model.safetensors; summary.txt beside them)\n"
        f"HTML report:     {report}\n"
        f"the full table, every method on every task over a budget sweep: make bench\n"
        f"done in {duration(time.perf_counter() - start)}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mixq.api import evaluate

    if args.run_dir is not None:
        if args.plan:
            raise ValueError("give either a RUN_DIR (and --task if it needs one) or --task and --plan")
        return _eval_run(args.run_dir, args.task)
    if not args.task or not args.plan:
        raise ValueError("give a RUN_DIR, or --task and --plan")
    result = evaluate(args.task, args.plan)
    skip = ("task", "method", "metric_name", "eval_seconds")
    m = {k: v for k, v in result.metrics.to_dict().items() if k not in skip}
    print(json.dumps(m, indent=2))
    return 0


def _eval_run(run_dir: str, task: str | None) -> int:
    """Evaluate a run directory's model: its model.safetensors (else its plan, rebuilt)."""
    from mixq import export

    result, task = export.rebuild(run_dir, check=False, task=task)
    source = export.RUN_MODEL if rundir.listed(run_dir, export.RUN_MODEL) is not None else "plan.json"
    m = result.metrics
    print(
        json.dumps(
            {
                "metric": m.metric,
                "recorded_metric": m.extra.get("recorded_metric"),
                "fp_metric": m.fp_metric,
                "model": source,
                **{
                    k: getattr(m, k)
                    for k in ("avg_weight_bits", "size_bytes", "bops")
                    if getattr(m, k) is not None
                },
            },
            indent=2,
        )
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from mixq import formats, plan

    print("tasks:   ", ", ".join(tasks.TASKS), "(or module:function returning a mixq.Task)")
    print("methods: ", ", ".join(METHODS))
    print("formats: ", ", ".join(formats.FORMAT_NAMES))
    print("budgets: ", ", ".join(cost.BUDGET_KEYS))
    print("ptq:     ", ", ".join(ptq.STEPS))
    print("candidates:", plan.GRAMMAR)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from mixq import export

    result, task = export.rebuild(args.run_dir, task=args.task)
    ext = "safetensors" if args.format == "safetensors" else "onnx"
    out = (
        Path(args.out) if args.out else Path(args.run_dir) / (f"model.{ext}" if args.format != "hf" else "hf")
    )
    stored = Path(args.run_dir) / export.RUN_MODEL
    if args.format == "hf":  # a model directory (transformers' from_pretrained), not a listed file
        path = export.save(result, out, format="hf")
    elif out.exists() and stored.is_file() and out.resolve() == stored.resolve():
        path = out  # the run's own packed model, just checked against its metric
    elif out.resolve().parent == Path(args.run_dir).resolve():  # into the run directory: listed

        def write(file: Path) -> Path:
            return export.save(
                result,
                file,
                format=args.format,
                task=task,
                int4_as_int8=args.int4_as_int8,
                exporter=args.exporter,
            )

        path = rundir.add_file(args.run_dir, out.name, write)
    else:
        path = export.save(
            result, out, format=args.format, task=task, int4_as_int8=args.int4_as_int8, exporter=args.exporter
        )
    print(
        f"wrote {path} ({path.stat().st_size} bytes; plan of {len(result.plan.layers)} layers, "
        f"{task.metric_name} {result.metrics.metric:.4f} as recorded by the run)"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mixq.report import render

    run_dirs = _run_dirs(args.run_dirs)
    path = render(run_dirs, args.out)
    print(f"wrote {path} ({len(run_dirs)} runs; PNG plots beside it)")
    return 0


def _run_dirs(paths: list[str]) -> list[Path]:
    """Run directories, a folder of them (e.g. runs/demo) standing for the run directories in it."""
    from mixq.rundir import METRICS

    out: list[Path] = []
    for p in map(Path, paths):
        inner = sorted(d for d in p.iterdir() if (d / METRICS).is_file()) if p.is_dir() else []
        out += inner if inner and not (p / METRICS).is_file() else [p]
    return out


_TASK_HELP = (
    f"a built-in task ({', '.join(tasks.TASKS)}) or module:function, an importable function "
    "returning a mixq.Task (recorded in the run directory, so eval and export find it again)"
)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser."""
    p = argparse.ArgumentParser(
        prog="mixq",
        description="Mixed-precision quantization of PyTorch models: every method behind one interface.",
        epilog="`mixq COMMAND --help` describes a command; `mixq list` the names and the candidate grammar.",
    )
    p.add_argument("--version", action="version", version=f"mixq {__version__}")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="log every step (INFO messages of all modules)"
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress lines in logs (MIXQ_PROGRESS=0 also hides a terminal's bars)",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", help="one of:")
    _run_parser(sub)
    d = sub.add_parser("demo", help="a few methods on the real MNIST CNN at two budgets (about two minutes)")
    d.add_argument(
        "--out", default="runs/demo", help="folder for the run directories and the report (runs/demo)"
    )
    d.set_defaults(fn=cmd_demo)
    e = sub.add_parser("eval", help="evaluate a run directory's model, or a saved plan on a task")
    e.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a directory written by `mixq run --out`")
    e.add_argument("--task", help=_TASK_HELP + "; with RUN_DIR: replaces the task the run recorded")
    e.add_argument("--plan", help="a plan.json to evaluate on --task (instead of a RUN_DIR)")
    e.set_defaults(fn=cmd_eval)
    ls = sub.add_parser("list", help="list tasks, methods, formats, budgets, PTQ steps, candidate grammar")
    ls.set_defaults(fn=cmd_list)
    rp = sub.add_parser("report", help="render run directories as an HTML report with PNG plots")
    rp.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="directories written by `mixq run --out`, or folders of them (e.g. runs/demo)",
    )
    rp.add_argument("--out", default="runs/report", help="folder for report.html and the plots (runs/report)")
    rp.set_defaults(fn=cmd_report)
    x = sub.add_parser(
        "export",
        help="export a run's quantized model: packed safetensors, ONNX QDQ or hf (compressed-tensors)",
    )
    x.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `mixq run --out`")
    x.add_argument("--format", choices=FORMATS, default="safetensors", help="file format (safetensors)")
    x.add_argument(
        "--out",
        help="file to write (default RUN_DIR/model.safetensors, model.onnx, or the folder RUN_DIR/hf)",
    )
    x.add_argument("--task", help=_TASK_HELP + "; replaces the task the run recorded")
    x.add_argument(
        "--exporter",
        choices=("dynamo", "torchscript"),
        default="dynamo",
        help="ONNX: torch.export's dynamo exporter (default) or the legacy TorchScript one (a fallback)",
    )
    x.add_argument(
        "--int4-as-int8",
        action="store_true",
        help="ONNX: store 2-4 bit weight codes in INT8 (ONNX Runtime's integer kernels; larger file)",
    )
    x.set_defaults(fn=cmd_export)
    return p


def _run_parser(sub: Any) -> None:
    r = sub.add_parser("run", help="quantize a task's model with one method under a budget")
    r.add_argument("--recipe", help="a TOML recipe (command-line options override it)")
    r.add_argument("--task", help=_TASK_HELP)
    r.add_argument("--method", help=f"one of {', '.join(METHODS)} (default uniform)")
    r.add_argument(
        "--candidates", help="comma-separated candidate names, e.g. w2,w4,w8 (grammar: `mixq list`)"
    )
    r.add_argument(
        "--budget",
        action="append",
        help=f"KEY=VALUE, e.g. avg_weight_bits=3; keys: {', '.join(cost.BUDGET_KEYS)}",
    )
    r.add_argument("--method-arg", action="append", help="KEY=VALUE for a field of the method's Config")
    r.add_argument("--seed", type=int, help="random seed of the run (default 0)")
    r.add_argument("--out", help="run directory (default runs/latest)")
    r.add_argument(
        "--overwrite",
        action="store_true",
        help="clear --out when it holds another run (a run of the same settings resumes without it)",
    )
    r.add_argument(
        "--ptq",
        help=f"comma-separated PTQ steps in order, of {', '.join(ptq.STEPS)}; adaround's default "
        "20000 iterations per layer take long on a CPU (--ptq-arg adaround.iters=2000)",
    )
    r.add_argument("--ptq-arg", action="append", help="STEP.KEY=VALUE, e.g. adaround.iters=2000")
    r.add_argument(
        "--target",
        choices=tuple(ptq.TARGETS),
        help="the runtime the plan is for: onnx ends the PTQ steps with int32_bias (ONNX Runtime's "
        "int32 biases), so the simulated metric is the deployed one",
    )
    r.add_argument(
        "--adds",
        help="quantize residual additions' operands with this candidate's input "
        "spec, e.g. a8 (integer additions in ONNX Runtime)",
    )
    r.add_argument(
        "--embeddings",
        action="store_true",
        default=None,
        help="quantize nn.Embedding weights too (weight-only, per row)",
    )
    r.add_argument(
        "--exclude",
        action="append",
        help="keep layers matching this pattern float (fnmatch on qualified names, e.g. lm_head or "
        "'*.embed_tokens'; repeatable); counted as float in every budget",
    )
    r.add_argument(
        "--no-fold-bn",
        dest="fold_bn",
        action="store_false",
        default=None,
        help="keep batch norm as it is (by default it is folded into the conv or linear layer before it)",
    )
    r.add_argument(
        "--executor",
        choices=("inprocess", "ray"),
        help="where sensitivity jobs run (inprocess, the default; ray: pip install mixq[ray])",
    )
    r.add_argument("--address", help="with --executor ray: a running Ray cluster (HOST:PORT or auto)")
    r.add_argument("--workers", type=int, help="with --executor ray: CPUs of the local Ray cluster")
    r.set_defaults(fn=cmd_run)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line and exit with status 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    # progress lines (mixq.progress: one per unit of work, where no bar is drawn) unless --quiet
    logging.getLogger("mixq.progress").setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"mixq: error: {e}", file=sys.stderr)
        return 2
