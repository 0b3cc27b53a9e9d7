"""Test the command-line interface in-process (mixq.cli.main) and once as `python -m mixq`."""

import argparse
import json
import logging
import subprocess
import sys

import pytest

import mixq
from mixq import cli, cost, formats, ptq, tasks
from mixq.methods import METHODS
from mixq.plan import Plan

KEYS = ("metric", "avg_weight_bits", "size_bytes", "bops", "seconds")
ARGS = "--task synthetic-mlp --method uniform --candidates w4,w8 --budget avg_weight_bits=6".split()


def check_run_dir(d):
    metrics = json.loads((d / "metrics.json").read_text())
    for k in KEYS:
        assert isinstance(metrics[k], float), k
    assert metrics["avg_weight_bits"] <= 6
    plan = Plan.load(d / "plan.json", layer_names=["0", "2", "4"])
    assert plan.summary() == {"w4": 3}  # w8 is over the budget
    assert metrics["candidates"] == ["w4", "w8"] and metrics["budget"] == {"avg_weight_bits": 6.0}
    return metrics


def test_run_with_options(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", *ARGS, "--out", str(out)]) == 0
    m = check_run_dir(out)
    for f in ("layers.csv", "report.md", "recipe.json"):
        assert (out / f).is_file()
    printed = capsys.readouterr().out
    assert f"{m['metric']:.4f}" in printed and "plan.json" in printed


def test_run_from_recipe(tmp_path):
    out = tmp_path / "from-recipe"
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        'task = "synthetic-mlp"\nmethod = "uniform"\ncandidates = ["w4", "w8"]\n'
        f'out = "{out.as_posix()}"\nseed = 0\n[budget]\navg_weight_bits = 6\n'
        '[method_args]\nselect = "loss"\n'
    )
    assert cli.main(["run", "--recipe", str(recipe)]) == 0
    m = check_run_dir(out)
    assert m["method_args"] == {"select": "loss"}
    # command-line options override the recipe
    out2 = tmp_path / "override"
    assert cli.main(["run", "--recipe", str(recipe), "--candidates", "w3,w4", "--out", str(out2)]) == 0
    assert json.loads((out2 / "metrics.json").read_text())["candidates"] == ["w3", "w4"]


def test_recipe_with_unknown_key(tmp_path, capsys):
    recipe = tmp_path / "bad.toml"
    recipe.write_text('task = "synthetic-mlp"\ncandidates = ["w4"]\nbudgett = {avg_weight_bits = 4}\n')
    assert cli.main(["run", "--recipe", str(recipe), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "budgett" in err and "budget" in err.replace("budgett", "") and err.startswith("mixq: error:")
    assert not (tmp_path / "x").exists()
    recipe.write_text("task = [unclosed\n")
    assert cli.main(["run", "--recipe", str(recipe)]) == 2
    assert "bad.toml" in capsys.readouterr().err


def test_adds_reach_the_run_and_a_model_without_additions_says_so(tmp_path, capsys):
    assert cli.main(["run", *ARGS, "--adds", "a8", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "quantizes residual additions" in err and "mixq.nn.Add()" in err
    recipe = tmp_path / "adds.toml"
    recipe.write_text('task = "synthetic-mlp"\ncandidates = ["w4"]\nadds = "a8"\n')
    assert cli.main(["run", "--recipe", str(recipe), "--out", str(tmp_path / "b")]) == 2
    assert "mixq.nn.Add()" in capsys.readouterr().err


def test_embeddings_option_reaches_the_run_and_its_recipe(tmp_path):
    assert cli.main(["run", *ARGS, "--embeddings", "--out", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "recipe.json").read_text())["embeddings"] is True
    recipe = tmp_path / "emb.toml"
    recipe.write_text('task = "synthetic-mlp"\ncandidates = ["w4"]\nembeddings = "yes"\n')
    assert cli.main(["run", "--recipe", str(recipe), "--out", str(tmp_path / "f")]) == 2


def test_target_option_reaches_the_run_and_its_recipe(tmp_path, capsys):
    assert (
        cli.main(["run", *ARGS[:2], "--candidates", "w8a8", "--target", "onnx", "--out", str(tmp_path / "t")])
        == 0
    )
    assert json.loads((tmp_path / "t" / "recipe.json").read_text())["target"] == "onnx"
    assert [r["step"] for r in json.loads((tmp_path / "t" / "metrics.json").read_text())["ptq"]] == [
        "int32_bias"
    ]
    with pytest.raises(SystemExit):  # argparse refuses it, naming the choices
        cli.main(["run", *ARGS, "--target", "tflite", "--out", str(tmp_path / "u")])
    assert "--target: invalid choice: 'tflite'" in capsys.readouterr().err


def test_bad_candidate_exits_2(tmp_path, capsys):
    code = cli.main(["run", "--task", "synthetic-mlp", "--candidates", "w4,w9", "--out", str(tmp_path / "y")])
    assert code == 2
    captured = capsys.readouterr()
    assert "'w9'" in captured.err and "2..8" in captured.err
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--task", "nope", "--candidates", "w4"], "synthetic-mlp"),
        (["--task", "synthetic-mlp", "--candidates", "w4", "--method", "nope"], "uniform"),
        (["--task", "synthetic-mlp", "--candidates", "w4", "--budget", "avg_weight_bits"], "KEY=VALUE"),
        (["--task", "synthetic-mlp", "--candidates", "w4", "--budget", "bits=3"], "avg_weight_bits"),
        (["--task", "synthetic-mlp", "--candidates", "w4", "--budget", "bops=1"], "smallest feasible"),
        (["--candidates", "w4"], "--task"),
    ],
)
def test_user_errors_exit_2(tmp_path, capsys, args, needle):
    assert cli.main(["run", *args, "--out", str(tmp_path / "z")]) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize(
    "line, key",
    [("budget = 4", "budget"), ("method_args = 3", "method_args"), ('task = 3\nmethod = "uniform"', "task")],
)
def test_recipe_values_of_the_wrong_type_exit_2(tmp_path, capsys, line, key):
    recipe = tmp_path / "typed.toml"
    lines = ['candidates = ["w4"]', line] + ([] if line.startswith("task") else ['task = "synthetic-mlp"'])
    recipe.write_text("\n".join(lines) + "\n")
    assert cli.main(["run", "--recipe", str(recipe), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixq: error:") and key in err


def test_list(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in [*tasks.TASKS, *METHODS, *formats.FORMAT_NAMES, "avg_weight_bits", "bops", "w4a8"]:
        assert name in out, name


def test_eval_prints_the_metric(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", *ARGS, "--out", str(out)]) == 0
    ran = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert cli.main(["eval", "--task", "synthetic-mlp", "--plan", str(out / "plan.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["metric"] == ran["metric"]
    assert printed["avg_weight_bits"] == ran["avg_weight_bits"]
    # a plan for another model is rejected with the layer names
    assert cli.main(["eval", "--task", "synthetic-cnn", "--plan", str(out / "plan.json")]) == 2
    assert "conv1" in capsys.readouterr().err
    assert cli.main(["eval", "--task", "synthetic-mlp", "--plan", str(tmp_path / "missing.json")]) == 2


def test_python_m_mixq_list():
    r = subprocess.run([sys.executable, "-m", "mixq", "list"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "synthetic-mlp" in r.stdout and "uniform" in r.stdout and "mxfp4_e2m1" in r.stdout


def test_demo_settings_are_valid():
    from mixq.api import method_config
    from mixq.cli import DEMO_BUDGETS, DEMO_CANDIDATES, DEMO_METHODS, DEMO_QAT_CANDIDATES, DEMO_TASK
    from mixq.plan import parse_candidate

    for method, m in METHODS.items():
        method_config(method, m.demo_args)  # raises on an unknown setting
    for c in DEMO_CANDIDATES + DEMO_QAT_CANDIDATES:
        parse_candidate(c)
    assert set(DEMO_METHODS) <= set(METHODS) and 1 <= len(DEMO_BUDGETS) <= 2
    assert DEMO_TASK in tasks.TASKS and set(tasks.SIZES[DEMO_TASK]) == {"val_size", "calib_size"}


def test_demo_runs_prints_progress_and_ends_with_the_report_and_make_bench(tmp_path, capsys, monkeypatch):
    small = tasks.get("synthetic-mlp")
    small.info["val_images"] = 64
    monkeypatch.setattr(tasks, "get", lambda name, **sizes: small)  # the demo's flow on a tiny task
    monkeypatch.setattr(cli, "DEMO_METHODS", ["uniform"])
    monkeypatch.setattr(cli, "DEMO_BUDGETS", [6.0, 8.0])
    monkeypatch.setattr(cli, "DEMO_CANDIDATES", ["w4", "w8"])
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[1/2] uniform at avg_weight_bits <= 6" in printed and "[2/2] uniform" in printed
    last = printed.strip().splitlines()[-4:]
    assert (
        last[0].startswith(f"run directories: {out}/") and (out / "uniform-avg6" / "metrics.json").is_file()
    )
    assert last[1] == f"HTML report:     {out / 'report' / 'report.html'}"
    assert (out / "report" / "report.html").is_file()
    assert last[2].endswith("make bench") and last[3].startswith("done in ")
    # the folder stands for its run directories in `mixq report` (summary files and report/ skipped)
    assert cli.main(["report", str(out), "--out", str(tmp_path / "again")]) == 0
    assert "(2 runs;" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"mixq {mixq.__version__}"


def test_every_option_has_help_and_names_its_choices():
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, p in [("mixq", parser), *sub.choices.items()]:
        for action in p._actions:
            assert action.help, (name, action.option_strings or action.dest)
    helps = {name: p.format_help() for name, p in sub.choices.items()}
    # argparse may wrap a line after a hyphen ("fashion-" / "resnet20"): joined without the space
    flat = {name: " ".join(text.split()).replace("- ", "-") for name, text in helps.items()}
    for word in [*METHODS, *tasks.TASKS, *ptq.STEPS, *cost.BUDGET_KEYS, "module:function"]:
        assert word in flat["run"], word
    for word in ["safetensors", "onnx", "module:function"]:
        assert word in flat["export"], word
    assert "module:function" in flat["eval"]


def test_budget_of_a_flag_is_an_error(tmp_path, capsys):
    args = ["run", "--task", "synthetic-mlp", "--candidates", "w4", "--budget", "avg_weight_bits=true"]
    assert cli.main([*args, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err  # one line naming the budget, the expected type and the value
    assert err.count("\n") == 1 and err.startswith("mixq: error: recipe: budget must be dict[str, float]")
    assert "'avg_weight_bits': True" in err
    with pytest.raises(ValueError, match="budget avg_weight_bits=True is not a number"):  # the Python API
        mixq.run("synthetic-mlp", "uniform", ["w4"], {"avg_weight_bits": True})


def test_quiet_silences_progress_lines():
    progress_log = logging.getLogger("mixq.progress")
    try:
        cli.main(["list"])
        assert progress_log.getEffectiveLevel() == logging.INFO  # one line per unit of work in logs
        cli.main(["-q", "list"])
        assert progress_log.getEffectiveLevel() == logging.WARNING  # slow-stage warnings stay
    finally:
        progress_log.setLevel(logging.NOTSET)


TASK_MODULE = """
import mixq


def make():
    task = mixq.tasks.get("synthetic-mlp")
    task.name = "my-mlp"
    return task


def not_a_task():
    return 3
"""


@pytest.fixture
def own_task(tmp_path, monkeypatch):
    """A module of one's own in the current directory (not on sys.path: found as `python -m` would)."""
    (tmp_path / "fd_own_tasks.py").write_text(TASK_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "fd_own_tasks", raising=False)
    return "fd_own_tasks:make"


def test_task_of_ones_own_runs_evaluates_and_exports_by_reference(tmp_path, capsys, own_task):
    out = tmp_path / "run"
    args = ["--candidates", "w4,w8", "--budget", "avg_weight_bits=6", "--out", str(out)]
    assert cli.main(["run", "--task", own_task, *args]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "my-mlp" and metrics["task_reference"] == own_task
    assert json.loads((out / "recipe.json").read_text())["task"] == own_task
    capsys.readouterr()
    assert cli.main(["eval", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["metric"] == metrics["metric"]
    assert cli.main(["export", str(out), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").stat().st_size > 0
    assert cli.main(["eval", "--task", own_task, "--plan", str(out / "plan.json")]) == 0
    recipe = tmp_path / "own.toml"  # a recipe names it the same way
    recipe.write_text(f'task = "{own_task}"\ncandidates = ["w4"]\nout = "{(tmp_path / "r").as_posix()}"\n')
    assert cli.main(["run", "--recipe", str(recipe)]) == 0
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["task_reference"] == own_task


def test_a_python_run_with_a_task_object_is_named_on_the_command_line(tmp_path, capsys, own_task):
    task = tasks.get("synthetic-mlp")
    task.name = "my-mlp"
    out = tmp_path / "py"
    mixq.run(task, candidates=["w4", "w8"], budget={"avg_weight_bits": 6}, out=out)
    assert cli.main(["eval", str(out)]) == 2
    assert "'my-mlp', not a built-in one: name it as module:function" in capsys.readouterr().err
    assert cli.main(["eval", str(out), "--task", own_task]) == 0
    assert cli.main(["export", str(out), "--task", own_task, "--out", str(tmp_path / "m.safetensors")]) == 0


@pytest.mark.parametrize(
    "ref, needle",
    [
        ("fd_own_tasks:nope", "has no 'nope'"),
        ("fd_own_tasks:not_a_task", "must be a function returning a mixq.Task, got int"),
        ("fd_no_such_module:make", "fd_no_such_module"),
    ],
)
def test_bad_task_reference_exits_2(tmp_path, capsys, own_task, ref, needle):
    assert cli.main(["run", "--task", ref, "--candidates", "w4", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixq: error:") and needle in err and len(err.strip().splitlines()) == 1
