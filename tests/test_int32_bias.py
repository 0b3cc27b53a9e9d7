"""The int32 bias plan step: each bias on its accumulator's int32 grid, as integer kernels add it.

Oracles: ONNX Runtime's own int32 biases (read by ``mixq.export.emulate`` from the graph ORT
optimizes) for the layers it fuses, and the codes of the emulation (which equals ORT code for
code) against the simulation's, layer by layer.
"""

from __future__ import annotations

import pytest
import torch

import mixq
from mixq import export
from mixq.export.integer import IntegerConv2d, IntegerLinear
from mixq.export.modules import ActQuant
from mixq.ptq import resolve
from mixq.ptq.int32_bias import weight_scale
from test_architectures import conv_net, image_batches


def fused(emu: torch.nn.Module) -> dict[str, IntegerConv2d | IntegerLinear]:
    return {n: m for n, m in emu.named_modules() if isinstance(m, IntegerConv2d | IntegerLinear)}


@pytest.fixture(scope="module")
def runs() -> tuple:
    """conv_net at w8a8 without and with the step, each with its emulation of ONNX Runtime."""
    task = mixq.Task(conv_net(), image_batches(2, 1), image_batches(1, 2), name="c")
    plain = mixq.run(task, "uniform", ["w8a8"])
    res = mixq.run(task, "uniform", ["w8a8"], ptq=["int32_bias"])
    return plain, export.emulate(plain, task), res, export.emulate(res, task)


def test_biases_are_the_int32_biases_onnx_runtime_adds(runs):
    plain, emu_plain, res, emu = runs
    rec = res.metrics.ptq[-1]
    assert rec["step"] == "int32_bias" and rec["layers"] > 0 and rec["max_change_in_steps"] > 0
    ort_plain, ort_step = fused(emu_plain), fused(emu)
    assert ort_plain and set(ort_plain) == set(ort_step)
    qsites = mixq.sites(res.model)
    for name, m in ort_step.items():
        lx = m.source.layer_export
        step = lx.act_scale.float().reshape(()) * lx.weight.scale.float().reshape(-1)
        # the simulation adds ORT's int32 bias at s_x s_w, and ORT rounds the original bias to the same ints
        assert torch.equal(qsites[name].bias.detach(), (m.bias_int.float() * step).float())
        assert torch.equal(m.bias_int, ort_plain[name].bias_int)
        assert not torch.equal(qsites[name].bias, mixq.sites(plain.model)[name].bias)


def differing_codes(sim: torch.nn.Module, emu: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Input codes of all quantized layers that differ between ``sim`` and ``emu``, and codes."""
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    hooks = []
    for n, s in mixq.sites(sim).items():
        scale = s.input_quant.act_params().scale
        hooks.append(
            s.input_quant.register_forward_hook(
                lambda _m, _i, y, n=n, s=scale: a.__setitem__(n, y.double() / s.double())
            )
        )
    for q in emu.modules():
        if isinstance(q, ActQuant):
            hooks.append(
                q.register_forward_hook(
                    lambda m, _i, y: b.__setitem__(m.layer, y.double() / m.scale.double())
                )
            )
    with torch.no_grad():
        sim(x), emu(x)
    for h in hooks:
        h.remove()
    assert set(a) == set(b)
    diff = sum(int((torch.round(a[k]) != torch.round(b[k])).sum()) for k in a)
    return diff, sum(v.numel() for v in a.values())


def test_the_simulation_with_int32_biases_differs_from_onnx_runtime_in_fewer_codes(runs):
    plain, emu_plain, res, emu = runs
    x = torch.randn(300, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    before, total = differing_codes(plain.model, emu_plain, x)
    after, _ = differing_codes(res.model, emu, x)
    assert before > 0  # ORT's int32 bias and requantization move some codes
    assert after < before / 10, f"{after} of {total} codes differ with int32 biases, {before} without"


def test_layers_without_an_integer_accumulator_keep_their_bias():
    task = mixq.Task(conv_net(), image_batches(2, 1), image_batches(1, 2), name="c")
    for cand in ("w4g8a8", "w8"):  # grouped weights; no input quantizer
        base = mixq.run(task, "uniform", [cand])
        res = mixq.run(task, "uniform", [cand], ptq=["int32_bias"])
        assert res.metrics.ptq[-1]["layers"] == 0
        for n, s in mixq.sites(res.model).items():
            b0 = mixq.sites(base.model)[n].bias
            assert (s.bias is None and b0 is None) or torch.equal(s.bias, b0)


def test_it_must_be_the_last_plan_step():
    assert [s.name for s in resolve("bias_correction,int32_bias")] == ["bias_correction", "int32_bias"]
    with pytest.raises(ValueError, match="'int32_bias' must be the last one"):
        resolve(["int32_bias", "bias_correction"])


class SharedBias(torch.nn.Module):
    """Two layers sharing one bias tensor (with different input grids), and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = (
            torch.nn.Linear(16, 32),
            torch.nn.Linear(32, 32),
            torch.nn.Linear(32, 5),
        )
        self.fc2.bias = self.fc1.bias
        with torch.no_grad():
            self.fc1.bias.mul_(20)  # biases of many steps: rounding twice would move them visibly

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def shared_bias_run(dtype: torch.dtype) -> tuple:
    torch.manual_seed(0)
    model = SharedBias().to(dtype)
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(32, 16, generator=g).to(dtype), torch.randint(5, (32,), generator=g)) for _ in range(2)
    ]
    task = mixq.Task(model, data, data[:1], name="shared")
    original = model.fc1.bias.detach().clone()
    res = mixq.run(task, "uniform", ["w8a8"], ptq=["int32_bias"])
    steps = {}
    for n, s in mixq.sites(res.model).items():
        steps[n] = s.input_quant.act_params().scale.double().reshape(()) * weight_scale(s).double()
    return task, res, original, steps


def test_a_shared_bias_is_rounded_from_its_original_values_for_each_layer():
    _, res, original, steps = shared_bias_run(torch.float32)
    qs = mixq.sites(res.model)
    assert qs["fc1"].bias is not qs["fc2"].bias and not torch.equal(steps["fc1"], steps["fc2"])
    for n in ("fc1", "fc2"):
        b, step = qs[n].bias.detach().double(), steps[n]
        k = torch.round(b / step)
        assert torch.allclose(b, k * step, rtol=1e-6, atol=0)  # on the layer's own grid
        # at most half a step from the original values (rounding a rounded bias again is not)
        assert float(((b - original.double()) / step).abs().max()) <= 0.5 + 1e-4, n
    assert res.metrics.ptq[-1]["off_grid"] == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_bias_gives_ort_the_nearest_grid_integer_and_is_named_off_grid(dtype):
    task, res, original, steps = shared_bias_run(dtype)
    rec = res.metrics.ptq[-1]
    assert rec["layers"] == 3 and set(rec["off_grid"]) <= {"fc1", "fc2", "fc3"} and rec["off_grid"]
    qs = mixq.sites(res.model)
    ints = {n: m.bias_int for n, m in fused(export.emulate(res, task)).items()}
    assert {"fc1", "fc2"} <= set(ints)
    for n in ("fc1", "fc2"):
        b0, step = original.double(), steps[n]
        k = torch.round(b0 / step)  # the grid integer nearest the original bias (float64 oracle)
        assert torch.equal(ints[n].double(), k), n  # what ONNX Runtime adds, from the exported bias
        b = qs[n].bias.detach().double()
        assert qs[n].bias.dtype == dtype
        assert bool(((b - k * step).abs() <= (b0 - k * step).abs()).all())  # no farther than before


def test_the_onnx_target_ends_the_steps_with_int32_bias():
    from mixq.ptq import for_target

    assert for_target(None, "onnx") == ["int32_bias"]
    assert for_target("bias_correction", "onnx") == ["bias_correction", "int32_bias"]
    assert for_target(["int32_bias"], "onnx") == ["int32_bias"] and for_target(["cle"], None) == ["cle"]
    with pytest.raises(ValueError, match=r"unknown target 'tflite'; valid: onnx"):
        for_target(None, "tflite")
    task = mixq.Task(conv_net(), image_batches(2, 1), image_batches(1, 2), name="c")
    with pytest.raises(ValueError, match=r"unknown target 'tensorrt'; valid: onnx"):
        mixq.run(task, "uniform", ["w8a8"], target="tensorrt")
    res = mixq.run(task, "uniform", ["w8a8"], target="onnx")
    same = mixq.run(task, "uniform", ["w8a8"], ptq=["int32_bias"])
    assert [r["step"] for r in res.metrics.ptq] == ["int32_bias"]
    for n, s in mixq.sites(res.model).items():  # the model of the listed step, bias for bias
        b = mixq.sites(same.model)[n].bias
        assert (s.bias is None and b is None) or torch.equal(s.bias, b)
    assert res.metrics.metric == same.metrics.metric
    from mixq.options import Recipe

    assert Recipe.from_dict({"task": "c", "target": "onnx"}).options.target == "onnx"
