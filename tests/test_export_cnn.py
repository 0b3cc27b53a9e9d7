"""ONNX = simulation on CNNs outside the zoo: depthwise convs, ReLU6, "same"-padding conv subclasses,
squeeze-excitation gating, average pooling, hard-swish.

Oracles: ONNX Runtime itself (every fused kernel's output read out of its optimized graph and
compared code for code with ``mixq.export.emulate``), and mixq's fake-quantized simulation, whose
top-1 decisions ONNX Runtime's outputs must share on 1,000 random inputs (>= 99.5 %).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import mixq
from bench.nets import conv_net, hardswish_net
from mixq import export
from mixq.export.integer import IntegerAdd, IntegerConv2d, IntegerLinear
from test_architectures import image_batches
from test_emulate import _fused_outputs

NETS = {"relu6-dw-se-same": conv_net, "hardswish-avgpool-se": hardswish_net}


def code_mismatch(emu: nn.Module, outs: dict[str, np.ndarray], x: torch.Tensor) -> dict[str, tuple]:
    """Per emulated kernel: (codes differing from ONNX Runtime's, codes, largest difference)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda m, _, y, n=n: seen.__setitem__(n, y))
        for n, m in emu.named_modules()
        if isinstance(m, IntegerConv2d | IntegerLinear | IntegerAdd)
    ]
    with torch.no_grad():
        emu(x)
    for h in hooks:
        h.remove()
    out = {}
    for name, y in seen.items():
        m = emu.get_submodule(name)
        codes = (torch.round(y / m.out.scale) + m.out.zero).numpy()
        ort_codes = outs[m.node].astype(np.float32)
        if ort_codes.shape != codes.shape:  # ORT keeps some convs channels-last (NHWC)
            ort_codes = ort_codes.transpose(0, 3, 1, 2)
        diff = np.abs(codes - ort_codes)
        out[name] = (int((diff > 0).sum()), diff.size, float(diff.max()))
    return out


@pytest.mark.parametrize(
    ("name", "cand", "target"),
    [
        ("relu6-dw-se-same", "w7a8", None),
        ("hardswish-avgpool-se", "w4a8", None),
        ("relu6-dw-se-same", "w7a8", "onnx"),
    ],
)
def test_ort_equals_emulation_code_for_code_and_the_simulation_in_top1(name, cand, target, tmp_path):
    task = mixq.Task(NETS[name](), image_batches(2, 1), image_batches(1, 2), name=name)
    res = mixq.run(task, "uniform", [cand], target=target)  # onnx: the int32_bias step
    path = export.save(res, tmp_path / "m.onnx", format="onnx", task=task, int4_as_int8=True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1000, 3, 16, 16, generator=g)
    outs, fused = _fused_outputs(path, tmp_path, x)
    emu = export.emulate(res, task, int4_as_int8=True)
    assert not emu.not_emulated and fused  # ORT fused integer kernels, every one emulated
    mismatch = code_mismatch(emu, outs, x)
    assert len(mismatch) == len(fused)
    for layer, (n, total, _) in mismatch.items():
        assert n == 0, f"{layer}: {n} of {total} codes differ"
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = s.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        sim, em = res.model(x).numpy(), emu(x).numpy()
    assert emu.emulated.get("exact float32")  # layers ORT runs in float32, on exact integer sums
    rows = int((np.abs(y - em) > 1e-4 + 1e-4 * np.abs(em)).any(1).sum())  # float pooling and classifier
    assert rows == 0, f"{rows} of 1000 outputs differ from the emulation"
    agree = float((y.argmax(1) == sim.argmax(1)).mean())
    assert agree >= 0.995, f"top-1 agreement with the simulation {agree:.3f}"


def test_a_same_padding_conv_subclass_exports_packed_bit_for_bit(tmp_path):
    task = mixq.Task(hardswish_net(), image_batches(2, 1), image_batches(1, 2), name="hs")
    res = mixq.run(task, "uniform", ["w4a8"])
    assert any(type(m).__name__ == "QCall" for m in mixq.sites(res.model).values())
    export.save(res, tmp_path / "m.safetensors")
    model = export.load(tmp_path / "m.safetensors", model=hardswish_net())
    x = image_batches(1, 7)[0][0]
    with torch.no_grad():
        assert torch.equal(model(x), res.model(x))


def test_onnx_export_without_example_inputs_names_what_to_pass(tmp_path):
    task = mixq.Task(hardswish_net(), image_batches(2, 1), image_batches(1, 2), name="not-built-in")
    res = mixq.run(task, "uniform", ["w8a8"])
    with pytest.raises(ValueError, match="ONNX export needs example inputs: pass task="):
        export.save(res, tmp_path / "m.onnx", format="onnx")


def test_the_wrapped_model_is_export_clean():
    """torch.export traces the fake-quantized model (no data-dependent check in the sites' forward)."""
    task = mixq.Task(hardswish_net(), image_batches(2, 1), image_batches(1, 2), name="hs")
    res = mixq.run(task, "uniform", ["w4a8"])
    x = image_batches(1, 9)[0][0]
    program = torch.export.export(res.model, (x,))
    with torch.no_grad():
        assert torch.equal(program.module()(x), res.model(x))


@pytest.mark.parametrize(("channels", "exact"), [(64, True), (1024, False)])
def test_a_conv_is_summed_on_integers_only_where_float32_holds_every_partial_sum(channels, exact):
    """Input codes up to 255 times weight codes of 127: 64 inputs sum below 2^24, 1,024 may not."""
    from mixq.export.codes import encode_weight
    from mixq.export.deploy import LayerExport
    from mixq.export.ort import EXACT_SUM, exact_layer
    from mixq.plan import parse_candidate

    spec = parse_candidate("w8a8")
    w = torch.ones(4, channels, 1, 1)
    enc = encode_weight(w, spec.weight)
    lx = LayerExport("c", "conv", enc, None, spec.act, torch.tensor([0.1]), torch.tensor([0.0]), 1)
    e = exact_layer(lx)
    assert (e is not None) == exact
    assert (255 * 127 * channels < EXACT_SUM) == exact
    if e is not None:  # the integers and float32(s_x * s_w) per output channel
        assert torch.equal(e.weight, torch.full((4, channels, 1, 1), 127.0))
        assert torch.equal(e.scale, torch.tensor(0.1) * enc.scale.reshape(-1))


def test_a_relu_beside_a_quantizer_without_zero_point_is_guarded_or_kept_by_its_type():
    """A DequantizeLinear of int32 sums (two inputs, no zero point) feeding a Relu: the Relu
    becomes ``Max(x, 0)`` (ONNX Runtime could drop it as after a uint8 one); a two-input
    QuantizeLinear (uint8 output) after a Relu keeps the Relu."""
    from mixq.export.ort import _guard_relus
    from mixq.export.qdq import Graph

    g = Graph()
    h = g.onnx.helper
    tp = g.tp
    s = g.tensor("s", tp.FLOAT, torch.tensor(0.5))
    acc = g.tensor("acc", tp.INT32, torch.tensor([3, -2]))
    nodes = [
        h.make_node("DequantizeLinear", [acc, s], ["x"], name="dq"),
        h.make_node("Relu", ["x"], ["y"], name="relu"),
        h.make_node("QuantizeLinear", ["y", s], ["q"], name="q"),
        h.make_node("DequantizeLinear", ["q", s], ["z"], name="dq2"),
        h.make_node("Relu", ["z"], ["r"], name="relu2"),
        h.make_node("QuantizeLinear", ["r", s], ["q2"], name="q2"),
    ]
    out = _guard_relus(g, nodes, {t.name: t.data_type for t in g.inits})
    ops = {n.name: n.op_type for n in out}
    assert ops["relu_as_max"] == "Max" and "relu" not in ops  # after the int32 DequantizeLinear
    assert ops["relu2"] == "Relu"  # between uint8 quantizers (no zero point: uint8)
