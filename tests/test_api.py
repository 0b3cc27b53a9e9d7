"""Test the one-call API mixq.run on synthetic tasks, a user Task, and the real MNIST CNN."""

import copy
import csv
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixq
from mixq import cost
from mixq.cost import InfeasibleBudgetError
from mixq.plan import Plan, parse_candidate
from mixq.wrap import sites

KEYS = ("metric", "avg_weight_bits", "size_bytes", "bops", "seconds")
MLP_WEIGHTS = 16 * 64 + 64 * 64 + 64 * 8
MLP_ROWS = 64 + 64 + 8


@pytest.fixture(scope="module")
def mlp():
    return mixq.tasks.get("synthetic-mlp")


@pytest.fixture(scope="module")
def cnn():
    return mixq.tasks.get("synthetic-cnn")


@pytest.fixture(scope="module")
def mnist():
    return mixq.tasks.mnist_cnn(val_size=1000)


def test_run_uniform_on_synthetic_mlp(mlp):
    res = mixq.run(mlp, method="uniform", candidates=["w2", "w4", "w8"], budget={"avg_weight_bits": 5})
    assert isinstance(res, mixq.Result)
    for k in KEYS:
        assert isinstance(getattr(res.metrics, k), float) and math.isfinite(getattr(res.metrics, k)), k
    assert set(res.plan.layers) == {"0", "2", "4"}
    (name,) = set(res.plan.summary())
    assert name in ("w2", "w4")  # w8 is over the budget
    bits = int(name[1])
    expect_bits = (MLP_WEIGHTS * bits + MLP_ROWS * 32) / MLP_WEIGHTS  # per-channel fp32 scales
    assert res.metrics.avg_weight_bits == pytest.approx(expect_bits, rel=1e-12)
    assert res.metrics.avg_weight_bits <= 5 and res.metrics.within["avg_weight_bits"] is True
    assert res.metrics.fp_metric == 100.0  # labels are the float model's own predictions
    # the returned model is the quantized one and its metric is what is reported
    assert {n: m.weight_quant.spec for n, m in sites(res.model).items()} == {
        n: parse_candidate(name).weight for n in ("0", "2", "4")
    }
    assert mlp.metric(res.model, mlp.val) == res.metrics.metric
    assert not sites(mlp.model)  # the task's own model is never modified


def test_run_uniform_on_synthetic_cnn_with_activations(cnn):
    budget = {"size_ratio": 0.2, "bops": 3e6}
    res = mixq.run(cnn, method="uniform", candidates=["w2a8", "w4a8", "w8a8", "w8"], budget=budget)
    assert set(res.plan.layers) == {"conv1", "dw", "conv2", "fc"}
    assert res.metrics.size_ratio <= 0.2 and res.metrics.bops <= 3e6
    assert res.metrics.within["size_ratio"] and res.metrics.within["bops"]
    # the reported costs are those of the plan
    infos = cost.probe(res.model, cnn.calib[0])
    again = cost.metrics_of(cost.model_costs(res.model, infos), [res.plan.layers[i.name] for i in infos])
    for k in ("avg_weight_bits", "size_bytes", "size_ratio", "bops"):
        assert getattr(res.metrics, k) == pytest.approx(again[k], rel=1e-12)


def test_run_is_deterministic_for_a_seed(mlp):
    cands = ["w2+asym+mse-a8", "w3a8", "w4a8"]
    a = mixq.run(mlp, "uniform", cands, {"avg_weight_bits": 4}, seed=3)
    b = mixq.run(mlp, "uniform", cands, {"avg_weight_bits": 4}, seed=3)
    assert a.plan == b.plan
    assert a.metrics.metric == b.metrics.metric
    assert a.history == b.history


def test_run_writes_the_run_directory_and_the_plan_reloads(mlp, tmp_path):
    res = mixq.run(mlp, "uniform", ["w3a8", "w4a8", "w8a8"], {"avg_weight_bits": 5}, out=tmp_path / "run")
    d = tmp_path / "run"
    for f in ("plan.json", "metrics.json", "layers.csv", "report.md"):
        assert (d / f).is_file(), f
    plan = Plan.load(d / "plan.json", layer_names=["0", "2", "4"])
    assert plan == res.plan
    metrics = json.loads((d / "metrics.json").read_text())
    for k in KEYS:
        assert metrics[k] == getattr(res.metrics, k)
    rows = list(csv.DictReader((d / "layers.csv").open()))
    assert [r["layer"] for r in rows] == ["0", "2", "4"]
    assert [r["spec"] for r in rows] == [res.plan.layers[n].name for n in ("0", "2", "4")]
    assert "uniform" in (d / "report.md").read_text()
    # the saved plan on a fresh wrapped, calibrated copy gives the same metric
    fresh = mixq.wrap(copy.deepcopy(mlp.model))
    mixq.calibrate(fresh, mlp.calib, mlp.forward)
    mixq.apply(fresh, plan)
    assert mlp.metric(fresh, mlp.val) == res.metrics.metric


# -- errors ------------------------------------------------------------------------------------


def test_unknown_method_lists_valid(mlp):
    with pytest.raises(ValueError, match="'clad0'.*uniform"):
        mixq.run(mlp, method="clad0", candidates=["w4"])


def test_unknown_method_arg_lists_valid(mlp):
    with pytest.raises(ValueError, match="'selct'.*select"):
        mixq.run(mlp, method="uniform", candidates=["w4"], method_args={"selct": "bits"})
    with pytest.raises(ValueError, match="'size'.*loss, bits"):
        mixq.run(mlp, method="uniform", candidates=["w4"], method_args={"select": "size"})


@pytest.mark.parametrize(
    "kwargs, key",
    [({"budget": 4}, "budget"), ({"method_args": ["select"]}, "method_args"), ({"task": 3}, "task")],
)
def test_arguments_of_the_wrong_type_raise_value_errors(mlp, kwargs, key):
    with pytest.raises(ValueError, match=key):
        mixq.run(**{"task": mlp, "candidates": ["w4"], **kwargs})


def test_unknown_candidate(mlp):
    with pytest.raises(ValueError, match="'w4q'.*grammar"):
        mixq.run(mlp, candidates=["w4", "w4q"])
    with pytest.raises(ValueError, match="candidate"):
        mixq.run(mlp, candidates=[])


def test_unknown_task_lists_valid():
    with pytest.raises(ValueError, match="'mnist'.*mnist-cnn.*synthetic-mlp"):
        mixq.run("mnist", candidates=["w4"])
    with pytest.raises(ValueError, match="synthetic-cnn"):
        mixq.tasks.get("synthetic")


def smallest_number(msg: str) -> float:
    return float(re.search(r"smallest feasible \w+ is ([-+0-9.e]+)", msg).group(1))


def test_infeasible_budget_names_the_smallest_feasible(mlp):
    with pytest.raises(InfeasibleBudgetError) as e:
        mixq.run(mlp, candidates=["w2", "w4"], budget={"avg_weight_bits": 2.5})
    smallest = (MLP_WEIGHTS * 2 + MLP_ROWS * 32) / MLP_WEIGHTS  # every layer at w2
    assert smallest_number(str(e.value)) == pytest.approx(smallest, rel=1e-5)
    res = mixq.run(mlp, candidates=["w2", "w4"], budget={"avg_weight_bits": smallest})
    assert res.plan.summary() == {"w2": 3}
    fp32 = 4 * sum(p.numel() for p in mlp.model.parameters())
    with pytest.raises(InfeasibleBudgetError) as e:
        mixq.run(mlp, candidates=["w8"], budget={"size_bytes": 100})
    smallest_bytes = (MLP_WEIGHTS * 8 + MLP_ROWS * 32) / 8 + 4 * MLP_ROWS  # + float32 biases
    assert smallest_number(str(e.value)) == pytest.approx(smallest_bytes, rel=1e-5)
    assert smallest_bytes < fp32
    with pytest.raises(ValueError, match="finite positive"):
        mixq.run(mlp, candidates=["w8"], budget={"avg_weight_bits": float("nan")})
    with pytest.raises(ValueError, match="avg_weight_bits, size_bytes"):
        mixq.run(mlp, candidates=["w8"], budget={"bits": 4})


def test_budgets_that_no_single_candidate_meets_together(mlp):
    # w2 meets the bits budget alone, w8a4 the BOPs budget alone: uniform cannot meet both
    with pytest.raises(InfeasibleBudgetError, match="together"):
        mixq.run(mlp, candidates=["w2", "w8a4"], budget={"avg_weight_bits": 3, "bops": 33 * 9000})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_named(mlp, bad):
    task = copy.deepcopy(mlp)
    with torch.no_grad():
        task.model[2].weight[3, 5] = bad
    with pytest.raises(ValueError, match=r"2\.weight"):
        mixq.run(task, candidates=["w4"])


def test_task_with_empty_calibration_raises(mlp):
    with pytest.raises(ValueError, match="calib"):
        mixq.Task(model=mlp.model, calib=[], val=mlp.val)
    with pytest.raises(ValueError, match="val"):
        mixq.Task(model=mlp.model, calib=mlp.calib, val=[])
    with pytest.raises(ValueError, match="Module"):
        mixq.Task(model=lambda x: x, calib=mlp.calib, val=mlp.val)


def test_user_task_with_own_loss_and_metric():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1)).eval()
    x = torch.randn(384, 10)
    with torch.no_grad():
        y = model(x) + 0.01 * torch.randn(384, 1)
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 384, 64)]

    def loss(m, b):
        return F.mse_loss(m(b[0]), b[1])

    def metric(m, bs):  # higher is better
        with torch.no_grad():
            return -sum(float(loss(m, b)) for b in bs) / len(bs)

    task = mixq.Task(model=model, calib=batches[:2], val=batches[2:], loss=loss, metric=metric, name="reg")
    res = mixq.run(task, "uniform", ["w2a8", "w8a8"], {"avg_weight_bits": 12})
    assert res.plan.summary() == {"w8a8": 2}  # the lower calibration loss
    assert res.metrics.task == "reg"
    assert res.metrics.metric == metric(res.model, task.val)
    assert res.metrics.metric > -1e-3
    assert res.metrics.fp_metric == pytest.approx(metric(model, task.val))
    res2 = mixq.run(task, "uniform", ["w2a8", "w8a8"], {"avg_weight_bits": 12}, {"select": "bits"})
    assert res2.plan.summary() == {"w8a8": 2}


# -- real MNIST --------------------------------------------------------------------------------


def test_mnist_w8_keeps_accuracy(mnist):
    res = mixq.run(mnist, "uniform", ["w8"])
    assert res.metrics.fp_metric > 98.0
    assert abs(res.metrics.metric - res.metrics.fp_metric) <= 0.5


def test_mnist_w2_needs_better_ranges(mnist):
    plain = mixq.run(mnist, "uniform", ["w2"]).metrics.metric  # symmetric, min/max
    best = mixq.run(mnist, "uniform", ["w2+asym+omse-a8"]).metrics.metric
    # measured on these 1000 images: about 37.5% and 98.3% (fp32 98.9%)
    assert plain < 70.0
    assert best > 95.0 and best - plain > 25.0


def test_prepare_cache_returns_identical_independent_copies():
    from mixq.api import prepare
    from mixq.plan import parse_candidate
    from mixq.sensitivity.perturb import state_fingerprint

    task = mixq.tasks.get("synthetic-cnn")
    specs = [parse_candidate("w2+asym+omse-a8")]
    cache = mixq.Cache()
    fresh, infos = prepare(task, specs)
    a, infos_a = prepare(task, specs, cache)
    b, _ = prepare(task, specs, cache)  # from the cache
    assert a is not b and infos_a == infos
    assert state_fingerprint(a) == state_fingerprint(b) == state_fingerprint(fresh)
    for m in mixq.sites(b).values():  # the copy keeps each site's weight shared with its float module
        assert m.weight is m.float_module.weight
    x = task.calib[0][0]
    mixq.apply(b, mixq.Plan({n: specs[0] for n in mixq.sites(b)}))
    mixq.apply(fresh, mixq.Plan({n: specs[0] for n in mixq.sites(fresh)}))
    with torch.no_grad():
        assert torch.equal(b(x), fresh(x))
        next(iter(mixq.sites(b).values())).weight.mul_(2)  # changing a copy leaves the cache alone
    c, _ = prepare(task, specs, cache)
    assert state_fingerprint(c) == state_fingerprint(fresh)
    with torch.no_grad():
        task.model.conv1.weight.add_(1.0)  # a changed model is prepared again
    try:
        d, _ = prepare(task, specs, cache)
        assert state_fingerprint(d) != state_fingerprint(fresh)
    finally:
        with torch.no_grad():
            task.model.conv1.weight.sub_(1.0)
