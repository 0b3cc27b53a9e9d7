"""Test mixq.run's options object, TOML recipes, the explicit cache a sweep shares, and typed
settings at every boundary (method and PTQ configs, recipes, the command line, the Python API)."""

import dataclasses
import doctest
import functools
import typing
from pathlib import Path

import pytest

import mixq
from mixq import api, cache, cli, options
from mixq.options import RECIPE_KEYS, Recipe, RunOptions, check_types

CANDS = ["w3+asym+mse", "w4+asym+omse", "w8"]
MLP = ("synthetic-mlp", "uniform", CANDS, {"avg_weight_bits": 5})


def test_doctests():
    assert doctest.testmod(options).failed == 0
    assert doctest.testmod(cache).failed == 0


def test_unknown_keyword_lists_the_valid_options():
    with pytest.raises(ValueError, match="'sead'.*seed.*ptq_args.*cache"):
        mixq.run("synthetic-mlp", "uniform", ["w4"], sead=3)
    with pytest.raises(ValueError, match="RunOptions"):
        mixq.run("synthetic-mlp", "uniform", ["w4"], options={"seed": 3})


def test_options_object_and_keywords_give_the_same_run():
    opts = RunOptions(seed=2, method_args={"select": "loss"})
    a = mixq.run(*MLP, options=opts)
    b = mixq.run(*MLP, seed=2, method_args={"select": "loss"})
    assert a.plan == b.plan and a.metrics.metric == b.metrics.metric
    assert a.metrics.seed == 2 and a.metrics.method_args["select"] == "loss"
    c = mixq.run(*MLP, options=opts, seed=0)  # keywords win
    assert c.metrics.seed == 0


def test_a_sweep_sharing_a_cache_prepares_and_searches_once(monkeypatch):
    built = []
    prepare = api._prepare
    monkeypatch.setattr(api, "_prepare", lambda *a: built.append(1) or prepare(*a))
    shared = mixq.Cache()
    cnn = ("synthetic-cnn", "uniform", CANDS)
    results = [mixq.run(*cnn, {"avg_weight_bits": b}, cache=shared) for b in (4, 9)]
    assert len(built) == 1 and len(shared) > 0
    searched = len(shared)
    alone = [mixq.run(*cnn, {"avg_weight_bits": b}) for b in (4, 9)]
    assert len(built) == 3 and len(shared) == searched  # each run without one: a fresh cache
    for r, s in zip(results, alone, strict=True):
        assert r.plan == s.plan and r.metrics.metric == s.metrics.metric
    assert cache.current() is None  # no cache outlives its run


def test_evaluate_sharing_a_cache_prepares_and_searches_once(monkeypatch):
    built = []
    prepare = api._prepare
    monkeypatch.setattr(api, "_prepare", lambda *a: built.append(1) or prepare(*a))
    plan = mixq.run(*MLP).plan
    built.clear()
    shared = mixq.Cache()
    results = [mixq.evaluate("synthetic-mlp", plan, cache=shared) for _ in range(2)]
    assert len(built) == 1 and len(shared) > 0  # ranges searched by the first, reused by the second
    searched = len(shared)
    alone = mixq.evaluate("synthetic-mlp", plan)
    assert len(built) == 2 and len(shared) == searched
    with shared.active():  # inside a run: the run's cache by default
        mixq.evaluate("synthetic-mlp", plan)
    assert len(built) == 2
    assert results[0].metrics == results[1].metrics.replace(eval_seconds=results[0].metrics.eval_seconds)
    assert alone.metrics.metric == results[0].metrics.metric
    assert cache.current() is None


def test_recipe_from_toml_is_strict_and_round_trips(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('task = "synthetic-mlp"\ncandidates = ["w4"]\nseed = 0\n[budget]\navg_weight_bits = 4\n')
    r = Recipe.from_toml(f)
    assert (r.task, r.method, r.candidates, r.options.seed) == ("synthetic-mlp", "uniform", ["w4"], 0)
    written = {"task": "synthetic-mlp", "candidates": ["w4"], "seed": 0, "budget": {"avg_weight_bits": 4}}
    assert r.to_dict() == written and r.budget == written["budget"]
    m = r.merged({"ptq": ["cle"], "seed": 3})
    assert m.options.ptq == ["cle"] and m.options.seed == 3 and list(m.to_dict())[-1] == "ptq"
    f.write_text('task = "synthetic-mlp"\ncache = 1\n')
    with pytest.raises(ValueError, match=r"unknown keys \['cache'\]"):
        Recipe.from_toml(f)
    assert "cache" not in RECIPE_KEYS and set(RECIPE_KEYS) < {
        "task",
        "method",
        "candidates",
        "budget",
        *RunOptions.__dataclass_fields__,
    }
    with pytest.raises(ValueError, match=r"seed must be int, got .x."):
        Recipe.from_dict({"task": "t", "seed": "x"})


# -- typed settings (issue #29) -------------------------------------------------------------------


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mixq: error: "), err
    return err[0]


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (
            ["--method", "ddq", "--method-arg", "steps=abc"],
            "method_args of 'ddq': steps must be int, got 'abc' (str)",
        ),
        (
            ["--method", "sensitivity-ilp", "--method-arg", "batches=1.5"],
            "method_args of 'sensitivity-ilp': batches must be int, got 1.5 (float)",
        ),
        (
            ["--ptq", "adaround", "--ptq-arg", "adaround.iters=lots"],
            "ptq_args of 'adaround': iters must be int",
        ),
        (["--candidates", "w4+sym+asym"], "candidate 'w4+sym+asym' sets the symmetric twice (+sym+asym)"),
        (["--candidates", "w4a8,w4a8"], "candidate 'w4a8' is given twice ('w4a8' and 'w4a8')"),
        (["--candidates", "w4a8,w4-a8"], "candidate 'w4a8' is given twice ('w4a8' and 'w4-a8')"),
    ],
)
def test_wrong_values_on_the_command_line_are_one_line_errors(argv, said, tmp_path, capsys):
    base = {"--task": "synthetic-mlp", "--candidates": "w4,w8", "--out": str(tmp_path / "run")}
    for i in range(0, len(argv), 2):
        base[argv[i]] = argv[i + 1]
    assert cli.main(["run", *[x for kv in base.items() for x in kv]]) == 2
    assert said in one_error_line(capsys)
    assert not (tmp_path / "run").exists()  # checked before the run directory is touched


@pytest.mark.parametrize(
    ("toml", "said"),
    [
        ('method = ["uniform"]', "method must be str, got ['uniform'] (list)"),
        ("out = 5", "out must be str or Path or None, got 5 (int)"),
        ('seed = "zero"', "seed must be int, got 'zero' (str)"),
        ("seed = true", "seed must be int, got True (bool)"),
        ('budget = {avg_weight_bits = "4"}', "budget must be dict[str, float] or None"),
        ("candidates = [4, 8]", "candidates must be list[str] or str or None, got [4, 8]"),
        ("ptq_args = {adaround = 3}", "ptq_args must be dict[str, dict[str, Any]] or None"),
        ("method_args = 3", "method_args must be dict[str, Any] or None, got 3 (int)"),
    ],
)
def test_wrong_types_in_a_recipe_name_the_key_the_type_and_the_value(toml, said, tmp_path, capsys):
    f = tmp_path / "r.toml"
    f.write_text(f'task = "synthetic-mlp"\n{toml}\n')
    with pytest.raises(ValueError, match="recipe .*r.toml: ") as e:
        Recipe.from_toml(f)
    assert said in str(e.value)
    assert cli.main(["run", "--recipe", str(f)]) == 2
    assert said in one_error_line(capsys)


def test_wrong_types_in_the_python_api_are_named():
    run = functools.partial(mixq.run, "synthetic-mlp", "uniform", ["w4", "w8"])
    cases = [
        (dict(method_args={"select": 3}), "method_args of 'uniform': select must be str, got 3 (int)"),
        (dict(seed="0"), "mixq.run: seed must be int, got '0' (str)"),
        (dict(out=5), "mixq.run: out must be str or Path or None, got 5"),
        (dict(overwrite="yes"), "mixq.run: overwrite must be bool, got 'yes'"),
        (
            dict(ptq=["cle"], ptq_args={"cle": {"max_sweeps": 2.5}}),
            "ptq_args of 'cle': max_sweeps must be int",
        ),
    ]
    for kwargs, said in cases:
        with pytest.raises(ValueError) as e:
            run(**kwargs)
        assert said in str(e.value), (kwargs, str(e.value))
    with pytest.raises(ValueError, match=r"method_args of 'ddq': steps must be int, got '3' \(str\)"):
        mixq.run("synthetic-mlp", "ddq", ["w4", "w8"], method_args={"steps": "3"})
    with pytest.raises(ValueError, match=r"unknown method \['uniform'\]"):
        mixq.run("synthetic-mlp", ["uniform"], ["w4"])
    with pytest.raises(ValueError, match="candidate 'w4' is given twice"):
        mixq.run("synthetic-mlp", "uniform", ["w4", "w4+sym"])


def test_every_config_annotation_is_checkable():
    """check_types reads each method's and PTQ step's Config annotations: none may be unreadable
    (an unreadable one would silently skip the check), and the defaults conform to them."""
    from mixq.methods import METHODS
    from mixq.ptq import STEPS

    for cls in [m.config for m in METHODS.values()] + [s.config for s in STEPS.values()] + [RunOptions]:
        hints = typing.get_type_hints(cls)
        defaults = {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
        assert set(hints) >= set(defaults)
        assert check_types(cls, defaults, cls.__name__) == defaults


def test_check_types_accepts_what_the_annotations_allow():
    assert check_types(RunOptions, {"seed": 3, "out": Path("x"), "ptq": "cle"}, "t") == {
        "seed": 3,
        "out": Path("x"),
        "ptq": "cle",
    }
    from mixq.methods.ddq import Config

    converted = check_types(Config, {"epochs": 2, "time_limit": None}, "t")
    assert converted == {"epochs": 2.0, "time_limit": None} and isinstance(converted["epochs"], float)
    with pytest.raises(ValueError, match=r"t: learn_bits must be bool, got 1 \(int\)"):
        check_types(Config, {"learn_bits": 1}, "t")
    with pytest.raises(ValueError, match=r"t: time_limit must be float or None, got 'soon'"):
        check_types(Config, {"time_limit": "soon"}, "t")
