"""Test refine=N (measured refinement after the ILP) and CLADO's repaired pair terms."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mixq
from mixq import search, tasks
from mixq.api import prepare
from mixq.methods import clado
from mixq.methods import refine as refining
from mixq.methods.common import Context
from mixq.plan import as_layer_spec
from mixq.sensitivity import pairwise
from mixq.wrap import applied
from test_tied_ptq import tiny_tied_llama

CANDS = ["w2", "w4", "w8"]
ARGS = {
    "sensitivity-ilp": {"batches": 1},
    "hawq": {"batches": 1, "hutchinson_samples": 1},
    "clado": {"batches": 1, "splits": 2},
    "clado-naive": {"batches": 1, "splits": 1},
}


@pytest.fixture(scope="module")
def task():
    return tasks.get("synthetic-mlp")


@pytest.fixture(scope="module")
def budget(task):
    w2 = mixq.run(task, method="uniform", candidates=["w2"]).metrics.avg_weight_bits
    w4 = mixq.run(task, method="uniform", candidates=["w4"]).metrics.avg_weight_bits
    return {"avg_weight_bits": 0.5 * (w2 + w4)}


def calib_kl(task, plan):
    """The oracle: the mean KL to the float outputs over the calibration batches, plan applied."""
    q, _ = prepare(task, [as_layer_spec(c) for c in CANDS])
    total = 0.0
    with torch.inference_mode():
        for x, _ in task.calib:
            p = F.log_softmax(task.model.eval()(x), -1)
            with applied(q, plan):
                total += float(F.kl_div(F.log_softmax(q(x), -1), p, log_target=True, reduction="batchmean"))
    return total / len(task.calib)


@pytest.mark.parametrize("method", list(ARGS))
def test_refine_starts_from_today_never_worse_within_budget(task, budget, method):
    plain = mixq.run(task, method=method, candidates=CANDS, budget=budget, method_args=ARGS[method])
    assert "refined" not in plain.history[0]  # refine=0 (the default) measures nothing
    n = 6
    res = mixq.run(
        task, method=method, candidates=CANDS, budget=budget, method_args={**ARGS[method], "refine": n}
    )
    rec = res.history[0]["refined"]
    assert res.metrics.within["avg_weight_bits"] and res.metrics.avg_weight_bits <= budget["avg_weight_bits"]
    assert 1 <= len(rec["measured"]) <= n
    layers = list(res.plan.layers)
    assert rec["measured"][0]["choices"] == [CANDS.index(plain.plan.layers[k].name) for k in layers]
    assert rec["chosen"] == [CANDS.index(res.plan.layers[k].name) for k in layers]
    start, chosen = calib_kl(task, plain.plan), calib_kl(task, res.plan)
    assert rec["start_loss"] == pytest.approx(start, rel=1e-5)
    assert rec["chosen_loss"] == pytest.approx(chosen, rel=1e-5)
    assert chosen <= start * (1 + 1e-9)
    assert rec["chosen_loss"] == min(m["loss"] for m in rec["measured"])


@pytest.fixture(scope="module")
def ctx(task):
    specs = [as_layer_spec(c) for c in CANDS]
    q, infos = prepare(task, specs)
    mc = mixq.cost.model_costs(q, infos)
    costs = mixq.cost.cost_table(infos, specs)
    limit = float(costs["weight_bits"][:, 1].sum())
    return Context(task, q, [i.name for i in infos], specs, costs, mc, {}, {"weight_bits": limit})


def test_refine_ends_at_a_measured_local_optimum(ctx):
    """With enough measurements, no neighbour (one or two layers changed) measures better."""
    L, C = len(ctx.layers), len(ctx.candidates)
    rng = np.random.default_rng(0)
    table = rng.normal(size=[C] * L)  # an arbitrary objective, unlike the problem's prediction
    calls = []

    def measure(choices):
        calls.append(list(choices))
        return float(table[tuple(choices)])

    prob = search.Problem(
        torch.zeros(L, C, dtype=torch.float64), {"weight_bits": ctx.costs["weight_bits"]}, ctx.limits
    )
    start = [0] * L
    best, rec = refining.refine(ctx, prob, start, 10_000, measure)
    assert ctx.within_limits(best) and table[tuple(best)] <= table[tuple(start)]
    assert len(calls) == len({tuple(c) for c in calls}) == len(rec["measured"])  # each plan once
    for layers in itertools.chain(itertools.combinations(range(L), 1), itertools.combinations(range(L), 2)):
        for js in itertools.product(range(C), repeat=len(layers)):
            other = list(best)
            for layer, j in zip(layers, js, strict=True):
                other[layer] = j
            if ctx.within_limits(other):
                assert table[tuple(other)] >= table[tuple(best)]
    calls.clear()
    _, rec3 = refining.refine(ctx, prob, start, 3, measure)
    assert len(calls) == len(rec3["measured"]) <= 3
    assert refining.refine(ctx, prob, start, 0, measure) == (start, {"refine": 0})


def test_bad_refine_is_rejected():
    with pytest.raises(ValueError, match="refine must be a non-negative integer"):
        clado.Config(refine=-1)
    with pytest.raises(ValueError, match="refine must be a non-negative integer"):
        mixq.run("synthetic-mlp", method="hawq", candidates=CANDS, method_args={"refine": -2})
    with pytest.raises(ValueError, match="valid: none, psd, psd-diag"):
        clado.Config(repair="nearest")
    with pytest.raises(ValueError, match="snr must be >= 0"):
        clado.Config(snr=-1.0)


def test_noise_estimate_matches_separate_measurements(ctx):
    """Terms are the mean over the parts (= one measurement on the whole set); errors their SE."""
    cfg = clado.Config(batches=1, splits=4, loss="task")
    sens, single_se, pair_se = clado.measure_with_noise(ctx, cfg)
    batch = ctx.task.calib[0]
    parts = clado.split([batch], 4)
    assert len(parts) == 4 and sum(len(p[0][0]) for p in parts) == len(batch[0])
    each = [
        pairwise(ctx.qmodel, ctx.task, ctx.layers, ctx.candidates, batches=p, progress=False, min_batches=1)
        for p in parts
    ]
    whole = pairwise(ctx.qmodel, ctx.task, ctx.layers, ctx.candidates, batches=[batch], progress=False)
    torch.testing.assert_close(sens.single, whole.single, rtol=0, atol=1e-6)  # float32 losses
    torch.testing.assert_close(sens.pairs, whole.pairs, rtol=0, atol=1e-6)
    pairs = np.stack([e.pairs.numpy() for e in each])
    np.testing.assert_allclose(pair_se.numpy(), pairs.std(0, ddof=1) / 2.0, rtol=1e-9, atol=1e-12)
    singles = np.stack([e.single.numpy() for e in each])
    np.testing.assert_allclose(single_se.numpy(), singles.std(0, ddof=1) / 2.0, rtol=1e-9, atol=1e-12)
    # The shrunk problem keeps exactly the terms beyond snr standard errors.
    prob = clado.problem(ctx, sens, "clado", "none", pair_se, snr=2.0)
    keep = np.abs(sens.pairs.numpy()) >= 2.0 * pair_se.numpy()
    L = len(ctx.layers)
    expected = np.where(keep, sens.pairs.numpy(), 0.0)
    expected[np.arange(L), :, np.arange(L), :] = 0.0
    np.testing.assert_allclose(prob.pairs.numpy(), expected, atol=0)


def test_psd_keep_diagonal_is_psd_and_keeps_singles():
    rng = np.random.default_rng(1)
    L, C = 5, 3
    single = rng.uniform(0.1, 1.0, size=(L, C))
    pairs = rng.normal(scale=0.5, size=(L, C, L, C))
    pairs = 0.5 * (pairs + pairs.transpose(2, 3, 0, 1))
    g = clado.interaction_matrix(single, pairs)
    assert np.linalg.eigvalsh(g).min() < -0.1  # indefinite as measured
    out = clado.psd_keep_diagonal(g, iters=2000, tol=1e-12)
    np.testing.assert_allclose(np.diag(out), np.diag(g), rtol=0, atol=0)
    assert np.linalg.eigvalsh(out).min() > -1e-6
    np.testing.assert_allclose(out, out.T, atol=0)
    # No PSD matrix with that diagonal is nearer: the plain projection with the diagonal reset
    # is one such candidate after enough alternations; compare with random PSD ones too.
    dist = np.linalg.norm(out - g)
    for _ in range(20):
        a = rng.normal(size=(L * C, L * C))
        psd = a @ a.T
        scale = np.sqrt(np.diag(g) / np.diag(psd))
        psd = psd * scale[:, None] * scale[None, :]  # same diagonal, still PSD
        assert np.linalg.norm(psd - g) >= dist - 1e-9
    already = rng.normal(size=(6, 6))
    already = already @ already.T
    np.testing.assert_allclose(clado.psd_keep_diagonal(already), already, atol=1e-9)


def test_refine_measures_tied_plans_only(monkeypatch):
    """A tied embedding and lm_head are one tensor: every plan refine measures gives them one weight
    spec, and the plan it keeps is the run's final plan (tie_plan changes nothing afterwards)."""
    task = tiny_tied_llama()
    emb, head = "model.embed_tokens", "lm_head"
    measured = []

    def spy(model, plan):
        if plan:
            measured.append(plan)
        return applied(model, plan)

    monkeypatch.setattr(refining, "applied", spy)
    cands = ["w2g16", "w4g16", "w8"]
    w = [mixq.run(task, "uniform", [c], embeddings=True).metrics.avg_weight_bits for c in cands[:2]]
    res = mixq.run(
        task, "sensitivity-ilp", cands, {"avg_weight_bits": 0.5 * sum(w)}, embeddings=True,
        method_args={"batches": 1, "refine": 6},
    )  # fmt: skip
    rec = res.history[0]["refined"]
    assert len(measured) == len(rec["measured"]) > 1
    for plan in measured:
        assert emb in plan.layers and head in plan.layers
        assert plan.layers[emb].weight == plan.layers[head].weight, plan.layers
    assert res.plan.layers[emb].weight == res.plan.layers[head].weight
    # The kept plan is the measured one: its loss is the final plan's.
    kept = measured[[tuple(m["choices"]) for m in rec["measured"]].index(tuple(rec["chosen"]))]
    assert {n: s.weight for n, s in kept.layers.items()} == {n: s.weight for n, s in res.plan.layers.items()}


def test_capped_start_is_the_best_measured_of_the_capped_optima(ctx):
    """Oracle by enumeration: for every cap k, the plan of least predicted objective among all plans
    within the budget with at most k layers at the cheapest candidate; the start is the best measured."""
    L, C = len(ctx.layers), len(ctx.candidates)
    rng = np.random.default_rng(3)
    scores = torch.tensor(rng.uniform(0.0, 1.0, size=(L, C)))  # continuous: no ties between optima
    prob = search.Problem(scores, {"weight_bits": ctx.costs["weight_bits"]}, ctx.limits)
    table = rng.normal(size=[C] * L)  # the measured objective, unlike the prediction
    bits = ctx.costs["weight_bits"].sum(0)
    feasible = [list(p) for p in itertools.product(range(C), repeat=L) if ctx.within_limits(list(p))]
    optima = set()
    for level in sorted(set(bits.tolist()))[:-1]:  # w2, then w2 and w4 (w8 is never capped)
        for k in range(L + 1):
            within = [p for p in feasible if sum(bits[j] <= level for j in p) <= k]
            if within:
                optima.add(tuple(min(within, key=prob.objective)))
    solver = list(min(feasible, key=prob.objective))
    calls = []

    def measure(choices):
        calls.append(tuple(choices))
        return float(table[tuple(choices)])

    best, rec = refining.capped_start(ctx, prob, solver, measure)
    assert rec["groups"] == [["w2"], ["w2", "w4"]]
    assert set(calls) == optima | {tuple(solver)} and len(calls) == len(set(calls))  # each plan once
    assert calls[0] == tuple(solver)
    assert tuple(best) == min(optima, key=lambda p: table[p])
    assert len(optima) > 1  # the caps did give other plans to measure


@pytest.mark.parametrize("method", ["sensitivity-ilp", "hawq"])
def test_caps_in_a_run_start_from_the_best_measured_plan(task, budget, method):
    args = ARGS[method]
    plain = mixq.run(task, method, CANDS, budget, method_args=args)
    res = mixq.run(task, method, CANDS, budget, method_args={**args, "caps": True, "refine": 4})
    info = res.history[0]
    capped, refined = info["capped"], info["refined"]
    layers = list(res.plan.layers)
    assert capped["measured"][0]["choices"] == [CANDS.index(plain.plan.layers[k].name) for k in layers]
    assert capped["chosen"] == refined["measured"][0]["choices"]  # the refinement starts there
    assert refined["start_loss"] == min(m["loss"] for m in capped["measured"])
    assert refined["chosen_loss"] <= capped["measured"][0]["loss"]
    assert calib_kl(task, res.plan) == pytest.approx(refined["chosen_loss"], rel=1e-5)
    assert res.metrics.within["avg_weight_bits"]
    with pytest.raises(ValueError, match="caps"):
        mixq.run(task, "sensitivity-ilp", CANDS, budget, method_args={"caps": "yes"})


def test_capped_start_passes_the_time_limit_and_counts_a_tied_tensor_once(ctx, monkeypatch):
    """Every capped problem gets the method's time limit; a tied follower (here layer 1, following
    layer 0) is no layer of its own: its cap row is zero, k runs to L - 1, every plan is tied."""
    L = len(ctx.layers)
    limits, problems = [], []
    real_ilp = search.ilp

    def spy(prob, time_limit=None, **kw):
        limits.append(time_limit)
        problems.append(prob)
        return real_ilp(prob, time_limit=time_limit, **kw)

    monkeypatch.setattr(refining.search, "ilp", spy)
    monkeypatch.setattr(ctx, "tied_pairs", lambda: [(1, 0)])
    rng = np.random.default_rng(5)
    scores = torch.tensor(rng.uniform(0.0, 1.0, size=(L, len(ctx.candidates))))
    prob = search.Problem(scores, {"weight_bits": ctx.costs["weight_bits"]}, ctx.limits)
    start = list(real_ilp(prob).choices)
    calls = []

    def measure(choices):
        calls.append(tuple(choices))
        return float(sum(choices))

    refining.capped_start(ctx, prob, start, measure, time_limit=7.5)
    assert problems and limits == [7.5] * len(problems)
    for p in problems:
        cap = p.costs[refining.CAP_KEY]
        assert float(cap[1].abs().sum()) == 0.0 and float(cap[0].sum()) > 0
    per_group = len(problems) // len(refining.levels(ctx))
    assert max(p.budgets[refining.CAP_KEY] for p in problems) == L - 1 == per_group - 1
    assert calls and all(c[1] == c[0] for c in calls)


def test_caps_in_a_run_use_the_methods_time_limit(task, budget, monkeypatch):
    limits = []
    real_ilp = search.ilp

    def spy(prob, time_limit=None, **kw):
        limits.append(time_limit)
        return real_ilp(prob, time_limit=time_limit, **kw)

    monkeypatch.setattr(refining.search, "ilp", spy)
    mixq.run(
        task, "sensitivity-ilp", CANDS, budget, method_args={"batches": 1, "caps": True, "time_limit": 9.0}
    )
    assert len(limits) > 2 and set(limits) == {9.0}


def calib_top1(task, plan):
    """The oracle: top-1 (%) on the calibration batches with ``plan`` applied to a fresh wrapped model."""
    q, _ = prepare(task, [as_layer_spec(c) for c in CANDS])
    hit = n = 0
    with torch.inference_mode(), applied(q, plan):
        for x, y in task.calib:
            hit += int((q(x).argmax(-1) == y).sum())
            n += len(y)
    return 100.0 * hit / n


def test_select_top1_keeps_the_measured_plan_of_best_calibration_accuracy(task, budget):
    args = {"batches": 1, "caps": True, "refine": 4}
    res = mixq.run(task, "sensitivity-ilp", CANDS, budget, method_args={**args, "select": "top1"})
    info = res.history[0]
    measured = info["capped"]["measured"] + info["refined"]["measured"]
    assert {tuple(m["choices"]) for m in measured} == {
        tuple(m["choices"]) for m in info["selected"]["measured"]
    }
    layers = list(res.plan.layers)
    acc = {}
    for m in info["selected"]["measured"]:
        plan = mixq.Plan({n: as_layer_spec(CANDS[j]) for n, j in zip(layers, m["choices"], strict=True)})
        acc[tuple(m["choices"])] = calib_top1(task, plan)
        assert m["top1"] == pytest.approx(acc[tuple(m["choices"])], abs=1e-9)
    assert calib_top1(task, res.plan) == max(acc.values())
    assert res.metrics.within["avg_weight_bits"]
    with pytest.raises(ValueError, match="select"):
        mixq.run(task, "sensitivity-ilp", CANDS, budget, method_args={"select": "top1"})
    with pytest.raises(ValueError, match="unknown select 'acc'; valid: objective, top1"):
        mixq.run(task, "sensitivity-ilp", CANDS, budget, method_args={"caps": True, "select": "acc"})


def test_select_top1_ranks_by_accuracy_then_loss(ctx, monkeypatch):
    acc = {(0, 0, 0): 50.0, (1, 0, 0): 70.0, (0, 1, 0): 70.0, (0, 0, 1): 60.0}
    monkeypatch.setattr(refining, "calib_top1", lambda c: lambda choices: acc[tuple(choices)])
    records = [
        {"choices": [0, 0, 0], "loss": 0.1},  # the lowest loss, the worst top-1
        {"choices": [1, 0, 0], "loss": 0.5},
        {"choices": [0, 1, 0], "loss": 0.3},  # ties on top-1 with the one above, lower loss
        {"choices": [0, 0, 1], "loss": 0.2},
        {"choices": [1, 0, 0], "loss": 0.5},  # measured twice: one entry
    ]
    assert len(ctx.layers) == 3
    chosen, rec = refining.select_top1(ctx, records)
    assert chosen == [0, 1, 0]
    assert len(rec["measured"]) == 4 and rec["chosen"] == [0, 1, 0]
