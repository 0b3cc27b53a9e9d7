"""Integer weights with a float zero point (``+fzero``: ``w^ = s q + m``, the GGUF Q4_1 grid)
against brute-force quantizers, the cost model's count, GPTQ's transcription and AdaRound's grid."""

from __future__ import annotations

import itertools

import pytest
import torch

import mixq
from mixq import export
from mixq.cost import LayerInfo, weight_bits
from mixq.formats import Int
from mixq.plan import LayerSpec, QSpec, parse_candidate
from mixq.ptq import adaround, gptq
from mixq.quant import fake
from mixq.wrap import sites


def brute_nearest(x: torch.Tensor, s: torch.Tensor, m: torch.Tensor, bits: int) -> torch.Tensor:
    """Every row's values replaced by the nearest of the 2^b points ``m + s q`` (float64)."""
    points = m.double()[:, None] + s.double()[:, None] * torch.arange(2**bits, dtype=torch.float64)
    idx = (x.double()[:, :, None] - points[:, None, :]).abs().argmin(-1)
    return torch.gather(points, 1, idx)


def q41_weight(out: int, k: int, seed: int) -> torch.Tensor:
    """A weight on the Q4_1 grid: per group of 32, ``d q + m`` (float16 d and m), codes 0 and 15 present."""
    g = torch.Generator().manual_seed(seed)
    groups = k // 32
    d = (torch.rand(out, groups, generator=g) * 0.01 + 1e-3).half().float()
    m = (-torch.rand(out, groups, generator=g) * 0.08).half().float()
    q = torch.randint(0, 16, (out, groups, 32), generator=g).float()
    q[..., 3], q[..., 17] = 0, 15
    return (q * d[..., None] + m[..., None]).reshape(out, k)


def test_the_name_parses_prints_and_round_trips_and_bad_uses_are_refused():
    spec = parse_candidate("w4g32+fzero")
    w = spec.weight
    assert w.float_zero and not w.symmetric and w.group_size == 32 and spec.name == "w4g32+fzero"
    assert parse_candidate("w3+fzero+mse-a8").name == "w3+fzero+mse-a8"
    assert LayerSpec.from_dict(spec.to_dict()) == spec
    assert "float_zero" not in parse_candidate("w4g32+asym").weight.to_dict()
    with pytest.raises(ValueError, match=r"sets the symmetric twice \(\+asym\+fzero\)"):
        parse_candidate("w4+asym+fzero")
    with pytest.raises(ValueError, match="fzero .* applies to weights only"):
        parse_candidate("w4-a8+fzero")
    with pytest.raises(ValueError, match="needs an asymmetric integer format.*fp8_e4m3fn"):
        parse_candidate("wfp8_e4m3fn+fzero")
    with pytest.raises(ValueError, match="needs an asymmetric integer format"):
        QSpec(Int(4), symmetric=True, float_zero=True)
    with pytest.raises(ValueError, match="unknown modifier 'fzeros'.*valid: sym, asym, fzero"):
        parse_candidate("w4+fzeros")
    with pytest.raises(ValueError, match="float_zero.*weight specs only"):
        LayerSpec.from_dict({"act": {"fmt": "int8", "symmetric": False, "float_zero": True}})


@pytest.mark.parametrize("cand", ["w4g32+fzero", "w3g8+fzero", "w2+fzero", "w5+fzero+tensor"])
def test_min_max_rounds_to_the_nearest_point_of_the_brute_force_grid(cand):
    spec = parse_candidate(cand).weight
    g = torch.Generator().manual_seed(len(cand))
    w = torch.randn(7, 64, generator=g) * 0.02 + torch.rand(7, 1, generator=g) * 0.2 + 0.15  # off-centre rows
    wq = fake.quantize_weight(w, spec)
    rows = fake.to_rows(w, spec).data
    lo, hi = rows.amin(1), rows.amax(1)
    s = (hi - lo) / (2**spec.fmt.bits - 1)
    m = lo.clone()
    if spec.granularity == "group":  # stored as float16, like the scales
        s, m = s.half().float(), m.half().float()
    want = brute_nearest(rows, s, m, spec.fmt.bits)
    got = fake.to_rows(wq, spec).data.double()
    err_got, err_want = (got - rows.double()).abs(), (want - rows.double()).abs()
    assert (err_got <= err_want + 1e-5 * s.double()[:, None] + 1e-7).all()  # nearest, up to float rounding
    assert ((got - want).abs() <= 1e-6).double().mean() > 0.99  # the same point (float32 vs 64)
    assert not (lo <= 0).all()  # some rows lie above zero: the range is not widened to contain it
    assert (err_got.amax(1) <= s.double() / 2 + 1e-6).all()


def test_the_q4_1_grid_is_reproduced_exactly_and_an_integer_zero_point_misses_it():
    w = q41_weight(16, 128, 0)
    exact = fake.quantize_weight(w, parse_candidate("w4g32+fzero").weight)
    assert torch.equal(exact, w)
    integer = fake.quantize_weight(w, parse_candidate("w4g32+asym").weight)
    assert (integer - w).abs().max() > 1e-4
    coarse = fake.quantize_weight(w, parse_candidate("w4g128+fzero").weight)
    assert not torch.equal(coarse, w)


def test_mse_ranges_are_never_worse_than_min_max_and_stay_on_their_grid():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(9, 96, generator=g) ** 3  # heavy tails: clipping helps
    spec_mm, spec_mse = parse_candidate("w3g32+fzero").weight, parse_candidate("w3g32+fzero+mse").weight
    rows = fake.to_rows(w, spec_mse).data
    err = {}
    for name, spec in (("minmax", spec_mm), ("mse", spec_mse)):
        err[name] = (fake.to_rows(fake.quantize_weight(w, spec), spec).data - rows).pow(2).sum(1)
    assert (err["mse"] <= err["minmax"] * (1 + 1e-6)).all() and err["mse"].sum() < 0.8 * err["minmax"].sum()
    s, m = fake.calibrate_rows(rows, spec_mse)
    codes = (fake.to_rows(fake.quantize_weight(w, spec_mse), spec_mse).data - m[:, None]) / s[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.min() >= 0 and codes.max() <= 7.001


def test_the_cost_model_counts_a_float16_offset_per_group():
    info = LayerInfo(name="l", kind="linear", weight_shape=(64, 256), bias=0, macs=0)
    fz, asym = parse_candidate("w4g128+fzero").weight, parse_candidate("w4g128+asym").weight
    assert weight_bits(info, fz) == 64 * 256 * 4 + 64 * 2 * (16 + 16)
    assert weight_bits(info, asym) == 64 * 256 * 4 + 64 * 2 * (16 + 4)
    per_channel = parse_candidate("w4+fzero").weight  # float32 scale and offset per channel
    assert weight_bits(info, per_channel) == 64 * 256 * 4 + 64 * (32 + 32)


def obq_fzero(w, h, damp, params, bits) -> torch.Tensor:
    """Fixed-order OBQ (GPTQ eq. 2-3, float64, explicit inverse) rounding column j on ``s q + m``."""
    w, h = w.double().clone(), h.double().clone()
    d = h.diagonal()
    d[d == 0] = 1
    h += damp * d.mean() * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    for j in range(w.shape[1]):
        s, m = params(j, w)
        code = torch.clamp(torch.round((w[:, j].float() - m) / s), 0, 2**bits - 1)
        q[:, j] = (code * s + m).double()
        e = (w[:, j] - q[:, j]) / hinv[j, j]
        w -= e[:, None] * hinv[j][None, :]
        hinv = hinv - torch.outer(hinv[:, j], hinv[j]) / hinv[j, j]
    return q.float()


def correlated(seed: int, out: int = 5, k: int = 7, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) @ torch.randn(k, k, generator=g)
    return torch.randn(out, k, generator=g) + 0.5, x


def fixed_params(grid: gptq.ColumnGrid):
    """Column j's scale and offset: the static grid's."""
    return lambda j, _w: (grid.scale[:, j], grid.zero[:, j])


def group_params(spec: QSpec):
    """At each group's first column, the spec's range method on the columns as updated so far
    (the row's last group zero-padded, as fake.to_rows pads it)."""
    gs, cur = spec.group_size, {}

    def params(j, w):
        if j % gs == 0:
            cols = w[:, j : j + gs].float()
            cur["sm"] = fake.calibrate_rows(torch.nn.functional.pad(cols, (0, gs - cols.shape[1])), spec)
        return cur["sm"]

    return params


@pytest.mark.parametrize(
    ("cand", "dynamic"),
    [("w2+fzero", False), ("w3g2+fzero", False), ("w3g2+fzero", True), ("w2g4+fzero", True)],
)
def test_gptq_equals_the_transcribed_update_equations_on_the_float_offset_grid(cand, dynamic):
    spec = parse_candidate(cand).weight
    regroup = gptq.dynamic(spec, gptq.Config()) if dynamic else None
    assert (regroup is not None) == dynamic
    for seed in range(5):
        w, x = correlated(seed)
        h = 2 * x.double().T @ x.double() / x.shape[0]
        params = group_params(spec) if dynamic else fixed_params(gptq.column_grid(w, spec))
        want = obq_fzero(w, h, 0.01, params, spec.fmt.bits)
        for block in (1, 3, 128):
            got = gptq.quantize_matrix(
                w, h, gptq.column_grid(w, spec), 0.01, block, dtype=torch.float64, regroup=regroup
            )
            assert torch.equal(got, want), (cand, seed, block)


def test_gptq_on_the_float_offset_grid_against_brute_force_and_round_to_nearest():
    spec = parse_candidate("w2+fzero").weight
    totals = {"opt": 0.0, "gptq": 0.0, "rtn": 0.0}
    codes = torch.tensor(list(itertools.product(range(4), repeat=4)), dtype=torch.float32)
    for seed in range(30):
        w, x = correlated(seed, out=6, k=4)
        grid = gptq.column_grid(w, spec)
        q = gptq.quantize_matrix(w, 2 * x.T @ x / x.shape[0], grid)
        opt = 0.0
        for r in range(w.shape[0]):
            cand = codes * grid.scale[r] + grid.zero[r]  # every code vector of the row
            opt += float(((x.double() @ (w[r] - cand).double().T) ** 2).sum(0).min())
        err = {
            "opt": opt,
            "gptq": float(((x @ (w - q).T).double() ** 2).sum()),
            "rtn": float(((x @ (w - fake.quantize_weight(w, spec)).T).double() ** 2).sum()),
        }
        assert err["opt"] <= err["gptq"] * (1 + 1e-6) and err["opt"] <= err["rtn"] * (1 + 1e-6)
        for key in totals:
            totals[key] += err[key]
    assert totals["gptq"] < 0.85 * totals["rtn"]


def test_adaround_grid_rounds_to_nearest_with_offsets_of_one_half():
    spec = parse_candidate("w3g8+fzero").weight
    w, _ = correlated(1, out=4, k=16)
    grid = adaround.grid_of(w, spec)
    h = (grid.units() - torch.floor(grid.units()) >= 0.5).float()
    assert torch.allclose(grid.weight(h), fake.quantize_weight(w, spec), atol=1e-6)


@pytest.mark.parametrize("groups", ["dynamic", "static"])
def test_a_run_with_gptq_on_fzero_exports_and_reloads_bit_exact(groups, tmp_path):
    task = mixq.tasks.get("synthetic-mlp")
    rtn = mixq.run(task, candidates=["w3g8+fzero"])
    res = mixq.run(task, candidates=["w3g8+fzero"], ptq=["gptq"], ptq_args={"gptq": {"groups": groups}})
    rec = res.metrics.ptq[0]
    assert sum(e["gptq"] for e in rec["output_error"].values()) < sum(
        e["rtn"] for e in rec["output_error"].values()
    )
    assert res.metrics.size_bytes == rtn.metrics.size_bytes
    x = torch.cat([b[0] if isinstance(b, (tuple, list)) else b for b in task.val])[:32]
    loaded = export.load(export.save(res, tmp_path / "m.safetensors"), model=task.model)
    with torch.no_grad():
        assert torch.equal(loaded(x), res.model(x))
    for m in sites(res.model).values():  # every weight a point s q + m of its rounding's grid
        wq = m.weight_quant(m.weight)
        rounding = m.weight_quant.rounding
        s, z = (
            (rounding.scale, rounding.zero)
            if groups == "dynamic"
            else fake.calibrate_rows(
                fake.to_rows(m.weight.detach().float(), m.weight_quant.spec).data, m.weight_quant.spec
            )
        )
        q = (fake.to_rows(wq, m.weight_quant.spec).data - z[:, None]) / s[:, None]
        assert torch.allclose(q, q.round(), atol=1e-3) and q.min() >= -1e-3 and q.max() <= 7.001
