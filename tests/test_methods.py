"""Conformance tests run over every method in METHODS, on a tiny real-numerics task."""

import dataclasses
import sqlite3

import pytest
import torch

import mixq
from mixq.methods import METHODS
from mixq.methods.common import Context
from mixq.store import Store

CANDIDATES = ["w2+asym", "w4", "w8"]
TINY_ARGS = {"hawq": {"hutchinson_samples": 8}, "fliqs": {"steps": 60, "rl_lr": 0.2}}
# sparq adds SPARQ activations to the candidates; layer "0" sees signed inputs and keeps a8.
MOST_PRECISE = {"sparq": {"w8asparq4_5opt_v": 2, "w8a8": 1}}


@pytest.fixture(scope="module")
def task() -> mixq.Task:
    return mixq.tasks.get("synthetic-mlp")


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("bits", [3.0, 5.0])
def test_plan_within_budget_and_deterministic(task: mixq.Task, method: str, bits: float) -> None:
    args = TINY_ARGS.get(method)
    a = mixq.run(
        task, method=method, candidates=CANDIDATES, budget={"avg_weight_bits": bits}, method_args=args, seed=1
    )
    b = mixq.run(
        task, method=method, candidates=CANDIDATES, budget={"avg_weight_bits": bits}, method_args=args, seed=1
    )
    assert a.metrics.avg_weight_bits <= bits
    assert a.metrics.within["avg_weight_bits"]
    assert a.plan.to_dict()["layers"] == b.plan.to_dict()["layers"]
    assert a.metrics.metric == b.metrics.metric
    assert set(a.plan.layers) == {"0", "2", "4"}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_unconstrained_budget_takes_the_most_precise_candidate(task: mixq.Task, method: str) -> None:
    res = mixq.run(
        task,
        method=method,
        candidates=["w2", "w8"],
        budget={"avg_weight_bits": 40},
        method_args=TINY_ARGS.get(method),
    )
    if method == "multipoint":  # points go on top of the base plan: w8 everywhere
        assert all(s.weight.bits == 8 and s.weight.points for s in res.plan.layers.values())
        assert len(res.plan.layers) == 3
        return
    assert res.plan.summary() == MOST_PRECISE.get(method, {"w8": 3})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_infeasible_budget_names_the_smallest(task: mixq.Task, method: str) -> None:
    # Linear 16->64, 64->64, 64->8 at 2 bits, one fp32 scale per output channel.
    numel, scales = 16 * 64 + 64 * 64 + 64 * 8, 64 + 64 + 8
    smallest = (2 * numel + 32 * scales) / numel
    with pytest.raises(ValueError, match=f"smallest feasible avg_weight_bits is {smallest:.6g}"):
        mixq.run(
            task,
            method=method,
            candidates=["w2", "w8"],
            budget={"avg_weight_bits": 1.0},
            method_args=TINY_ARGS.get(method),
        )


def test_measured_sensitivity_ilp_beats_uniform_at_the_same_budget(task: mixq.Task) -> None:
    # 3 layers, 3 candidates: the exact ILP over measured single-layer losses is solved to
    # optimality and its plan is not worse than the best uniform plan within 1 point.
    budget = {"avg_weight_bits": 4.5}
    uni = mixq.run(task, method="uniform", candidates=CANDIDATES, budget=budget)
    ilp = mixq.run(task, method="sensitivity-ilp", candidates=CANDIDATES, budget=budget)
    assert ilp.metrics.metric >= uni.metrics.metric - 1.0
    assert ilp.history[0]["status"] == "optimal"


def test_sensitivity_ilp_run_dir_resumes_from_its_store(task: mixq.Task, tmp_path) -> None:
    first = mixq.run(
        task, method="sensitivity-ilp", candidates=CANDIDATES, budget={"avg_weight_bits": 4}, out=tmp_path
    )
    assert (tmp_path / "store.sqlite").exists() and (tmp_path / "sensitivity.safetensors").exists()
    again = mixq.run(
        task, method="sensitivity-ilp", candidates=CANDIDATES, budget={"avg_weight_bits": 4}, out=tmp_path
    )
    assert torch.equal(first.sensitivity.single, again.sensitivity.single)
    loaded = mixq.sensitivity.Sensitivity.load(tmp_path / "sensitivity.safetensors")
    assert torch.equal(loaded.single, first.sensitivity.single)


def test_cli_runs_hawq(tmp_path, capsys) -> None:
    from mixq.cli import main

    code = main(
        [
            "run",
            "--task",
            "synthetic-mlp",
            "--method",
            "hawq",
            "--candidates",
            "w2,w4,w8",
            "--budget",
            "avg_weight_bits=5",
            "--method-arg",
            "hutchinson_samples=8",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    assert (tmp_path / "plan.json").exists()
    assert "hawq" in capsys.readouterr().out


@pytest.mark.parametrize(
    "method, args, message",
    [
        ("clado", {"loss": "mse"}, "unknown loss 'mse'; valid: kl, task"),
        ("clado", {"solver": "lp"}, "unknown solver 'lp'; valid: ilp, greedy"),
        ("sensitivity-ilp", {"objective": "mse"}, "unknown objective 'mse'; valid: auto, loss, kl"),
        ("sensitivity-ilp", {"hutchinson_mode": "row"}, "unknown hutchinson_mode 'row'; valid: block, joint"),
        ("uniform", {"select": "size"}, "unknown select 'size'; valid: loss, bits"),
        ("sparq", {"select": "size"}, "unknown select 'size'; valid: loss, bits"),
        ("multipoint", {"variant": "row"}, "unknown variant 'row'; valid: channel, layer"),
        ("ddq", {"penalty": "abs"}, "unknown penalty 'abs'; valid: hinge, square"),
        ("ddq", {"bn": "fold"}, "unknown bn 'fold'; valid: freeze, train"),
        ("fliqs", {"schedule": "step"}, "unknown schedule 'step'; valid: cosine, linear, constant"),
        ("ddq", {"steps": 0, "epochs": 0}, "need steps > 0 or epochs > 0, got steps=0, epochs=0"),
        ("fliqs", {"steps": -1, "epochs": 1}, "need steps > 0 or epochs > 0, got steps=-1, epochs=1"),
    ],
)
def test_config_names_an_unknown_choice_and_the_valid_ones(method: str, args: dict, message: str) -> None:
    with pytest.raises(ValueError) as e:
        METHODS[method].config(**args)
    assert str(e.value) == message


def test_common_doctests() -> None:
    import doctest

    from mixq.methods import common

    assert doctest.testmod(common).failed == 0


def test_context_store_is_the_run_directorys_and_closed_on_leaving(tmp_path) -> None:
    ctx = Context(None, None, [], [], {}, None, {}, {}, out=tmp_path)
    with ctx.store() as store:
        store.put("model", "data", "job", 1.5)
    assert store.path == tmp_path / "store.sqlite"
    with pytest.raises(sqlite3.ProgrammingError):  # closed
        store.get("model", "data", "job")
    with Store(tmp_path / "store.sqlite") as again:
        assert again.get("model", "data", "job") == 1.5
    with dataclasses.replace(ctx, out=None).store() as none:
        assert none is None
