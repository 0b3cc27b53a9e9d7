"""Tests of the peer-tool benchmark ``bench.compare_peers`` (``bench/peers/``) and its driver protocol
``bench/peers/drivers/_common.py``.

The peer tools themselves live in their own venvs and are not needed here: these tests check the
mixq side (format conversion, cost counting, re-evaluation, the comparison with mixq's results)
and the JSON protocol of the drivers with a stand-in tool.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from bench import compare_peers
from bench.common import section, set_section
from bench.peers import measure, points, render, translate, venvs
from mixq import tasks
from mixq.plan import parse_candidate

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def common(load_bench):
    return load_bench("peers.drivers._common")


def W(bits, gran="channel", group=None, sym=True):
    return {"bits": bits, "granularity": gran, "group_size": group, "symmetric": sym}


@pytest.mark.parametrize(
    ("layer", "same", "mixq"),
    [
        ({"weight": W(4), "act": None}, "w4", "w4+asym+omse"),
        ({"weight": W(4, "group", 128), "act": None}, "w4g128", "w4g128+asym+omse"),
        ({"weight": W(8, sym=False), "act": None}, "w8+asym", "w8+asym+omse"),
        ({"weight": W(8), "act": {"bits": 8, "symmetric": True}}, "w8-a8+sym", "w8+asym+omse-a8+sym"),
        ({"weight": W(2), "act": {"bits": 8, "symmetric": False}}, "w2-a8", "w2+asym+omse-a8"),
        (
            {"weight": {**W(2), "clip": "mse"}, "act": {"bits": 8, "symmetric": False}},
            "w2+mse-a8",
            "w2+asym+omse-a8",
        ),
        (
            {"weight": W("fp8_e4m3fn", "tensor"), "act": {"bits": "fp8_e4m3fn", "symmetric": True}},
            "wfp8_e4m3fn+tensor-afp8_e4m3fn",
            "wfp8_e4m3fn+tensor-afp8_e4m3fn",
        ),
        ({"weight": None, "act": None}, "float", "float"),
    ],
)
def test_to_candidate_parses_to_the_described_format(layer, same, mixq):
    assert translate.to_candidate(layer, "same") == same
    assert translate.to_candidate(layer, "mixq") == mixq
    spec = parse_candidate(same)
    w = layer["weight"]
    if w is None:
        assert spec.weight is None
        return
    assert spec.weight.bits == (w["bits"] if isinstance(w["bits"], int) else 8)
    assert spec.weight.granularity == w["granularity"]
    assert spec.weight.group_size == w["group_size"]
    assert spec.weight.symmetric == w["symmetric"]
    assert spec.weight.clip == w.get("clip", "minmax")
    assert (spec.act is None) == (layer["act"] is None)
    if layer["act"] is not None and isinstance(layer["act"]["bits"], int):
        assert spec.act.symmetric == layer["act"]["symmetric"]


def test_to_candidate_rejects_bad_descriptions():
    with pytest.raises(ValueError, match="granularity 'row'"):
        translate.to_candidate({"weight": W(4, "row"), "act": None})
    with pytest.raises(ValueError, match="valid: same, mixq"):
        translate.to_candidate({"weight": W(4), "act": None}, grid="other")
    with pytest.raises(ValueError, match="clip 'kl'"):
        translate.to_candidate({"weight": {**W(4), "clip": "kl"}, "act": None})
    with pytest.raises(ValueError, match="bits must be"):
        translate.to_candidate({"weight": W(4.5), "act": None})


def test_converted_plan_is_charged_with_scales_by_an_independent_count():
    """ModelOpt-style INT4 block-128 and INT8 per-channel, and a float layer, on the synthetic MLP."""
    task = tasks.synthetic_mlp()
    layers = {
        "0": {"weight": W(8), "act": None},
        "2": {"weight": W(4, "group", 32), "act": None},
        "4": {"weight": None, "act": None},
    }
    res = measure.evaluate(task, translate.to_plan(layers))
    # independent count: 0 is 64x16 (int8 + 64 fp32 scales), 2 is 64x64 in groups of 32 (int4 + 128
    # fp16 scales), 4 is 8x64 fp32; biases fp32 everywhere.
    bits = [64 * 16 * 8 + 64 * 32, 64 * 64 * 4 + 64 * 2 * 16, 8 * 64 * 32]
    n = 64 * 16 + 64 * 64 + 8 * 64
    assert res["avg_weight_bits"] == pytest.approx(sum(bits) / n)
    assert res["size_bytes"] == pytest.approx(sum(bits) / 8 + 4 * (64 + 64 + 8))


def test_evaluate_matches_an_independent_fake_quantization():
    """Re-evaluating an all-W8 per-channel plan equals quantizing the weights by hand."""
    task = tasks.synthetic_mlp()
    layers = {n: {"weight": W(8), "act": None} for n in ("0", "2", "4")}
    res = measure.evaluate(task, translate.to_plan(layers))
    oracle = copy.deepcopy(task.model)
    with torch.no_grad():
        for m in oracle.modules():
            if isinstance(m, nn.Linear):
                s = m.weight.abs().amax(1, keepdim=True) / 127
                m.weight.copy_(torch.round(m.weight / s) * s)
    assert res["metric"] == pytest.approx(task.metric(oracle, task.val))
    # and a 2-bit plan must do worse than fp32 on this task (the check can fail)
    two_bit = {n: {"weight": W(2, "tensor"), "act": None} for n in ("0", "2")}
    bad = measure.evaluate(task, translate.to_plan(two_bit))
    assert bad["metric"] < task.fp_metric()
    # a tool that keeps every layer float: an empty plan, charged as fp32
    empty = measure.evaluate(task, translate.to_plan({}))
    assert empty["metric"] == task.fp_metric() and empty["avg_weight_bits"] == 32.0


def test_best_mixq_takes_the_best_row_at_or_below_the_size():
    pts = [
        {"task": "mnist-cnn", "val": 10000, "act": False, "size_bytes": 100.0, "metric": 98.0, "method": "a"},
        {"task": "mnist-cnn", "val": 10000, "act": False, "size_bytes": 150.0, "metric": 99.0, "method": "b"},
        {"task": "mnist-cnn", "val": 10000, "act": False, "size_bytes": 201.0, "metric": 99.5, "method": "c"},
        {"task": "mnist-cnn", "val": 10000, "act": True, "size_bytes": 120.0, "metric": 99.9, "method": "d"},
        {"task": "mnist-cnn", "val": 2000, "act": False, "size_bytes": 120.0, "metric": 99.9, "method": "e"},
        {"task": "minilm", "val": 1024, "act": False, "size_bytes": 50.0, "metric": 1.0, "method": "f"},
    ]
    row = {
        "task": "mnist-cnn",
        "val_items": 10000,
        "mixq_same": {"size_bytes": 200.0},
        "plan_same": {"x": "w4", "y": "float"},
    }
    assert points.best_mixq(pts, row)["method"] == "b"
    row["plan_same"] = {"x": "w4-a8+sym"}
    assert points.best_mixq(pts, row)["method"] == "d"
    row["mixq_same"]["size_bytes"] = 90.0
    assert points.best_mixq(pts, row) is None


def test_mixq_points_reads_rows_with_their_context(tmp_path, monkeypatch):
    doc = {
        "tasks": {
            "mnist-cnn": {
                "info": {"val_images": 10000},
                "sets": {
                    "ch": {
                        "candidates": ["w2+asym+omse", "w4+asym+omse"],
                        "rows": [
                            {"method": "hawq", "metric": 99.0, "avg_weight_bits": 2.5, "size_bytes": 1e5}
                        ],
                    }
                },
            }
        }
    }
    (tmp_path / "search.json").write_text(json.dumps(doc))
    monkeypatch.setattr(points, "RESULTS", tmp_path)
    (p,) = points.mixq_points()
    got = (p["task"], p["method"], p["val"], p["act"], p["metric"])
    assert got == ("mnist-cnn", "hawq", 10000, False, 99.0)


def test_patch_torchvision_makes_the_fake_registrations_conditional(tmp_path):
    site = tmp_path / "lib" / "python3.11" / "site-packages" / "torchvision"
    site.mkdir(parents=True)
    src = (
        "import torch\n\n"
        '@torch.library.register_fake("torchvision::nms")\ndef meta_nms(a):\n    return a\n\n'
        '@torch.library.register_fake("torchvision::qnms")\ndef meta_qnms(a):\n    return a\n\n'
        '@torch.library.register_fake("torchvision::roi_align")\ndef meta_roi(a):\n    return a\n'
    )
    (site / "_meta_registrations.py").write_text(src)
    venvs.patch_torchvision(tmp_path)
    new = (site / "_meta_registrations.py").read_text()
    assert new.count("_has_ops()") == 2
    assert '@torch.library.register_fake("torchvision::roi_align")' in new
    compile(new, "patched", "exec")
    with pytest.raises(FileNotFoundError, match="torchvision is not installed"):
        venvs.patch_torchvision(tmp_path / "none")


def test_driver_protocol_writes_json_and_records_failures(common, tmp_path, monkeypatch):
    task = tasks.synthetic_mlp()
    monkeypatch.setattr(common, "build_task", lambda name, val=0: task)
    out = tmp_path / "r.json"
    args = common.parser("x").parse_args(["--task", "synthetic-mlp", "--budget", "4", "--out", str(out)])

    def tool(a, t, s):  # a stand-in tool: quantizes layer "0" only, to nothing
        return {
            "model": t.model,
            "layers": {"0": {"weight": common.weight_desc(8), "act": None, "tool_format": "W8"}},
            "search_seconds": 0.0,
            "tool_bits": 8.0,
        }

    common.run("stand-in", "torch", tool, args)
    res = json.loads(out.read_text())
    assert res["ok"] and res["metric"] == pytest.approx(task.fp_metric())
    assert res["layers"]["2"]["weight"] is None and res["layers"]["0"]["weight"]["bits"] == 8
    assert res["version"] == importlib.metadata.version("torch")

    def broken(a, t, s):
        raise RuntimeError("tool exploded")

    with pytest.raises(SystemExit):
        common.run("stand-in", "torch", broken, args)
    res = json.loads(out.read_text())
    assert not res["ok"] and "tool exploded" in res["error"] and math.isfinite(res["driver_seconds"])


def test_mixq_points_skip_exhaustive_oracles(tmp_path, monkeypatch):
    row = {"method": "x", "metric": 99.0, "avg_weight_bits": 2.5, "size_bytes": 1e5}
    doc = {"tasks": {"mnist-cnn": {"val_images": 10000, "exhaustive": {"3.0": dict(row)}, "rows": [row]}}}
    (tmp_path / "clado.json").write_text(json.dumps(doc))
    monkeypatch.setattr(points, "RESULTS", tmp_path)
    assert [p["where"] for p in points.mixq_points()] == ["tasks/mnist-cnn/rows/0"]


def test_verdict_names_the_quantizer_or_the_search():
    def row(tool, same, search):
        return {
            "task": "mnist-cnn",
            "tool_metric": tool,
            "mixq_same": {"metric": same},
            "mixq_search": {"metric": search},
        }

    assert render.verdict(row(99.0, 99.0, 99.2), None) == "mixq ≥ tool"
    assert render.verdict(row(99.0, 99.0, 99.0), None) == "tie"
    q = render.verdict(row(99.0, 97.0, 97.0), None)
    assert q.startswith("mixq loses by 2") and "quantizer" in q and "search" not in q
    s = render.verdict(row(99.0, 99.0, 98.0), None)
    assert "search" in s and "quantizer" not in s
    assert render.verdict(row(99.0, 98.0, 98.0), {"metric": 99.5}) == "mixq ≥ tool"
    assert render.verdict({"task": "minilm", "tool_metric": 0.9, "mixq_same": {"metric": 0.9}}, None) == (
        "no mixq result at this size"
    )


def test_verdict_weighs_bias_correction_and_the_sampling_error():
    row = {
        "task": "fashion-resnet20",
        "val_items": 2000,
        "tool_metric": 94.0,
        "mixq_same": {"metric": 93.9},
        "mixq_search": {"metric": 93.9},
    }
    assert "standard error of a top-1 on 2000 images (0.53 points)" in render.verdict(row, None)
    row["mixq_search_mixq_ptq"] = {"metric": 94.2, "avg_weight_bits": 3.9, "ptq": ["bias_correction"]}
    v = render.verdict(row, None)
    assert v.startswith("mixq ≥ tool with bias_correction: 94.20 at 3.90 b") and "loses by 0.1" in v
    row["mixq_search_mixq_ptq"]["metric"] = 93.97
    assert render.verdict(row, None).startswith("tie with bias_correction: 93.97")
    row["mixq_search_mixq_ptq"]["metric"] = 93.0
    v = render.verdict(row, None)
    assert v.startswith("mixq loses by 0.1") and "with bias_correction: 93.00" in v
    big = {**row, "tool_metric": 99.0, "mixq_search_mixq_ptq": None}  # a gap of 5.1 points is no noise
    assert "standard error" not in render.verdict(big, None)


def test_driver_losses(common):
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    e = torch.nn.functional.normalize(torch.randn(6, 8, generator=g).double(), dim=-1)
    mini = SimpleNamespace(name="minilm")
    assert float(common.batches_loss(mini, "task")(e, {"target": e})) == pytest.approx(0.0, abs=1e-6)
    logits = 20.0 * e @ e.T  # in-batch contrastive: row i should pick column i
    manual = -(logits.diag() - logits.logsumexp(1)).mean()
    assert float(common.batches_loss(mini, "contrastive")(e, {})) == pytest.approx(float(manual), rel=1e-5)
    y = torch.tensor([1, 0, 2, 3, 0, 1])
    logits = torch.randn(6, 4)
    ce = common.batches_loss(SimpleNamespace(name="mnist-cnn"))(logits, (None, y))
    assert float(ce) == pytest.approx(float(-logits.log_softmax(1)[torch.arange(6), y].mean()), rel=1e-6)
    with pytest.raises(ValueError, match="valid: task, contrastive"):
        common.batches_loss(mini, "mse")


def _w8_w4_w8_row(tmp_path, monkeypatch):
    """The synthetic MLP, a W8/W4/W8 peer plan on it and its row (run directories under tmp_path)."""
    monkeypatch.setattr(measure, "ROOT", tmp_path)
    task = tasks.synthetic_mlp()
    layers = {
        "0": {"weight": W(8), "act": None},
        "2": {"weight": W(4), "act": None},
        "4": {"weight": W(8), "act": None},
    }
    same = measure.evaluate(task, translate.to_plan(layers, "same"))
    row = {"plan_mixq": {n: translate.to_candidate(d, "mixq") for n, d in layers.items()}, "mixq_same": same}
    return task, same, row


def test_own_grid_search_stays_within_the_peers_size(tmp_path, monkeypatch):
    task, same, row = _w8_w4_w8_row(tmp_path, monkeypatch)
    measure.own_grid(row, task)
    got = row["mixq_search_mixq"]
    assert got["size_bytes"] <= same["size_bytes"] * (1 + 1e-9)
    assert got["candidates"] == ["w4+asym+omse", "w8+asym+omse"]
    assert (tmp_path / got["run_dir"] / "plan.json").exists()


def test_own_grid_records_an_infeasible_size(tmp_path, monkeypatch):
    """An all-W4 symmetric plan's size cannot hold W4 with zero points: recorded, not raised."""
    monkeypatch.setattr(measure, "ROOT", tmp_path)
    task = tasks.synthetic_mlp()
    layers = {n: {"weight": W(4), "act": None} for n in ("0", "2", "4")}
    row = {
        "plan_mixq": {n: translate.to_candidate(d, "mixq") for n, d in layers.items()},
        "mixq_same": measure.evaluate(task, translate.to_plan(layers, "same")),
    }
    measure.own_grid(row, task)
    assert "infeasible" in row["mixq_search_mixq"]["infeasible"]


@pytest.fixture(scope="module")
def aimet(common, load_bench):
    return load_bench("peers.drivers.aimet_driver")


def test_aimet_walk_replays_the_cumulative_steps(aimet):
    """Each Pareto entry lowers its modules on top of the entries before it; output-only groups
    (no weights) change nothing; the average is weight-count weighted."""
    sizes = {"a": 100, "b": 300, "c": 600}
    path = [
        (0.9, 99.5, ["b"], 4),
        (0.9, 99.5, [], 4),
        (0.7, 99.1, ["c"], 4),
        (0.5, 98.0, ["c"], 2),
        (0.4, 97.0, ["x.a"], 2),
    ]
    pts = aimet.walk(path, sizes, 8, names={"x.a": "a"})
    assert [p["bits"] for p in pts][-1] == {"a": 2, "b": 4, "c": 2}
    assert [round(p["avg_bits"], 6) for p in pts] == [6.8, 6.8, 4.4, 3.2, 2.6]
    assert pts[2]["bits"] == {"a": 8, "b": 4, "c": 4} and pts[0]["bitops"] == 0.9
    with pytest.raises(ValueError, match="not one of the counted layers"):
        aimet.walk([(1.0, 1.0, ["zz"], 4)], sizes, 8)
    # a module AIMET quantizes but mixq does not count (a LayerNorm weight): replayed, not averaged
    pts = aimet.walk([(1.0, 1.0, ["ln"], 4), (0.9, 1.0, ["b"], 2)], sizes, 8, uncounted=("ln",))
    assert [p["other"] for p in pts] == [{"ln": 4}, {"ln": 4}] and pts[0]["avg_bits"] == 8.0
    assert pts[1]["avg_bits"] == pytest.approx((100 * 8 + 300 * 2 + 600 * 8) / 1000)
    with pytest.raises(ValueError, match="sizes is empty"):
        aimet.walk(path, {}, 8)


def test_aimet_pick_takes_the_best_score_within_the_budget(aimet):
    pts = [
        {"index": i, "score": s, "avg_bits": b, "bitops": 0.0}
        for i, (s, b) in enumerate([(99.5, 6.8), (99.1, 4.4), (98.0, 3.2), (98.4, 2.9), (98.4, 2.6)])
    ]
    assert aimet.pick(pts, 4.4)["index"] == 1  # the budget is inclusive
    assert aimet.pick(pts, 4.0)["index"] == 3  # best score below 4 bits; the tie goes to more bits
    assert aimet.pick(pts, 2.6)["index"] == 4
    with pytest.raises(ValueError, match="lowest: 2.600"):
        aimet.pick(pts, 2.5)


def test_mixq_points_leave_out_methods_that_train(tmp_path, monkeypatch):
    rows = [{"method": m, "metric": 99.0, "avg_weight_bits": 2.5, "size_bytes": 1e5} for m in ("fliqs", "x")]
    doc = {"tasks": {"mnist-cnn": {"val_images": 10000, "rows": rows}}}
    (tmp_path / "run_all.json").write_text(json.dumps(doc))
    monkeypatch.setattr(points, "RESULTS", tmp_path)
    assert [p["method"] for p in points.mixq_points()] == ["x"]


@pytest.fixture(scope="module")
def hawq(common, load_bench):
    return load_bench("peers.drivers.nncf219_driver")


def test_nncf219_layer_names_from_node_names(hawq):
    assert hawq.layer_of("MnistCNN/Sequential[conv_layers]/NNCFConv2d[0]/conv2d_0") == "conv_layers.0"
    node = "ResNet/Sequential[layer1]/BasicBlock[0]/NNCFConv2d[conv1]/conv2d_0"
    assert hawq.layer_of(node) == "layer1.0.conv1"
    with pytest.raises(ValueError, match="cannot read a module name"):
        hawq.layer_of("conv2d_0")


def test_nncf219_knob_is_the_smallest_ratio_whose_choice_fits(hawq):
    # HAWQ's rule: least metric among ratio >= knob. Sequence 1 (ratio 1.5, 5 bits) is the best at
    # knob 1.5 but too big for 4.5 bits; at 2.0 sequence 3 wins (4 bits): the knob is 2.0.
    ratios = [1.0, 1.5, 2.0, 2.0, 3.0]
    metrics = [0.1, 0.5, 2.0, 0.9, 3.0]
    avg = [8.0, 5.0, 4.0, 4.0, 2.5]
    assert hawq.hawq_choice(metrics, ratios, 1.2) == 1
    assert hawq.knob_for_budget(metrics, ratios, avg, 4.5) == (2.0, 3)
    assert hawq.knob_for_budget(metrics, ratios, avg, 8.0) == (1.0, 0)
    assert hawq.knob_for_budget(metrics, ratios, avg, 2.5) == (3.0, 4)
    with pytest.raises(ValueError, match="lowest: 2.500"):
        hawq.knob_for_budget(metrics, ratios, avg, 2.0)
    with pytest.raises(ValueError, match="no sequence reaches"):
        hawq.hawq_choice(metrics, ratios, 3.5)


def test_render_shows_how_a_budgetless_tool_was_picked(tmp_path, monkeypatch):
    monkeypatch.setattr(points, "RESULTS", tmp_path)
    same = {"metric": 98.0, "avg_weight_bits": 2.5, "size_bytes": 1000.0}
    row = {
        "tool": "aimet",
        "tool_version": "2.42.0",
        "task": "mnist-cnn",
        "budget": 3.0,
        "ok": True,
        "tool_metric": 99.0,
        "tool_bits": 2.47,
        "search_seconds": 1.0,
        "mixq_same": same,
        "mixq_mixq": same,
        "plan_same": {"a": "w2-a8"},
        "val_items": 10000,
        "note": "a grid note",
        "pick": {"rule": "best score within B", "index": 8, "score": 99.61, "pareto": [1, 2]},
    }
    md = render.render({"k": row})
    assert "- aimet 2.42.0 B=3: a=w2-a8 (pick: index=8, score=99.61)" in md
    assert "Note: aimet picks its point by the rule: best score within B." in md
    assert "Note: a grid note." in md
    assert "| aimet 2.42.0 | 3 | 2.47 | 99.00 |" in md


def test_own_grid_ptq_runs_the_given_steps_and_keeps_the_earlier_result(tmp_path, monkeypatch):
    task, same, row = _w8_w4_w8_row(tmp_path, monkeypatch)
    measure.own_grid_ptq(row, task)
    first = row["mixq_search_mixq_ptq"]
    assert first["ptq"] == ["bias_correction"] and "ptq_args" not in first
    measure.own_grid_ptq(row, task, ["bias_correction", "adaround"], adaround_iters=3)
    got = row["mixq_search_mixq_ptq"]
    assert got["ptq"] == ["bias_correction", "adaround"] and got["ptq_args"] == {"adaround": {"iters": 3}}
    assert got["size_bytes"] <= same["size_bytes"] * (1 + 1e-9)
    assert row["mixq_search_mixq_ptq_earlier"] == [first]
    run = json.loads((tmp_path / got["run_dir"] / "metrics.json").read_text())
    assert [p["step"] for p in run["ptq"]] == ["bias_correction", "adaround"]


def test_backfill_ptq_redoes_only_rows_without_these_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(compare_peers, "RESULTS", tmp_path)
    monkeypatch.setattr(points, "RESULTS", tmp_path)
    monkeypatch.setattr(compare_peers, "VENVS", tmp_path / "venvs")
    monkeypatch.setattr(compare_peers, "get_task", lambda name, val: None)
    monkeypatch.setattr(compare_peers, "render", lambda rows: "")
    monkeypatch.setattr(compare_peers, "summary", lambda rows: "")
    monkeypatch.setattr(
        compare_peers, "write", lambda name, doc: (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    )  # noqa: E501
    calls = []

    def fake(row, task, steps, iters):
        calls.append((row["budget"], steps, iters))
        row["mixq_search_mixq_ptq"] = {"metric": 90.0, "ptq": steps}

    monkeypatch.setattr(compare_peers, "own_grid_ptq", fake)
    base = {
        "ok": True,
        "tool": "mct",
        "task": "mnist-cnn",
        "tool_metric": 99.0,
        "plan_same": {"a": "w4"},
        "mixq_same": {"metric": 90.0, "size_bytes": 1e5},
        "mixq_search": {"metric": 90.0},
    }
    earlier = {"metric": 95.0, "ptq": ["bias_correction"]}  # other steps: judged without it, redone
    same = {"metric": 95.0, "ptq": ["adaround"]}  # these very steps: left alone
    rows = {
        "mct|mnist-cnn|3": {**base, "budget": 3, "mixq_search_mixq_ptq": earlier},
        "mct|mnist-cnn|4": {**base, "budget": 4, "mixq_search_mixq_ptq": same},
        "mct|mnist-cnn|5": {**base, "budget": 5, "tool_metric": 80.0},
    }  # mixq wins: no run
    compare_peers.backfill(rows, ["mct"], [], ptq=True, ptq_steps=["adaround"], adaround_iters=7)
    assert calls == [(3, ["adaround"], 7)]
    saved = json.loads((tmp_path / "peers.json").read_text())["rows"]
    assert saved["mct|mnist-cnn|3"]["mixq_search_mixq_ptq"]["ptq"] == ["adaround"]


def test_own_methods_run_mixqs_methods_at_the_peers_size(tmp_path, monkeypatch):
    task, same, row = _w8_w4_w8_row(tmp_path, monkeypatch)
    row = {"task": "synthetic", "tool_metric": 101.0, "mixq_same": same}  # no sampling-error text
    cands = ["w2+asym+omse", "w4+asym+omse", "w8+asym+omse"]
    measure.own_methods(row, task, ["sensitivity-ilp", "hawq"], candidates=cands)
    measure.own_methods(row, task, ["sensitivity-ilp"], ["bias_correction"], candidates=cands)
    got = row["mixq_methods"]
    assert list(got) == ["sensitivity-ilp", "hawq", "sensitivity-ilp+bias_correction"]
    for label, r in got.items():
        assert r["size_bytes"] <= same["size_bytes"] * (1 + 1e-9) and r["candidates"] == cands
        assert r["method"] == label.split("+")[0]
        assert json.loads((tmp_path / r["run_dir"] / "metrics.json").read_text())["method"] == r["method"]
    assert got["sensitivity-ilp+bias_correction"]["ptq"] == ["bias_correction"]
    # the verdict counts them: the tool's 101 is out of reach, 99 is within them
    assert "mixq's methods: sensitivity-ilp" in render.verdict(row, None)
    best = max(r["metric"] for r in got.values())
    row["tool_metric"] = best - 1.0
    assert render.verdict(row, None).startswith("mixq ≥ tool with mixq ")


def test_aimet_walk_cache_is_shared_by_budgets_and_reset_by_a_new_key(aimet, tmp_path):
    from types import SimpleNamespace

    task = SimpleNamespace(name="mnist-cnn")
    model = nn.Linear(3, 2)
    args = SimpleNamespace(out=str(tmp_path / "aimet_mnist-cnn_2.5.json"), val=0)
    s = {"phase1_batches": 1, "weight_bits": [8, 4]}
    d = aimet.walk_cache(args, task, s, model)
    assert d.name == "aimet_mnist-cnn_val0_phase1_batches=1_weight_bits=84.amp"
    (d / ".cache").mkdir()
    (d / ".cache" / "pareto_list.pkl").write_bytes(b"x")
    args4 = SimpleNamespace(out=str(tmp_path / "aimet_mnist-cnn_4.json"), val=0)  # another budget
    assert aimet.walk_cache(args4, task, s, model) == d and (d / ".cache" / "pareto_list.pkl").exists()
    with torch.no_grad():
        model.weight.add_(1.0)  # other weights: the walk is stale
    assert aimet.walk_cache(args4, task, s, model) == d and not (d / ".cache").exists()


def test_summary_block_is_replaced_in_place_and_kept_by_other_writers(tmp_path):
    path = tmp_path / "summary.md"
    path.write_text("# sweep\n\ntable\n")
    set_section(path, "peers", "first")
    set_section(path, "peers", "second\n")
    text = path.read_text()
    assert text.startswith("# sweep\n\ntable\n") and text.count("peers:start") == 1
    assert section(text, "peers") == "<!-- peers:start -->\nsecond\n<!-- peers:end -->"
    assert section("no block here", "peers") == ""


def test_peers_summary_has_one_line_per_row(tmp_path, monkeypatch):
    monkeypatch.setattr(points, "RESULTS", tmp_path)
    ok = {
        "ok": True,
        "tool": "mct",
        "task": "mnist-cnn",
        "budget": 3.0,
        "val_items": 10000,
        "tool_metric": 99.0,
        "plan_same": {"a": "w4-a8"},
        "mixq_same": {"metric": 98.0, "avg_weight_bits": 3.1, "size_bytes": 1e5},
        "mixq_search_mixq": {"metric": 99.2, "avg_weight_bits": 3.0},
    }
    bad = {"ok": False, "tool": "nncf", "task": "minilm", "budget": 4.5, "error": "Boom:\nline two | x"}
    text = render.summary({"a": ok, "b": bad})
    lines = [x for x in text.splitlines() if x.startswith("| ")]
    assert len(lines) == 3  # the header and one line per row
    assert "99.20 (search, own grid) | mixq ≥ tool |" in lines[1]
    assert "failed: Boom: line two / x" in lines[2]


def test_same_grid_remeasure_pairs_the_peer_plan_and_the_search(tmp_path, monkeypatch):
    """--same-grid: the peer's plan measured as measure.evaluate does, mixq's capped search within the
    peer's size, and the paired difference recomputed from the two plans' own per-image predictions."""
    from bench.peers import same_grid

    monkeypatch.setattr(same_grid, "ROOT", tmp_path)
    task = tasks.synthetic_mlp()
    task.metric = same_grid.Top1Recorder()
    task.fp_metric()
    layers = {
        "0": {"weight": W(2), "act": None},
        "2": {"weight": W(8), "act": None},
        "4": {"weight": W(4), "act": None},
    }
    plan = translate.to_plan(layers, "same")
    peer = measure.evaluate(task, plan)
    row = {
        "task": task.name,
        "tool": "t",
        "budget": 4.0,
        "plan_same": {n: translate.to_candidate(d, "same") for n, d in layers.items()},
        "mixq_same": peer,
    }
    import mixq

    got = same_grid.remeasure(row, task, mixq.Cache())
    assert got["same"]["metric"] == peer["metric"]
    assert got["search"]["size_bytes"] <= peer["size_bytes"] * (1 + 1e-9)
    assert got["search"]["method_args"] == {"caps": True, "refine": 32} and got["search"]["capped_plans"] >= 1
    assert got["search"]["refined_loss"] <= got["search"]["solver_loss"]

    def hits(p):  # an independent pass: the plan's per-image correctness
        from mixq.plan import Plan, parse_candidate

        q = mixq.evaluate(task, Plan({n: parse_candidate(c) for n, c in p.items()})).model
        with torch.inference_mode():
            return torch.cat([q(x).argmax(-1) == y for x, y in task.val]).double()

    a, b = hits(row["plan_same"]), hits(got["search"]["plan"])
    n = a.numel()
    assert got["val_items"] == n and got["search"]["metric"] == pytest.approx(100 * float(b.mean()))
    assert got["diff"] == pytest.approx(100 * float((b - a).mean()), abs=1e-9)
    d = (b - a).numpy()
    se = 100 * math.sqrt(((d - d.mean()) ** 2).sum() / (n - 1) / n)
    assert got["paired_se"] == pytest.approx(se, rel=1e-9, abs=1e-12)
    row[same_grid.FIELD] = got
    text = "\n".join(same_grid.render([row]))
    assert same_grid.verdict(row) in text and f"{got['diff']:+.2f}" in text


def test_same_grid_other_search_settings_go_beside_the_default(tmp_path, monkeypatch):
    """--search-args: a search with other settings is stored in row[ALT] (the default's row[FIELD] kept),
    skipped when done, and rendered in its own table."""
    from bench.peers import same_grid

    monkeypatch.setattr(same_grid, "ROOT", tmp_path)
    task = tasks.synthetic_mlp()
    task.metric = same_grid.Top1Recorder()
    task.fp_metric()
    monkeypatch.setattr(same_grid, "full_task", lambda name: task)
    layers = {
        "0": {"weight": W(2), "act": None},
        "2": {"weight": W(8), "act": None},
        "4": {"weight": W(4), "act": None},
    }
    plan = translate.to_plan(layers, "same")
    row = {
        "task": task.name,
        "tool": "t",
        "budget": 4.0,
        "plan_same": {n: translate.to_candidate(d, "same") for n, d in layers.items()},
        "mixq_same": measure.evaluate(task, plan),
        same_grid.FIELD: {"kept": True},
    }
    args = {**same_grid.SEARCH[1], "select": "top1"}
    saved = []
    same_grid.run({"k": row}, ["k"], False, saved.append, args)
    got = row[same_grid.ALT][same_grid.alt_key(args)]
    assert row[same_grid.FIELD] == {"kept": True} and len(saved) == 1
    assert got["search"]["method_args"] == args and got["search"]["selected"]["select"] == "top1"
    same_grid.run({"k": row}, ["k"], False, saved.append, args)
    assert len(saved) == 1  # done already
    row[same_grid.FIELD] = got
    text = "\n".join(same_grid.render([row]))
    assert same_grid.alt_key(args) in text and f"{got['diff']:+.2f} ± {got['paired_se']:.2f}" in text
