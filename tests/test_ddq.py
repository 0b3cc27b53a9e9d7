"""DDQ: the quantizer against rounding oracles, its gradients against finite differences, the method."""

from __future__ import annotations

import itertools

import pytest
import torch

import mixq
from mixq import api, cost
from mixq.methods import ddq as method
from mixq.methods.common import Context
from mixq.nn import Quantizer
from mixq.plan import as_layer_spec, parse_candidate
from mixq.quant import fake
from mixq.quant.ddq import (
    DDQQuantizer,
    LearnedInt,
    _round_ste,
    merge_table,
    monotone_gates,
    quantize_levels,
)
from mixq.wrap import apply


def sorted_levels(rows: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randn(rows, n, generator=g, dtype=torch.float64), dim=1).values


def merge_oracle(q: torch.Tensor, b: int) -> torch.Tensor:
    """Group means of contiguous groups of 2^(B-b) levels, by explicit loops."""
    rows, n = q.shape
    size = n // 2**b
    out = torch.empty_like(q)
    for r in range(rows):
        for k in range(n):
            g = k // size
            out[r, k] = q[r, g * size : (g + 1) * size].mean()
    return out


def u_matrix_oracle(gates: torch.Tensor) -> torch.Tensor:
    """Z U built as the explicit Kronecker product of 2x2 factors (small B only)."""
    u = torch.ones(1, 1, dtype=gates.dtype)
    for g in gates:
        ui = g * torch.eye(2, dtype=gates.dtype) + (1 - g) * torch.ones(2, 2, dtype=gates.dtype)
        u = torch.kron(u, ui)
    return u / u.sum(1, keepdim=True)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_merge_table_equals_explicit_kronecker(bits):
    q = sorted_levels(3, 2**bits, seed=bits)
    g = torch.Generator().manual_seed(7)
    gates = torch.rand(bits, generator=g, dtype=torch.float64)
    expected = q @ u_matrix_oracle(gates).T
    assert torch.allclose(merge_table(q, gates), expected, atol=1e-12)


@pytest.mark.parametrize("b", range(0, 5))
def test_monotone_gates_merge_contiguous_groups(b):
    q = sorted_levels(2, 16, seed=b)
    gates = monotone_gates(torch.tensor(float(b), dtype=torch.float64), 4)
    assert gates.tolist() == [1.0] * b + [0.0] * (4 - b)
    assert torch.allclose(merge_table(q, gates), merge_oracle(q, b), atol=1e-12)


def test_all_gates_on_equals_rounding_to_levels():
    q = sorted_levels(4, 256, seed=1).float()
    x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(2)) * 1.5
    out = quantize_levels(x, q, torch.ones(8))
    nearest = (x[:, :, None] - q[:, None, :]).abs().argmin(-1)  # oracle: argmin over all levels
    assert torch.equal(out, q.gather(1, nearest))


def test_uniform_levels_all_gates_on_equal_plain_rounding():
    lo, hi = torch.tensor([-1.0, -0.5]), torch.tensor([1.0, 2.0])
    dq = DDQQuantizer(2, 4, 2, lo, hi, levels="uniform")
    x = torch.randn(2, 500, generator=torch.Generator().manual_seed(3)) * 2
    step = ((hi - lo) / 15)[:, None]
    oracle = torch.clamp(torch.round((x - lo[:, None]) / step), 0, 15) * step + lo[:, None]
    assert dq.bits == 4
    assert torch.allclose(dq(x), oracle, atol=1e-6)


def test_merged_levels_with_gates_off_are_group_means_of_nearest_fine_level():
    q = sorted_levels(1, 16, seed=4)
    x = torch.randn(1, 300, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    gates = monotone_gates(torch.tensor(2.0, dtype=torch.float64), 4)
    nearest = (x[:, :, None] - q[:, None, :]).abs().argmin(-1)
    assert torch.allclose(quantize_levels(x, q, gates), merge_oracle(q, 2).gather(1, nearest))


def test_level_and_gate_gradients_match_finite_differences():
    q = sorted_levels(2, 8, seed=6)
    x = torch.randn(2, 40, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    w = torch.randn(2, 40, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def f(levels: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        return (quantize_levels(x, levels, gates) * w).sum()

    # soft gates (U is multilinear in them) and binary gates (the training point)
    for gates in (
        torch.tensor([0.9, 0.4, 0.2], dtype=torch.float64),
        torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64),
    ):
        assert torch.autograd.gradcheck(
            f, (q.clone().requires_grad_(), gates.clone().requires_grad_()), eps=1e-6, atol=1e-6
        )


def test_input_gradient_is_straight_through_plus_correction():
    q = torch.tensor([[-1.0, -0.5, 0.5, 1.0]])
    x = torch.tensor([[-2.0, -0.7, 0.2, 0.9, 3.0]], requires_grad=True)
    alpha = 0.3
    out = quantize_levels(x, q, torch.ones(2), alpha=alpha)
    out.backward(torch.ones_like(out))
    inside = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    expected = inside + alpha * (x.detach() - out.detach())
    assert torch.allclose(x.grad, expected)


def test_beta_gradient_uses_triangular_surrogate():
    beta = torch.tensor(2.3, requires_grad=True)
    g = monotone_gates(beta, 4)
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0])
    (g * upstream).sum().backward()
    tri = [max(0.0, 1 - abs(2.3 - i + 0.5)) for i in range(1, 5)]
    assert beta.grad.item() == pytest.approx(sum(t * u for t, u in zip(tri, upstream.tolist(), strict=True)))


def test_learned_levels_stay_sorted_and_are_trainable():
    dq = DDQQuantizer(1, 3, 1, torch.tensor([-1.0]), torch.tensor([1.0]), levels="learned")
    assert torch.allclose(dq.levels(), torch.linspace(-1, 1, 8)[None], atol=1e-5)
    with torch.no_grad():
        dq.delta.normal_()
    lv = dq.levels()
    assert (lv[:, 1:] > lv[:, :-1]).all()
    x = torch.randn(1, 64)
    dq(x).sum().backward()
    assert dq.delta.grad is not None and dq.q0.grad is not None


@pytest.mark.parametrize("cand", ["a8", "a4", "a4+sym", "auint4"])
def test_learned_int_activation_equals_mixq_site(cand):
    spec = parse_candidate(cand).act
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(10)).relu() * 2 - 0.3
    lo, hi = torch.tensor(-0.25), torch.tensor(2.5)
    ours = LearnedInt(spec, "act", lo, hi)(x)
    site = Quantizer("act")
    site.observe(x)
    site.stats_min, site.stats_max = lo, hi
    site.set_spec(spec)
    assert torch.equal(ours, site(x))


@pytest.mark.parametrize(
    "cand", ["w4", "w3", "w8", "w4+tensor", "w4+mse", "w4+asym", "w3+asym+tensor", "w2+asym"]
)
def test_baked_weights_are_reproduced_by_mixq_site(cand):
    spec = parse_candidate(cand).weight
    w = torch.randn(6, 20, generator=torch.Generator().manual_seed(11))
    rows = 6 if spec.granularity == "channel" else 1
    amax = w.reshape(rows, -1).abs().amax(1)
    lq = LearnedInt(spec, "weight", -0.7 * amax, 0.7 * amax)  # clipped range: a learned, not min/max, grid
    trained = lq(w).detach()
    baked = w.clone()
    lq.bake(baked)
    site = Quantizer("weight")
    site.set_spec(spec)
    assert torch.equal(baked, trained)
    assert torch.allclose(site(baked), trained, rtol=1e-6, atol=1e-7)


def test_learned_int_range_gradient_is_lsq_straight_through_gradient():
    spec = parse_candidate("a4").act
    x = torch.randn(1, 300, generator=torch.Generator().manual_seed(12), dtype=torch.float64).relu() * 3
    lq = LearnedInt(spec, "act", torch.tensor(0.0), torch.tensor(2.0)).double()
    # the range enters the forward through the scale (LSQ): rounding is straight-through, so the
    # analytic gradient of sum(Q(x)) in hi is sum over x of (round(x/s) - x/s) / 15 inside + clip terms
    hi = lq.hi
    out = lq(x).sum()
    (g,) = torch.autograd.grad(out, hi)
    s = float(hi.detach()) / 15
    v = x / s
    inside = (v.round() <= 15).double()
    expected = ((v.round() - v) * inside + 15 * (1 - inside)).sum() / 15
    assert float(g) == pytest.approx(float(expected), rel=1e-9)


def test_fused_activation_gradients_equal_unfused_reference():
    spec = parse_candidate("a4").act
    x = (
        torch.randn(2, 300, generator=torch.Generator().manual_seed(14), dtype=torch.float64) * 2
    ).requires_grad_()
    lq = LearnedInt(spec, "act", torch.tensor(-1.3), torch.tensor(2.2)).double()
    w = torch.randn(2, 300, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    (lq(x) * w).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    lo, hi = lq.lo.detach().clone().requires_grad_(), lq.hi.detach().clone().requires_grad_()
    s = (hi - lo) / 15
    z = torch.clamp(_round_ste(-lo / s), 0, 15)
    ref = (torch.clamp(_round_ste(x2 / s) + z, 0, 15) - z) * s  # autograd through every op
    (ref * w).sum().backward()
    assert torch.equal(lq(x).detach(), ref.detach())
    for a, b in ((x.grad, x2.grad), (lq.lo.grad, lo.grad), (lq.hi.grad, hi.grad)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)


def test_bad_specs_and_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="integer formats only"):
        method.check_candidates([as_layer_spec("wfp8_e4m3fn")])
    with pytest.raises(ValueError, match="signed when symmetric"):
        method.check_candidates([as_layer_spec("wuint4")])
    with pytest.raises(ValueError, match="minmax"):
        method.check_candidates([as_layer_spec("w4-a8+p99.9")])
    with pytest.raises(ValueError, match="levels 'lut'.*uniform, learned"):
        method.Config(levels="lut")
    with pytest.raises(ValueError, match="search_frac"):
        method.Config(search_frac=1.0)
    with pytest.raises(ValueError, match="unknown method_args"):
        mixq.run("synthetic-mlp", "ddq", candidates=["w4"], method_args={"epoch": 1})


def make_ctx(task: mixq.Task, cands: list[str], budget: dict[str, float]) -> Context:
    specs = [as_layer_spec(c) for c in cands]
    qmodel, infos = api.prepare(task, specs)
    mc = cost.model_costs(qmodel, infos)
    return Context(
        task=task,
        qmodel=qmodel,
        layers=[i.name for i in infos],
        candidates=specs,
        costs=cost.cost_table(infos, specs),
        model_costs=mc,
        budget=budget,
        limits=cost.budget_limits(mc, budget),
    )


def learned_avg_bits(task: mixq.Task, lam: float) -> float:
    ctx = make_ctx(task, ["w2", "w4", "w8"], {"avg_weight_bits": 3.0})
    cfg = method.Config(steps=16, lam=lam, init_bits="max", lr_bits=0.6, lr=0.0)
    quantizers = method.search_quantizers(ctx, cfg, 8.0)
    installed, _ = method._phase(ctx, cfg, quantizers, 16, method.regularizer(ctx, cfg, quantizers), "search")
    installed.restore()
    wb, _ = method.learned_bits(quantizers)
    n = torch.tensor([float(i.numel) for i in ctx.model_costs.infos], dtype=torch.float64)
    return float((wb * n).sum() / n.sum())


def test_bits_decrease_as_regularizer_weight_grows():
    task = mixq.tasks.get("synthetic-mlp")
    bits = [learned_avg_bits(task, lam) for lam in (0.0, 0.3, 30.0)]
    assert bits[0] > bits[1] > bits[2]
    assert bits[0] > 7.5 and bits[2] < 5.0


def test_ddq_search_meets_budget_and_splits_the_steps():
    task = mixq.tasks.get("synthetic-cnn")
    cands = ["w2a8", "w4a8", "w8a8"]
    ctx = make_ctx(task, cands, {"avg_weight_bits": 4.5})
    out = method.search_ddq(ctx, method.Config(steps=12, search_frac=0.5, lr=1e-4))
    assert ctx.within_limits([cands.index(out.plan.layers[n].name) for n in ctx.layers])
    assert [h["phase"] for h in out.history] == ["search", "finetune"]
    assert [h["steps"] for h in out.history] == [6, 6]
    assert set(out.history[0]["learned_bits"]) == set(ctx.layers)


def test_finish_makes_site_evaluation_equal_trained_quantizers():
    task = mixq.tasks.get("synthetic-cnn")
    ctx = make_ctx(task, ["w3a4", "w4a4"], {})
    choices = [0, 1, 0, 1]
    quantizers = method.deploy_quantizers(ctx, choices)
    with torch.no_grad():  # move the ranges away from their initial values, as training does
        for wq, aq in quantizers.values():
            wq.range.mul_(0.8)
            aq.hi.mul_(0.9)
    installed = method.Installed(ctx.qmodel, quantizers)
    x = task.val[0][0]
    with torch.no_grad():
        trained = ctx.qmodel(x)
    method.finish(ctx, installed)
    apply(ctx.qmodel, ctx.plan_of(choices))
    with torch.no_grad():
        evaluated = ctx.qmodel(x)
    assert torch.allclose(evaluated, trained, rtol=1e-5, atol=1e-5)


def test_ddq_through_run_and_lsq_baseline_are_deterministic():
    task = mixq.tasks.get("synthetic-mlp")
    kw = {"candidates": ["w2a8", "w4a8", "w8a8"], "budget": {"avg_weight_bits": 4.8}}  # uniform w4: 4.77
    a = mixq.run(task, "ddq", method_args={"steps": 6}, **kw)
    b = mixq.run(task, "ddq", method_args={"steps": 6}, **kw)
    assert a.metrics.metric == b.metrics.metric
    assert a.metrics.within["avg_weight_bits"]
    lsq = mixq.run(task, "ddq", method_args={"steps": 4, "learn_bits": False}, **kw)
    assert {s.name for s in lsq.plan.layers.values()} == {"w4a8"}
    assert [h["phase"] for h in lsq.history] == ["finetune"]


def test_weight_mask_is_cached_with_the_quantized_weight(monkeypatch):
    site = Quantizer("weight")
    site.set_spec(parse_candidate("w3+mse").weight)
    w = torch.randn(4, 30, generator=torch.Generator().manual_seed(13), requires_grad=True)
    calls = []
    real = fake.calibrate_rows
    monkeypatch.setattr(fake, "calibrate_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    out1 = site(w)
    n_first = len(calls)
    out2 = site(w)
    assert len(calls) == n_first  # second call: no range search at all
    out2.sum().backward()
    rows = w.detach()
    scale, zero = real(rows, site.spec)
    inside = fake.clip_mask(rows, scale[:, None], zero[:, None], site.spec)
    assert torch.equal(w.grad, inside.float())
    assert torch.equal(out1, out2)
    with torch.no_grad():
        w.mul_(0.5)
    site(w)
    assert len(calls) > n_first  # a changed weight is quantized again


def test_gates_all_combinations_of_small_b():
    # every (B, b) up to B = 4: merged values equal group means (contiguity for every b)
    for B, b in itertools.product(range(1, 5), range(0, 5)):
        if b > B:
            continue
        q = sorted_levels(1, 2**B, seed=B * 10 + b)
        gates = monotone_gates(torch.tensor(float(b), dtype=torch.float64), B)
        assert torch.allclose(merge_table(q, gates), merge_oracle(q, b))


def test_cli_runs_ddq_and_a_rerun_resumes_from_the_checkpoints(tmp_path, capsys):
    from mixq.cli import main

    argv = [
        "run",
        "--task",
        "synthetic-mlp",
        "--method",
        "ddq",
        "--candidates",
        "w2,w4,w8",
        "--budget",
        "avg_weight_bits=5",
        "--method-arg",
        "epochs=1",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    assert "ddq" in capsys.readouterr().out
    assert (tmp_path / "plan.json").exists()
    for phase in ("search", "finetune"):
        state = torch.load(tmp_path / "train" / phase / "train_state.pt", weights_only=True)
        assert int(state["step"]) == 2  # epochs=1 over the 4 calibration batches: 2 + 2 steps
    first = mixq.Plan.load(tmp_path / "plan.json").to_dict()["layers"]
    assert main(argv) == 0  # both phases find finished checkpoints: nothing is trained again
    assert mixq.Plan.load(tmp_path / "plan.json").to_dict()["layers"] == first


# -- the read-out: measured losses into the ILP under the budget ----------------------------------


def test_readout_scores_equal_the_loss_with_one_layer_deployed():
    task = mixq.tasks.get("synthetic-cnn")
    cands = ["w2a8", "w4a8", "w8a8"]
    ctx = make_ctx(task, cands, {"avg_weight_bits": 4.5})
    quantizers = method.search_quantizers(ctx, method.Config(steps=2), 4.0)
    installed = method.Installed(ctx.qmodel, quantizers)
    batches = task.calib[:1]
    scores = method.readout_scores(ctx, installed, batches)
    # oracle: build the model by hand, one layer on its deployable grid, the others as learned
    layer, j = ctx.layers[1], 0
    m = installed.layers[layer]
    saved = (m.weight_quant, m.input_quant)
    m.weight_quant, m.input_quant = method.deploy_pair(m, ctx.candidates[j], installed.saved[layer][1])
    ctx.qmodel.eval()
    with torch.no_grad():
        one = float(task.loss(ctx.qmodel, batches[0]))
        m.weight_quant, m.input_quant = saved
        base = float(task.loss(ctx.qmodel, batches[0]))
    installed.restore()
    assert scores.shape == (len(ctx.layers), len(cands))
    assert float(scores[1, j]) == pytest.approx(one - base, rel=1e-6, abs=1e-9)
    assert float(scores[1, 0]) > float(scores[1, 2])  # 2 bits cost more loss than 8 bits


def test_choose_is_the_brute_force_optimum_and_favours_the_sensitive_layer():
    task = mixq.tasks.get("synthetic-cnn")
    cands = ["w2a8", "w4a8", "w8a8"]
    ctx = make_ctx(task, cands, {"avg_weight_bits": 4.0})
    n = len(ctx.layers)
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(n, 3, generator=g, dtype=torch.float64) * torch.tensor(
        [0.3, 0.1, 0.0], dtype=torch.float64
    )
    scores[0] = torch.tensor([10.0, 5.0, 0.0], dtype=torch.float64)  # layer 0: very sensitive
    choices, rec = method.choose(ctx, scores, None)
    best = min(
        (c for c in itertools.product(range(3), repeat=n) if ctx.within_limits(list(c))),
        key=lambda c: float(scores[torch.arange(n), torch.tensor(c)].sum()),
    )
    assert ctx.within_limits(choices)
    assert float(scores[torch.arange(n), torch.tensor(choices)].sum()) == pytest.approx(
        float(scores[torch.arange(n), torch.tensor(best)].sum())
    )
    assert choices[0] == 2 and rec["solver"] == "ilp"


def test_ddq_uses_the_budget_or_records_why_not():
    task = mixq.tasks.get("synthetic-cnn")
    cands = ["w2a8", "w4a8", "w8a8"]
    ctx = make_ctx(task, cands, {"avg_weight_bits": 5.0})
    out = method.search_ddq(ctx, method.Config(steps=4, readout_batches=1))
    h = out.history[0]
    choices = [cands.index(out.plan.layers[n].name) for n in ctx.layers]
    used = float(ctx.costs["weight_bits"][torch.arange(len(choices)), torch.tensor(choices)].sum())
    assert used <= ctx.limits["weight_bits"] + 1e-6
    assert h["budget_use"]["weight_bits"] == pytest.approx(used / ctx.limits["weight_bits"])
    assert h["budget_use"]["weight_bits"] >= 0.98 or "unused_budget" in h
    assert h["readout"] == "sensitivity" and set(h["scores"]) == set(ctx.layers)
    # the loss curve: one loss per step in each phase
    assert [len(p["loss_curve"]) for p in out.history] == [p["steps"] for p in out.history]


def test_distance_readout_is_the_nearest_plan_within_budget():
    task = mixq.tasks.get("synthetic-cnn")
    ctx = make_ctx(task, ["w2a8", "w4a8", "w8a8"], {"avg_weight_bits": 4.5})
    out = method.search_ddq(ctx, method.Config(steps=4, readout="distance"))
    assert out.history[0]["readout"] == "distance"
    with pytest.raises(ValueError, match="unknown readout 'loss'; valid: sensitivity, distance"):
        method.Config(readout="loss")


def test_readout_table_mean_and_standard_error_are_those_of_the_single_batches():
    task = mixq.tasks.get("synthetic-cnn")
    cands = ["w2a8", "w4a8", "w8a8"]
    ctx = make_ctx(task, cands, {"avg_weight_bits": 4.5})
    installed = method.Installed(ctx.qmodel, method.search_quantizers(ctx, method.Config(steps=2), 4.0))
    b = task.calib[:2]
    mean, se = method.readout_table(ctx, installed, b)
    one, two = (method.readout_scores(ctx, installed, [x]) for x in b)
    installed.restore()
    torch.testing.assert_close(mean, (one + two) / 2, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(se, (one - two).abs() / 2, rtol=1e-9, atol=1e-12)  # sd/√2 of two values
    assert float(se.max()) > 0
    with pytest.raises(ValueError, match="readout_confidence"):
        method.Config(readout_confidence=-1.0)
