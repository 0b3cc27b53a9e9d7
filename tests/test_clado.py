"""Test CLADO: measured pairwise terms against direct losses, the IQP against brute force."""

import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn

import mixq
from mixq import search, tasks
from mixq.api import prepare
from mixq.cli import main as cli_main
from mixq.executor import InProcessExecutor
from mixq.methods import METHODS, clado
from mixq.methods.common import Context
from mixq.plan import as_layer_spec
from mixq.sensitivity import measured, pairwise
from mixq.store import Store
from mixq.wrap import applied, wrap

CANDS = ["w2", "w4+asym-a8"]


def direct_loss(q, task, plan, batches):
    """The oracle: the mean loss with ``plan`` applied the ordinary way."""
    with applied(q, {n: as_layer_spec(c) for n, c in plan.items()}), torch.inference_mode():
        return sum(float(task.loss(q, b)) for b in batches) / len(batches)


class Residual(nn.Module):
    """A residual CNN with in-place ops on module outputs (replays must be copies)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 1))
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.relu(self.stem(x))
        y = self.block(x)
        y += x
        return self.head(self.relu(y).mean((2, 3)))


@pytest.fixture(scope="module")
def residual():
    torch.manual_seed(0)
    task = tasks._teacher_task(Residual(), (3, 6, 6), "residual", n=96)
    q, infos = prepare(task, [as_layer_spec(c) for c in CANDS])
    return task, q, [i.name for i in infos]


def test_pairs_match_direct_losses_and_are_symmetric(residual):
    task, q, layers = residual
    batches = task.calib[:1]
    s = pairwise(
        q, task, layers, CANDS, batches=batches, progress=False, min_batches=1
    )  # the oracle: whole batch
    assert s.meta["reuse"] is True and s.pairs is not None
    torch.testing.assert_close(s.pairs, s.pairs.permute(2, 3, 0, 1), rtol=0, atol=0)
    fp = direct_loss(q, task, {}, batches)
    one = {(n, c): direct_loss(q, task, {n: c}, batches) for n in layers for c in CANDS}
    for i, j in itertools.combinations(range(len(layers)), 2):
        for a, b in itertools.product(range(len(CANDS)), repeat=2):
            (n, c), (m, d) = (layers[i], CANDS[a]), (layers[j], CANDS[b])
            omega = direct_loss(q, task, {n: c, m: d}, batches) - one[(n, c)] - one[(m, d)] + fp
            assert float(s.pairs[i, a, j, b]) == pytest.approx(omega, abs=1e-6)
    single = measured(q, task, layers, CANDS, batches=batches, progress=False).single
    torch.testing.assert_close(s.single, single, rtol=0, atol=1e-6)
    assert s.pairs.abs().max() > 1e-4  # a real network interacts


def test_prefix_reuse_is_exact_and_restores_model(residual):
    task, q, layers = residual
    before = {k: v.clone() for k, v in q.state_dict().items()}
    fast = pairwise(q, task, layers, CANDS, batches=task.calib[:2], progress=False)
    slow = pairwise(q, task, layers, CANDS, batches=task.calib[:2], reuse=False, progress=False)
    assert fast.meta["reuse"] and not slow.meta["reuse"]
    assert fast.meta["copy_replays"]  # relu(inplace=True) writes into the stem's replayed output
    torch.testing.assert_close(fast.pairs, slow.pairs, rtol=0, atol=1e-6)
    torch.testing.assert_close(fast.single, slow.single, rtol=0, atol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    assert all("forward" not in m.__dict__ for m in q.modules())
    assert fast.meta["fp_loss"] == pytest.approx(direct_loss(q, task, {}, task.calib[:2]), abs=1e-7)


class Chain(nn.Module):
    """A residual CNN without in-place ops: replays are handed out uncopied."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.head(torch.relu(self.block(x) + x).mean((2, 3)))


def test_uncopied_replays_give_the_naive_pairs():
    torch.manual_seed(0)
    task = tasks._teacher_task(Chain(), (3, 6, 6), "chain", n=64)
    q, infos = prepare(task, [as_layer_spec(c) for c in CANDS])
    layers = [i.name for i in infos]
    fast = pairwise(q, task, layers, CANDS, batches=task.calib[:2], progress=False)
    slow = pairwise(q, task, layers, CANDS, batches=task.calib[:2], reuse=False, progress=False)
    assert fast.meta["reuse"] and not fast.meta["copy_replays"]
    assert fast.pairs.abs().max() > 1e-4
    torch.testing.assert_close(fast.pairs, slow.pairs, rtol=0, atol=1e-6)
    torch.testing.assert_close(fast.single, slow.single, rtol=0, atol=1e-6)
    m, n = layers[1], layers[2]  # stem is replayed for both; one pair against plain passes
    omega = (
        direct_loss(q, task, {m: CANDS[0], n: CANDS[1]}, task.calib[:2])
        - direct_loss(q, task, {m: CANDS[0]}, task.calib[:2])
        - direct_loss(q, task, {n: CANDS[1]}, task.calib[:2])
        + fast.meta["fp_loss"]
    )
    assert float(fast.pairs[1, 0, 2, 1]) == pytest.approx(omega, abs=1e-6)


class Separable(nn.Module):
    """Two branches on disjoint inputs whose outputs add up: the loss below is additive."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.a(x[:, :4]) + self.b(x[:, 4:])


def test_zero_interaction_on_separable_model():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    task = tasks.Task(
        model=Separable(), calib=[(x, x)], val=[(x, x)], loss=lambda m, b: m(b[0]).sum(1).mean()
    )
    q = wrap(copy.deepcopy(task.model)).eval()
    s = pairwise(q, task, ["a", "b"], ["w2", "w3"], progress=False)
    assert s.single.abs().min() > 1e-3
    assert s.pairs.abs().max() < 1e-5
    squared = tasks.Task(
        model=task.model, calib=task.calib, val=task.val, loss=lambda m, b: (m(b[0]) ** 2).sum(1).mean()
    )
    assert pairwise(q, squared, ["a", "b"], ["w2", "w3"], progress=False).pairs.abs().max() > 1e-3


def test_matrix_form_matches_problem_objective():
    rng = np.random.default_rng(0)
    L, C = 4, 3
    single = rng.normal(size=(L, C))
    raw = rng.normal(size=(L, C, L, C))
    pairs = raw + raw.transpose(2, 3, 0, 1)
    g = clado.interaction_matrix(single, pairs)
    scores, p = clado.objective_terms(g, L, C)
    prob = search.Problem(scores, {}, {}, p)
    for x in itertools.product(range(C), repeat=L):
        onehot = np.zeros(L * C)
        onehot[np.arange(L) * C + np.array(x)] = 1
        direct = single[np.arange(L), x].sum() + sum(
            pairs[i, x[i], j, x[j]] for i, j in itertools.combinations(range(L), 2)
        )
        assert 0.5 * onehot @ g @ onehot == pytest.approx(direct)
        assert prob.objective(list(x)) == pytest.approx(direct)
    gp = clado.psd_projection(g)
    assert np.linalg.eigvalsh(gp).min() > -1e-10
    np.testing.assert_allclose(clado.psd_projection(gp), gp, atol=1e-10)
    psd = raw.reshape(L * C, L * C) @ raw.reshape(L * C, L * C).T
    np.testing.assert_allclose(clado.psd_projection(psd), psd, atol=1e-9)


@pytest.fixture(scope="module")
def mlp_ctx():
    task = tasks.get("synthetic-mlp")
    specs = [as_layer_spec(c) for c in ["w2", "w4", "w8"]]
    q, infos = prepare(task, specs)
    mc = mixq.cost.model_costs(q, infos)
    ctx = Context(
        task=task,
        qmodel=q,
        layers=[i.name for i in infos],
        candidates=specs,
        costs=mixq.cost.cost_table(infos, specs),
        model_costs=mc,
        budget={},
        limits={},
    )
    return ctx, clado.measure(ctx, clado.Config(batches=1))


@pytest.mark.parametrize("psd", [False, True])
def test_iqp_equals_brute_force_and_sweep_warm_start(mlp_ctx, psd):
    ctx, sens = mlp_ctx
    base = clado.problem(ctx, sens, "clado", psd)
    wb = ctx.costs["weight_bits"]
    limits = [float(wb[:, 0].sum()) * f for f in (1.0, 1.4, 1.8, 2.5)]
    prob = search.Problem(base.scores, {"weight_bits": wb}, {}, base.pairs)
    sols = clado.sweep(prob, "weight_bits", limits, clado.Config(time_limit=None))
    for limit, sol in zip(limits, sols, strict=True):
        sub = search.Problem(base.scores, {"weight_bits": wb}, {"weight_bits": limit}, base.pairs)
        assert sol.status == "optimal" and sol.gap == 0.0
        assert sol.objective == pytest.approx(search.brute_force(sub).objective, abs=1e-12)
        assert sub.is_feasible(sol.choices)


@pytest.mark.parametrize("method", ["clado", "clado-naive"])
def test_unconstrained_budget_gives_highest_precision(method):
    for psd in (False, True):
        res = mixq.run(
            "synthetic-mlp",
            method=method,
            candidates=["w2", "w4", "w8"],
            budget={},
            method_args={"batches": 1, "repair": "psd" if psd else "none"},
        )
        assert {s.name for s in res.plan.layers.values()} == {"w8"}
        assert res.history[0]["status"] == "optimal"


def test_tight_budget_stays_feasible():
    cands = ["w2", "w4", "w8"]
    task = tasks.get("synthetic-mlp")
    uniform2 = mixq.run(task, method="uniform", candidates=["w2"]).metrics.avg_weight_bits
    res = mixq.run(
        task,
        method="clado",
        candidates=cands,
        budget={"avg_weight_bits": uniform2 + 0.05},
        method_args={"batches": 1},
    )
    assert res.metrics.within["avg_weight_bits"]
    assert res.metrics.avg_weight_bits <= uniform2 + 0.05
    with pytest.raises(ValueError, match="smallest feasible"):
        mixq.run(task, method="clado", candidates=cands, budget={"avg_weight_bits": 1.0})


class Failing(InProcessExecutor):
    """Runs the first ``n`` jobs, then stops as if the process were killed."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def map(self, jobs, context, store=None, progress=True):
        super().map(jobs[: self.n], context, store=store, progress=False)
        raise KeyboardInterrupt


class Counting(InProcessExecutor):
    def map(self, jobs, context, store=None, progress=True):
        stored = set(store.keys()) if store is not None else set()
        self.ran = [j.key for j in jobs if j.key not in stored]
        return super().map(jobs, context, store=store, progress=False)


def test_interrupted_run_resumes(residual, tmp_path):
    task, q, layers = residual
    with Store(tmp_path / "s.sqlite") as store, pytest.raises(KeyboardInterrupt):
        pairwise(q, task, layers, CANDS, batches=task.calib[:1], store=store, executor=Failing(3))
    counting = Counting()
    with Store(tmp_path / "s.sqlite") as store:
        resumed = pairwise(q, task, layers, CANDS, batches=task.calib[:1], store=store, executor=counting)
    total = 1 + len(layers) * len(CANDS)
    assert len(counting.ran) == total - 3
    fresh = pairwise(q, task, layers, CANDS, batches=task.calib[:1], progress=False)
    torch.testing.assert_close(resumed.pairs, fresh.pairs, rtol=0, atol=1e-9)


def test_window_measures_near_pairs_only(residual):
    task, q, layers = residual
    full = pairwise(q, task, layers, CANDS, batches=task.calib[:1], progress=False)
    near = pairwise(q, task, layers, CANDS, batches=task.calib[:1], progress=False, window=1)
    assert near.meta["window"] == 1 and near.meta["pair_evals"] < full.meta["pair_evals"]
    torch.testing.assert_close(near.single, full.single, rtol=0, atol=0)
    for i, j in itertools.product(range(len(layers)), repeat=2):  # layers are in execution order
        if abs(i - j) <= 1:
            torch.testing.assert_close(near.pairs[i, :, j], full.pairs[i, :, j], rtol=0, atol=0)
        else:
            assert bool((near.pairs[i, :, j] == 0).all())
    assert full.pairs[0, :, 2:].abs().max() > 0  # what the window leaves out is not zero here
    wide = pairwise(q, task, layers, CANDS, batches=task.calib[:1], progress=False, window=len(layers))
    torch.testing.assert_close(wide.pairs, full.pairs, rtol=0, atol=0)
    with pytest.raises(ValueError, match="window must be at least 1"):
        pairwise(q, task, layers, CANDS, batches=task.calib[:1], progress=False, window=0)


def test_samples_measure_on_the_first_examples(mlp_ctx):
    ctx, _ = mlp_ctx
    sens = clado.measure(ctx, clado.Config(batches=1, samples=16, loss="task", splits=1), with_pairs=False)
    first = [clado.head(ctx.task.calib[0], 16)]
    assert len(first[0][0]) == 16 < len(ctx.task.calib[0][0])
    oracle = pairwise(
        ctx.qmodel, ctx.task, ctx.layers, ctx.candidates, batches=first, progress=False, with_pairs=False
    )
    torch.testing.assert_close(sens.single, oracle.single, rtol=0, atol=0)
    whole = clado.measure(ctx, clado.Config(batches=1, loss="task"), with_pairs=False)
    assert not torch.equal(sens.single, whole.single)


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="window must be at least 1"):
        clado.Config(window=0)
    with pytest.raises(ValueError, match="samples must be >= 0"):
        clado.Config(samples=-1)
    with pytest.raises(ValueError, match="valid: kl, task"):
        clado.Config(loss="mse")
    with pytest.raises(ValueError, match="valid: ilp, greedy"):
        clado.Config(solver="cvxpy")
    with pytest.raises(ValueError, match="logits"):
        clado._logits({"out": torch.zeros(2)})
    assert set(METHODS) >= {"clado", "clado-naive"}


def test_cli_runs_clado(tmp_path, capsys):
    code = cli_main(
        [
            "run",
            "--task",
            "synthetic-cnn",
            "--method",
            "clado",
            "--candidates",
            "w2,w8",
            "--budget",
            "avg_weight_bits=5",
            "--method-arg",
            "batches=1",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    assert (tmp_path / "plan.json").exists() and (tmp_path / "store.sqlite").exists()
    assert "clado" in capsys.readouterr().out


def test_pair_names_measure_those_candidates_pairs_only(residual):
    """Pairs of the other candidates are not evaluated and count as 0; the measured ones are exact."""
    task, q, layers = residual
    full = pairwise(q, task, layers, CANDS, batches=task.calib[:1], progress=False)
    part = pairwise(q, task, layers, CANDS, batches=task.calib[:1], progress=False, pair_names=("w2",))
    torch.testing.assert_close(part.single, full.single, rtol=0, atol=0)
    torch.testing.assert_close(part.pairs[:, 0, :, 0], full.pairs[:, 0, :, 0], rtol=0, atol=0)
    assert bool((part.pairs[:, 1] == 0).all()) and bool((part.pairs[:, :, :, 1] == 0).all())
    assert bool((part.pairs_se[:, 1] == 0).all())
    assert full.pairs[:, 1].abs().max() > 0  # what is left out is not zero here
    assert part.meta["pair_evals"] * len(CANDS) ** 2 == full.meta["pair_evals"]
    with pytest.raises(ValueError, match="pair_names \\['w9'\\] are not candidates"):
        pairwise(q, task, layers, CANDS, batches=task.calib[:1], progress=False, pair_names=("w9",))


def test_top_pairs_false_leaves_out_the_most_precise_candidate(mlp_ctx):
    ctx, _ = mlp_ctx
    assert clado._top(["w2", "w8", "w4"]) == "w8" and clado._top(["w4", "w4+asym"]) == "w4+asym"
    cfg = clado.Config(batches=1, loss="task", splits=1, top_pairs=False)
    sens = clado.measure(ctx, cfg)
    oracle = pairwise(
        ctx.qmodel, ctx.task, ctx.layers, ctx.candidates, batches=ctx.task.calib[:1], progress=False
    )
    top = 2  # w8
    torch.testing.assert_close(sens.pairs[:, :top, :, :top], oracle.pairs[:, :top, :, :top], rtol=0, atol=0)
    assert bool((sens.pairs[:, top] == 0).all()) and bool((sens.pairs[:, :, :, top] == 0).all())
