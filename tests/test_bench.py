"""Tests of the bench/ package's plumbing: importable as ``bench.X`` without ``sys.path`` edits, the
provenance command of a script run as a module, and the environment the peer drivers run in."""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import bench
from bench import common
from bench.peers import runner

ROOT = Path(__file__).resolve().parent.parent
# The drivers import their tool at the top (it lives in the tool's own venv).
DRIVERS = {"aimet_driver", "mct_driver", "modelopt_driver", "nncf_driver", "nncf219_driver"}


def test_no_bench_file_edits_sys_path():
    offenders = [str(p) for p in (ROOT / "bench").rglob("*.py") if "sys.path" in p.read_text()]
    assert offenders == []


def test_every_bench_module_imports_as_a_package_module():
    names = [m.name for m in pkgutil.walk_packages(bench.__path__, "bench.")]
    expected = {"bench.run_all", "bench.compare_peers", "bench.peers.render", "bench.peers.drivers._common"}
    assert expected <= set(names)
    for name in names:
        if name.rsplit(".", 1)[-1] in DRIVERS:
            continue
        assert importlib.import_module(name).__doc__, f"{name} has no docstring"


def test_no_file_and_folder_share_a_name():
    for folder in [p for p in (ROOT / "bench").rglob("*") if p.is_dir() and p.name != "__pycache__"]:
        assert not folder.with_suffix(".py").exists(), folder


def test_command_of_a_module_run_reads_python_m(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/repo/bench/run_all.py", "--tasks", "mnist-cnn"])
    main = SimpleNamespace(__spec__=SimpleNamespace(name="bench.run_all"))  # python -m bench.run_all
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert common.command().endswith(" -m bench.run_all --tasks mnist-cnn")
    monkeypatch.setitem(sys.modules, "__main__", SimpleNamespace(__spec__=None))  # python path/to/script.py
    assert common.command().endswith(" /repo/bench/run_all.py --tasks mnist-cnn")


def test_driver_environment_puts_this_mixq_and_bench_on_the_path(tmp_path, monkeypatch):
    """A driver runs from a work folder in a venv without mixq: PYTHONPATH alone must find this tree."""
    monkeypatch.setattr(runner, "VENVS", tmp_path / "venvs")
    env = runner.driver_env()
    code = "import mixq, bench.peers.drivers._common as c; print(mixq.__file__); print(c.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert Path(out[0]).resolve() == ROOT / "src" / "mixq" / "__init__.py"
    assert Path(out[1]).resolve() == ROOT / "bench" / "peers" / "drivers" / "_common.py"
    assert env["HF_HUB_OFFLINE"] == "1" and env["HOME"] == str(tmp_path / "venvs" / "home")


@pytest.mark.parametrize("tool", ["modelopt", "mct", "nncf", "aimet", "nncf219"])
def test_each_peer_driver_is_a_module_of_the_drivers_package(tool):
    driver = runner.PEERS[tool].driver
    assert (ROOT / "bench" / "peers" / "drivers" / f"{driver}.py").exists()


def test_merge_parts_keeps_the_first_entry_and_adds_new_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    x8, x4 = {"run": "x", "acts": 8}, {"run": "x", "acts": 4}
    parts = {
        "a": {"provenance": {"command": "a"}, "tasks": {"t": {"rows": [x8], "wall_seconds": 2}}},
        "b": {
            "provenance": {"command": "b"},
            "tasks": {"t": {"rows": [x8, x4], "wall_seconds": 3}, "u": {"rows": [], "wall_seconds": 1}},
        },
    }
    for name, doc in parts.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    tasks, prov = common.merge_parts(["a", "b"], lambda r: (r["run"], r["acts"]), add=("wall_seconds",))
    assert tasks["t"] == {"rows": [{"run": "x", "acts": 8}, {"run": "x", "acts": 4}], "wall_seconds": 5}
    assert tasks["u"]["wall_seconds"] == 1 and [p["command"] for p in prov] == ["a", "b"]
    tasks, _ = common.merge_parts(["a", "b"], lambda r: r["run"])  # by run alone: b adds nothing to t
    assert tasks["t"] == {"rows": [{"run": "x", "acts": 8}], "wall_seconds": 2}


def test_task_entry_and_measures_keep_the_order_of_the_results_files():
    task = SimpleNamespace(metric_name="top1", info={"params": 3})
    t0 = common.time.perf_counter()
    entry = common.task_entry(task, 99.0, [{"run": "x"}], t0, qat_steps=2, val_images=5)
    assert list(entry) == ["metric_name", "fp32", "info", "qat_steps", "val_images", "rows", "wall_seconds"]
    assert entry["metric_name"] == "top1" and entry["fp32"] == 99.0 and entry["qat_steps"] == 2
    assert entry["rows"] == [{"run": "x"}] and entry["wall_seconds"] >= 0.0
    m = common.Metrics(
        task="t", method="uniform", metric=98.5, avg_weight_bits=4.0, size_bytes=10.0, bops=7.0
    )
    got = common.measures(m.replace(seconds=1.5, eval_seconds=0.5))
    assert got == {
        "metric": 98.5,
        "avg_weight_bits": 4.0,
        "size_bytes": 10.0,
        "bops": 7.0,
        "seconds": 1.5,
        "eval_seconds": 0.5,
    }
    assert list(got) == list(common.MEASURES)


def test_compare_sweeps_names_every_differing_field_and_missing_row():
    from bench.compare_sweeps import differences, rows_of

    a = {"t|m|1": {"metric": 1.0, "plan": {"w4": 2}}, "t|m|2": {"metric": 2.0}}
    b = {"t|m|1": {"metric": 1.5, "plan": {"w4": 2}}, "t|m|3": {"metric": 3.0}}
    assert differences(a, b) == [
        {"row": "t|m|1", "field": "metric", "before": 1.0, "after": 1.5},
        {"row": "t|m|2", "field": "row", "before": "present", "after": None},
        {"row": "t|m|3", "field": "row", "before": None, "after": "present"},
    ]
    assert differences(a, a) == []
    results = {"rows": {"t|m|1": {"task": "t"}, "u|m|1": {"task": "u"}}}
    assert list(rows_of(results, "t")) == ["t|m|1"]


def test_exhaustive_walker_counts_every_plan_of_a_model_with_a_conv_subclass():
    import itertools

    import torch
    import torch.nn.functional as F
    from torch import nn

    import mixq
    from bench.exhaustive import Walker
    from mixq.api import prepare
    from mixq.plan import Plan, as_layer_spec

    class SameConv(nn.Conv2d):  # its own forward: a QCall site
        def forward(self, x):
            return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias)

    torch.manual_seed(0)
    model = nn.Sequential(SameConv(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).eval()
    x, y = torch.randn(32, 1, 6, 6), torch.randint(0, 3, (32,))
    task = mixq.Task(model, calib=[(x, y)], val=[(x, y)])
    specs = [as_layer_spec(c) for c in ("w2a8", "w8a8")]
    qmodel, infos = prepare(task, specs)
    layers = [i.name for i in infos]
    counts = Walker(qmodel, layers, specs).correct(x, y)
    for idx in itertools.product(range(len(specs)), repeat=len(layers)):
        plan = Plan({n: specs[j] for n, j in zip(layers, idx, strict=True)})
        assert counts[idx] == round(mixq.evaluate(task, plan).metrics.metric * len(y) / 100), idx


def test_exhaustive_walker_scores_equal_direct_losses_and_variants_are_checked():
    import itertools

    import pytest
    import torch
    from torch import nn

    import mixq
    from bench.exhaustive import Walker, variant
    from mixq.api import prepare
    from mixq.plan import as_layer_spec
    from mixq.wrap import applied

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    task = mixq.Task(model, calib=[(x, y)], val=[(x, y)])
    specs = [as_layer_spec(c) for c in ("w2", "w3", "w8")]
    qmodel, infos = prepare(task, specs)
    layers = [i.name for i in infos]
    with torch.inference_mode():
        logp = torch.log_softmax(model(x), -1)

    def kl(out):
        return float((logp.exp() * (logp - torch.log_softmax(out, -1))).sum(-1).mean())

    values = Walker(qmodel, layers, specs).scores(x, kl)
    for idx in itertools.product(range(len(specs)), repeat=len(layers)):
        with applied(qmodel, {n: specs[j] for n, j in zip(layers, idx, strict=True)}), torch.inference_mode():
            assert values[idx] == pytest.approx(kl(qmodel(x)), rel=1e-5, abs=1e-9), idx
    assert variant("clado+refine")[1]["refine"] > 0 and "refine" not in variant("hawq")[1]
    with pytest.raises(ValueError, match="unknown variant 'clado-x'"):
        variant("clado-x")
