"""Test mixq.sensitivity against independent oracles: exact Hessians, direct losses, direct errors."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call

from mixq import tasks, wrap
from mixq.plan import parse_candidate
from mixq.quant import fake
from mixq.sensitivity import Sensitivity, hawq, hutchinson_trace, measured, proxy
from mixq.wrap import current_plan, sites


@pytest.fixture(scope="module")
def tiny():
    """A tiny tanh MLP (128 + 64 weights), its task and a wrapped copy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).eval()
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    task = tasks.Task(model=model, calib=[(x[:32], y[:32]), (x[32:], y[32:])], val=[(x, y)])
    return task, wrap(copy.deepcopy(model)).eval()


def exact_trace(model: nn.Module, name: str, batches) -> float:
    """The trace of the full Hessian w.r.t. one weight, averaged over batches."""
    w0 = dict(model.named_parameters())[name].detach()
    params = {k: v.detach() for k, v in model.named_parameters()}
    total = 0.0
    for x, y in batches:

        def loss(w, x=x, y=y):
            return F.cross_entropy(functional_call(model, {**params, name: w}, (x,)), y)

        h = torch.autograd.functional.hessian(loss, w0, vectorize=True).reshape(w0.numel(), w0.numel())
        total += float(h.diagonal().sum())
    return total / len(batches)


@pytest.mark.parametrize("layer", ["0", "2"])
def test_hutchinson_matches_exact_trace(tiny, layer):
    task, q = tiny
    est = hutchinson_trace(q, task, [layer], task.calib[:1], n_samples=256, seed=0)[layer]
    exact = exact_trace(task.model, f"{layer}.weight", task.calib[:1])
    assert abs(est - exact) <= 0.1 * abs(exact)
    assert hutchinson_trace(q, task, [layer], n_samples=8, seed=3) == hutchinson_trace(
        q, task, [layer], n_samples=8, seed=3
    )


def test_joint_hutchinson_matches_exact_block_traces(tiny):
    """One whole-model vector per sample: the cross-layer terms average out."""
    task, q = tiny
    est = hutchinson_trace(q, task, ["0", "2"], task.calib[:1], n_samples=1024, seed=0, mode="joint")
    for layer in ("0", "2"):
        exact = exact_trace(task.model, f"{layer}.weight", task.calib[:1])
        assert abs(est[layer] - exact) <= 0.15 * abs(exact)
    # with one layer there are no cross terms: the joint and block estimators agree exactly
    one = hutchinson_trace(q, task, ["2"], task.calib[:1], n_samples=8, seed=1, mode="joint")
    assert one == pytest.approx(hutchinson_trace(q, task, ["2"], task.calib[:1], n_samples=8, seed=1))
    with pytest.raises(ValueError, match="joint"):
        hutchinson_trace(q, task, ["2"], n_samples=2, mode="diagonal")


def test_hutchinson_restores_model(tiny):
    task, q = tiny
    q.get_submodule("0").weight_quant.set_spec(parse_candidate("w4").weight)
    try:
        flags = [p.requires_grad for p in q.parameters()]
        for p in q.parameters():
            p.requires_grad_(False)
        hutchinson_trace(q, task, ["0"], n_samples=2)
        assert not any(p.requires_grad for p in q.parameters())
        assert current_plan(q).layers["0"].name == "w4"
    finally:
        q.get_submodule("0").weight_quant.set_spec(None)
        for p, f in zip(q.parameters(), flags, strict=True):
            p.requires_grad_(f)


def test_hawq_is_average_trace_times_weight_error(tiny):
    task, q = tiny
    s = hawq(q, task, ["0", "2"], ["w2", "w4"], n_samples=4, seed=1)
    p = proxy(q, ["0", "2"], ["w2", "w4"])
    for i, name in enumerate(["0", "2"]):
        avg = s.meta["trace"][name] / sites(q)[name].weight.numel()
        torch.testing.assert_close(s.single[i], avg * p.single[i])
    assert s.kind == "hawq" and s.candidates == ["w2", "w4"]


def test_hawq_traces_are_stored_and_reused(tiny, tmp_path, monkeypatch):
    from mixq.sensitivity import hessian
    from mixq.store import Store

    task, q = tiny
    calls = []
    real = hessian.hutchinson_samples

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(hessian, "hutchinson_samples", counting)
    with Store(tmp_path / "s.sqlite") as store:
        first = hawq(q, task, ["0", "2"], ["w2", "w4"], n_samples=4, seed=1, store=store)
        again = hawq(q, task, ["0", "2"], ["w2", "w8"], n_samples=4, seed=1, store=store)
        other_seed = hawq(q, task, ["0", "2"], ["w2"], n_samples=4, seed=2, store=store)
    assert len(calls) == 2  # the second call reused the stored traces; a new seed did not
    assert again.meta["trace"] == first.meta["trace"]
    torch.testing.assert_close(again.single[:, 0], first.single[:, 0])
    assert other_seed.meta["trace"] != first.meta["trace"]


def test_measured_equals_direct_loss(tiny):
    task, q = tiny
    s = measured(q, task, ["0", "2"], ["w2", "w4"], progress=False)
    assert current_plan(q).layers == {}
    ref = copy.deepcopy(task.model)  # direct: quantize one float weight in place, no mixq sites

    def mean_loss(m):
        with torch.no_grad():
            return sum(float(F.cross_entropy(m(x), y)) for x, y in task.calib) / len(task.calib)

    fp = mean_loss(ref)
    with torch.no_grad():
        ref[2].weight.copy_(fake.quantize_weight(ref[2].weight, parse_candidate("w2").weight))
    assert s.score("2", "w2") == pytest.approx(mean_loss(ref) - fp, rel=1e-5, abs=1e-7)
    assert s.meta["fp_loss"] == pytest.approx(fp, rel=1e-6)
    assert s.single.shape == (2, 2) and s.kind == "measured"


def test_measured_kl_equals_direct_divergence(tiny):
    task, q = tiny
    s = measured(q, task, ["0", "2"], ["w2", "w4", "w8"], progress=False, objective="kl")
    ref = copy.deepcopy(task.model)
    with torch.no_grad():
        fp_logp = [F.log_softmax(ref(x).double(), -1) for x, _ in task.calib]
        ref[0].weight.copy_(fake.quantize_weight(ref[0].weight, parse_candidate("w2").weight))
        kl = [
            F.kl_div(F.log_softmax(ref(x).double(), -1), lp, log_target=True, reduction="batchmean")
            for (x, _), lp in zip(task.calib, fp_logp, strict=True)
        ]
    assert s.score("0", "w2") == pytest.approx(float(sum(kl)) / len(kl), rel=1e-6)
    assert s.meta["fp_loss"] == pytest.approx(0.0, abs=1e-12) and s.meta["objective"] == "kl"
    assert (s.single >= 0).all()
    assert (s.single[:, 0] > s.single[:, 2]).all()  # 2-bit moves the outputs more than 8-bit
    with pytest.raises(ValueError, match="unknown sensitivity objective 'nll'.*loss, kl"):
        measured(q, task, ["0"], ["w2"], progress=False, objective="nll")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['progres'\]; valid: executor, store"):
        measured(q, task, ["0"], ["w2"], progres=False)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['samples'\]; valid: n_samples"):
        hawq(q, task, ["0"], ["w2"], samples=4)


def test_measured_with_activation_candidates():
    task = tasks.get("synthetic-mlp")
    task.calib = task.calib[:1]
    from mixq.api import prepare

    specs = [parse_candidate(c) for c in ("w4a8", "a4")]
    q, infos = prepare(task, specs)
    s = measured(q, task, [i.name for i in infos], specs, progress=False)
    assert s.candidates == ["w4a8", "a4"] and torch.isfinite(s.single).all()
    assert current_plan(q).layers == {}


def test_proxy_equals_direct_weight_error(tiny):
    _, q = tiny
    s = proxy(q, ["0", "2"], ["w2", "w8", "a8"])
    for i, name in enumerate(["0", "2"]):
        w = sites(q)[name].weight.detach()
        for j, c in enumerate(["w2", "w8"]):
            direct = (fake.quantize_weight(w, parse_candidate(c).weight) - w).pow(2).sum()
            assert float(s.single[i, j]) == pytest.approx(float(direct), rel=1e-6)
    assert (s.single[:, 2] == 0).all()  # activation-only: weights untouched
    assert (s.single[:, 0] > s.single[:, 1]).all()


def test_unknown_layer_is_rejected(tiny):
    task, q = tiny
    with pytest.raises(ValueError, match="unknown layers"):
        proxy(q, ["nope"], ["w4"])


def test_save_load_round_trip(tmp_path):
    single = torch.rand(2, 3, dtype=torch.float64)
    pairs = torch.rand(2, 3, 2, 3)
    s = Sensitivity(["a.b", "c"], ["w2", "w4a8", "float"], single, "measured", pairs, {"fp_loss": 1.5})
    s.save(tmp_path / "s.safetensors")
    t = Sensitivity.load(tmp_path / "s.safetensors")
    assert (t.layers, t.candidates, t.kind, t.meta) == (s.layers, s.candidates, s.kind, s.meta)
    assert torch.equal(t.single, single) and torch.equal(t.pairs, pairs)
    u = Sensitivity(["a"], ["w4"], torch.zeros(1, 1), "proxy")
    u.save(tmp_path / "u.safetensors")
    assert Sensitivity.load(tmp_path / "u.safetensors").pairs is None


def _header(**change):
    h = {"schema": 1, "layers": ["a", "b"], "candidates": ["w4"], "kind": "proxy", "meta": {}}
    h.update(change)
    return {"mixq.sensitivity": json.dumps(h)}


@pytest.mark.parametrize(
    "tensors, metadata, match",
    [
        ({"single": torch.zeros(2, 1)}, _header(extra=1), "metadata fields"),
        ({"single": torch.zeros(2, 1)}, {**_header(), "other": "x"}, "metadata keys"),
        ({"single": torch.zeros(2, 1), "bogus": torch.zeros(1)}, _header(), "tensors"),
        ({"single": torch.zeros(3, 1)}, _header(), "shape"),
        ({"single": torch.zeros(2, 1), "pairs": torch.zeros(2, 1, 2)}, _header(), "shape"),
        ({"single": torch.zeros(2, 1)}, _header(layers=["a", 3]), "list of strings"),
        ({"single": torch.zeros(2, 1)}, _header(candidates=["w99"]), "candidate"),
        ({"single": torch.zeros(2, 1)}, _header(schema=7), "schema"),
        ({"single": torch.zeros(2, 1, dtype=torch.int32)}, _header(), "floating-point"),
        ({"single": torch.zeros(2, 1)}, {"mixq.sensitivity": "{not json"}, "JSON"),
    ],
)
def test_load_rejects_bad_files(tmp_path, tensors, metadata, match):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=match):
        Sensitivity.load(path)


def test_load_rejects_corrupt_bytes(tmp_path):
    path = tmp_path / "s.safetensors"
    Sensitivity(["a"], ["w4"], torch.zeros(1, 1), "proxy").save(path)
    data = path.read_bytes()
    path.write_bytes(data[:20] + b"\xff" * 10 + data[30:])
    with pytest.raises(ValueError, match="s.safetensors"):
        Sensitivity.load(path)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="s.safetensors"):
        Sensitivity.load(path)
