"""Test mixq.quant.fake against brute-force oracles written here, torch float8 casts and ml_dtypes."""

import doctest
import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mixq import formats
from mixq.formats import Fp, Int
from mixq.nn import QConv2d, Quantizer
from mixq.plan import QSpec, parse_candidate
from mixq.quant import fake


def wspec(name: str) -> QSpec:
    return parse_candidate(name).weight


def rows_of(w: torch.Tensor, granularity: str, group: int | None = None) -> list[torch.Tensor]:
    """Split a weight into the element sets that share a scale (no padding), row-major."""
    if granularity == "tensor":
        return [w.reshape(-1)]
    flat = w.reshape(w.shape[0], -1)
    if granularity == "channel":
        return list(flat)
    return [chunk for row in flat for chunk in row.split(group)]


def oracle_scale_zero(row: torch.Tensor, fmt: Int, symmetric: bool, half: bool) -> tuple[float, int]:
    """The documented scale and zero point of one row, as float32 arithmetic."""
    lo = torch.clamp(row.min(), max=0.0)
    hi = torch.clamp(row.max(), min=0.0)
    if symmetric:
        pos = 2 ** (fmt.bits - 1) - 1 if fmt.signed else 2**fmt.bits - 1
        amax = torch.maximum(-lo, hi) if fmt.signed else hi
        s = amax / pos
    else:
        s = (hi - lo) / (2**fmt.bits - 1)
    if half:
        s = s.half().float()
    s = s if s > 0 else torch.tensor(1.0)
    z = 0 if symmetric else int(torch.clamp(torch.round(-lo / s), 0, 2**fmt.bits - 1))
    return float(s), z


def oracle_int_row(row: torch.Tensor, fmt: Int, symmetric: bool, half: bool = False) -> torch.Tensor:
    """Nearest point of the affine grid s * (q - z), q over all codes, by exhaustive comparison.

    Ties go to the even integer q - z. Distances are exact in float64.
    """
    s, z = oracle_scale_zero(row, fmt, symmetric, half)
    if symmetric:
        qmin, qmax = (-(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1) if fmt.signed else (0, 2**fmt.bits - 1)
    else:
        qmin, qmax = 0, 2**fmt.bits - 1
    ints = torch.arange(qmin, qmax + 1, dtype=torch.float64) - z  # q - z
    grid32 = (ints.float() * torch.tensor(s, dtype=torch.float32)).double()  # values as stored
    exact = ints * s  # exact grid points (s is a float32 value)
    dist = (row.double()[:, None] - exact[None, :]).abs()  # [k, codes]
    best = dist.min(dim=1, keepdim=True).values
    tied = dist == best
    even = (ints.remainder(2) == 0)[None, :]
    pick = torch.where(tied.sum(1, keepdim=True) > 1, tied & even, tied).double().argmax(1)
    return grid32[pick].float()


KINDS = ((True, True), (False, True), (True, False))  # (signed, symmetric)
INT_CASES = [(Int(b, signed), sym) for b in (2, 3, 4, 8) for signed, sym in KINDS]


def spec_for(fmt: Int, symmetric: bool, granularity: str, group: int | None = None) -> QSpec:
    return QSpec(fmt, granularity, group, symmetric)


@pytest.mark.parametrize("fmt, symmetric", INT_CASES)
@pytest.mark.parametrize("granularity, group", [("tensor", None), ("channel", None), ("group", 16)])
def test_int_matches_brute_force_oracle(fmt, symmetric, granularity, group):
    g = torch.Generator().manual_seed(fmt.bits * 7 + symmetric)
    # a conv weight [out, in, kh, kw]: row length 5*3*3 = 45, so the last group of 16 is partial
    w = torch.randn(6, 5, 3, 3, generator=g) * torch.logspace(-2, 1, 6)[:, None, None, None]
    w[1] = w[1].abs() + 0.1  # an all-positive row
    w[2] = -w[2].abs()  # an all-negative row
    w[3, 0] = 0.0  # exact zeros
    spec = spec_for(fmt, symmetric, granularity, group)
    got = fake.quantize_weight(w, spec)
    assert got.shape == w.shape and got.dtype == torch.float32
    got_rows = rows_of(got, granularity, group)
    for row, q in zip(rows_of(w, granularity, group), got_rows, strict=True):
        expect = oracle_int_row(row, fmt, symmetric, half=granularity == "group")
        assert torch.equal(q, expect), (row, q, expect)


def test_int_ties_round_to_even():
    # int4 symmetric with max 7: s = 1 exactly, so x / s lies exactly on the half-way points
    w = torch.tensor([[7.0, 0.5, 1.5, 2.5, -2.5, -0.5, 3.5, -6.5]])
    assert fake.quantize_weight(w, wspec("w4")).tolist() == [[7.0, 0.0, 2.0, 2.0, -2.0, -0.0, 4.0, -6.0]]
    # asymmetric uint8 on [0, 255]: s = 1, z = 0
    w = torch.tensor([[0.0, 255.0, 0.5, 1.5, 254.5, 100.5]])
    assert fake.quantize_weight(w, wspec("w8+asym")).tolist() == [[0.0, 255.0, 0.0, 2.0, 254.0, 100.0]]
    # the oracle agrees on the same ties
    row = torch.tensor([7.0, 0.5, 1.5, 2.5, -2.5, -0.5, 3.5, -6.5])
    assert oracle_int_row(row, Int(4), True).tolist() == [7.0, 0.0, 2.0, 2.0, -2.0, 0.0, 4.0, -6.0]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=40),
    st.sampled_from(INT_CASES),
)
def test_property_int_nearest_point_and_half_step(values, case):
    fmt, symmetric = case
    row = torch.tensor(values, dtype=torch.float32)
    spec = spec_for(fmt, symmetric, "channel")
    scale, zero = fake.calibrate_rows(row[None], spec)
    q = fake.quantize_rows(row[None], scale, zero, spec)[0]
    s = float(scale)
    # nearest grid point, except where x / s is within rounding noise of a half-way point
    expect = oracle_int_row(row, fmt, symmetric)
    frac = (row.double() / s).remainder(1.0)
    near_tie = (frac - 0.5).abs() < 1e-5
    assert torch.equal(q[~near_tie], expect[~near_tie])
    # inside the representable range, the error is at most half a step
    qmin, qmax = fake.int_grid(fmt, symmetric)
    lo, hi = (qmin - float(zero)) * s, (qmax - float(zero)) * s
    inside = (row >= lo) & (row <= hi)
    err = (q - row).abs()[inside].double()
    assert bool((err <= s / 2 * (1 + 1e-6) + 1e-30).all())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymmetric_grid_represents_zero_exactly(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(32, 50, generator=g) * 3 + torch.randn(32, 1, generator=g) * 2  # skewed rows
    x[:, 0] = 0.0
    spec = QSpec(Int(bits), "channel", None, False)
    scale, zero = fake.calibrate_rows(x, spec)
    assert bool((zero == zero.round()).all()) and bool((zero >= 0).all())
    assert bool((zero <= 2**bits - 1).all())
    q = fake.quantize_rows(x, scale, zero, spec)
    assert bool((q[:, 0] == 0).all())
    assert bool((fake.quantize_rows(torch.zeros(32, 3), scale, zero, spec) == 0).all())
    # the rows really are asymmetric: a symmetric grid would need a larger scale
    sym = fake.calibrate_rows(x, QSpec(Int(bits)))[0]
    assert bool((scale < sym).any())


def test_unsigned_symmetric_clips_negatives_to_zero():
    w = torch.tensor([[-3.0, -0.1, 0.0, 1.0, 15.0, 7.4]])
    q = fake.quantize_weight(w, wspec("wuint4"))
    assert q.tolist() == [[0.0, 0.0, 0.0, 1.0, 15.0, 7.0]]


def test_scale_formulas():
    x = torch.tensor([[-2.0, 1.0], [0.5, 3.0], [0.0, 0.0]])
    s, z = fake.calibrate_rows(x, wspec("w3"))  # max 3
    assert s.tolist() == pytest.approx([2 / 3, 1.0, 1.0]) and z.tolist() == [0, 0, 0]
    s, z = fake.calibrate_rows(x, wspec("w3+asym"))  # 7 steps, range widened to contain 0
    assert s.tolist() == pytest.approx([3 / 7, 3 / 7, 1.0]) and z.tolist() == [5, 0, 0]
    s, _ = fake.calibrate_rows(x, wspec("wuint3"))  # 7 steps over [0, max]
    assert s.tolist() == pytest.approx([1 / 7, 3 / 7, 1.0])
    assert fake.quantize_weight(torch.zeros(2, 5), wspec("w4")).abs().sum() == 0


# -- floating-point element formats ----------------------------------------------------------------

TORCH_FP8 = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
ML_FP = {
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}


def cast(y: torch.Tensor, name: str) -> torch.Tensor:
    if name in TORCH_FP8:
        return y.to(TORCH_FP8[name]).float()
    return torch.from_numpy(y.numpy().astype(ML_FP[name]).astype(np.float32))


@pytest.mark.parametrize("name", [*TORCH_FP8, *ML_FP])
def test_fp_per_channel_matches_cast(name):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 40, generator=g) * torch.logspace(-3, 2, 16)[:, None]
    w[0, :5] = 0.0
    fmt = formats.parse(name)
    spec = QSpec(fmt)
    scale, zero = fake.calibrate_rows(w, spec)
    assert torch.equal(scale, w.abs().amax(1) / formats.max_value(fmt))
    assert bool((zero == 0).all())
    s = scale[:, None]
    expect = cast(w / s, name) * s
    assert torch.equal(fake.quantize_weight(w, spec), expect)
    # per tensor: one scale
    s1 = w.abs().max() / formats.max_value(fmt)
    assert torch.equal(fake.quantize_weight(w, QSpec(fmt, "tensor")), cast(w / s1, name) * s1)


def test_fp8_group_scales_are_float16():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(4, 64, generator=g)
    spec = QSpec(Fp(4, 3), "group", 16)
    scale, _ = fake.calibrate_rows(w.reshape(-1, 16), spec)
    assert torch.equal(scale, scale.half().float())
    s = scale.reshape(-1, 1)
    expect = (cast(w.reshape(-1, 16) / s, "fp8_e4m3fn") * s).reshape(4, 64)
    assert torch.equal(fake.quantize_weight(w, spec), expect)


@pytest.mark.parametrize("name", ["mxfp4_e2m1", "mxfp8_e4m3", "mxint8", "mxfp6_e2m3_b16"])
def test_mx_weights_are_blocks_of_flattened_rows(name):
    fmt = formats.parse(name)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(6, 5, 3, 3, generator=g) * torch.logspace(-2, 2, 6)[:, None, None, None]
    got = fake.quantize_weight(w, QSpec(fmt, "block"))
    # blocks never cross output channels: quantize every block of each flattened row alone
    expect = torch.stack(
        [torch.cat([formats.mx_quantize(b, fmt) for b in row.split(fmt.block)]) for row in w.reshape(6, -1)]
    ).reshape(w.shape)
    assert torch.equal(got, expect)


# -- group scales --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["w4g32", "w3g7+asym", "w8g16+mse", "wuint4g8"])
def test_group_scales_are_float16_representable(name):
    spec = wspec(name)
    g = torch.Generator().manual_seed(6)
    w = torch.randn(8, 100, generator=g) * 1e-3 + 0.01 * (name.startswith("wuint"))
    rows = fake.to_rows(w, spec)
    assert rows.data.shape == (8 * math.ceil(100 / spec.group_size), spec.group_size)
    assert torch.equal(fake.from_rows(rows, rows.data), w)
    scale, zero = fake.calibrate_rows(rows.data, spec)
    assert torch.equal(scale, scale.half().float())
    # the quantized weight lies on the grid of those float16 scales
    q = fake.to_rows(fake.quantize_weight(w, spec), spec).data
    codes = q / scale[:, None] + zero[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-3)


# -- range search ----------------------------------------------------------------------------------


def sq_err(w: torch.Tensor, q: torch.Tensor, spec: QSpec) -> torch.Tensor:
    granularity = spec.granularity
    return torch.stack(
        [
            (a.double() - b.double()).pow(2).sum()
            for a, b in zip(
                rows_of(w, granularity, spec.group_size),
                rows_of(q, granularity, spec.group_size),
                strict=True,
            )
        ]
    )


@pytest.mark.parametrize(
    "mse, minmax",
    [
        ("w2+mse", "w2"),
        ("w3+mse", "w3"),
        ("w4+mse", "w4"),
        ("w8+mse", "w8"),
        ("w2+asym+mse", "w2+asym"),
        ("w4+asym+mse", "w4+asym"),
        ("w3g16+mse", "w3g16"),
        ("w4+tensor+mse", "w4+tensor"),
        ("wfp4_e2m1+mse", "wfp4_e2m1"),
        ("wuint3+mse", "wuint3"),
    ],
)
def test_mse_never_worse_than_minmax_per_row(mse, minmax):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(32, 64, generator=g)
    w[::3] = w[::3] ** 3  # heavy-tailed rows, where clipping pays
    w[1] = torch.linspace(-1, 1, 64)  # a uniform row, where min/max is close to optimal
    a, b = wspec(mse), wspec(minmax)
    e_mse = sq_err(w, fake.quantize_weight(w, a), a)
    e_mm = sq_err(w, fake.quantize_weight(w, b), b)
    assert bool((e_mse <= e_mm * (1 + 1e-6)).all())
    assert float(e_mse.sum()) < float(e_mm.sum())  # and the search does find something better


def linear_output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """||X (W - Q)^T||^2 per output channel, computed on the outputs."""
    return (x.double() @ (w.double() - q.double()).T).pow(2).sum(0)


def correlated_inputs(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / math.sqrt(k) + torch.eye(k)
    return (torch.randn(n, k, generator=g) * torch.logspace(-1, 1, k)) @ mix + 0.3


@pytest.mark.parametrize("name", ["w2+omse", "w3+omse", "w4+omse", "w2+asym+omse", "w4+asym+omse"])
def test_omse_never_worse_output_error_than_minmax(name):
    g = torch.Generator().manual_seed(8)
    w = torch.randn(24, 48, generator=g)
    x = correlated_inputs(512, 48, 9)
    gram = (x.double().T @ x.double()).float()[None]  # [1, k, k]
    spec = wspec(name)
    minmax = QSpec(spec.fmt, spec.granularity, spec.group_size, spec.symmetric, "minmax")
    mse = QSpec(spec.fmt, spec.granularity, spec.group_size, spec.symmetric, "mse")
    e_omse = linear_output_error(x, w, fake.quantize_weight(w, spec, gram))
    e_mm = linear_output_error(x, w, fake.quantize_weight(w, minmax))
    e_mse = linear_output_error(x, w, fake.quantize_weight(w, mse))
    assert bool((e_omse <= e_mm * (1 + 1e-5)).all())
    assert float(e_omse.sum()) < float(e_mm.sum())
    assert float(e_omse.sum()) < float(e_mse.sum())
    if spec.symmetric:  # the same candidate ranges, so omse wins on its own objective per channel
        assert bool((e_omse <= e_mse * (1 + 1e-5)).all())


def test_omse_without_gram_raises():
    with pytest.raises(RuntimeError, match="calibrate"):
        fake.quantize_weight(torch.randn(4, 8), wspec("w4+omse"))


def test_output_error_linear_channel_and_tensor():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(100, 12, generator=g, dtype=torch.float64)
    d = torch.randn(5, 12, generator=g, dtype=torch.float64)
    gram = (x.T @ x)[None]
    direct = (x @ d.T).pow(2).sum(0)
    got = fake.output_error(gram, wspec("w4"), 5)(d)
    assert torch.allclose(got, direct, rtol=1e-10)
    got_t = fake.output_error(gram, wspec("w4+tensor"), 5)(d.reshape(1, -1))
    assert got_t.shape == (1,) and torch.allclose(got_t, direct.sum().reshape(1), rtol=1e-10)


def group_output_error(cols: torch.Tensor, d: torch.Tensor, groups: int, gs: int) -> torch.Tensor:
    """Block-diagonal output error: ||X[:, chunk] d_chunk||^2 for every channel and chunk."""
    out, k = d.shape
    per = out // groups
    errs = []
    for c in range(out):
        xg = cols[c // per]  # [N, k]: the inputs this channel's conv group sees
        for start in range(0, k, gs):
            sl = slice(start, min(start + gs, k))
            errs.append((xg[:, sl] @ d[c, sl]).pow(2).sum())
    return torch.stack(errs)


CONVS = [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=2, groups=2, dilation=(1, 2)),
    dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6),  # depthwise
    dict(in_channels=6, out_channels=12, kernel_size=3, groups=6, padding="same"),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect", groups=2),
]


@pytest.mark.parametrize("cfg", CONVS)
def test_output_error_conv_via_input_columns(cfg):
    torch.manual_seed(11)
    conv = nn.Conv2d(**cfg).double()
    q = QConv2d(conv)
    x = torch.randn(3, cfg["in_channels"], 9, 8, dtype=torch.float64)
    cols = q.input_columns(x)  # [G, N * positions, k]
    groups, k = cfg.get("groups", 1), conv.weight[0].numel()
    assert cols.shape[0] == groups and cols.shape[2] == k
    gram = torch.bmm(cols.transpose(1, 2), cols)
    delta = torch.randn_like(conv.weight)
    # direct: the output of the convolution with the weight error, per output channel
    conv_d = nn.Conv2d(**cfg, bias=False).double()
    conv_d.weight.data.copy_(delta)
    direct = conv_d(x).pow(2).sum((0, 2, 3))
    out = cfg["out_channels"]
    channel = fake.output_error(gram, wspec("w4"), out)(delta.reshape(out, -1))
    assert torch.allclose(channel, direct, rtol=1e-9)
    tensor = fake.output_error(gram, wspec("w4+tensor"), out)(delta.reshape(1, -1))
    assert torch.allclose(tensor, direct.sum().reshape(1), rtol=1e-9)
    for gs in (2, 4, 5, k):
        spec = wspec(f"w4g{gs}")
        rows = fake.to_rows(delta, spec).data
        got = fake.output_error(gram, spec, out)(rows)
        expect = group_output_error(cols, delta.reshape(out, -1), groups, gs)
        assert torch.allclose(got, expect, rtol=1e-9, atol=1e-12), gs
    # the group error leaves out cross-group terms: with one group per row it is the channel error
    one = fake.output_error(gram, wspec(f"w4g{k}"), out)(delta.reshape(out, -1))
    assert torch.allclose(one, direct, rtol=1e-9)


# -- percentile ranges -----------------------------------------------------------------------------


def test_percentile_ranges_symmetric_and_asymmetric():
    g = torch.Generator().manual_seed(12)
    k = 1000
    mags = torch.randperm(k, generator=g).float() + 1  # |x| = 1 .. 1000, shuffled
    signs = torch.where(torch.rand(k, generator=g) < 0.5, -1.0, 1.0)
    x = (mags * signs)[None]
    for p in (99.0, 99.9, 90.0, 100.0):
        lo, hi = fake.percentile_range(x, p, wspec(f"w8+p{p:g}"))
        amax = float(np.percentile(mags.numpy(), p, method="inverted_cdf"))
        assert (float(lo), float(hi)) == (-amax, amax)
    srt = x[0].sort().values
    for p in (99.0, 99.95, 75.0):
        lo, hi = fake.percentile_range(x, p, wspec(f"w8+asym+p{p:g}"))
        r = math.ceil(p / 100 * k)
        assert (float(lo), float(hi)) == (float(srt[k - r]), float(srt[r - 1]))
        assert float(hi) == float(np.percentile(srt.numpy(), p, method="inverted_cdf"))
    # quantizing with p99 clips the top 1% of magnitudes to the 99th percentile
    q = fake.quantize_weight(x, wspec("w8+p99"))
    big = mags > 990
    assert bool((q[0, big].abs() <= 990 * 128 / 127 + 1e-3).all())
    assert float(q[0, ~big].sub(x[0, ~big]).abs().max()) <= 990 / 127 / 2 + 1e-3


# -- straight-through gradients --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["w4+p90", "w3+asym+p80", "w4g16+p90", "wfp4_e2m1+p90", "w2+mse"])
def test_weight_straight_through_gradient(name):
    spec = wspec(name)
    site = Quantizer("weight")
    site.set_spec(spec)
    g = torch.Generator().manual_seed(13)
    w = torch.randn(8, 64, generator=g).requires_grad_()
    y = site(w)
    assert torch.equal(y.detach(), fake.quantize_weight(w, spec))
    upstream = torch.randn(8, 64, generator=g)
    (y * upstream).sum().backward()
    # oracle mask: inside [lo, hi] of the row's grid, from the row's own scale and zero point
    rows = fake.to_rows(w.detach(), spec)
    scale, zero = fake.calibrate_rows(rows.data, spec)
    if isinstance(spec.fmt, Int):
        qmin, qmax = fake.int_grid(spec.fmt, spec.symmetric)
        lo, hi = (qmin - zero) * scale, (qmax - zero) * scale
    else:
        lo, hi = -formats.max_value(spec.fmt) * scale, formats.max_value(spec.fmt) * scale
    inside = (rows.data >= lo[:, None]) & (rows.data <= hi[:, None])
    mask = fake.from_rows(rows, inside.float())
    assert 0 < int(mask.sum()) < mask.numel()  # both regions occur
    assert torch.equal(w.grad, upstream * mask)
    assert set(torch.unique(w.grad / upstream).tolist()) <= {0.0, 1.0}


def test_activation_straight_through_gradient():
    site = Quantizer("act")
    site.observing = True
    site(torch.linspace(-1.0, 3.0, 401))  # calibration range [-1, 3]
    site.observing = False
    site.set_spec(parse_candidate("a8").act)
    x = torch.tensor([-5.0, -1.5, -0.9, 0.0, 1.0, 2.9, 3.5, 10.0], requires_grad=True)
    y = site(x)
    y.backward(torch.ones_like(y))
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    # forward: clipped to the calibration range, on the 8-bit grid
    y = y.detach()
    assert float(y[0]) == pytest.approx(-1.0, abs=4 / 255) and float(y[-1]) == pytest.approx(3.0, abs=4 / 255)
    with torch.no_grad():
        assert torch.equal(site(x.detach()), y.detach())


def test_straight_through_identity_in_forward():
    x = torch.randn(10, requires_grad=True)
    xq = x.detach().round()
    inside = x.detach().abs() < 1
    y = fake.straight_through(x, xq, inside)
    assert torch.equal(y.detach(), xq)
    y.sum().backward()
    assert torch.equal(x.grad, inside.float())
    assert fake.straight_through(x.detach(), xq, inside) is xq


def test_doctests():
    assert doctest.testmod(fake).failed == 0


@pytest.mark.parametrize("name", ["w3+asym+omse", "w4g8+mse"])
def test_searched_ranges_are_reused_only_for_equal_inputs(name, monkeypatch):
    from mixq.cache import Cache

    torch.manual_seed(5)
    x, w = torch.randn(64, 16), torch.randn(6, 16)
    gram = (x.T @ x)[None]
    spec = wspec(name)
    cache = Cache()
    calls = []
    search = fake.search_range
    monkeypatch.setattr(fake, "search_range", lambda *a, **k: calls.append(1) or search(*a, **k))
    first = fake.quantize_weight(w, spec, gram, cache)
    assert len(calls) == 1
    again = fake.quantize_weight(w.clone(), spec, gram.clone(), cache)  # equal contents, new tensors
    assert len(calls) == 1 and torch.equal(first, again)
    cache.clear()
    assert torch.equal(fake.quantize_weight(w, spec, gram, cache), first) and len(calls) == 2
    assert torch.equal(fake.quantize_weight(w, spec, gram), first) and len(calls) == 3  # no cache: no reuse
    with cache.active():  # the cache of a run in progress is used by default
        assert torch.equal(fake.quantize_weight(w, spec, gram), first) and len(calls) == 3
    w2 = w.clone()
    w2[0, 0] += 1e-3  # any change of the weight, the Gram matrix or the spec searches again
    fake.quantize_weight(w2, spec, gram, cache)
    assert len(calls) == 4
    if spec.clip == "omse":
        fake.quantize_weight(w, spec, gram * 2, cache)
        assert len(calls) == 5
    fake.quantize_weight(w, wspec(name.replace("w3", "w2").replace("w4g8", "w3g8")), gram, cache)
    assert len(calls) == (6 if spec.clip == "omse" else 5)
