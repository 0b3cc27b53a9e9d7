"""Test the run directory's one schema: what mixq.run writes, what report and export read back."""

import csv
import doctest
import json

import pytest

import mixq
from mixq import export, metrics, rundir
from mixq.metrics import Metrics
from mixq.report import load_run

CANDS = ["w2", "w4", "w8"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("rundir") / "run"
    res = mixq.run("synthetic-mlp", "uniform", CANDS, {"avg_weight_bits": 5}, out=d)
    return res, d


def test_doctests():
    assert doctest.testmod(metrics).failed == 0


def test_metrics_json_is_the_schema_and_the_metrics(run):
    res, d = run
    data = json.loads((d / rundir.METRICS).read_text())
    assert data.pop("schema") == rundir.SCHEMA
    assert data == json.loads(json.dumps(res.metrics.to_dict(), default=str))
    keys = list(data)
    assert keys[:6] == ["task", "method", "method_args", "candidates", "budget", "seed"]
    assert keys[-3:] == ["within_avg_weight_bits", "history", "ptq"]
    assert Metrics.from_dict(data) == res.metrics


def test_layers_csv_has_the_schema_columns_and_reads_back(run):
    res, d = run
    with (d / rundir.LAYERS).open(newline="") as f:
        assert tuple(next(csv.reader(f))) == rundir.LAYER_COLUMNS
    rows = rundir.read_layers(d / rundir.LAYERS)
    assert [r.name for r in rows] == ["0", "2", "4"]
    assert [r.spec for r in rows] == [res.plan.layers[r.name].name for r in rows]
    assert all(r.macs > 0 and r.weight_bits > 0 for r in rows)
    assert load_run(d).layers == rows


def test_a_directory_without_schema_still_reads(run, tmp_path):
    _, d = run
    old = tmp_path / "old"
    old.mkdir()
    for f in (rundir.PLAN, rundir.LAYERS, rundir.MODEL):
        (old / f).write_bytes((d / f).read_bytes())
    data = json.loads((d / rundir.METRICS).read_text())
    del data["schema"]
    (old / rundir.METRICS).write_text(json.dumps(data))
    assert load_run(old).metrics == load_run(d).metrics
    assert rundir.load_metrics(old) == rundir.load_metrics(d)
    result, _ = export.rebuild(old)
    assert result.metrics.metric == data["metric"] == result.metrics.extra["recorded_metric"]


def test_a_newer_schema_is_refused(run, tmp_path):
    _, d = run
    data = json.loads((d / rundir.METRICS).read_text())
    (tmp_path / rundir.METRICS).write_text(json.dumps({**data, "schema": rundir.SCHEMA + 1}))
    with pytest.raises(ValueError, match="newer"):
        load_run(tmp_path)


def test_metrics_round_trip_keeps_extra_and_absent_fields():
    d = {
        "task": "t",
        "method": "plan",
        "metric_name": "acc",
        "metric": 1.5,
        "eval_seconds": 0.1,
        "layers": 3,
        "within_bops": False,
        "recorded_metric": 1.25,
    }
    m = Metrics.from_dict(d)
    assert m.within == {"bops": False} and m.extra == {"recorded_metric": 1.25} and m.seed is None
    assert m.to_dict() == d and list(m.to_dict()) == list(d)
    with pytest.raises(ValueError, match="method"):
        Metrics.from_dict({"task": "t"})
