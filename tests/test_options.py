"""Test mixq.run's options object, TOML recipes and the explicit cache a sweep shares."""

import doctest

import pytest

import mixq
from mixq import api, cache, options
from mixq.options import RECIPE_KEYS, Recipe, RunOptions

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
    with pytest.raises(ValueError, match="seed must be an integer"):
        Recipe.from_dict({"task": "t", "seed": "x"})
