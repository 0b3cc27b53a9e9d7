"""Test multipoint PTQ: the greedy points against brute force and the error bound, the adaptive
allocation against exact output errors, the cost model, the channel-split form, and the method."""

import doctest
import itertools
import json
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mixq
import mixq.quant.multipoint
from mixq import cli, cost, tasks
from mixq.api import prepare
from mixq.formats import Int
from mixq.methods import METHODS
from mixq.methods import multipoint as method
from mixq.plan import LayerSpec, Plan, QSpec
from mixq.quant import fake
from mixq.quant import multipoint as mp
from mixq.wrap import apply, calibrate, sites, wrap

F64 = torch.float64


@st.composite
def weights(draw, max_rows=4, max_cols=12):
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(1, max_cols))
    vals = draw(
        st.lists(st.floats(-8, 8, allow_nan=False, width=64), min_size=rows * cols, max_size=rows * cols)
    )
    w = torch.tensor(vals, dtype=F64).reshape(rows, cols)
    zero_row = draw(st.booleans())
    if zero_row:
        w[0] = 0.0
    return w


def test_doctests():
    assert doctest.testmod(mixq.quant.multipoint).failed == 0
    assert doctest.run_docstring_examples(cost.multipoint_bits, {}) is None


# -- numerics: bound, monotone error, greedy vs absmax, brute force --------------------------------


@settings(max_examples=80, deadline=None)
@given(weights(), st.integers(2, 8), st.integers(1, 5))
def test_linf_bound_with_absmax_step(w, bits, n):
    """‖w − w̃‖∞ ≤ ‖w‖∞ (2^b − 2)^(−n) per channel when a = ‖r‖∞ at every step."""
    wt = mp.approximate(w, bits, n, a_search="absmax")
    err = (w - wt).abs().amax(1)
    bound = w.abs().amax(1) * float(2**bits - 2) ** (-n)
    assert torch.all(err <= bound * (1 + 1e-9) + 1e-300)


def test_linf_bound_is_tight_and_needs_the_restricted_grid():
    # One coordinate halfway between two grid points: the first step's error equals the bound.
    for bits in (2, 3, 4):
        k = 2 ** (bits - 1) - 1
        w = torch.tensor([[1.0, 0.5 / k]], dtype=F64)  # 1 is hit exactly; 0.5/k rounds (ties to even) to 0
        err = (w - mp.approximate(w, bits, 1, "absmax")).abs().max()
        assert math.isclose(float(err), 1.0 / (2**bits - 2), rel_tol=1e-12)


@settings(max_examples=60, deadline=None)
@given(weights(), st.integers(2, 6), st.sampled_from(mp.A_SEARCH))
def test_l2_error_falls_with_every_point(w, bits, a_search):
    errs = [float((w - mp.approximate(w, bits, n, a_search)).pow(2).sum()) for n in range(1, 5)]
    start = float(w.pow(2).sum())
    tol = 1e-26 * start  # the reconstruction Σ s_i q_i is rounded: residuals of 0 come back as ~1e-32
    for before, after in zip([start, *errs], errs, strict=False):
        assert after <= before + tol
        if before > 1e3 * tol:
            assert after < before  # strictly while the residual is not zero


@settings(max_examples=60, deadline=None)
@given(weights(), st.integers(2, 8))
def test_greedy_step_no_worse_than_absmax_step(w, bits):
    """From the same residual, the greedy step's ℓ2 error ≤ that of a = ‖r‖∞ (each point)."""
    r = w.clone()
    for _ in range(3):
        sg, qg = mp.next_point(r, bits, "greedy")
        sa, qa = mp.next_point(r, bits, "absmax")
        eg = (r - sg[:, None] * qg).pow(2).sum(1)
        ea = (r - sa[:, None] * qa).pow(2).sum(1)
        assert torch.all(eg <= ea * (1 + 1e-12) + 1e-300)
        r = r - sg[:, None] * qg
    # and after one point the greedy approximation is no worse than the absmax one
    e1g = (w - mp.approximate(w, bits, 1, "greedy")).pow(2).sum(1)
    e1a = (w - mp.approximate(w, bits, 1, "absmax")).pow(2).sum(1)
    assert torch.all(e1g <= e1a * (1 + 1e-12) + 1e-300)


def brute_force_point(r: torch.Tensor, bits: int) -> float:
    """min over a > 0 and ŵ ∈ G_b^d of ‖r − a ŵ‖², by enumerating every code vector."""
    k = 2 ** (bits - 1) - 1
    best = float(r.pow(2).sum())
    for c in itertools.product(range(-k, k + 1), repeat=r.numel()):
        q = torch.tensor(c, dtype=F64)
        qq = float(q.pow(2).sum())
        if qq == 0:
            continue
        s = max(0.0, float((r * q).sum()) / qq)  # least-squares step for these codes
        best = min(best, float((r - s * q).pow(2).sum()))
    return best


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-4, 4, allow_nan=False, width=64), min_size=2, max_size=4), st.integers(2, 3))
def test_greedy_point_matches_brute_force(vals, bits):
    r = torch.tensor([vals], dtype=F64)
    s, q = mp.next_point(r, bits, "greedy")
    got = float((r - s[:, None] * q).pow(2).sum())
    assert got <= brute_force_point(r[0], bits) + 1e-9 * float(r.pow(2).sum()) + 1e-300


def test_one_absmax_point_is_restricted_symmetric_per_channel_quantization():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 20, generator=g, dtype=F64)
    for bits in (2, 3, 4, 8):
        k = 2 ** (bits - 1) - 1
        wn = w.numpy()
        s = np.abs(wn).max(1, keepdims=True) / k
        oracle = np.clip(np.round(wn / s), -k, k) * s  # numpy, independent of torch's code path
        got = mp.approximate(w, bits, 1, "absmax")
        np.testing.assert_allclose(got.numpy(), oracle, rtol=1e-12, atol=1e-15)
        spec = QSpec(Int(bits))  # mixq's per-channel min/max quantizer: the same grid
        np.testing.assert_allclose(fake.quantize_weight(w.float(), spec).double().numpy(), oracle, atol=1e-6)


def test_codes_on_grid_and_reconstruction():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 3, 3, 3, generator=g, dtype=F64)
    w[2] = 0.0
    pts = mp.decompose(w.reshape(5, -1), 3, [1, 2, 3, 4, 1])
    assert pts.codes.dtype == torch.int8 and int(pts.codes.abs().max()) <= 3
    assert torch.all(pts.steps[2] == 0) and torch.all(pts.codes[2] == 0)
    manual = torch.stack(
        [sum(pts.steps[j, i] * pts.codes[j, i].double() for i in range(int(pts.counts[j]))) for j in range(5)]
    )
    torch.testing.assert_close(pts.reconstruct(), manual)
    assert torch.all(pts.steps[0, 1:] == 0)  # absent points have zero steps


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 1}, "bits"),
        ({"bits": 9}, "bits"),
        ({"points": 0}, "points"),
        ({"points": 17}, "points"),
        ({"a_search": "optimal"}, "a_search"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"w": torch.ones(2, 3), "bits": 4, "points": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        mp.approximate(**args)


def test_non_finite_weights_rejected():
    with pytest.raises(ValueError, match="finite"):
        mp.approximate(torch.tensor([[1.0, float("nan")]]), 4, 1)


# -- adaptive allocation -------------------------------------------------------------------------


def layer_problem(seed=0, c=12, d=10, n=200):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, d, generator=g, dtype=F64) * torch.linspace(0.2, 2.0, c, dtype=F64)[:, None]
    x = torch.randn(n, d, generator=g, dtype=F64) * torch.linspace(0.1, 3.0, d, dtype=F64)
    return w, x, (x.T @ x)[None]


def output_errors(w, wt, x):
    """‖X (w_j − w̃_j)‖² per channel, from the inputs themselves (not the Gram matrix)."""
    return ((x @ (w - wt).T) ** 2).sum(0)


def test_first_extra_point_goes_where_output_error_falls_most():
    w, x, gram = layer_problem()
    c = w.shape[0]
    one = mp.decompose(w, 3, [1] * c).reconstruct()
    gains = []
    for j in range(c):  # brute force: add the point to each channel in turn
        counts = [1] * c
        counts[j] = 2
        two = mp.decompose(w, 3, counts).reconstruct()
        gains.append(float(output_errors(w, one, x).sum() - output_errors(w, two, x).sum()))
    alloc = mp.allocate(w, 3, gram, ratio=1 / c, n_max=4)
    assert alloc.extra == 1 and alloc.stop == "budget"
    assert int(alloc.points.counts.argmax()) == int(np.argmax(gains))
    torch.testing.assert_close(
        alloc.errors, output_errors(w, alloc.points.reconstruct(), x), rtol=1e-6, atol=1e-9
    )


def test_allocation_budget_cap_and_determinism():
    w, _, gram = layer_problem(seed=2, c=20)
    spec = QSpec(Int(2), clip="mse")
    start = mp.base_start(w, spec)
    search = mp.Search(step_dtype=mp.STEP_DTYPE)  # the steps the spec's simulation uses
    a = mp.allocate(w, 2, gram, ratio=0.5, n_max=3, search=search, start=start)
    b = mp.allocate(w, 2, gram, ratio=0.5, n_max=3, search=search, start=start)
    assert a.extra == 10 and int(a.points.counts.sum()) == 30
    assert int(a.points.counts.max()) <= 3 and int(a.points.counts.min()) >= 1
    assert torch.equal(a.points.counts, b.points.counts) and torch.equal(a.points.codes, b.points.codes)
    assert float(a.errors.sum()) < float(a.first_errors.sum())
    full = mp.allocate(w, 2, gram, ratio=None, n_max=2)  # no cap: every channel that gains gets n_max
    assert full.stop == "exhausted" and int(full.points.counts.min()) == 2
    # the reconstruction is what the spec recomputes (the plan alone reproduces the model)
    spec = QSpec(Int(2), clip="mse", points=tuple(int(n) for n in a.points.counts))
    one = fake.quantize_weight(w, QSpec(Int(2), clip="mse"))  # channels with one point: the base quantizer
    single = a.points.counts == 1
    torch.testing.assert_close(
        a.points.reconstruct()[single], one[single], rtol=1e-6, atol=1e-9
    )  # fake: float32
    torch.testing.assert_close(mp.quantize_weight(w, spec), a.points.reconstruct(), rtol=1e-9, atol=1e-12)


def test_capped_allocation_is_a_prefix_of_the_uncapped_one():
    """Stopping after k extra points gives the first k of the uncapped allocation (the budget cut uses it)."""
    w, _, gram = layer_problem(seed=6, c=20)
    full = mp.allocate(w, 3, gram, ratio=None, n_max=4)
    assert len(full.order) == full.extra > 20
    for k in (0, 1, 7, 20, full.extra):
        capped = mp.allocate(w, 3, gram, ratio=k / 20 if k <= 20 else None, n_max=4)
        assert full.counts_at(k) == tuple(int(n) for n in capped.points.counts)


def test_error_key_gives_points_to_the_largest_error():
    w, x, gram = layer_problem(seed=3)
    alloc = mp.allocate(w, 3, gram, ratio=1 / w.shape[0], search=mp.Search(key="error"))
    first = output_errors(w, mp.decompose(w, 3, [1] * w.shape[0]).reconstruct(), x)
    assert int(alloc.points.counts.argmax()) == int(first.argmax())


def test_tau_threshold_stops_allocation():
    w, _, gram = layer_problem(seed=4, c=16)
    loose = mp.allocate(w, 3, gram, ratio=None, tau=100.0)
    assert loose.extra == 0 and loose.stop == "tau"
    tau = 0.8
    a = mp.allocate(w, 3, gram, ratio=None, tau=tau, n_max=6)
    target = tau * float(a.first_errors.mean())
    assert a.stop == "tau" and float(a.errors.max()) <= target and a.extra > 0


def test_layer_variant_shares_the_first_step():
    w, _, gram = layer_problem(seed=5)
    a = mp.allocate(w, 4, gram, ratio=0.25, search=mp.Search(first="tensor"))
    assert torch.allclose(a.points.steps[:, 0], (w.abs().max() / 7).expand(w.shape[0]))


def test_grouped_gram_matches_explicit_conv_outputs():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2).double()
    x = torch.randn(5, 4, 7, 7, dtype=F64)
    model = wrap(nn.Sequential(conv))
    calibrate(model, [x], gram=True)
    q = sites(model)["0"]
    w = q.weight.detach().reshape(6, -1)
    alloc = mp.allocate(w, 3, q.weight_quant.gram, ratio=0.5)
    wt = alloc.points.reconstruct().reshape(q.weight.shape)
    direct = F.conv2d(x, q.weight, None, padding=1, groups=2) - F.conv2d(x, wt, None, padding=1, groups=2)
    torch.testing.assert_close(alloc.errors, direct.pow(2).sum((0, 2, 3)), rtol=1e-8, atol=1e-10)


# -- cost -----------------------------------------------------------------------------------------


def test_cost_counts_every_point_and_step():
    info = cost.LayerInfo("fc", "linear", (4, 100), 4, 400.0)
    counts = (1, 3, 1, 2)
    ch = QSpec(Int(4), clip="mse", points=counts)
    # a float32 first step per channel, a float16 step per extra point
    assert cost.weight_bits(info, ch) == 7 * 100 * 4 + 4 * 32 + 3 * 16
    lay = QSpec(Int(4), granularity="tensor", clip="mse", points=counts)
    assert cost.weight_bits(info, lay) == 7 * 100 * 4 + 1 * 32 + 3 * 16
    one = QSpec(Int(4), clip="mse", points=(1, 1, 1, 1))
    plain = QSpec(Int(4))
    assert cost.weight_bits(info, one) == cost.weight_bits(info, plain)
    a8 = QSpec(Int(8), "tensor", symmetric=False)
    assert (
        cost.layer_costs(info, LayerSpec(one, a8))["bops"]
        == cost.layer_costs(info, LayerSpec(plain, a8))["bops"]
    )
    # 400 MACs over 4 outputs: 7/4 of the low-bit MACs + 3 extra float32 merges per 4 outputs
    assert cost.layer_costs(info, LayerSpec(ch, a8))["bops"] == 400 * 7 / 4 * 4 * 8 + 4 * 3 / 4 * 32 * 32
    with pytest.raises(ValueError, match="output channels"):
        cost.weight_bits(info, QSpec(Int(4), points=(1, 2)))


# -- plan JSON ------------------------------------------------------------------------------------


def test_plan_json_round_trip_and_strict_points():
    spec = LayerSpec(QSpec(Int(3), clip="mse", points=(1, 2, 1)), QSpec(Int(8), "tensor", symmetric=False))
    plan = Plan({"fc": spec})
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.layers == plan.layers and again.layers["fc"].weight.points == (1, 2, 1)
    assert "+mp1.33" in spec.name
    d = plan.to_dict()["layers"]["fc"]["weight"]
    for bad, match in [([1, 0], "1..16"), ([1, True], "integers"), ("12", "wrong type"), ([], "non-empty")]:
        with pytest.raises(ValueError, match=match):
            QSpec.from_dict({**d, "points": bad})
    with pytest.raises(ValueError, match="signed integer"):
        QSpec(Int(3, signed=False), points=(1,))
    assert QSpec(Int(3), symmetric=False, points=(1, 2)).points == (1, 2)  # asymmetric: a zero point
    with pytest.raises(ValueError, match="granularity"):
        QSpec(Int(3), "group", 8, points=(1,))
    assert QSpec(Int(3), points=[1, 2]).points == (1, 2)


# -- deployment form ------------------------------------------------------------------------------


def split_check(layer, x, counts, bits=3):
    w = layer.weight.detach()
    pts = mp.decompose(w.reshape(w.shape[0], -1), bits, counts)
    split = mp.split_layer(layer, pts)
    wt = pts.reconstruct().reshape(w.shape)
    ref = (
        F.linear(x, wt, layer.bias)
        if isinstance(layer, nn.Linear)
        else layer._conv_forward(x, wt, layer.bias)
    )
    torch.testing.assert_close(split(x), ref, rtol=1e-10, atol=1e-10)
    codes = split.expand.weight
    assert torch.equal(codes, codes.round()) and int(codes.abs().max()) <= 2 ** (bits - 1) - 1
    return split


def test_split_layer_equals_sum_of_points():
    torch.manual_seed(0)
    lin = nn.Linear(7, 5).double()
    s = split_check(lin, torch.randn(3, 7, dtype=F64), [1, 3, 1, 2, 1])
    assert s.expand.out_features == 8
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    split_check(nn.Conv2d(4, 6, 3, padding=1).double(), x, [2, 1, 1, 3, 1, 1])
    grouped = split_check(nn.Conv2d(4, 6, 3, stride=2, groups=2).double(), x, [3, 1, 1, 1, 1, 1])
    assert grouped.expand.groups == 2 and grouped.expand.out_channels == 2 * 5  # padded to 5 copies
    split_check(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False).double(), x, [1, 2, 4, 1])  # depthwise


def test_deploy_model_matches_fake_quant_and_onnx_runtime(tmp_path):
    task = tasks.get("synthetic-cnn")
    res = mixq.run(task, "multipoint", ["w3"], method_args={"ratio": 0.5})
    model = res.model.eval()
    deployed = method.deploy(model).eval()
    x = task.calib[0][0][:16]
    with torch.no_grad():
        ref, got = model(x), deployed(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert sum(isinstance(m, mp.ChannelSplit) for m in deployed.modules()) == len(res.plan.layers)
    path = tmp_path / "mp.onnx"
    torch.onnx.export(deployed, (x,), str(path), dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-3, atol=1e-3)


# -- the method -----------------------------------------------------------------------------------


def test_method_through_run_counts_points_and_reproduces_from_plan(tmp_path):
    task = tasks.get("synthetic-mlp")
    uni = mixq.run(task, "uniform", ["w3"])
    zero = mixq.run(task, "multipoint", ["w3"], method_args={"ratio": 0.0})
    res = mixq.run(task, "multipoint", ["w3"], method_args={"ratio": 0.5}, out=tmp_path)
    assert zero.metrics.avg_weight_bits == uni.metrics.avg_weight_bits
    pts = {n: s.weight.points for n, s in res.plan.layers.items()}
    extra = {n: sum(p) - len(p) for n, p in pts.items()}
    assert extra == {"0": 32, "2": 32, "4": 4}  # floor(0.5 * C_out) per layer
    n_w = 16 * 64 + 64 * 64 + 64 * 8
    bits = sum(
        (sum(p) * k * 3 + len(p) * 32 + (sum(p) - len(p)) * 16)
        for p, k in zip(pts.values(), (16, 64, 64), strict=True)
    )
    assert math.isclose(res.metrics.avg_weight_bits, bits / n_w, rel_tol=1e-12)
    assert res.metrics.metric > uni.metrics.metric  # extra points help here
    assert res.plan.meta["multipoint"]["extra_points"] == 68
    # the plan file alone reproduces the model's weights
    plan = Plan.load(tmp_path / "plan.json")
    qmodel, _ = prepare(task, list(plan.layers.values()))
    apply(qmodel, plan)
    for name, m in sites(qmodel).items():
        torch.testing.assert_close(m.weight_quant(m.weight), sites(res.model)[name].weight_quant(m.weight))


def test_variants_and_base_methods(tmp_path):
    task = tasks.get("synthetic-mlp")
    budget = {"avg_weight_bits": 3.5}
    ilp = mixq.run(task, "sensitivity-ilp", ["w2", "w4"], budget=budget)
    on_ilp = mixq.run(
        task,
        "multipoint",
        ["w2", "w4"],
        budget=budget,
        method_args={"ratio": 0.25, "base_method": "sensitivity-ilp"},
    )
    assert {n: s.weight.bits for n, s in on_ilp.plan.layers.items()} == {
        n: s.weight.bits for n, s in ilp.plan.layers.items()
    }
    ilp.plan.save(tmp_path / "base.json")
    from_file = mixq.run(
        task,
        "multipoint",
        ["w2"],
        budget=budget,
        method_args={"ratio": 0.25, "base_plan": str(tmp_path / "base.json")},
    )
    assert from_file.plan.layers == on_ilp.plan.layers
    layer = mixq.run(task, "multipoint", ["w3"], method_args={"ratio": 0.25, "variant": "layer"})
    w = layer.plan.layers["0"].weight
    assert w.granularity == "tensor" and w.clip == "minmax"


def test_points_fill_only_the_budget_the_base_plan_leaves():
    task = tasks.get("synthetic-mlp")
    uni = mixq.run(task, "uniform", ["w3"])
    free = mixq.run(task, "multipoint", ["w3"], method_args={"ratio": 0.5})
    limit = (uni.metrics.avg_weight_bits + free.metrics.avg_weight_bits) / 2
    cut = mixq.run(task, "multipoint", ["w3"], budget={"avg_weight_bits": limit}, method_args={"ratio": 0.5})
    assert uni.metrics.avg_weight_bits < cut.metrics.avg_weight_bits <= limit
    assert cut.metrics.within["avg_weight_bits"]
    frac = cut.plan.meta["multipoint"]["budget_ratio"]
    assert 0 < frac < 0.5
    # the cut is the largest common fraction: one more point per layer's share breaks the budget
    for name, spec in cut.plan.layers.items():
        extra = sum(spec.weight.points) - len(spec.weight.points)
        assert extra == min(
            math.floor(frac * len(spec.weight.points) + 1e-9),
            sum(free.plan.layers[name].weight.points) - len(spec.weight.points),
        )
    # ratio=None: the points spend what the budget leaves, and stay within it
    fill = mixq.run(
        task, "multipoint", ["w3"], budget={"avg_weight_bits": limit}, method_args={"ratio": None}
    )
    assert uni.metrics.avg_weight_bits < fill.metrics.avg_weight_bits <= limit
    # a budget the base plan alone meets exactly leaves no room for points
    tight = mixq.run(task, "multipoint", ["w3"], budget={"avg_weight_bits": uni.metrics.avg_weight_bits})
    assert tight.metrics.avg_weight_bits == uni.metrics.avg_weight_bits
    assert tight.plan.meta["multipoint"]["extra_points"] == 0


@pytest.mark.parametrize(
    "args, match",
    [
        ({"ratio": -1}, "ratio"),
        ({"tau": float("nan")}, "tau"),
        ({"n_max": 0}, "n_max"),
        ({"variant": "group"}, "variant"),
        ({"key": "x"}, "key"),
        ({"base_method": "multipoint"}, "base_method"),
        ({"base_method": "nope"}, "base_method"),
        ({"gram_batches": -1}, "gram_batches"),
        ({"colour": 1}, "unknown method_args"),
    ],
)
def test_bad_method_args(args, match):
    with pytest.raises(ValueError, match=match):
        mixq.run(tasks.get("synthetic-mlp"), "multipoint", ["w3"], method_args=args)


def test_one_absmax_point_is_the_uniform_baseline_with_activations():
    """ratio 0 with a = max|w| is per-channel min/max PTQ; Gram collection leaves activation ranges alone."""
    task = tasks.get("synthetic-cnn")
    uni = mixq.run(task, "uniform", ["w3a8"])
    one = mixq.run(task, "multipoint", ["w3a8"], method_args={"ratio": 0, "gram_batches": 1})
    assert one.metrics.metric == uni.metrics.metric
    assert one.metrics.avg_weight_bits == uni.metrics.avg_weight_bits
    assert one.metrics.bops == uni.metrics.bops
    x = task.calib[0][0][:8]
    with torch.no_grad():
        torch.testing.assert_close(one.model(x), uni.model(x), rtol=1e-5, atol=1e-5)


def test_no_eligible_layer_keeps_the_base_plan(caplog):
    task = tasks.get("synthetic-mlp")
    res = mixq.run(task, "multipoint", ["w4g8"])  # group-wise scales: no points
    uni = mixq.run(task, "uniform", ["w4g8"])
    assert res.plan.to_dict()["layers"] == uni.plan.to_dict()["layers"]
    assert res.metrics.metric == uni.metrics.metric
    assert res.history[-1] == {"multipoint": "no eligible layer; base plan kept"}
    assert "signed integer weight spec per channel" in caplog.text


def test_cli_runs_multipoint(tmp_path):
    assert "multipoint" in METHODS
    out = tmp_path / "run"
    args = [
        "run",
        "--task",
        "synthetic-mlp",
        "--method",
        "multipoint",
        "--candidates",
        "w3",
        "--method-arg",
        "ratio=0.25",
        "--method-arg",
        "n_max=2",
        "--out",
        str(out),
    ]
    assert cli.main(args) == 0
    plan = Plan.load(out / "plan.json")
    assert all(max(s.weight.points) <= 2 for s in plan.layers.values())
    assert json.loads((out / "metrics.json").read_text())["method_args"]["ratio"] == 0.25
