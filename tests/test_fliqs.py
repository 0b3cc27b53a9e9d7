"""FLIQS: the REINFORCE controller on bandits, the reward's cost term, search spaces, the method."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

import mixq
from mixq.methods import fliqs
from mixq.plan import parse_candidate
from mixq.search import rl
from mixq.wrap import sites

INT = ["w4a4", "w8a8"]
FP = ["wfp4_e2m1-afp4_e2m1", "wfp6_e3m2-afp6_e3m2", "wfp8_e4m3fn-afp8_e4m3fn", "wfp8_e5m2-afp8_e5m2"]
SHORT = {"steps": 24, "rl_lr": 0.2}


@pytest.fixture(scope="module")
def task() -> mixq.Task:
    return mixq.tasks.get("synthetic-cnn")


def test_doctests() -> None:
    assert doctest.testmod(rl).failed == 0
    assert doctest.testmod(fliqs).failed == 0


# -- reward and schedule ------------------------------------------------------------------------


def test_abs_reward_penalizes_both_directions_and_is_quality_at_the_target() -> None:
    assert rl.reward(0.8, 100.0, 100.0, -0.3) == pytest.approx(0.8)
    assert rl.reward(0.8, 130.0, 100.0, -0.3) == pytest.approx(0.8 - 0.3 * 0.3)
    assert rl.reward(0.8, 70.0, 100.0, -0.3) == pytest.approx(0.8 - 0.3 * 0.3)
    # further from the target: lower reward
    assert rl.reward(0.8, 200.0, 100.0, -0.3) < rl.reward(0.8, 130.0, 100.0, -0.3)
    assert rl.reward(0.8, 30.0, 100.0, -0.3) < rl.reward(0.8, 70.0, 100.0, -0.3)


def test_mnas_reward_and_no_target() -> None:
    assert rl.reward(0.5, 200.0, 100.0, -1.0, "mnas") == pytest.approx(0.25)
    assert rl.reward(0.5, None, None, -1.0) == 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"beta": 0.1}, "beta must be <= 0"), ({"form": "exp"}, "unknown reward 'exp'; valid: abs, mnas")],
)
def test_reward_rejects_bad_input(kwargs: dict, match: str) -> None:
    args = {"quality": 1.0, "cost": 1.0, "target": 1.0, "beta": -0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        rl.reward(**args)


def test_entropy_schedule_is_flat_in_warmup_then_cosine_to_zero() -> None:
    vals = [rl.entropy_coef(t, 10, 30, 0.4) for t in range(40)]
    assert vals[:11] == [0.4] * 11
    assert vals[20] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(vals, vals[1:], strict=False))
    assert vals[30:] == [0.0] * 10
    with pytest.raises(ValueError, match="unknown entropy schedule 'step'; valid: cosine, linear, constant"):
        rl.entropy_coef(0, 0, 1, 1.0, "step")


# -- the controller ------------------------------------------------------------------------------


def run_bandit(means: torch.Tensor, updates: int, seed: int, noise: float, entropy: float) -> rl.Controller:
    """REINFORCE on a bandit: the reward is the sum over layers of the chosen arms' means + noise."""
    layers, arms = means.shape
    c = rl.Controller(layers, arms, lr=0.1, momentum=0.9, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    for t in range(updates):
        picks = c.sample()
        r = float(means[torch.arange(layers), torch.tensor(picks)].sum()) + noise * float(
            torch.randn(1, generator=g)
        )
        c.update(picks, r, rl.entropy_coef(t, 0, updates, entropy))
    return c


@pytest.mark.parametrize("seed", [0, 1])
def test_controller_converges_to_the_best_arm_of_a_noisy_bandit(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    means = 0.2 * torch.rand(4, 5, generator=g, dtype=torch.float64)
    means[torch.arange(4), torch.randint(5, (4,), generator=g)] += 0.3  # best arm: >= 0.1 above the rest
    c = run_bandit(means, 400, seed, noise=0.1, entropy=0.01)
    assert c.argmax() == means.argmax(1).tolist()
    assert float(c.probs().max(1).values.min()) > 0.9
    assert c.entropy() < 0.2 * math.log(5)


def test_closed_form_gradient_equals_autograd() -> None:
    c = rl.Controller(3, 4, seed=0)
    c.logits = torch.randn(3, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    theta = c.logits.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, 1)
    picks = [2, 0, 3]
    loss = -0.7 * logp[torch.arange(3), torch.tensor(picks)].sum() - 0.3 * -(logp.exp() * logp).sum()
    loss.backward()
    assert torch.allclose(c.grad(picks, 0.7, 0.3), theta.grad, atol=1e-12)


def test_entropy_bonus_keeps_the_policy_spread() -> None:
    means = torch.tensor([[0.0, 0.1, 0.2]], dtype=torch.float64)
    low = run_bandit(means, 100, 0, noise=0.0, entropy=0.0)
    high = rl.Controller(1, 3, lr=0.1, seed=0)
    for _ in range(100):
        picks = high.sample()
        high.update(picks, float(means[0, picks[0]]), 1.0)  # a constant, large entropy weight
    assert high.entropy() > low.entropy()
    assert high.entropy() > 0.9 * math.log(3)


def test_cost_term_alone_drives_the_policy_onto_the_target() -> None:
    # Two layers, arm costs 1, 2, 4, 8; quality is constant, target 6: only 2 + 4 or 4 + 2 hit it.
    costs = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    c = rl.Controller(2, 4, lr=0.1, seed=3)
    for t in range(250):
        picks = c.sample()
        total = float(costs[picks].sum())
        c.update(picks, rl.reward(0.5, total, 6.0, -0.5), rl.entropy_coef(t, 0, 250, 0.01))
    assert float(costs[c.argmax()].sum()) == 6.0


def test_controller_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="baseline momentum must be in"):
        rl.Controller(2, 2, momentum=1.0)
    with pytest.raises(ValueError, match="expected 2 choices, got 1"):
        rl.Controller(2, 2).update([0], 1.0, 0.0)


# -- search spaces and settings ------------------------------------------------------------------


def test_search_spaces_filter_the_candidates() -> None:
    cands = [parse_candidate(c) for c in [*INT, *FP, "w4-afp8_e4m3fn", "float"]]
    assert fliqs.space_arms(cands, "int") == [0, 1, 7]
    assert fliqs.space_arms(cands, "fp") == [2, 3, 4, 5, 7]
    assert fliqs.space_arms(cands, "joint") == list(range(8))
    with pytest.raises(ValueError, match="no candidate is in search space 'fp'; candidates: w4a4, w8a8"):
        fliqs.space_arms(cands[:2], "fp")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"space": "mixed"}, "unknown space 'mixed'; valid: joint, int, fp"),
        ({"beta": 0.5}, "beta must be <= 0"),
        ({"cost": "latency"}, "unknown cost 'latency'; valid: auto, bops, size_bits, weight_bits"),
        ({"warmup": 1.0}, "warmup is a fraction in"),
    ],
)
def test_config_rejects_bad_values(task: mixq.Task, args: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mixq.run(task, "fliqs", candidates=INT, method_args=args)


# -- the method ----------------------------------------------------------------------------------


def bops_budget(task: mixq.Task, factor: float) -> float:
    base = mixq.run(task, "uniform", candidates=["w4a4"])
    return factor * base.metrics.bops


@pytest.mark.parametrize("space", ["joint", "int", "fp"])
def test_search_meets_the_bops_budget_and_is_deterministic(task: mixq.Task, space: str) -> None:
    budget = {"bops": bops_budget(task, 1.6)}
    args = {**SHORT, "space": space}
    a = mixq.run(task, "fliqs", candidates=INT + FP, budget=budget, method_args=args, seed=4)
    b = mixq.run(task, "fliqs", candidates=INT + FP, budget=budget, method_args=args, seed=4)
    assert a.metrics.within["bops"]
    assert a.plan.to_dict()["layers"] == b.plan.to_dict()["layers"]
    assert a.metrics.metric == b.metrics.metric
    allowed = {"joint": INT + FP, "int": INT, "fp": FP}[space]
    assert set(a.plan.summary()) <= set(allowed)
    h = a.history[0]
    assert h["steps"] == 24 and h["fixed_steps"] == 2 and h["search_steps"] == 22 and h["warmup_steps"] == 6
    assert h["cost"] == "bops" and h["target"] == pytest.approx(budget["bops"])
    assert all(r["step"] >= 6 for r in h["controller"]) and h["controller"]


def test_trained_weights_are_the_float_modules_and_changed(task: mixq.Task) -> None:
    res = mixq.run(task, "fliqs", candidates=INT, method_args=SHORT)
    orig = dict(task.model.named_parameters())
    for m in sites(res.model).values():
        assert m.weight is m.float_module.weight
    changed = [n for n, m in sites(res.model).items() if not torch.equal(m.weight, orig[f"{n}.weight"])]
    assert changed == list(sites(res.model))
    # the plan evaluated by mixq.run is the one on the sites
    for name, m in sites(res.model).items():
        assert m.weight_quant.spec == res.plan.layers[name].weight


def test_controller_is_frozen_during_warmup(task: mixq.Task) -> None:
    res = mixq.run(
        task,
        "fliqs",
        candidates=INT + FP,
        budget={"bops": bops_budget(task, 2.0)},
        method_args={"steps": 8, "warmup": 0.99, "fix_frac": 0.0},
    )
    h = res.history[0]
    assert h["warmup_steps"] == h["search_steps"] == 8 and not h["controller"]
    assert h["final_entropy"] == pytest.approx(math.log(6))


def test_explicit_cost_needs_a_budget_on_it(task: mixq.Task) -> None:
    with pytest.raises(ValueError, match="cost 'bops' needs a budget on it"):
        mixq.run(task, "fliqs", candidates=INT, budget={"avg_weight_bits": 6}, method_args={"cost": "bops"})


def test_float_is_a_candidate_of_every_space(task: mixq.Task) -> None:
    budget = {"bops": bops_budget(task, 3.0)}
    res = mixq.run(
        task, "fliqs", candidates=["w4a4", "float"], budget=budget, method_args={"steps": 8, "space": "int"}
    )
    assert res.metrics.within["bops"]
    assert res.history[0]["arms"] == ["w4a4", "float"]


def test_single_candidate_is_uniform_qat(task: mixq.Task) -> None:
    res = mixq.run(task, "fliqs", candidates=["wfp8_e4m3fn-afp8_e4m3fn"], method_args={"steps": 6})
    assert res.plan.summary() == {"wfp8_e4m3fn-afp8_e4m3fn": 4}


def test_infeasible_budget_in_the_space_names_the_smallest(task: mixq.Task) -> None:
    with pytest.raises(ValueError, match="smallest feasible bops"):
        mixq.run(
            task,
            "fliqs",
            candidates=["w8a8", FP[0]],
            budget={"bops": bops_budget(task, 1.0)},
            method_args={"steps": 4, "space": "int"},
        )


def test_cli_runs_fliqs(tmp_path, capsys) -> None:
    from mixq.cli import main

    code = main(
        [
            "run",
            "--task",
            "synthetic-mlp",
            "--method",
            "fliqs",
            "--candidates",
            "w4a8,w8a8",
            "--budget",
            "avg_weight_bits=6",
            "--method-arg",
            "steps=6",
            "--method-arg",
            "space=int",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    assert (tmp_path / "plan.json").exists()
    assert "fliqs" in capsys.readouterr().out


def test_growing_controller_rate_converges_where_a_constant_one_does_not() -> None:
    # 20 layers x 6 arms, a weak per-arm quality signal under reward noise (one held-out batch):
    # the TuNAS 10x growing rate reaches entropy <= 0.3 of the maximum in 300 updates.
    g = torch.Generator().manual_seed(0)
    means = 0.02 * torch.rand(20, 6, generator=g, dtype=torch.float64)
    ratios = {}
    for growth in (1.0, 10.0):
        c = rl.Controller(20, 6, lr=0.1, seed=0)
        h0 = c.entropy()
        for t in range(300):
            picks = c.sample()
            r = float(means[torch.arange(20), torch.tensor(picks)].sum()) + 0.02 * float(
                torch.randn(1, generator=g)
            )
            c.update(picks, r, rl.entropy_coef(t, 0, 300, 0.02), growth ** (t / 300))
        assert c.entropy() < h0
        ratios[growth] = c.entropy() / c.max_entropy()
    assert ratios[10.0] <= 0.3 < ratios[1.0]


def test_history_records_per_layer_entropy_and_argmax_over_time(task: mixq.Task) -> None:
    res = mixq.run(task, "fliqs", candidates=INT + FP, method_args={"steps": 40, "rl_lr": 0.3})
    h = res.history[0]
    recs = h["controller"]
    n = len(sites(res.model))
    assert len(recs) >= 2 and all(len(r["layer_entropy"]) == len(r["layer_argmax"]) == n for r in recs)
    assert recs[-1]["rl_lr"] > recs[0]["rl_lr"]  # the rate grows over the search
    assert h["max_entropy"] == pytest.approx(math.log(len(INT + FP)))
    assert h["final_entropy_ratio"] == pytest.approx(h["final_entropy"] / h["max_entropy"])
    assert recs[-1]["entropy"] < recs[0]["entropy"]
    for r in recs:
        assert r["entropy"] == pytest.approx(sum(r["layer_entropy"]) / n, abs=1e-3)


def test_batch_centre_removes_each_reward_batch_offset() -> None:
    from mixq.methods.fliqs import BatchCentre

    centre = BatchCentre(0.5)
    assert centre(0, 0.90) == pytest.approx(0.90) and centre(1, 0.95) == pytest.approx(0.925)
    # the same plan quality on either batch: after a few rounds both give the same centred value
    for _ in range(30):
        a, b = centre(0, 0.90), centre(1, 0.95)
    assert a == pytest.approx(b, abs=1e-6) and a == pytest.approx(0.925, abs=1e-6)
    # a plan 0.01 better on batch 1 than its mean stands 0.01 above the common level
    assert centre(1, 0.96) == pytest.approx(0.935, abs=1e-6)


def bandit_with_two_reward_batches(centred: bool, seed: int, layers: int = 10, arms: int = 4) -> int:
    """Layers whose best arm the controller finds when the rewards alternate between two batches
    whose qualities differ by 0.05, ten times the per-layer gap of the best arm (0.004)."""
    from mixq.methods.fliqs import BatchCentre

    g = torch.Generator().manual_seed(seed)
    means = 0.004 * torch.rand(layers, arms, generator=g, dtype=torch.float64)
    best = torch.randint(arms, (layers,), generator=g)
    means[torch.arange(layers), best] += 0.004
    c = rl.Controller(layers, arms, lr=0.1, seed=seed)
    centre = BatchCentre(0.9)
    for t in range(300):
        picks = c.sample()
        q = 0.9 + 0.05 * (t % 2) + float(means[torch.arange(layers), torch.tensor(picks)].sum())
        q += 0.002 * float(torch.randn(1, generator=g))
        c.update(picks, centre(t % 2, q) if centred else q, rl.entropy_coef(t, 0, 300, 0.02), 10 ** (t / 300))
    return sum(int(a == int(b)) for a, b in zip(c.argmax(), best, strict=True))


@pytest.mark.parametrize("seed", [0, 2])
def test_per_batch_quality_baseline_finds_the_arms_a_shared_one_misses(seed: int) -> None:
    centred, shared = (bandit_with_two_reward_batches(c, seed) for c in (True, False))
    assert centred >= 8 and centred > shared + 2
