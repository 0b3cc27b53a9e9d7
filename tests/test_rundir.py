"""Test the run directory's one schema: what mixq.run writes, what report and export read back."""

import csv
import doctest
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import mixq
from mixq import cli, export, metrics, rundir, tasks
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
    assert doctest.testmod(rundir).failed == 0


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


# -- one run per directory (issue #29) ------------------------------------------------------------

SRC = str(Path(__file__).resolve().parents[1] / "src")
DDQ = ["--task", "synthetic-mlp", "--method", "ddq", "--candidates", "w2,w4,w8", "--method-arg", "steps=12"]


def cli_run(*argv: str) -> list[str]:
    return ["run", "--task", "synthetic-mlp", "--candidates", "w2,w4,w8", *argv]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mixq: error: "), err
    return err[0]


def test_kill_and_resume_with_a_changed_configuration(tmp_path, sigkill_when, capsys, caplog):
    d = tmp_path / "run"
    argv = ["run", *DDQ, "--budget", "avg_weight_bits=5", "--out", str(d)]
    cmd = [
        sys.executable,
        "-c",
        f"import sys; sys.path.insert(0, {SRC!r}); from mixq.cli import main; main()",
    ]
    sigkill_when([*cmd, *argv], (d / "train" / "search" / "train_state.pt").is_file, "wrote no checkpoint")
    assert not (d / rundir.MANIFEST).exists() and (d / rundir.LOCK).is_file()  # killed mid-run
    with pytest.raises(rundir.RunDirError, match="incomplete run"):
        rundir.read_metrics(d)
    # another budget, another candidate set: refused, naming what differs (the dead run's lock is stale)
    assert cli.main(["run", *DDQ, "--budget", "avg_weight_bits=6", "--out", str(d)]) == 2
    line = error_line(capsys)
    assert "holds another run (budget: {'avg_weight_bits': 5.0} there, {'avg_weight_bits': 6.0} here)" in line
    assert "--overwrite" in line
    assert cli.main([a if a != "w2,w4,w8" else "w2,w8" for a in argv]) == 2
    assert "candidates: ['w2', 'w4', 'w8'] there, ['w2', 'w8'] here" in error_line(capsys)
    assert (d / "train" / "search" / "train_state.pt").is_file()  # nothing was touched
    # the same configuration resumes, and says so at the default log level (warnings)
    assert cli.main(argv) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for said in ("replacing the stale lock", "resuming the run in", "resumed ddq search at step"):
        assert any(said in w for w in warned), (said, warned)
    resumed = rundir.load_metrics(d)
    fresh = mixq.run("synthetic-mlp", "ddq", CANDS, {"avg_weight_bits": 5}, method_args={"steps": 12})
    assert resumed.metric == fresh.metrics.metric and resumed.avg_weight_bits == fresh.metrics.avg_weight_bits


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path):
    from mixq.train import Checkpoint, TrainConfig, train

    def job(key):
        model = torch.nn.Linear(2, 1)
        loss = lambda m, b: (m(b) ** 2).mean()  # noqa: E731
        groups = [{"params": model.parameters(), "lr": 0.1}]
        return train(
            model, loss, [torch.ones(3, 2)], groups, TrainConfig(steps=2), None, Checkpoint(tmp_path, key)
        )

    assert job("a").resumed_from == 0 and job("a").resumed_from == 2
    with pytest.raises(ValueError, match="written by another configuration"):
        job("b")


def test_two_concurrent_writers_the_second_fails_at_once(tmp_path, capsys):
    d = tmp_path / "run"
    holding, done = threading.Event(), threading.Event()

    def first() -> None:  # a writer that holds the directory until told to finish
        with rundir.writing(d, {"first": 1}):
            holding.set()
            done.wait(60)

    writer = threading.Thread(target=first)
    writer.start()
    try:
        assert holding.wait(60)
        assert (d / rundir.LOCK).read_text() == f"{os.getpid()}\n"
        with pytest.raises(
            rundir.RunDirError, match=rf"being written by another mixq run \(pid {os.getpid()}"
        ):
            mixq.run("synthetic-mlp", "uniform", CANDS, out=d)
        assert cli.main(cli_run("--out", str(d))) == 2
        assert "being written by another mixq run" in error_line(capsys)
        assert sorted(p.name for p in d.iterdir()) == [rundir.LOCK, rundir.CONFIG]  # the first's only
    finally:
        done.set()
        writer.join()
    assert not (d / rundir.LOCK).exists()  # released
    mixq.run("synthetic-mlp", "uniform", CANDS, out=d)  # the first wrote nothing but run.json
    assert rundir.load_metrics(d).method == "uniform"


def test_a_run_that_stopped_before_writing_anything_leaves_the_directory_free(tmp_path):
    d = tmp_path / "run"
    with pytest.raises(mixq.search.InfeasibleBudgetError):
        mixq.run("synthetic-mlp", "uniform", CANDS, {"avg_weight_bits": 1}, out=d)
    assert sorted(p.name for p in d.iterdir()) == [rundir.CONFIG]  # no lock left, no result
    with pytest.raises(rundir.RunDirError, match="incomplete run"):
        load_run(d)
    mixq.run("synthetic-mlp", "uniform", CANDS, {"avg_weight_bits": 5}, out=d)
    assert rundir.load_metrics(d).budget == {"avg_weight_bits": 5.0}


def test_a_stale_lock_is_replaced(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    d = tmp_path / "run"
    d.mkdir()
    (d / rundir.LOCK).write_text(f"{gone.pid}\n")
    with caplog.at_level(logging.WARNING):
        mixq.run("synthetic-mlp", "uniform", CANDS, out=d)
    assert f"stale lock {d / rundir.LOCK} of process {gone.pid}" in caplog.text
    assert not (d / rundir.LOCK).exists() and rundir.load_metrics(d).method == "uniform"


def test_stale_files_of_an_earlier_run_are_not_read(tmp_path, capsys):
    ilp, d = tmp_path / "ilp", tmp_path / "run"
    mixq.run("synthetic-mlp", "sensitivity-ilp", CANDS, {"avg_weight_bits": 5}, out=ilp)
    assert load_run(ilp).sensitivity is not None
    # a uniform run over the ilp run's directory: refused, then cleared with --overwrite
    with pytest.raises(rundir.RunDirError, match="method: 'sensitivity-ilp' there, 'uniform' here"):
        mixq.run("synthetic-mlp", "uniform", CANDS, out=ilp)
    assert cli.main(["export", str(ilp), "--format", "onnx"]) == 0  # into the run: listed
    assert "model.onnx" in json.loads((ilp / rundir.MANIFEST).read_text())["files"]
    mixq.run("synthetic-mlp", "uniform", CANDS, out=ilp, overwrite=True)
    assert not (ilp / rundir.SENSITIVITY).exists() and not (ilp / "model.onnx").exists()
    assert load_run(ilp).sensitivity is None
    assert (ilp / rundir.STORE).is_file()  # the same task's store, reusable by design (jobs keyed per job)
    mixq.run("synthetic-cnn", "uniform", ["w4", "w8"], out=ilp, overwrite=True)
    assert not (ilp / rundir.STORE).exists()  # another task's run: the store goes too
    # a file put beside a run is not the run's: readers ignore it (only the manifest's files count)
    mixq.run("synthetic-mlp", "sensitivity-ilp", CANDS, {"avg_weight_bits": 5}, out=d)
    shutil.copy(d / rundir.SENSITIVITY, ilp / rundir.SENSITIVITY)
    assert load_run(ilp).sensitivity is None
    # a rerun of the same configuration resumes and keeps only its own files
    (d / "model.onnx").write_text("stale")
    mixq.run("synthetic-mlp", "sensitivity-ilp", CANDS, {"avg_weight_bits": 5}, out=d)
    assert not (d / "model.onnx").exists() and load_run(d).sensitivity is not None
    capsys.readouterr()


@pytest.mark.parametrize("option", [{"fold_bn": False}, {"embeddings": True}])
def test_every_setting_that_changes_the_outcome_keys_the_directory(tmp_path, option):
    d = tmp_path / "run"
    mixq.run("synthetic-mlp", "uniform", CANDS, out=d)
    ((name, value),) = option.items()
    with pytest.raises(rundir.RunDirError, match=f"{name}: {not value!r} there, {value!r} here"):
        mixq.run("synthetic-mlp", "uniform", CANDS, out=d, **option)
    mixq.run("synthetic-mlp", "uniform", CANDS, out=d)  # the same settings resume


def test_out_that_is_a_file_or_below_one_is_a_one_line_error(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert cli.main(cli_run("--out", str(f))) == 2
    assert "is a file, not a directory" in error_line(capsys)
    assert cli.main(cli_run("--out", str(f / "run"))) == 2
    assert f"lies below the file '{f}'" in error_line(capsys)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):  # a directory that is not a run's is never cleared
        assert cli.main(cli_run("--out", str(other), *extra)) == 2
        assert "notes.txt" in error_line(capsys)
    assert (other / "notes.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("two")
    for name, cand in (("w4", "w4"), ("w8", "w8")):
        mixq.run("synthetic-mlp", "uniform", [cand], out=base / name)
    return base / "w4", base / "w8"


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_a_flipped_byte_in_the_model_file_is_refused(two_runs, tmp_path, capsys):
    d = copy_run(two_runs[0], tmp_path / "run")
    data = bytearray((d / rundir.MODEL).read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    for i in range(header + 10, header + 110):  # 100 payload bytes
        data[i] ^= 0xFF
    (d / rundir.MODEL).write_bytes(bytes(data))
    for cmd in (["eval", str(d)], ["export", str(d)]):
        assert cli.main(cmd) == 2
        line = error_line(capsys)
        assert f"{d / rundir.MODEL} differs from the run's manifest.json" in line
    with pytest.raises(
        ValueError, match=r"model.safetensors: its payload checksum is .* the file is damaged"
    ):
        export.load(d / rundir.MODEL)
    # the file alone (no manifest) is caught by its own checksum too
    (d / rundir.MANIFEST).unlink()
    (d / rundir.CONFIG).unlink()
    data = json.loads((d / rundir.METRICS).read_text())
    (d / rundir.METRICS).write_text(json.dumps({**data, "schema": 1}))
    assert cli.main(["eval", str(d)]) == 2 and "payload checksum" in error_line(capsys)


def test_a_swapped_model_file_is_refused(two_runs, tmp_path, capsys):
    w4, w8 = two_runs
    d = copy_run(w4, tmp_path / "run")
    shutil.copy(w8 / rundir.MODEL, d / rundir.MODEL)
    assert cli.main(["eval", str(d)]) == 2
    assert "differs from the run's manifest.json" in error_line(capsys)
    # even with a manifest rewritten to list it, the plan hash the file records tells
    m = json.loads((d / rundir.MANIFEST).read_text())
    rundir.write_manifest(d, m["key"], list(m["files"]))
    for cmd in (["eval", str(d)], ["export", str(d)]):
        assert cli.main(cmd) == 2
        assert "it holds the model of another plan" in error_line(capsys)
    with pytest.raises(ValueError, match="another plan"):
        export.load(d / rundir.MODEL, plan=d / rundir.PLAN)
    export.load(w8 / rundir.MODEL, plan=w8 / rundir.PLAN)  # its own plan: fine
    meta = export.read_safetensors(w8 / rundir.MODEL)[0]
    with pytest.raises(ValueError, match="layer '0' holds w8, the run's plan says w4"):
        export.file_costs(d / rundir.MODEL, meta, rundir.read_plan(w4), tasks.get("synthetic-mlp"))


def test_eval_reports_the_bits_and_size_of_the_file(two_runs, capsys):
    for d, bits in zip(two_runs, (4, 8), strict=True):
        capsys.readouterr()
        assert cli.main(["eval", str(d)]) == 0
        out = json.loads(capsys.readouterr().out)
        recorded = rundir.load_metrics(d)
        assert out["model"] == rundir.MODEL and out["metric"] == recorded.metric
        assert out["avg_weight_bits"] == recorded.avg_weight_bits and bits < out["avg_weight_bits"] < bits + 1
        assert out["size_bytes"] == recorded.size_bytes
    meta = export.read_safetensors(two_runs[1] / rundir.MODEL)[0]
    plan = rundir.read_plan(two_runs[1])
    sizes = export.file_costs(two_runs[1] / rundir.MODEL, meta, plan, tasks.get("synthetic-mlp"))
    assert sizes["avg_weight_bits"] == rundir.load_metrics(two_runs[1]).avg_weight_bits


def test_readers_refuse_an_altered_metrics_file_and_read_schema_1(two_runs, tmp_path):
    d = copy_run(two_runs[0], tmp_path / "run")
    data = json.loads((d / rundir.METRICS).read_text())
    (d / rundir.METRICS).write_text(json.dumps({**data, "metric": 99.0}))
    with pytest.raises(rundir.RunDirError, match="metrics.json differs from the run's manifest.json"):
        load_run(d)
    old = tmp_path / "schema1"
    old.mkdir()
    for f in (rundir.PLAN, rundir.LAYERS, rundir.MODEL):
        shutil.copy(two_runs[0] / f, old / f)
    (old / rundir.METRICS).write_text(json.dumps({**data, "schema": 1}))
    assert load_run(old).metrics == load_run(two_runs[0]).metrics
    assert export.rebuild(old)[0].metrics.metric == data["metric"]
