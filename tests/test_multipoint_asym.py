"""Multipoint on asymmetric per-channel grids (``w{b}+asym``): the first point is the base's own
asymmetric quantizer (its zero point kept), the extra points are symmetric. Checked against the
base quantizer, the max|r| chain from the same first point, the cost model and the packed/ONNX
encodings."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixq
from mixq import export, tasks
from mixq.cost import LayerInfo, weight_bits
from mixq.formats import Int
from mixq.plan import QSpec
from mixq.quant import fake
from mixq.quant import multipoint as mp

F64 = torch.float64


@st.composite
def shifted_weights(draw, max_rows=5, max_cols=16):
    """Rows with per-row scales over three decades and a per-row offset (asymmetric ranges)."""
    rows, cols = draw(st.integers(1, max_rows)), draw(st.integers(2, max_cols))
    vals = draw(
        st.lists(st.floats(-4, 4, allow_nan=False, width=64), min_size=rows * cols, max_size=rows * cols)
    )
    scales = draw(st.lists(st.floats(1e-3, 1.0, width=64), min_size=rows, max_size=rows))
    shifts = draw(st.lists(st.floats(-3, 3, width=64), min_size=rows, max_size=rows))
    w = torch.tensor(vals, dtype=F64).reshape(rows, cols) + torch.tensor(shifts, dtype=F64)[:, None]
    return w * torch.tensor(scales, dtype=F64)[:, None]


def asym(bits, clip="minmax", points=None, granularity="channel"):
    return QSpec(Int(bits), granularity=granularity, symmetric=False, clip=clip, points=points)


def errs(w, steps, codes):
    return mp.sq_error(w, steps, codes)


def absmax_chain(w, start, bits, n):
    """The plain max|r| chain from the base point: each extra point takes a = max|r| (oracle)."""
    k = mp.levels(bits)
    steps, codes = [start.steps.double()], [start.codes.double()]
    out = [(torch.stack(steps, 1), torch.stack(codes, 1))]
    for _ in range(1, n):
        r = w - (torch.stack(steps, 1)[..., None] * torch.stack(codes, 1)).sum(1)
        s = r.abs().amax(1) / k
        safe = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.where(s[:, None] > 0, torch.clamp(torch.round(r / safe[:, None]), -k, k), 0.0)
        steps.append(s)
        codes.append(q)
        out.append((torch.stack(steps, 1), torch.stack(codes, 1)))
    return out


@settings(max_examples=25, deadline=None)
@given(shifted_weights(), st.integers(2, 6), st.integers(1, 4))
def test_asym_best_never_worse_than_base_chain_or_fewer_points(w, bits, n):
    start = mp.base_start(w, asym(bits))
    k = mp.levels(bits)
    chain = absmax_chain(w, start, bits, n)
    prev = None
    for i, (rows, s, q) in enumerate(mp.chain_levels(w, bits, n, "best", "channel", start)):
        assert torch.equal(rows, torch.arange(w.shape[0]))
        e = errs(w, s, q)
        slack = 1e-12 * w.pow(2).sum(1) + 1e-300
        cs, cq = chain[i]
        assert torch.all(e <= errs(w, cs, cq) + slack)  # never worse than the max|r| chain
        if prev is not None:
            assert torch.all(e <= prev + slack)  # nor than its own i−1 points
        # the first point's codes stay on the base's grid with its zero point: q − z in [−z, 2^b − 1 − z]
        z = start.zero.double()
        assert torch.all(q[:, 0].double() >= -z[:, None]) and torch.all(
            q[:, 0].double() <= 2**bits - 1 - z[:, None]
        )
        assert torch.all(q[:, 1:].abs() <= k)
        prev = e
    # the chain's own bound: each max|r| point divides the residual's max by at least 2^b − 2
    r1 = (w - chain[0][0][:, :1] * chain[0][1][:, 0]).abs().amax(1)
    s, q = chain[-1]
    rn = (w - (s[..., None] * q).sum(1)).abs().amax(1)
    assert torch.all(rn <= r1 * float(2**bits - 2) ** -(n - 1) * (1 + 1e-9) + 1e-300)


@pytest.mark.parametrize("clip", ["minmax", "mse", "omse", "percentile"])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_one_asym_point_is_the_base_quantizer(clip, granularity):
    g = torch.Generator().manual_seed(3)
    w = (
        torch.randn(8, 30, generator=g) * torch.linspace(0.1, 2, 8)[:, None]
        + torch.linspace(-1, 1, 8)[:, None]
    )
    x = torch.randn(100, 30, generator=g)
    gram = (x.T @ x)[None]
    base = QSpec(Int(3), granularity=granularity, symmetric=False, clip=clip, percentile=99.0)
    one = QSpec(Int(3), granularity=granularity, symmetric=False, clip=clip, percentile=99.0, points=(1,) * 8)
    ref = fake.quantize_weight(w, base, gram if clip == "omse" else None)
    torch.testing.assert_close(mp.quantize_weight(w, one, gram), ref, rtol=1e-6, atol=1e-6)
    three = QSpec(
        Int(3), granularity=granularity, symmetric=False, clip=clip, percentile=99.0, points=(3,) * 8
    )
    e3 = (w - mp.quantize_weight(w, three, gram)).pow(2).sum(1)
    assert torch.all(e3 <= (w - ref).pow(2).sum(1) + 1e-9)
    assert float(e3.sum()) < 0.1 * float((w - ref).pow(2).sum())


def test_asym_8_bit_codes_need_int16_and_round_trip():
    """q − z of an 8-bit asymmetric grid spans −255..255: stored as int16, rebuilt exactly."""
    w = torch.cat([torch.linspace(0.0, 1.0, 40)[None], torch.linspace(-1.0, 0.0, 40)[None]]) + 0.003
    pts = mp.spec_points(w, asym(8, points=(2, 2)))
    assert pts.codes.dtype == torch.int16 and pts.zero is not None
    assert int(pts.codes[:, 0].max()) > 127 or int(pts.codes[:, 0].min()) < -128
    enc = export.codes.encode_weight(w, asym(8, points=(2, 2)))
    assert torch.equal(export.codes.decode_weight(enc), pts.reconstruct())


def test_cost_counts_zero_points_once_per_first_step():
    info = LayerInfo("fc", "linear", (4, 256), 4, 1024.0)
    pts = (1, 3, 2, 1)
    got = weight_bits(info, asym(3, points=pts))
    assert got == sum(pts) * 256 * 3 + 4 * (32 + 3) + 3 * 16  # codes, f32 step + 3-bit zero, f16 extras
    assert weight_bits(info, asym(3, points=(1,) * 4)) == weight_bits(info, asym(3))  # = the base
    assert (
        weight_bits(info, asym(3, points=pts, granularity="tensor")) == sum(pts) * 256 * 3 + (32 + 3) + 3 * 16
    )


@pytest.fixture(scope="module")
def asym_run():
    res = mixq.run(
        "synthetic-mlp", "multipoint", ["w3+asym"], method_args={"ratio": 0.5, "base_method": "uniform"}
    )
    uni = mixq.run("synthetic-mlp", "uniform", ["w3+asym"])
    return res, uni


def test_asym_method_payload_and_reload_equal_the_simulation(asym_run, tmp_path):
    res, uni = asym_run
    specs = [s.weight for s in res.plan.layers.values()]
    assert all(not s.symmetric and s.points is not None for s in specs)
    assert any(max(s.points) > 1 for s in specs)
    assert res.metrics.avg_weight_bits > uni.metrics.avg_weight_bits
    raw = export.save(res, tmp_path / "m.safetensors").read_bytes()
    payload = len(raw) - 8 - int.from_bytes(raw[:8], "little")
    assert payload == pytest.approx(res.metrics.size_bytes, rel=0.01)
    loaded = export.load(tmp_path / "m.safetensors")
    x = torch.cat([b[0] for b in tasks.get("synthetic-mlp").val])
    with torch.no_grad():
        assert torch.equal(loaded(x), res.model(x))


def test_asym_onnx_dequantizes_the_first_point_with_its_zero_points(asym_run, tmp_path):
    import onnx

    res, _ = asym_run
    task = tasks.get("synthetic-mlp")
    path = export.save(res, tmp_path / "m.onnx", format="onnx", task=task)
    model = onnx.load(str(path))
    zeros = {i.name: i for i in model.graph.initializer if i.name.endswith("point0.zero")}
    assert zeros and all(
        z.data_type in (onnx.TensorProto.UINT4, onnx.TensorProto.UINT8) for z in zeros.values()
    )
    x = torch.cat([b[0] for b in task.val])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        sim = res.model(x).numpy()
    assert np.abs(out - sim).max() <= 1e-5 * np.abs(sim).max()
