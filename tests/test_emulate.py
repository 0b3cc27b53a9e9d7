"""The emulation of ONNX Runtime's integer kernels (``mixq.export.emulate``) against ONNX Runtime.

The oracle is ONNX Runtime itself: every tensor a fused kernel (QLinearConv, QGemm, QLinearAdd)
writes is read out of the graph ONNX Runtime optimizes and compared, code for code, with what the
emulating module computes; the model's outputs must then agree to float precision (the pooling
and the float classifier sum in another order) with every top-1 decision equal, where the plain
fake-quantized simulation does not.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import mixq
from mixq import export, tasks
from mixq.export.integer import IntegerAdd, IntegerConv2d, IntegerLinear, IntegerMatMul, optimized_graph


def _fused_outputs(path, tmp_path, x: torch.Tensor) -> tuple[dict[str, np.ndarray], list]:
    """Every fused kernel's output tensor in ONNX Runtime's own optimized graph, by tensor name."""
    graph = optimized_graph(path, tmp_path / "opt.onnx")
    fused = [n for n in graph.node if n.op_type in ("QLinearConv", "QGemm", "QLinearAdd")]
    model = onnx.load(str(tmp_path / "opt.onnx"))
    known = {o.name for o in model.graph.output}
    for n in fused:
        if n.output[0] not in known:
            model.graph.output.append(onnx.ValueInfoProto(name=n.output[0]))
    onnx.save(model, str(tmp_path / "probe.onnx"))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # run it as it is
    s = ort.InferenceSession(str(tmp_path / "probe.onnx"), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(None, {"input": x.numpy()}), strict=True)), fused


def _ort_outputs(path, x: torch.Tensor) -> np.ndarray:
    """ONNX Runtime's outputs with full graph optimization (the deployment setting)."""
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"input": x.numpy()})[0]


def _check_codes(emu: torch.nn.Module, outs: dict[str, np.ndarray], x: torch.Tensor) -> int:
    """Compare each emulating module's codes with the fused kernel's output; return how many."""
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
    for name, y in seen.items():
        m = emu.get_submodule(name)
        codes = torch.round(y / m.out.scale) + m.out.zero
        ort_codes = outs[m.node].astype(np.float32)
        if ort_codes.shape != tuple(codes.shape):  # ORT keeps some convs channels-last (NHWC)
            ort_codes = ort_codes.transpose(0, 3, 1, 2)
        assert np.array_equal(codes.numpy(), ort_codes), f"{name}: codes differ from ONNX Runtime's"
    return len(seen)


@pytest.fixture(scope="module")
def resnet_adds():
    task = tasks.fashion("fashion-resnet20", calib_size=64, val_size=256, batch_size=256)
    return task, mixq.run(task, method="uniform", candidates=["w7a8"], adds="a8")


def test_every_fused_kernel_of_resnet20_is_reproduced_code_for_code(resnet_adds, tmp_path) -> None:
    task, res = resnet_adds
    path = export.save(res, tmp_path / "m.onnx", format="onnx", task=task)
    x = task.val[0][0]
    outs, fused = _fused_outputs(path, tmp_path, x)
    # every fused conv runs on mixq's own weight codes (ORT quantized no float weight itself)
    assert all(n.input[3].endswith(".weight.codes") for n in fused if n.op_type == "QLinearConv")
    emu = export.emulate(res, task)
    assert {k: len(v) for k, v in emu.emulated.items()} == {"QLinearConv": 21, "QLinearAdd": 8}
    assert emu.not_emulated == []
    assert _check_codes(emu, outs, x) == len(fused) == 29
    fused_out = _ort_outputs(path, x)
    with torch.no_grad():
        e, sim = emu(x).numpy(), res.model(x).numpy()
    assert np.abs(e - fused_out).max() < 1e-2  # the float pooling and classifier sum in another order
    assert (e.argmax(1) == fused_out.argmax(1)).all()
    assert np.abs(sim - fused_out).max() > 10 * np.abs(e - fused_out).max()  # what emulation explains


def test_mnist_qgemm_and_float_input_layers_are_emulated(tmp_path) -> None:
    """MNIST at w7a8: two QLinearConv and a QGemm with an 8-bit output; the float32 first conv (one
    input channel, summed on exact integers) and the last Gemm stay float."""
    task = tasks.mnist_cnn(calib_size=256, val_size=500, batch_size=500)
    res = mixq.run(task, method="uniform", candidates=["w7a8"])
    path = export.save(res, tmp_path / "m.onnx", format="onnx", task=task)
    x, y = task.val[0][0], task.val[0][1].numpy()
    outs, fused = _fused_outputs(path, tmp_path, x)
    emu = export.emulate(res, task)
    assert {k: len(v) for k, v in emu.emulated.items()} == {"QLinearConv": 2, "QGemm": 1, "exact float32": 1}
    assert _check_codes(emu, outs, x) == len(fused) == 3
    fused_out = _ort_outputs(path, x)
    with torch.no_grad():
        e = emu(x).numpy()
    assert np.abs(e - fused_out).max() < 1e-3 and (e.argmax(1) == fused_out.argmax(1)).all()
    assert (e.argmax(1) == y).mean() == (fused_out.argmax(1) == y).mean()
    loaded = export.load(export.save(res, tmp_path / "m.safetensors"))  # a deployed model emulates alike
    with torch.no_grad():
        assert torch.equal(export.emulate(loaded, task)(x), emu(x))


@pytest.mark.parametrize("cand", ["wfp8_e4m3fn-afp8_e4m3fn", "w4a8"])
def test_layers_onnx_runtime_runs_in_float_keep_their_float_bias(cand: str, tmp_path) -> None:
    """fp8 and INT4 layers run in float32: ORT changes none of their values (no int32 bias). The
    fp8 emulation is the simulation, bit for bit; the integer convs sum their codes exactly."""
    task = tasks.mnist_cnn(calib_size=64, val_size=128, batch_size=128)
    res = mixq.run(task, method="uniform", candidates=[cand])
    path = export.save(res, tmp_path / "m.onnx", format="onnx", task=task)
    graph = optimized_graph(path, tmp_path / "opt.onnx")
    assert not [t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT32]
    emu = export.emulate(res, task)
    assert set(emu.emulated) == ({"exact float32"} if cand == "w4a8" else set()) and emu.not_emulated == []
    x = task.val[0][0]
    fused = _ort_outputs(path, x)
    with torch.no_grad():
        e = emu(x)
        assert torch.equal(e, res.model(x)) or cand == "w4a8"
    if cand == "w4a8":  # every layer summed on exact integers: ORT's outputs, bit for bit
        assert np.array_equal(fused, e.numpy())

    # float summation order only: a value on a later quantizer's rounding boundary may move a step
    assert np.abs(fused - e.numpy()).max() < 0.01 * np.abs(e.numpy()).max()
    assert (fused.argmax(1) == e.numpy().argmax(1)).all()


def test_requantization_equals_onnx_runtime_qlinearconv_on_random_codes() -> None:
    """ONNX's QLinearConv on random 8-bit codes: large accumulators, per-channel multipliers.

    The float32 requantization matters here: an exact (float64) one lands on other codes for
    some outputs, the emulated one on ONNX Runtime's codes for all.
    """
    from onnx import TensorProto, helper, numpy_helper

    from mixq.export.integer import Requant, _requantize

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 16, 128, 128), dtype=np.uint8)  # 4 million outputs
    w = rng.integers(-64, 64, (64, 16, 1, 1), dtype=np.int8)
    bias = rng.integers(-2000, 2000, 64, dtype=np.int32)
    sx, zx = np.float32(0.1), np.uint8(3)
    sw = rng.uniform(0.001, 0.01, 64).astype(np.float32)
    sy, zy = np.float32(0.04), np.uint8(128)
    inits = [
        numpy_helper.from_array(np.asarray(v), n)
        for n, v in [
            ("sx", sx),
            ("zx", zx),
            ("w", w),
            ("sw", sw),
            ("zw", np.zeros(64, np.int8)),
            ("sy", sy),
            ("zy", zy),
            ("b", bias),
        ]
    ]
    node = helper.make_node("QLinearConv", ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy", "b"], ["y"])
    io = [helper.make_tensor_value_info(n, TensorProto.UINT8, s) for n, s in (("x", x.shape), ("y", None))]
    graph = helper.make_graph([node], "g", io[:1], io[1:], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = s.run(None, {"x": x})[0]
    acc = torch.nn.functional.conv2d(
        torch.from_numpy(x.astype(np.float64) - float(zx)), torch.from_numpy(w.astype(np.float64))
    )
    acc = acc + torch.from_numpy(bias.astype(np.float64)).reshape(1, -1, 1, 1)
    out = Requant(torch.tensor(sy), float(zy), 0, 255)
    multiplier = (torch.tensor(sx) * torch.from_numpy(sw)) / torch.tensor(sy)  # float32, as ORT
    codes = torch.round(_requantize(acc, multiplier.reshape(1, -1, 1, 1), out) / out.scale) + out.zero
    assert np.array_equal(codes.numpy(), y.astype(np.float32))
    exact = (
        torch.round(
            torch.clamp(
                acc * (float(sx) * torch.from_numpy(sw).double() / float(sy)).reshape(1, -1, 1, 1), -128, 127
            )
        )
        + 128
    )
    assert (exact.numpy() != y).sum() > 0  # the test can tell float32 from exact requantization


def test_matmul_integer_to_float_is_reproduced_bit_for_bit_on_random_codes() -> None:
    """ONNX Runtime's MatMulIntegerToFloat on 1 million random outputs: float32(acc) * (s_a * s_b).

    The emulation's formula gives ORT's floats bit for bit; the scales' product taken in
    float64 instead differs on some (asserted), so the test tells the two apart.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (1024, 384), dtype=np.uint8)
    b = rng.integers(-64, 64, (384, 1024), dtype=np.int8)
    sa, za = np.float32(0.037), np.uint8(11)
    sb = rng.uniform(0.001, 0.01, 1024).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.asarray(v), n)
        for n, v in [("b", b), ("sa", sa), ("sb", sb), ("za", za), ("zb", np.zeros(1024, np.int8))]
    ]
    node = helper.make_node(
        "MatMulIntegerToFloat", ["a", "b", "sa", "sb", "za", "zb"], ["y"], domain="com.microsoft"
    )
    io = [
        helper.make_tensor_value_info("a", TensorProto.UINT8, a.shape),
        helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
    ]
    graph = helper.make_graph([node], "g", io[:1], io[1:], inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = s.run(None, {"a": a})[0]
    acc = torch.from_numpy(a.astype(np.float64) - float(za)) @ torch.from_numpy(b.astype(np.float64))
    emulated = acc.float() * (torch.tensor(sa) * torch.from_numpy(sb))  # as IntegerMatMul computes
    assert np.array_equal(emulated.numpy(), y)
    exact = (acc * (float(sa) * torch.from_numpy(sb).double())).float()
    assert (exact.numpy() != y).sum() > 0


def test_minilm_onnx_matches_the_simulation_and_its_integer_matmuls_are_emulated(tmp_path) -> None:
    """all-MiniLM-L6-v2 at w7a8 on 32 real sentences, in ONNX Runtime and emulated.

    ORT runs its 36 linear layers as MatMulIntegerToFloat between float32 LayerNorm, GELU and
    softmax. Given ORT's own input codes, every emulated layer's product equals ORT's bit for
    bit (float32(acc) * (s_x * s_w), before the bias). The embeddings of ORT (fused and unfused) match the
    simulation's: the float kernels sum in their own order, so where a value lies on a
    quantizer's rounding boundary a code moves one step and that sentence's embedding moves by
    up to about 0.02 (between ORT's two graphs too); the metric (mean cosine to fp32, 0.991, so a
    loss of 0.009) agrees to 5e-4 on these 32 sentences.
    """
    from mixq.export.qdq import model_inputs

    task = tasks.minilm(val_size=32, calib_size=32, batch_size=32)
    res = mixq.run(task, method="uniform", candidates=["w7a8"])
    path = export.save(res, tmp_path / "m.onnx", format="onnx", task=task)
    batch = task.val[0]
    names, xs, _ = model_inputs(batch)
    feeds = {n: x.numpy() for n, x in zip(names, xs, strict=True)}
    emu = export.emulate(res, task)
    assert {k: len(v) for k, v in emu.emulated.items()} == {"MatMulIntegerToFloat": 36}
    assert emu.not_emulated == []
    # each layer on ORT's input codes: its product equals ORT's bit for bit (the bias is added
    # after it, in an Add or in ORT's BiasGelu)
    graph = optimized_graph(path, tmp_path / "opt.onnx")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    probe = onnx.load(str(tmp_path / "opt.onnx"))
    layers = {}
    for n in graph.node:
        if n.op_type == "MatMulIntegerToFloat":  # A, B, sa, sb, za, zb
            a, y = n.input[0], n.output[0]
            layers[n.input[1].removesuffix(".weight.codes")] = (a, y, n.input[2], n.input[4])
            probe.graph.output.extend([onnx.ValueInfoProto(name=a), onnx.ValueInfoProto(name=y)])
    onnx.save(probe, str(tmp_path / "probe.onnx"))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(str(tmp_path / "probe.onnx"), so, providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds), strict=True))
    modules = dict(emu.named_modules())
    assert len(layers) == 36
    for layer, (a, y, sa, za) in layers.items():
        m = modules[layer]
        assert isinstance(m, IntegerMatMul)
        x = (torch.from_numpy(got[a].astype(np.float32)) - float(inits[za])) * float(inits[sa])
        bias, m.source.bias = m.source.bias, None
        with torch.no_grad():
            assert np.array_equal(m(x).numpy(), got[y]), layer
        m.source.bias = bias
    outs = {}
    for optimize in (False, True):
        so = ort.SessionOptions()
        if not optimize:  # the QDQ reference semantics
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        outs[optimize] = s.run(None, feeds)[0]
    with torch.no_grad():
        sim, e = task.forward(res.model, batch).numpy(), task.forward(emu, batch).numpy()
    fp32 = batch["target"].numpy()
    for out in (outs[False], outs[True], e):  # unit-norm embeddings
        per_sentence = np.abs(out - sim).max(1)
        assert per_sentence.max() < 0.03 and np.median(per_sentence) < 1e-4
        assert (out * sim).sum(1).min() > 0.99
        assert abs((out * fp32).sum(1).mean() - (sim * fp32).sum(1).mean()) < 5e-4  # the metric
