"""Test the per-channel "best" multipoint decomposition against the plain chains it must beat, the
exponential bound of the a = max|r| chain, the joint step refit, the base quantizer as first point
(every range method), float16 extra steps and the measured choice of the base plan."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixq
from mixq import tasks
from mixq.formats import Int
from mixq.plan import QSpec
from mixq.quant import fake
from mixq.quant import multipoint as mp

F64 = torch.float64


@st.composite
def weights(draw, max_rows=5, max_cols=16):
    """Rows with per-row scales spread over three decades, a few exact zeros."""
    rows, cols = draw(st.integers(1, max_rows)), draw(st.integers(1, max_cols))
    vals = draw(
        st.lists(st.floats(-4, 4, allow_nan=False, width=64), min_size=rows * cols, max_size=rows * cols)
    )
    scales = draw(st.lists(st.floats(1e-3, 1.0, width=64), min_size=rows, max_size=rows))
    return torch.tensor(vals, dtype=F64).reshape(rows, cols) * torch.tensor(scales, dtype=F64)[:, None]


def row_errors(w, wt):
    return (w - wt).pow(2).sum(1)


def slack(w):
    """Rounding slack of an ℓ2 comparison (float64 sums of the reconstruction)."""
    return 1e-12 * w.pow(2).sum(1) + 1e-300


@settings(max_examples=20, deadline=None)
@given(weights(), st.integers(2, 6), st.integers(1, 4))
def test_best_never_worse_than_either_plain_chain_per_channel(w, bits, n):
    best = row_errors(w, mp.approximate(w, bits, n, "best"))
    for chain in ("absmax", "greedy"):
        assert torch.all(best <= row_errors(w, mp.approximate(w, bits, n, chain)) + slack(w))


@settings(max_examples=20, deadline=None)
@given(weights(), st.integers(2, 6))
def test_best_never_worse_than_its_n_minus_1_points(w, bits):
    errs = [w.pow(2).sum(1)] + [row_errors(w, mp.approximate(w, bits, n, "best")) for n in range(1, 4)]
    for before, after in zip(errs, errs[1:], strict=False):
        assert torch.all(after <= before + slack(w))


@settings(max_examples=20, deadline=None)
@given(weights(), st.integers(2, 8), st.integers(1, 4))
def test_absmax_chain_meets_the_exponential_bound(w, bits, n):
    """‖w − w̃‖∞ ≤ ‖w‖∞ (2^b − 2)^(−n): each a = ‖r‖∞ point leaves at most a / (2K) per coordinate."""
    err = (w - mp.approximate(w, bits, n, "absmax")).abs().amax(1)
    assert torch.all(err <= w.abs().amax(1) * float(2**bits - 2) ** (-n) * (1 + 1e-9) + 1e-300)


@settings(max_examples=25, deadline=None)
@given(weights(), st.integers(2, 5), st.integers(2, 4))
def test_refit_never_raises_the_error_and_keeps_codes_on_the_grid(w, bits, n):
    pts = mp.decompose(w, bits, [n] * w.shape[0], "absmax")
    s, q = mp.refit(w, pts.steps, pts.codes, bits, -mp.levels(bits), False)
    assert torch.all(mp.sq_error(w, s, q) <= mp.sq_error(w, pts.steps, pts.codes) + slack(w))
    assert torch.all(s >= 0) and int(q.abs().max()) <= mp.levels(bits)


def test_refit_is_no_worse_than_the_least_squares_steps_of_the_codes_it_starts_from():
    """numpy's lstsq on the starting codes is the oracle of the first move; re-rounding only helps."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 40, generator=g, dtype=F64)
    pts = mp.decompose(w, 3, [3] * 6, "greedy")
    s, q = mp.refit(w, pts.steps, pts.codes, 3, -3, False)
    for j in range(6):
        a = pts.codes[j].double().T.numpy()
        ls, *_ = np.linalg.lstsq(a, w[j].numpy(), rcond=None)
        e_ls = float(((a @ ls) - w[j].numpy()) @ ((a @ ls) - w[j].numpy()))
        e = float(mp.sq_error(w[j : j + 1], s[j : j + 1], q[j : j + 1]))
        assert e <= e_ls * (1 + 1e-9) + 1e-12


def spread_weights(seed=0):
    """64 channels × 288 (a 3×3 conv with 32 inputs), per-channel scales over two decades."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(64, 288, generator=g)
        * torch.logspace(-2, 0, 64)[torch.randperm(64, generator=g)][:, None]
    )


def level_errors(w, bits, n, a_search):
    """Per-channel ℓ2 errors [n, C] of the 1..n-point forms (one pass of ``chain_levels``)."""
    return torch.stack([mp.sq_error(w, s, q) for _, s, q in mp.chain_levels(w, bits, n, a_search)])


@pytest.mark.parametrize("bits", [3, 4])
def test_best_on_spread_random_weights_beats_the_myopic_greedy_chain(bits):
    w = spread_weights()
    greedy, absmax, best = (level_errors(w, bits, 3, a) for a in ("greedy", "absmax", "best"))
    for n in (1, 2):  # two and three points
        assert float(greedy[n].sum()) > float(absmax[n].sum())  # the ℓ2-optimal first point is myopic
        assert torch.all(best[n] <= torch.minimum(greedy[n], absmax[n]) * (1 + 1e-6) + 1e-12)
    # chain_levels agrees with approximate (the rows' forms do not depend on the other rows)
    torch.testing.assert_close(
        best[2], row_errors(w.double(), mp.approximate(w, bits, 3).double()), rtol=1e-4, atol=1e-8
    )


@pytest.mark.parametrize("clip", ["minmax", "mse", "omse", "percentile"])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_one_point_is_the_base_quantizer_for_every_range_method(clip, granularity):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 30, generator=g) * torch.linspace(0.1, 2, 8)[:, None]
    x = torch.randn(100, 30, generator=g)
    gram = (x.T @ x)[None]
    base = QSpec(Int(3), granularity=granularity, clip=clip, percentile=99.0)
    spec = QSpec(Int(3), granularity=granularity, clip=clip, percentile=99.0, points=(1,) * 8)
    ref = fake.quantize_weight(w, base, gram if clip == "omse" else None)
    got = mp.quantize_weight(w, spec, gram)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    two = QSpec(Int(3), granularity=granularity, clip=clip, percentile=99.0, points=(2,) * 8)
    assert torch.all(row_errors(w, mp.quantize_weight(w, two, gram)) <= row_errors(w, ref) + 1e-9)


def test_float16_extra_steps_lose_almost_nothing_and_are_exact_halves():
    w = spread_weights(1)
    start = mp.base_start(w, QSpec(Int(3)))
    p32 = mp.decompose(w, 3, [2] * 64, "best", "channel", start)
    p16 = mp.decompose(w, 3, [2] * 64, "best", "channel", start, torch.float16)
    e32, e16 = (
        float(mp.sq_error(w, p32.steps, p32.codes).sum()),
        float(mp.sq_error(w, p16.steps, p16.codes).sum()),
    )
    assert e16 <= e32 * (1 + 1e-3)
    assert torch.equal(p16.steps[:, 1:].half().float(), p16.steps[:, 1:])
    assert torch.equal(p16.steps[:, 0], p32.steps[:, 0])  # the first point keeps the base scale
    one = float(mp.sq_error(w, p32.steps[:, :1], p32.codes[:, :1]).sum())
    assert e16 < one


def test_auto_base_is_measured_and_recorded():
    task = tasks.get("synthetic-mlp")
    cands = ["w2", "w3", "w4"]
    budget = {"avg_weight_bits": 3.4}
    res = mixq.run(task, "multipoint", cands, budget=budget, method_args={"ratio": 0.25})
    choice = res.plan.meta["multipoint"]["base_choice"]
    tried = {t["base_method"]: t["calib_loss"] for t in choice["tried"]}
    assert set(tried) == {"uniform", "sensitivity-ilp"}
    assert choice["chosen"] == min(tried, key=tried.get) == res.plan.meta["multipoint"]["base"]
    assert res.metrics.within["avg_weight_bits"]
    for base in tried:  # each recorded loss is that of multipoint on that base alone
        one = mixq.run(
            task, "multipoint", cands, budget=budget, method_args={"ratio": 0.25, "base_method": base}
        )
        assert one.metrics.avg_weight_bits <= 3.4 + 1e-9
    assert all(math.isfinite(v) for v in tried.values())
