"""Tests of the deployment benchmark's export-and-check path (``bench/deploy.py --export-dir`` and
``bench/deploy_target.py``): the files written on one machine are checked on another with numpy and
ONNX Runtime alone, so what they hold must reproduce mixq's simulated outputs and metrics there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def target(load_bench):
    return load_bench("deploy_target")


@pytest.fixture(scope="module")
def deploy(target, load_bench):
    return load_bench("deploy")


def test_time_plans_paired_ratio_is_the_median_of_rounds(target, monkeypatch):
    # a fake clock: each run of "fp32" takes 4 units, "int8" 2 units except one slow round (8)
    durations = iter([4, 2, 4, 2, 4, 2, 4, 8, 4, 2, 4, 2])  # warm-up pair, then 5 rounds
    now = [0.0]

    def clock():
        return now[0]

    def run(_name):
        now[0] += next(durations)

    monkeypatch.setattr(target.time, "perf_counter", clock)
    rows = target.time_plans({"fp32": lambda: run("fp32"), "int8": lambda: run("int8")}, 5, suffix="_b")
    assert rows["fp32"]["speedup_vs_fp32_b"] == 1.0
    assert rows["int8"]["latency_ms_b_all"] == [2000.0, 2000.0, 8000.0, 2000.0, 2000.0]
    assert rows["int8"]["latency_ms_b"] == 2000.0
    assert rows["int8"]["paired_speedup_vs_fp32_b"] == 2.0  # rounds: 2, 2, 0.5, 2, 2
    assert rows["int8"]["paired_speedup_quartiles_b"][0] <= 2.0
    assert set(rows["int8"]) >= {"cpu_ms_b", "cpu_speedup_vs_fp32_b"}


def test_time_plans_rejects_bad_arguments(target):
    with pytest.raises(ValueError, match="baseline 'fp32' is not among the plans: int8"):
        target.time_plans({"int8": lambda: None}, 3)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        target.time_plans({"fp32": lambda: None}, 0)


def test_top1_and_agreement(target):
    outs = np.array([[0.0, 1.0], [2.0, 0.5], [0.1, 0.2]], dtype=np.float32)
    assert target.top1(outs, np.array([1, 0, 0])) == pytest.approx(200 / 3)
    ref = outs.copy()
    ref[2] = [0.3, 0.2]
    got = target.agreement(outs, ref, classifier=True)
    assert got["max_abs_diff"] == pytest.approx(0.2)
    assert got["top1_agreement"] == pytest.approx(2 / 3)


def test_export_dir_reproduces_the_simulation_in_onnx_runtime(deploy, target, tmp_path, monkeypatch):
    """Exported files, checked by the numpy/ONNX Runtime-only script, give the simulated metrics."""
    monkeypatch.setattr(deploy, "PLANS", {k: deploy.PLANS[k] for k in ("fp32", "int8-w7a8")})
    monkeypatch.setattr(deploy, "INT8_STORAGE", {})
    entry = deploy.export_task("mnist-cnn", tmp_path, val=300)
    assert set(entry["plans"]) == {"fp32", "int8-w7a8", "int8-w7a8-float-input"}
    (tmp_path / target.MANIFEST).write_text(json.dumps({"tasks": {"mnist-cnn": entry}}))
    got = target.check_task(tmp_path, "mnist-cnn", entry, repeats=2, threads=1)
    assert got["val_samples"] == 300
    for plan, row in got["plans"].items():
        sim = entry["plans"][plan]["simulated_metric"]
        assert row["simulated_metric_here"] == pytest.approx(sim, abs=1e-9), plan
        assert row["ort_reference_metric"] == pytest.approx(sim, abs=1e-9), plan
        assert row["ort_fused_metric"] == pytest.approx(sim, abs=1e-9), plan
        assert row["ort_reference_vs_simulated"]["top1_agreement"] == 1.0
        assert row["ort_reference_vs_simulated"]["max_abs_diff"] < 0.1
        assert row["latency_ms_batch256"] > 0 and len(row["latency_ms_batch1_all"]) == 2
        assert row["ort_fused_metric_minus_emulated"] == 0.0, plan
        assert row["ort_fused_vs_emulated"]["top1_agreement"] == 1.0
        assert row["ort_fused_vs_emulated"]["max_abs_diff"] < 1e-3  # float Gemm at the end only
    assert got["plans"]["fp32"]["ort_fused_vs_simulated"]["max_abs_diff"] < 1e-3
    assert got["plans"]["fp32"]["paired_speedup_vs_fp32_batch256"] == 1.0


def test_check_task_names_a_kind_it_does_not_check(target, tmp_path):
    with pytest.raises(SystemExit, match="kind 'embedding' is not checked here; valid: classifier"):
        target.check_task(tmp_path, "minilm", {"kind": "embedding"}, repeats=1, threads=1)


def test_time_batch_adds_each_plans_times_to_its_row_and_prints_them(target, monkeypatch, capsys):
    fed = []

    class Session:
        def run(self, outputs, feed):
            fed.append((outputs, feed))

    def time_plans(runs, repeats, suffix):
        for run in runs.values():
            run()
        return {p: {f"latency_ms{suffix}": 2.0, f"cpu_ms{suffix}": 1.0 + (p == "int8")} for p in runs}

    monkeypatch.setattr(target, "time_plans", time_plans)
    rows = {"fp32": {"metric": 1.0}, "int8": {}}
    feed = {"x": np.zeros(2)}
    sessions = {"fp32": Session(), "int8": Session()}
    target.time_batch("net", sessions, feed, 4, 3, rows, lambda t: f"cpu {t['cpu_ms_batch4']:.2f}")
    assert rows == {
        "fp32": {"metric": 1.0, "latency_ms_batch4": 2.0, "cpu_ms_batch4": 1.0},
        "int8": {"latency_ms_batch4": 2.0, "cpu_ms_batch4": 2.0},
    }
    assert fed == [(None, feed), (None, feed)]
    assert (
        capsys.readouterr().out == f"{'net':20s} batch 4: fp32 2.00 ms (cpu 1.00), int8 2.00 ms (cpu 2.00)\n"
    )
