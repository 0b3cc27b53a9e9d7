"""Test the command-line interface in-process (mixq.cli.main) and once as `python -m mixq`."""

import json
import subprocess
import sys

import pytest

from mixq import cli, formats, tasks
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


def test_demo_covers_every_method_with_valid_settings():
    from mixq.api import method_config
    from mixq.cli import DEMO_CANDIDATES, DEMO_QAT_CANDIDATES
    from mixq.methods import METHODS
    from mixq.plan import parse_candidate

    for method, m in METHODS.items():
        method_config(method, m.demo_args)  # raises on an unknown setting
    for c in DEMO_CANDIDATES + DEMO_QAT_CANDIDATES:
        parse_candidate(c)
