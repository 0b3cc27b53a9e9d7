"""Export: packed safetensors round trips bit-exactly; ONNX Runtime runs the QDQ graph as simulated."""

from __future__ import annotations

import copy
import json
import math

import ml_dtypes
import numpy as np
import pytest
import torch

import mixq
from mixq import cli, export, formats, rundir, tasks
from mixq.export import packing
from mixq.export.codes import decode_weight, encode_weight
from mixq.plan import Plan, parse_candidate
from mixq.quant import fake

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

# Every weight format the cost model counts, at every granularity it takes.
WEIGHT_FORMATS = [f"w{n}" for n in formats.FORMAT_NAMES if not n.startswith("mx")] + [
    f"w{n}" for n in formats.FORMAT_NAMES if n.startswith("mx")
]
INT_NAMES = [n for n in formats.FORMAT_NAMES if "int" in n and not n.startswith("mx")]
VARIANTS = (
    WEIGHT_FORMATS
    + [f"w{n}+asym" for n in INT_NAMES if n.startswith("int")]
    + [f"w{n}+tensor" for n in ("int4", "int8", "fp8_e4m3fn")]
    + [f"w{n}g8" for n in ("int2", "int3", "int4", "int6", "uint4", "fp4_e2m1", "fp8_e5m2")]
    + ["w4g8+asym", "w3+asym+mse", "w4+p99.9", "wmxfp4_e2m1_b16", "w4g8+fzero", "w3+fzero+mse"]
)
ACT_VARIANTS = [
    "w4a8",
    "w4a4+sym",
    "w8-auint6",
    "wfp8_e4m3fn-afp8_e4m3fn",
    "wfp8_e5m2-afp8_e5m2",
    "wmxfp6_e3m2-amxint8",
    "wmxfp4_e2m1-amxfp8_e4m3",
]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of float32 tensors (tells -0.0 from 0.0 and compares NaN payloads)."""
    return a.shape == b.shape and torch.equal(a.float().view(torch.int32), b.float().view(torch.int32))


# -- packing ----------------------------------------------------------------------------------


def naive_pack(codes: list[int], bits: int) -> bytes:
    """Oracle: one big little-endian integer, code i at bit offset bits * i."""
    value = sum(c << (bits * i) for i, c in enumerate(codes))
    return value.to_bytes(math.ceil(len(codes) * bits / 8), "little")


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 13, 64, 1001])
def test_pack_matches_bit_string_oracle_and_round_trips(bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (n,), generator=g)
    packed = packing.pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    assert bytes(packed.tolist()) == naive_pack(codes.tolist(), bits)
    assert torch.equal(packing.unpack_bits(packed, bits, n), codes)


def test_pack_rejects_bad_codes_and_sizes() -> None:
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        packing.pack_bits(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="1..8"):
        packing.pack_bits(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match="take 2 bytes"):
        packing.unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 4)


@pytest.mark.parametrize("name", ["fp8_e4m3fn", "fp8_e5m2"])
def test_fp8_codes_equal_torch_float8_bits(name: str) -> None:
    fmt = formats.parse(name)
    values = torch.cat([formats.grid(fmt), torch.tensor([-0.0])])
    dtype = torch.float8_e4m3fn if name == "fp8_e4m3fn" else torch.float8_e5m2
    oracle = values.to(dtype).view(torch.uint8).to(torch.int64)
    codes = packing.encode_fp(values, fmt)
    assert torch.equal(codes, oracle)
    assert same_bits(packing.decode_fp(codes, fmt), values)


@pytest.mark.parametrize(
    ("name", "np_dtype"),
    [
        ("fp6_e2m3", ml_dtypes.float6_e2m3fn),
        ("fp6_e3m2", ml_dtypes.float6_e3m2fn),
        ("fp4_e2m1", ml_dtypes.float4_e2m1fn),
    ],
)
def test_fp6_fp4_codes_equal_ml_dtypes_bits(name: str, np_dtype: type) -> None:
    fmt = formats.parse(name)
    values = torch.cat([formats.grid(fmt), torch.tensor([-0.0])])
    oracle = values.numpy().astype(np_dtype).view(np.uint8).astype(np.int64)
    codes = packing.encode_fp(values, fmt)
    assert codes.tolist() == oracle.tolist()
    assert same_bits(packing.decode_fp(codes, fmt), values)


def test_encode_fp_rejects_off_grid_values() -> None:
    with pytest.raises(ValueError, match="round them to the format"):
        packing.encode_fp(torch.tensor([0.3]), formats.parse("fp4_e2m1"))


# -- codes: every weight format ---------------------------------------------------------------


@pytest.mark.parametrize("cand", VARIANTS)
def test_codes_rebuild_the_fake_quantized_weight_bit_exactly(cand: str) -> None:
    spec = parse_candidate(cand).weight
    g = torch.Generator().manual_seed(len(cand))
    w = torch.randn(6, 5, 3, 3, generator=g) * torch.logspace(-3, 1, 6)[:, None, None, None]
    w[0, 0, 0, 0] = 0.0
    enc = encode_weight(w, spec)
    assert int(enc.codes.min()) >= 0 and int(enc.codes.max()) < 1 << spec.bits
    assert same_bits(decode_weight(enc), fake.quantize_weight(w, spec))


# -- safetensors save/load ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cnn() -> tuple[tasks.Task, torch.nn.Module]:
    """The synthetic CNN (plain, depthwise and grouped convs, a linear layer), wrapped and calibrated."""
    task = tasks.get("synthetic-cnn")
    qmodel = mixq.wrap(copy.deepcopy(task.model).eval())
    mixq.calibrate(qmodel, task.calib[:2], gram=True)
    return task, qmodel


def result_for(task: tasks.Task, qmodel: torch.nn.Module, cand: str) -> mixq.Result:
    spec = parse_candidate(cand)
    plan = Plan({n: spec for n in mixq.sites(qmodel)}, {"task": task.name})
    mixq.apply(qmodel, plan)
    return mixq.Result(plan, qmodel, {})


@pytest.mark.parametrize("cand", [*VARIANTS, *ACT_VARIANTS, "w2+asym+omse-a8"])
def test_safetensors_round_trip_is_bit_exact(cnn, cand: str, tmp_path) -> None:
    task, qmodel = cnn
    res = result_for(task, qmodel, cand)
    path = export.save(res, tmp_path / "m.safetensors")
    loaded = export.load(path, model=task.model)
    x = torch.cat([b[0] for b in task.val])[:64]
    with torch.no_grad():
        assert same_bits(loaded(x), res.model(x))


@pytest.mark.parametrize(
    "cand", ["w4a8", "w3+asym-a8", "w2g8+asym", "wfp6_e2m3-a8", "wmxfp4_e2m1", "w3g8+fzero", "w4+fzero-a8"]
)
def test_payload_size_equals_cost_model(cand: str, tmp_path) -> None:
    res = mixq.run("synthetic-mlp", candidates=[cand])
    path = export.save(res, tmp_path / "m.safetensors")
    raw = path.read_bytes()
    payload = len(raw) - 8 - int.from_bytes(raw[:8], "little")
    assert payload == pytest.approx(res.metrics.size_bytes, rel=0.01)
    assert payload >= res.metrics.size_bytes  # packing pads each tensor to whole bytes only


def test_load_rebuilds_the_task_model_by_name(tmp_path) -> None:
    res = mixq.run("synthetic-mlp", candidates=["w3+asym-a8"])
    loaded = export.load(export.save(res, tmp_path / "m.safetensors"))
    x = tasks.get("synthetic-mlp").val[0][0]
    with torch.no_grad():
        assert same_bits(loaded(x), res.model(x))


def test_bad_files_and_arguments_raise_clear_errors(cnn, tmp_path) -> None:
    task, qmodel = cnn
    res = result_for(task, qmodel, "w4a8")
    path = export.save(res, tmp_path / "m.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        export.load(broken, model=task.model)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        export.load(garbage, model=task.model)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a mixq export"):
        export.load(plain, model=task.model)
    with pytest.raises(ValueError, match="does not fit the model"):
        export.load(path, model=tasks.get("synthetic-mlp").model)
    with pytest.raises(ValueError, match="valid: safetensors, onnx"):
        export.save(res, tmp_path / "m.bin", format="bin")
    custom = mixq.Result(Plan(res.plan.layers, {"task": "custom"}), qmodel, {})
    with pytest.raises(ValueError, match="pass model="):
        export.load(export.save(custom, tmp_path / "c.safetensors"))


# -- ONNX ---------------------------------------------------------------------------------------


def ort_run(path, x: torch.Tensor, optimize: bool, optimized_path=None) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"input": x.numpy()})[0]


ONNX_CASES = {  # candidate -> element type of the weight initializer
    "w8a8": "INT8",
    "w4a8": "INT4",
    "w3+asym-a6": "UINT4",
    "w2a4+sym": "INT4",
    "w6+tensor-a8": "INT8",
    "wuint4-auint8": "UINT4",
    "wfp8_e4m3fn-afp8_e4m3fn": "FLOAT8E4M3FN",
    "wfp8_e5m2-afp8_e5m2": "FLOAT8E5M2",
    "wmxfp4_e2m1-a8": "FLOAT",
    "w4g8-a8": "FLOAT",
    "wfp6_e3m2-a8": "FLOAT",
    "w4+fzero-a8": "FLOAT",  # a float zero point: no DequantizeLinear form, float32 weights
}


@pytest.mark.parametrize("cand", list(ONNX_CASES))
def test_onnx_runtime_matches_the_simulation(cnn, cand: str, tmp_path) -> None:
    task, qmodel = cnn
    res = result_for(task, qmodel, cand)
    # the writer's numerics per format: the legacy tracer is faster; the maintained one on two
    exporter = "dynamo" if cand in ("w8a8", "w4a8") else "torchscript"
    path = export.save(res, tmp_path / "m.onnx", format="onnx", task=task, exporter=exporter)
    model = onnx.load(str(path))
    inits = {t.name: onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer}
    assert inits["conv1.weight.codes" if ONNX_CASES[cand] != "FLOAT" else "conv1.weight"] == ONNX_CASES[cand]
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and not any(
        n.domain == "mixq" for n in model.graph.node
    )
    x = torch.cat([b[0] for b in task.val])
    with torch.no_grad():
        sim = res.model(x).numpy()
    out = ort_run(path, x, optimize=False)
    diff, scale = np.abs(out - sim), np.abs(sim).max()
    # Float summation order differs; a value on a rounding boundary of a later quantizer may then
    # land one step away, which moves a few outputs a little: the bulk agrees to float precision.
    assert (diff <= 1e-5 * scale).mean() >= 0.99
    assert diff.max() <= 0.02 * scale
    assert (out.argmax(1) == sim.argmax(1)).all()
    if ONNX_CASES[cand] == "FLOAT":  # float weights stay float under ORT's full optimization too
        fused = ort_run(path, x, optimize=True, optimized_path=tmp_path / "opt.onnx")
        fused_ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
        assert not {"QLinearConv", "QGemm"} & fused_ops
        diff = np.abs(fused - sim)
        assert (diff <= 1e-5 * scale).mean() >= 0.99 and diff.max() <= 0.02 * scale
        assert (fused.argmax(1) == sim.argmax(1)).all()


def test_onnx_rejects_inputs_it_cannot_express(cnn, tmp_path) -> None:
    task, qmodel = cnn
    res = result_for(task, qmodel, "w4-amxint8")
    with pytest.raises(ValueError, match="no ONNX QDQ form; supported input formats"):
        export.save(res, tmp_path / "m.onnx", format="onnx", task=task)


def test_mnist_int8_runs_in_integer_kernels_with_the_simulated_accuracy(tmp_path) -> None:
    """The real MNIST CNN at w7a8 on 500 real test images: ONNX Runtime fuses QLinearConv."""
    task = tasks.mnist_cnn(calib_size=256, val_size=500, batch_size=500)
    qmodel = mixq.wrap(copy.deepcopy(task.model).eval())
    mixq.calibrate(qmodel, task.calib)
    res = result_for(task, qmodel, "w7a8")
    path = export.save(res, tmp_path / "m.onnx", format="onnx", task=task)
    x, y = task.val[0][0], task.val[0][1].numpy()
    with torch.no_grad():
        sim = res.model(x).numpy()
    fused = ort_run(path, x, optimize=True, optimized_path=tmp_path / "opt.onnx")
    opt = onnx.load(str(tmp_path / "opt.onnx")).graph.node
    assert [n.op_type for n in opt].count("QLinearConv") == 2 and "QGemm" in [n.op_type for n in opt]
    # the first conv (one input channel) runs in float32 (NCHWc) on its 8-bit input codes minus
    # their zero point, in a form ORT does not fuse, and its integer weights; the exact integer
    # sums are then scaled by s_x s_w (a DequantizeLinear of their int32 values)
    graph = onnx.load(str(path)).graph
    inits = {t.name: onnx.TensorProto.DataType.Name(t.data_type) for t in graph.initializer}
    first = "conv_layers.0"
    assert inits[f"{first}.weight"] == "FLOAT" and f"{first}.weight.codes" not in inits
    assert [n.op_type for n in graph.node][:3] == ["QuantizeLinear", "Cast", "Sub"]
    assert [n.op_type for n in graph.node][4:8] == ["Conv", "Cast", "DequantizeLinear", "Add"]
    assert inits[graph.node[0].input[2]] == "UINT8"
    assert {"Conv", "MaxPool"} <= {n.op_type for n in opt if n.domain == "com.microsoft.nchwc"}
    reference = ort_run(path, x, optimize=False)
    assert np.abs(reference - sim).max() < 0.1  # logits of magnitude about 20
    assert np.abs(fused - sim).max() < 0.5  # + int32 bias and requantization in the fused kernels
    assert (fused.argmax(1) == sim.argmax(1)).all() and (reference.argmax(1) == sim.argmax(1)).all()
    assert (fused.argmax(1) == y).mean() == (sim.argmax(1) == y).mean()


def test_mnist_with_a_float_image_input_keeps_the_first_conv_on_float_kernels(tmp_path) -> None:
    """w7a8 with the first layer's input float: its conv, Relu and MaxPool stay float32 (NCHWc)."""
    task = tasks.mnist_cnn(calib_size=256, val_size=500, batch_size=500)
    base = mixq.run(task, method="uniform", candidates=["w7a8"])
    first = next(iter(base.plan.layers))
    layers = {**base.plan.layers, first: parse_candidate("w7")}
    res = mixq.evaluate(task, Plan(layers, {"task": task.name}))
    assert res.plan.layers[first].act is None
    assert res.metrics.avg_weight_bits == base.metrics.avg_weight_bits
    path = export.save(res, tmp_path / "m.onnx", format="onnx", task=task)
    graph = onnx.load(str(path)).graph
    inits = {t.name: onnx.TensorProto.DataType.Name(t.data_type) for t in graph.initializer}
    assert inits[f"{first}.weight"] == "FLOAT"  # the exact dequantized values: no DQ on every run
    ops = [n.op_type for n in graph.node]
    assert ops.index("MaxPool") < ops.index("Relu")  # max commutes with Relu: same values
    x, y = task.val[0][0], task.val[0][1].numpy()
    with torch.no_grad():
        sim = res.model(x).numpy()
    fused = ort_run(path, x, optimize=True, optimized_path=tmp_path / "opt.onnx")
    opt = onnx.load(str(tmp_path / "opt.onnx")).graph.node
    assert [n.op_type for n in opt].count("QLinearConv") == 2
    nchwc = {n.op_type for n in opt if n.domain == "com.microsoft.nchwc"}
    assert {"Conv", "MaxPool"} <= nchwc  # the float kernels, not a uint8 NCHW MaxPool
    reference = ort_run(path, x, optimize=False)
    assert np.abs(reference - sim).max() < 0.1 and np.abs(fused - sim).max() < 0.5
    assert (fused.argmax(1) == sim.argmax(1)).all() and (reference.argmax(1) == sim.argmax(1)).all()
    assert (fused.argmax(1) == y).mean() * 100 == pytest.approx(res.metrics.metric)


def test_resnet_convs_before_residual_adds_export_float_weights_and_match(tmp_path) -> None:
    """Fashion ResNet-20 at w7a8: a conv whose output meets no quantizer runs in float32.

    Its weight is the exact dequantized float32 (ORT's NCHWc kernels); every other conv keeps
    INT8 codes and fuses into QLinearConv; ORT's outputs still equal the simulation.
    """
    task = tasks.fashion("fashion-resnet20", calib_size=64, val_size=256, batch_size=256)
    res = mixq.run(task, method="uniform", candidates=["w7a8"])
    path = export.save(res, tmp_path / "m.onnx", format="onnx", task=task)
    graph = onnx.load(str(path)).graph
    inits = {t.name: onnx.TensorProto.DataType.Name(t.data_type) for t in graph.initializer}
    as_float = {n for n in res.plan.layers if f"{n}.weight" in inits}
    as_codes = {n for n in res.plan.layers if inits.get(f"{n}.weight.codes") == "INT8"}
    assert as_float and as_codes and as_float | as_codes == set(res.plan.layers)
    assert all(inits[f"{n}.weight"] == "FLOAT" for n in as_float)
    x = task.val[0][0]
    with torch.no_grad():
        sim = res.model(x).numpy()
    fused = ort_run(path, x, optimize=True, optimized_path=tmp_path / "opt.onnx")
    opt = [(n.op_type, n.domain) for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    int_convs = as_codes - {"fc"}  # fc: a float Gemm (its output meets no quantizer either)
    assert opt.count(("QLinearConv", "com.microsoft")) == len(int_convs)  # NHWC integer kernels
    assert opt.count(("Conv", "com.microsoft.nchwc")) == len(as_float)  # the float kernels
    reference = ort_run(path, x, optimize=False)
    assert (reference.argmax(1) == sim.argmax(1)).all()
    assert (fused.argmax(1) == sim.argmax(1)).mean() >= 0.99  # + int32 bias and requantization


def test_int4_codes_in_int8_storage_fuse_into_integer_kernels_with_the_same_values(tmp_path) -> None:
    """A mixed w4a8/w7a8 MNIST plan: INT4 weights run dequantized in float, INT8-stored ones fuse."""
    task = tasks.mnist_cnn(calib_size=256, val_size=500, batch_size=500)
    qmodel = mixq.wrap(copy.deepcopy(task.model).eval())
    mixq.calibrate(qmodel, task.calib)
    names = list(mixq.sites(qmodel))
    specs = {n: parse_candidate("w4a8" if i % 2 else "w7a8") for i, n in enumerate(names)}
    plan = Plan(specs, {"task": task.name})
    mixq.apply(qmodel, plan)
    res = mixq.Result(plan, qmodel, {})
    x = task.val[0][0]
    outs, fused_ops = {}, {}
    for as8 in (False, True):
        path = export.save(res, tmp_path / f"m{as8}.onnx", format="onnx", task=task, int4_as_int8=as8)
        graph = onnx.load(str(path)).graph
        inits = {t.name: onnx.TensorProto.DataType.Name(t.data_type) for t in graph.initializer}
        for n in names[1::2]:  # INT4 linear layers run on exact integers stored as float32 (MatMulNBits)
            got = inits.get(f"{n}.weight.codes", inits.get(f"{n}.weight"))
            assert got == ("INT8" if as8 else "FLOAT" if n.startswith("fc") else "INT4"), n
        outs[as8] = ort_run(path, x, optimize=False)
        fused = ort_run(path, x, optimize=True, optimized_path=tmp_path / "opt.onnx")
        fused_ops[as8] = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
        with torch.no_grad():
            assert (fused.argmax(1) == res.model(x).argmax(1).numpy()).mean() >= 0.99
    assert np.array_equal(outs[False], outs[True])  # the same codes, scales and values
    assert fused_ops[True].count("QLinearConv") == 2 > fused_ops[False].count("QLinearConv")
    with pytest.raises(ValueError, match="int4_as_int8 applies to format='onnx'"):
        export.save(res, tmp_path / "m.safetensors", int4_as_int8=True)


def test_evaluate_measures_a_given_plan_as_run_does(tmp_path) -> None:
    res = mixq.run(
        "synthetic-mlp", method="sensitivity-ilp", candidates=["w4a8", "w8a8"], budget={"avg_weight_bits": 6}
    )
    res.plan.save(tmp_path / "plan.json")
    again = mixq.evaluate("synthetic-mlp", tmp_path / "plan.json")
    for k in ("metric", "avg_weight_bits", "size_bytes", "bops"):
        assert getattr(again.metrics, k) == getattr(res.metrics, k)
    bad = Plan({"nope": parse_candidate("w4a8")}, {})
    with pytest.raises(ValueError, match="nope"):
        mixq.evaluate("synthetic-mlp", bad)


# -- CLI: export a run directory ------------------------------------------------------------------


def test_cli_exports_a_run_directory(tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    assert cli.main(["run", "--task", "synthetic-mlp", "--candidates", "w4a8", "--out", str(run_dir)]) == 0
    assert cli.main(["export", str(run_dir)]) == 0
    assert cli.main(["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    res = mixq.run("synthetic-mlp", candidates=["w4a8"])
    x = tasks.get("synthetic-mlp").val[0][0]
    loaded = export.load(run_dir / "model.safetensors")
    with torch.no_grad():
        assert same_bits(loaded(x), res.model(x))
    out = ort_run(tmp_path / "m.onnx", x, optimize=False)
    assert (out.argmax(1) == res.model(x).detach().numpy().argmax(1)).all()
    capsys.readouterr()
    assert cli.main(["export", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- run directories hold their model: PTQ and QAT weights come back exactly ------------------------


def check_run_dir(run_dir, res: mixq.Result, task: tasks.Task, capsys) -> None:
    """The run's model.safetensors reloads bit-exactly; `mixq export` and `mixq eval` use it."""
    x = torch.cat([b[0] for b in task.val])
    with torch.no_grad():
        sim = res.model(x)
        assert same_bits(export.load(run_dir / "model.safetensors")(x), sim)
    assert cli.main(["export", str(run_dir)]) == 0  # checks the loaded model's metric against the run's
    assert cli.main(["export", str(run_dir), "--out", str(run_dir / "copy.safetensors")]) == 0
    with torch.no_grad():
        assert same_bits(export.load(run_dir / "copy.safetensors")(x), sim)
    assert cli.main(["export", str(run_dir), "--format", "onnx"]) == 0
    out = ort_run(run_dir / "model.onnx", x, optimize=False)
    assert np.abs(out - sim.numpy()).max() <= 0.02 * np.abs(sim.numpy()).max()
    assert (out.argmax(1) == sim.numpy().argmax(1)).all()
    capsys.readouterr()
    assert cli.main(["eval", str(run_dir)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["model"] == "model.safetensors" and shown["metric"] == res.metrics.metric
    assert cli.main(["eval", str(run_dir), "--plan", str(run_dir / "plan.json")]) == 2
    assert "either a RUN_DIR" in capsys.readouterr().err


def plan_only_outputs(run_dir, x: torch.Tensor) -> torch.Tensor:
    """What the run's plan alone rebuilds (its stored model set aside, as a run whose plan had no
    packed form: the manifest does not list it)."""
    (run_dir / "model.safetensors").rename(run_dir / "aside.safetensors")
    manifest = (run_dir / rundir.MANIFEST).read_text()
    files = [f for f in json.loads(manifest)["files"] if f != rundir.MODEL]
    rundir.write_manifest(run_dir, json.loads(manifest)["key"], files)
    try:
        with pytest.raises(ValueError, match="cannot be rebuilt from its plan"):
            export.rebuild(run_dir)
        res, _ = export.rebuild(run_dir, check=False)
        with torch.no_grad():
            return res.model(x)
    finally:
        (run_dir / "aside.safetensors").rename(run_dir / "model.safetensors")
        (run_dir / rundir.MANIFEST).write_text(manifest)


def test_run_dir_with_bias_correction_and_adaround_exports_exactly(tmp_path, capsys) -> None:
    task = tasks.get("synthetic-mlp")
    run_dir = tmp_path / "run"
    res = mixq.run(
        task,
        candidates=["w3-a8"],
        ptq=["bias_correction", "adaround"],
        ptq_args={"adaround": {"iters": 20, "batch_size": 32}},
        out=run_dir,
    )
    x = torch.cat([b[0] for b in task.val])
    with torch.no_grad():
        assert not torch.equal(plan_only_outputs(run_dir, x), res.model(x))  # the file is needed
    check_run_dir(run_dir, res, task, capsys)


def test_run_dir_after_qat_exports_exactly(tmp_path, capsys) -> None:
    task = tasks.get("synthetic-mlp")
    run_dir = tmp_path / "run"
    res = mixq.run(
        task,
        "ddq",
        candidates=["w2a8", "w4a8", "w8a8"],
        budget={"avg_weight_bits": 4.8},
        method_args={"steps": 6},
        out=run_dir,
    )
    x = torch.cat([b[0] for b in task.val])
    with torch.no_grad():
        assert not torch.equal(plan_only_outputs(run_dir, x), res.model(x))
    check_run_dir(run_dir, res, task, capsys)


class Relu6Net(torch.nn.Module):
    """conv -> ReLU6 -> depthwise -> ReLU6 -> 1x1 conv -> ReLU6 -> mean -> linear (MobileNetV2's links)."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.c1, self.r1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6()
        self.dw, self.r2 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6()
        self.c2, self.r3 = nn.Conv2d(8, 12, 1), nn.ReLU6()
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.r3(self.c2(self.r2(self.dw(self.r1(self.c1(x)))))).mean((2, 3)))


def test_cle_channel_clamps_export_to_onnx_and_safetensors(tmp_path) -> None:
    from mixq.ptq.cle import ChannelClamp

    torch.manual_seed(0)
    model = Relu6Net().eval()
    with torch.no_grad():  # channel ranges far apart: CLE rescales them, the ReLU6 become clamps
        for layer in (model.c1, model.dw, model.c2):
            n = layer.weight.shape[0]
            layer.weight.mul_(torch.logspace(-1, 1, n)[torch.randperm(n)].reshape(-1, 1, 1, 1))
    task = tasks._teacher_task(model, (3, 8, 8), "relu6-cnn")
    res = mixq.run(task, candidates=["w7a8"], ptq=["cle"])
    clamps = [m for m in res.model.modules() if isinstance(m, ChannelClamp)]
    assert len(clamps) == 2 and not torch.equal(clamps[0].upper, torch.full_like(clamps[0].upper, 6.0))
    x = torch.cat([b[0] for b in task.val])
    with torch.no_grad():
        sim = res.model(x)
    loaded = export.load(export.save(res, tmp_path / "m.safetensors"), model=task.model)  # ReLU6 model
    assert sum(isinstance(m, ChannelClamp) for m in loaded.modules()) == 2
    with torch.no_grad():
        assert same_bits(loaded(x), sim)
    path = export.save(res, tmp_path / "m.onnx", format="onnx", task=task)
    graph = onnx.load(str(path)).graph
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    consts = [
        onnx.numpy_helper.to_array(a.t) for n in graph.node if n.op_type == "Constant" for a in n.attribute
    ]
    uppers = [inits.get(i) for n in graph.node if n.op_type == "Min" for i in n.input]
    uppers += [c for c in consts if c.size == 8]
    assert any(u is not None and np.array_equal(u.reshape(-1), clamps[0].upper.numpy()) for u in uppers)
    scale = np.abs(sim.numpy()).max()
    out = ort_run(path, x, optimize=False)  # the QDQ semantics: the simulation up to summation order
    assert np.abs(out - sim.numpy()).max() <= 1e-5 * scale
    assert (out.argmax(1) == sim.numpy().argmax(1)).all()
    # The next input's quantizer is repeated above each clamp (exact), so ORT runs the convs that
    # feed clamps as QLinearConv; its int32 biases and requantization then move outputs a little.
    fused = ort_run(path, x, optimize=True, optimized_path=tmp_path / "opt.onnx")
    assert [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node].count("QLinearConv") == 2
    assert np.abs(fused - sim.numpy()).max() <= 0.1 * scale
    assert (fused.argmax(1) == sim.numpy().argmax(1)).mean() >= 0.98


# -- multipoint weights and SPARQ inputs ------------------------------------------------------------


def multipoint_plan(qmodel: torch.nn.Module, bits: int, act: str | None) -> Plan:
    """Every layer multipoint: 1, 2, 3, 1, 2, 3, ... points per output channel."""
    from mixq.formats import Int
    from mixq.plan import LayerSpec, QSpec

    aspec = parse_candidate(f"w8{act}").act if act else None
    points = {n: tuple(i % 3 + 1 for i in range(m.weight.shape[0])) for n, m in mixq.sites(qmodel).items()}
    return Plan(
        {n: LayerSpec(QSpec(Int(bits), points=p), aspec) for n, p in points.items()},
        {"task": "synthetic-cnn"},
    )


MP_SPARQ_CASES = [
    "mp3-a8",
    "mp4",
    "mp2-asparq4_3opt",
    "w8-asparq4_5opt_v",
    "w4-asparq4_2opt_raw",
    "w6-asparq4_3opt_raw_v",
]


def mp_sparq_result(task: tasks.Task, qmodel: torch.nn.Module, case: str) -> mixq.Result:
    if case.startswith("mp"):
        bits, _, act = case[2:].partition("-")
        plan = multipoint_plan(qmodel, int(bits), act or None)
        mixq.apply(qmodel, plan)
        return mixq.Result(plan, qmodel, {})
    return result_for(task, qmodel, case)


@pytest.mark.parametrize("case", MP_SPARQ_CASES)
def test_multipoint_and_sparq_round_trip_and_run_in_onnx_runtime(cnn, case: str, tmp_path) -> None:
    task, qmodel = cnn
    res = mp_sparq_result(task, qmodel, case)
    x = torch.cat([b[0] for b in task.val])
    with torch.no_grad():
        sim = res.model(x)
    loaded = export.load(export.save(res, tmp_path / "m.safetensors"), model=task.model)
    with torch.no_grad():
        assert same_bits(loaded(x), sim)
    path = export.save(res, tmp_path / "m.onnx", format="onnx", task=task)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    if case.startswith("mp"):
        assert ops.count("DequantizeLinear") >= 3 + (2 if "-a" in case else 0)  # conv1: three points
    if "sparq" in case:
        assert "Gather" in ops and ("Where" in ops) == case.endswith("_v")
    reference = ort_run(path, x, optimize=False)
    # ORT's own QDQ rewrites (int32 biases, MatMulNBits) change numerics: full optimization
    # otherwise, e.g. the fused float convolutions, must give the same values.
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    optimized = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()}
    )[0]
    scale = np.abs(sim.numpy()).max()
    for out in (reference, optimized):  # float summation order may move a code on a rounding boundary
        diff = np.abs(out - sim.numpy())
        assert (diff <= 1e-5 * scale).mean() >= 0.99 and diff.max() <= 0.25 * scale
        assert (out.argmax(1) == sim.numpy().argmax(1)).mean() >= 0.99


def test_multipoint_payload_equals_cost_model(tmp_path) -> None:
    res = mixq.run("synthetic-mlp", "multipoint", ["w3"], method_args={"ratio": 0.5})
    assert any(s.weight.points is not None and max(s.weight.points) > 1 for s in res.plan.layers.values())
    raw = export.save(res, tmp_path / "m.safetensors").read_bytes()
    payload = len(raw) - 8 - int.from_bytes(raw[:8], "little")
    assert payload == pytest.approx(res.metrics.size_bytes, rel=0.01)
    loaded = export.load(tmp_path / "m.safetensors")
    x = tasks.get("synthetic-mlp").val[0][0]
    with torch.no_grad():
        assert same_bits(loaded(x), res.model(x))


def test_export_modules_are_layered() -> None:
    """deploy builds models, packed is the file format, ort ORT's surgery below the QDQ writer."""
    from test_imports import find_cycle, import_graph

    graph = import_graph()
    e = {n: f"mixq.export.{n}" for n in ("deploy", "packed", "ort", "qdq", "integer")}
    assert not graph[e["deploy"]] & {e["packed"], e["ort"], e["qdq"], e["integer"]}
    assert not graph[e["packed"]] & {e["ort"], e["qdq"], e["integer"]}
    assert not graph[e["ort"]] & {e["packed"], e["qdq"], e["integer"]}  # qdq passes its Graph in
    assert e["ort"] in graph[e["qdq"]] and not graph[e["qdq"]] & {e["packed"], e["integer"]}
    export = {m: deps & set(e.values()) for m, deps in graph.items() if m in e.values()}
    assert find_cycle(export) is None


def test_a_schema_2_multipoint_file_is_refused_with_a_named_reason(cnn, tmp_path) -> None:
    """Multipoint's extra steps moved to float16 in schema 3: an older file is refused, naming its
    layers and what to do, instead of a shape error deep in the reader."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    task, qmodel = cnn
    res = mp_sparq_result(task, qmodel, "mp2")
    path = export.save(res, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta = json.loads(header["mixq"])
    assert meta["schema"] == 3
    meta["schema"] = 2
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={**header, "mixq": json.dumps(meta)})
    with pytest.raises(ValueError, match=r"schema-2 layout .*export the run again"):
        export.load(old, model=task.model)
    export.load(path, model=task.model)  # the file as written still loads
