"""Quantized residual additions: ``mixq.nn.Add`` sites, the plan's ``meta["adds"]``, and their export.

The oracle of the simulation is a hand-written asymmetric 8-bit quantizer of each operand (range
from the calibration data's min and max, zero included); the export is checked against the
simulation: bit for bit after a safetensors round trip, and in ONNX Runtime (its reference QDQ
semantics and its fused integer kernels, which must include QLinearAdd).
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import mixq
from mixq import export, tasks
from mixq.export.modules import DeployAdd
from mixq.nn import Add, QAdd
from mixq.plan import Plan, parse_candidate
from mixq.wrap import ADDS, add_sites, adds_spec, current_plan, with_adds


class Residual(nn.Module):
    """conv -> add(conv output, input) -> ReLU -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.add = Add()
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.add(self.conv(x), x)).flatten(1))


def _uint8(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Independent oracle: asymmetric 8-bit fake quantization of x for the range [lo, hi] ∪ {0}."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = torch.tensor((hi - lo) / 255, dtype=torch.float32)
    z = torch.clamp(torch.round(-torch.tensor(lo) / s), 0, 255)
    return (torch.clamp(torch.round(x / s) + z, 0, 255) - z) * s


def test_wrap_makes_add_sites_that_are_exact_until_a_plan_sets_them() -> None:
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(5, 3, 4, 4)
    ref = model(x)
    q = mixq.wrap(copy.deepcopy(model))
    assert isinstance(q.add, QAdd) and list(add_sites(q)) == ["add"]
    assert torch.equal(q(x), ref)
    mixq.unwrap(q)
    assert type(q.add) is Add


def test_add_operands_match_an_independent_8_bit_quantizer() -> None:
    torch.manual_seed(0)
    model = Residual().eval()
    batches = [torch.randn(8, 3, 4, 4) for _ in range(3)]
    q = mixq.wrap(copy.deepcopy(model))
    mixq.calibrate(q, batches)
    with torch.no_grad():
        convs = torch.cat([model.conv(b) for b in batches])
        inputs = torch.cat(batches)
        x = torch.randn(4, 3, 4, 4) * 1.5  # values beyond the calibrated range saturate
        a, b = model.conv(x), x
        qa = _uint8(a, convs.min().item(), convs.max().item())
        qb = _uint8(b, inputs.min().item(), inputs.max().item())
        want = model.fc(torch.relu(qa + qb).flatten(1))
        mixq.apply(q, with_adds(Plan({}), "a8"))
        got = q(x)
    assert torch.allclose(got, want, rtol=0, atol=1e-6)
    assert not torch.equal(got, model(x))


def test_with_adds_records_the_spec_in_the_plan_and_apply_restores_it() -> None:
    base = Plan({}, {"task": "t"})
    plan = with_adds(base, "w8a8")
    assert plan.meta["task"] == "t" and adds_spec(plan) == parse_candidate("a8").act
    assert ADDS not in base.meta  # a copy
    assert adds_spec(with_adds(plan, None)) is None
    assert Plan.from_dict(plan.to_dict()).meta[ADDS] == plan.meta[ADDS]  # survives plan.json
    with pytest.raises(ValueError, match="candidate 'w8' has no input spec"):
        with_adds(base, "w8")
    with pytest.raises(ValueError, match="plan meta 'adds' is not a QSpec"):
        adds_spec(Plan({}, {ADDS: {"fmt": "int99"}}))
    q = mixq.wrap(Residual().eval())
    mixq.calibrate(q, [torch.randn(2, 3, 4, 4)])
    with mixq.applied(q, plan):
        assert q.add.quant[0].spec == q.add.quant[1].spec == adds_spec(plan)
        assert current_plan(q).meta[ADDS] == plan.meta[ADDS]
    assert q.add.quant[0].spec is None and ADDS not in current_plan(q).meta


@pytest.fixture(scope="module")
def resnet():
    """fashion-resnet20 at w7a8 with quantized additions, and the same plan without them."""
    task = tasks.fashion("fashion-resnet20", calib_size=64, val_size=256, batch_size=256)
    res = mixq.run(task, method="uniform", candidates=["w7a8"], adds="a8")
    return task, res


def test_run_with_adds_records_them(resnet) -> None:
    task, res = resnet
    assert res.metrics.adds == res.plan.meta[ADDS] == parse_candidate("a8").act.to_dict()
    assert len(add_sites(res.model)) == 9
    again = mixq.evaluate(task, res.plan)  # the plan alone rebuilds the model
    assert again.metrics.metric == res.metrics.metric
    plain = mixq.evaluate(task, Plan(res.plan.layers, {}))
    x = task.val[0][0][:16]
    with torch.no_grad():
        assert not torch.equal(plain.model(x), res.model(x))


def test_safetensors_round_trip_of_quantized_adds_is_bit_exact(resnet, tmp_path) -> None:
    task, res = resnet
    path = export.save(res, tmp_path / "m.safetensors")
    header = int.from_bytes(path.read_bytes()[:8], "little")
    payload = path.stat().st_size - 8 - header
    assert payload == res.metrics.size_bytes  # the additions' scales and zero points counted
    plain = mixq.evaluate(task, Plan(res.plan.layers, {}))
    assert res.metrics.size_bytes - plain.metrics.size_bytes == 9 * 2 * (4 + 1)
    model = export.load(path)
    assert sum(isinstance(m, DeployAdd) for m in model.modules()) == 9
    x = task.val[0][0]
    with torch.no_grad():
        assert torch.equal(model(x), res.model(x))
    again = export.save(mixq.Result(res.plan, model, {}), tmp_path / "again.safetensors")  # a deployed model
    with torch.no_grad():
        assert torch.equal(export.load(again)(x), res.model(x))


def test_a_corrupt_addition_record_in_the_file_is_named(resnet, tmp_path) -> None:
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    _, res = resnet
    path = export.save(res, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["mixq"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    op = next(iter(meta["adds"]))
    meta["adds"][op] = {"fmt": "int99"}
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"mixq": json.dumps(meta)})
    with pytest.raises(ValueError, match=f"addition operand {op}: corrupt spec"):
        export.load(tmp_path / "bad.safetensors")
    meta["adds"] = {}  # the additions' tensors no longer fit the model
    save_file(tensors, str(tmp_path / "bad2.safetensors"), metadata={"mixq": json.dumps(meta)})
    with pytest.raises(ValueError, match="does not fit the model"):
        export.load(tmp_path / "bad2.safetensors")


def test_onnx_runs_quantized_adds_and_every_conv_in_integers(resnet, tmp_path) -> None:
    """With the additions quantized, ORT fuses them into QLinearAdd and every conv into QLinearConv."""
    task, res = resnet
    path = export.save(res, tmp_path / "m.onnx", format="onnx", task=task)
    x = task.val[0][0]
    with torch.no_grad():
        sim = res.model(x).numpy()
    outs = {}
    for optimize in (False, True):
        so = ort.SessionOptions()
        level = ort.GraphOptimizationLevel
        so.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
        if optimize:
            so.optimized_model_filepath = str(tmp_path / "opt.onnx")
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        outs[optimize] = s.run(None, {"input": x.numpy()})[0]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    convs = [n for n in res.plan.layers if n != "fc"]
    assert ops.count("QLinearConv") == len(convs) and "Conv" not in ops
    assert ops.count("QLinearAdd") == 8  # the last addition feeds the pooling, not a quantizer
    assert np.abs(outs[False] - sim).max() < 0.1 and (outs[False].argmax(1) == sim.argmax(1)).all()
    assert np.abs(outs[True] - sim).max() < 0.5
    assert (outs[True].argmax(1) == sim.argmax(1)).mean() >= 0.99  # + int32 bias and requantization
