"""Test the PTQ steps (CLE, bias correction, AdaRound) against independent oracles, and ptq= in run."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixq
from mixq import cli
from mixq.plan import Plan, parse_candidate
from mixq.ptq import STEPS, adaround, bias_correction, cle, resolve
from mixq.wrap import apply, sites, wrap


class Chain(nn.Module):
    """Conv -> ReLU -> depthwise -> ReLU6 -> conv -> ReLU -> pool -> flatten -> linear -> ReLU -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.r1 = nn.ReLU()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.r2 = nn.ReLU6()
        self.c2 = nn.Conv2d(8, 6, 1)
        self.r3 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(6 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.r3(self.c2(self.r2(self.dw(self.r1(self.c1(x)))))))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def chain_model(seed: int = 0) -> nn.Module:
    """A chain whose output channels have very different ranges (what CLE fixes)."""
    torch.manual_seed(seed)
    m = Chain().eval()
    with torch.no_grad():
        for layer in (m.c1, m.dw, m.c2, m.fc1):
            n = layer.weight.shape[0]
            spread = torch.logspace(-1.5, 1.5, n)[torch.randperm(n)]
            layer.weight.mul_(spread.reshape(-1, *([1] * (layer.weight.dim() - 1))))
            layer.bias.normal_()
    return m


def naive_in_range(layer: nn.Module, i: int, repeat: int = 1) -> float:
    """Max |w| over every weight that multiplies input channel ``i`` (explicit indexing)."""
    w = layer.weight.detach()
    if isinstance(layer, nn.Conv2d):
        per_in = w.shape[1]
        g, j = divmod(i, per_in)
        per_out = w.shape[0] // layer.groups
        return float(w[g * per_out : (g + 1) * per_out, j].abs().max())
    return float(w[:, i * repeat : (i + 1) * repeat].abs().max())


def test_cle_finds_pairs_and_keeps_the_function():
    m = chain_model()
    x = torch.randn(16, 3, 8, 8) * 3
    before = m(x)
    record = cle.equalize(m)
    assert record["pairs"] == [["c1", "dw"], ["dw", "c2"], ["c2", "fc1"], ["fc1", "fc2"]]
    assert isinstance(m.r2, cle.ChannelClamp)  # ReLU6 became an exact per-channel clamp
    assert record["max_log_scale"] <= 1e-4
    torch.testing.assert_close(m(x), before, rtol=1e-4, atol=1e-4)
    # the chain really changed: ranges were far apart before
    assert not torch.allclose(m.c1.weight, chain_model().c1.weight)


def test_cle_single_pair_makes_both_ranges_the_geometric_mean():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=3)).eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.tensor([0.01, 0.1, 1.0, 10.0, 3.0, 0.3]).reshape(-1, 1, 1, 1))
    r1 = [float(model[0].weight[i].detach().abs().max()) for i in range(6)]
    r2 = [naive_in_range(model[2], i) for i in range(6)]
    x = torch.randn(5, 4, 9, 9)
    y = model(x)
    rec = cle.equalize(model)
    assert rec["pairs"] == [["0", "2"]] and rec["sweeps"] == 2  # second sweep finds all s = 1
    for i in range(6):
        expect = (r1[i] * r2[i]) ** 0.5
        assert float(model[0].weight[i].detach().abs().max()) == pytest.approx(expect, rel=1e-5)
        assert naive_in_range(model[2], i) == pytest.approx(expect, rel=1e-5)
    torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)


def test_cle_equalizes_every_pair_of_a_chain_and_flatten_blocks():
    m = chain_model(2)
    cle.equalize(m)
    for first, second, repeat in (("c1", "dw", 1), ("dw", "c2", 1), ("c2", "fc1", 16), ("fc1", "fc2", 1)):
        a, b = m.get_submodule(first), m.get_submodule(second)
        for i in range(a.weight.shape[0]):
            assert float(a.weight[i].abs().max()) == pytest.approx(naive_in_range(b, i, repeat), rel=1e-3)


def test_cle_relu6_modes_and_non_homogeneous_links():
    m = chain_model()
    rec = cle.equalize(m, cle.Config(relu6="skip"))
    assert ["c1", "dw"] in rec["pairs"] and ["dw", "c2"] not in rec["pairs"]
    assert isinstance(m.r2, nn.ReLU6)
    m = chain_model()
    cle.equalize(m, cle.Config(relu6="relu"))
    assert type(m.r2) is nn.ReLU
    bn = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1)).eval()
    assert cle.find_pairs(bn) == []  # a batch norm is not homogeneous: fold it first
    with pytest.raises(ValueError, match="relu6.*valid: clamp, relu, skip"):
        cle.Config(relu6="bogus")


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(y) + y  # a's output also feeds the add: not a pair


def test_cle_leaves_a_layer_with_two_users_alone():
    assert cle.find_pairs(Residual().eval()) == []


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, ReLU6, ZeroPad2d, 3x3 depthwise, ReLU6, 1x1 project (+ x)."""

    def __init__(self, c: int, act: nn.Module | None, stride: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(c, 4 * c, 1)
        self.act1 = act or nn.ReLU6()
        self.pad = nn.ZeroPad2d(1) if stride == 1 else nn.ZeroPad2d((0, 1, 0, 1))  # TF "same"
        self.dw = nn.Conv2d(4 * c, 4 * c, 3, stride=stride, groups=4 * c)
        self.act2 = act or nn.ReLU6()
        self.project = nn.Conv2d(4 * c, c, 1)
        self.residual = stride == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.act2(self.dw(self.pad(self.act1(self.expand(x))))))
        return x + y if self.residual else y


class MobileNetLike(nn.Module):
    """Stem, a residual and a strided inverted-residual block, a head, pass-through modules
    (Dropout, MaxPool2d, Identity, pooling, Flatten) and a two-layer classifier; ``shared``: one
    ReLU6 module called at every ReLU6 site (a shared ReLU is called twice in both variants)."""

    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.act = nn.ReLU6()
        act = self.act if shared else None
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.drop = nn.Dropout(0.1)
        self.b1 = InvertedResidual(8, act, 1)
        self.b2 = InvertedResidual(8, act, 2)
        self.head = nn.Conv2d(8, 24, 1)
        self.relu = nn.ReLU()
        self.pool = nn.Sequential(nn.MaxPool2d(2), nn.Identity(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc1 = nn.Linear(24, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b2(self.b1(self.drop(self.act(self.stem(x)))))
        return self.fc2(self.relu(self.fc1(self.pool(self.relu(self.head(x))))))


def spread_model(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every layer output channels of very different ranges and random biases."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                n = m.weight.shape[0]
                m.weight.mul_(
                    torch.logspace(-1.5, 1.5, n)[torch.randperm(n)].reshape(-1, *[1] * (m.weight.dim() - 1))
                )
                m.bias.normal_()
    return model.eval()


MNV2_PAIRS = [["b2.project", "head"], ["head", "fc1"], ["fc1", "fc2"]]
MNV2_RELU6_PAIRS = [
    ["b1.expand", "b1.dw"],
    ["b1.dw", "b1.project"],
    ["b2.expand", "b2.dw"],
    ["b2.dw", "b2.project"],
]


@pytest.mark.parametrize("shared", [False, True])
def test_cle_keeps_the_function_of_a_mobilenet_like_model(shared: bool):
    model = spread_model(MobileNetLike(shared))
    x = torch.randn(16, 3, 8, 8)
    ref = model(x)
    rec = cle.equalize(model, example=lambda m: m(x))
    assert sorted(rec["pairs"]) == sorted(MNV2_PAIRS + ([] if shared else MNV2_RELU6_PAIRS))
    if shared:  # rescaling the one ReLU6 for one pair would change it at its 5 other places
        why = "called at more than one place: act (5 places)"
        assert sorted(rec["skipped"]) == sorted([*p, why] for p in MNV2_RELU6_PAIRS)
        assert type(model.act) is nn.ReLU6
    else:
        assert rec["skipped"] == [] and isinstance(model.b1.act1, cle.ChannelClamp)
    assert rec["max_log_scale"] <= 1e-4 and rec["max_abs_diff"] < 1e-4 * float(ref.abs().max())
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert not torch.allclose(model.fc1.weight, spread_model(MobileNetLike(shared)).fc1.weight)


class OwnForward(nn.Conv2d):
    """A conv subclass whose forward standardizes its weight: rescaling its rows is undone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight / self.weight.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
        return F.conv2d(x, w, self.bias)


def test_cle_skips_and_names_pairs_it_cannot_equalize():
    layers = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), OwnForward(4, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    rec = cle.equalize(spread_model(layers))
    why = "has its own forward (the rescaled weight may not act linearly)"
    assert rec["pairs"] == [] and rec["skipped"] == [["0", "2", f"2 {why}"], ["2", "4", f"2 {why}"]]
    interleaved = spread_model(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Flatten(), nn.Linear(18, 2)))
    x = torch.randn(5, 3, 4)
    ref = interleaved(x)
    rec = cle.equalize(interleaved, example=lambda m: m(x))
    assert rec["skipped"] == [
        ["0", "3", "a linear layer's outputs are flattened (features interleave its channels)"]
    ]
    torch.testing.assert_close(interleaved(x), ref, rtol=0, atol=0)


def test_cle_undoes_everything_when_the_outputs_change(monkeypatch, caplog):
    """The check on a batch: a pair through a GELU (not homogeneous) wrongly let through is undone."""
    link = cle._link
    monkeypatch.setattr(
        cle, "_link", lambda model, node: "through" if node.target == "1" else link(model, node)
    )
    model = spread_model(nn.Sequential(nn.Conv2d(3, 6, 1), nn.GELU(), nn.Conv2d(6, 2, 1)))
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 3, 5, 5)
    with caplog.at_level("WARNING", logger="mixq.ptq.cle"):
        rec = cle.equalize(model, example=lambda m: m(x))
    assert rec["pairs"] == [] and rec["skipped"][0][:2] == ["0", "2"]
    assert rec["skipped"][0][2].startswith("equalizing changed the outputs by") and rec["max_abs_diff"] > 1e-3
    assert "CLE: equalizing changed the outputs" in caplog.text
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_cle_in_run_on_a_shared_relu6_model_keeps_the_float_model():
    """The issue's crash: calibration after CLE on a model that calls one ReLU6 at several places."""
    model = spread_model(MobileNetLike(shared=True))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(2)]
    task = mixq.Task(model, calib=data[:1], val=data[1:], name="mnv2-like")
    state = copy.deepcopy(model.state_dict())
    res = mixq.run(task, candidates=["w8a8"], ptq=["cle"])
    rec = res.metrics.ptq[0]
    assert sorted(rec["pairs"]) == sorted(MNV2_PAIRS) and len(rec["skipped"]) == 4
    assert rec["max_abs_diff"] < 1e-4 * float(model(data[0][0]).abs().max())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


# -- bias correction ---------------------------------------------------------------------------


def layer_errors(qmodel, task, names):
    """Per-channel mean of (quantized layer output - float layer on the same input), by full capture."""
    store = {n: [] for n in names}

    def keep(n):
        return lambda _m, i, y: store[n].append((i[0].detach().clone(), y.detach().clone()))

    hooks = [qmodel.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    with torch.no_grad():
        for b in task.calib:
            qmodel(b[0])
    for h in hooks:
        h.remove()
    err = {}
    for n in names:
        ref = task.model.get_submodule(n)  # the float layer, its own (uncorrected) bias
        d = torch.cat([y - ref(x) for x, y in store[n]]).double()
        d = d.movedim(1, -1) if d.dim() == 4 else d
        err[n] = d.reshape(-1, d.shape[-1]).mean(0)
    return err


def quantized(task, cand):
    qmodel = wrap(copy.deepcopy(task.model).eval())
    mixq.calibrate(qmodel, task.calib)
    apply(qmodel, Plan({n: parse_candidate(cand) for n in sites(qmodel)}))
    return qmodel


def test_bias_correction_zeroes_the_mean_output_error_of_every_layer():
    task = mixq.tasks.get("synthetic-cnn")
    qmodel = quantized(task, "w3-a8")
    names = list(sites(qmodel))
    before = layer_errors(qmodel, task, names)
    assert max(float(e.abs().max()) for e in before.values()) > 1e-2  # a real shift to remove
    rec = bias_correction.correct(qmodel, task)
    assert rec["layers"] == len(names)
    after = layer_errors(qmodel, task, names)
    for n in names:
        assert float(after[n].abs().max()) < 1e-5, n
    assert task.model.conv1.bias is not qmodel.conv1.bias  # the task's model is untouched


class Branches(nn.Module):
    """Three linears reading one tensor (an attention's q, k, v), then a linear on their sum."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 16)
        self.q, self.k, self.v = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        return self.out(torch.relu(self.v(h)) + self.q(h) * torch.sigmoid(self.k(h)))


def test_bias_correction_measures_layers_that_share_an_input_in_one_pass():
    torch.manual_seed(0)
    x = torch.randn(384, 12)
    model = Branches().eval()
    y = model(x).argmax(1)
    task = mixq.Task(
        model=model, calib=[(x[i : i + 128], y[i : i + 128]) for i in (0, 128, 256)], val=[(x, y)]
    )
    qmodel = quantized(task, "w3-a8")
    names = list(sites(qmodel))
    groups = bias_correction.shared_input_groups(qmodel, sites(qmodel), task.calib[:1], task.forward)
    assert groups == [["inp"], ["q", "k", "v"], ["out"]]
    rec = bias_correction.correct(qmodel, task)
    assert rec["passes"] == 3 and rec["layers"] == 5
    after = layer_errors(qmodel, task, names)  # the defining property holds for every layer
    for n in names:
        assert float(after[n].abs().max()) < 1e-5, n


# -- AdaRound -------------------------------------------------------------------------------------


def small_layer(cand: str = "w3+asym"):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1)).eval()
    x = torch.randn(64, 4, 6, 6)
    qmodel = wrap(copy.deepcopy(model))
    apply(qmodel, Plan({"0": parse_candidate(cand)}))
    m = sites(qmodel)["0"]
    return m, x, model(x).detach()


def run_adaround(m, x, target, seed=0, iters=300):
    cfg = adaround.Config(iters=iters, batch_size=16, lr=1e-2)  # a short schedule: a larger step
    with torch.enable_grad():
        return adaround.learn_rounding(
            m, x, target, cfg, torch.Generator().manual_seed(seed), mixq.progress.Bar(None, "t", show=False)
        )


@pytest.mark.parametrize("cand", ["w3+asym", "w2", "w3g8"])
def test_adaround_stays_on_floor_or_ceil_and_beats_nearest(cand):
    m, x, target = small_layer(cand)
    wq, grid = run_adaround(m, x, target)
    s, z = grid.scale[:, None], grid.zero[:, None]
    w_rows = grid.rows.data
    codes = mixq.quant.fake.to_rows(wq.float(), m.weight_quant.spec).data / s + z  # learned codes
    torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
    lo = torch.clamp(torch.floor(w_rows / s) + z, grid.qmin, grid.qmax)
    hi = torch.clamp(torch.floor(w_rows / s) + 1 + z, grid.qmin, grid.qmax)
    assert bool(((codes.round() == lo) | (codes.round() == hi)).all())
    rtn = mixq.quant.fake.quantize_weight(m.weight, m.weight_quant.spec)
    assert adaround.output_error(m, x, target, wq) < adaround.output_error(m, x, target, rtn)


def test_adaround_is_deterministic_for_a_seed():
    m, x, target = small_layer()
    a, _ = run_adaround(m, x, target, seed=5, iters=100)
    b, _ = run_adaround(m, x, target, seed=5, iters=100)
    assert torch.equal(a, b)


def test_adaround_defaults_and_annealing():
    cfg = adaround.Config()
    assert (cfg.iters, cfg.batch_size, cfg.reg, cfg.warmup, cfg.lr) == (20000, 32, 0.01, 0.2, 1e-3)
    assert adaround.beta_at(0, cfg) is None and adaround.beta_at(3999, cfg) is None
    assert adaround.beta_at(4000, cfg) == 20.0 and adaround.beta_at(12000, cfg) == pytest.approx(11.0)
    assert adaround.beta_at(20000, cfg) == pytest.approx(2.0)
    frac = torch.rand(100)
    torch.testing.assert_close(adaround.rectified_sigmoid(adaround.init_v(frac)), frac, atol=1e-5, rtol=0)
    assert not adaround.supported(parse_candidate("wmxfp4_e2m1").weight)


def test_fixed_weight_survives_forwards_and_falls_back_on_change():
    m, x, _ = small_layer()
    spec = m.weight_quant.spec
    wq = torch.full_like(m.weight, 0.5)
    m.weight_quant.set_rounding(adaround.FixedRounding(spec, m.weight, wq))
    assert torch.equal(m.weight_quant(m.weight), wq) and torch.equal(m.weight_quant(m.weight), wq)
    other = parse_candidate("w4").weight
    m.weight_quant.set_spec(other)
    assert torch.equal(m.weight_quant(m.weight), mixq.quant.fake.quantize_weight(m.weight, other))
    m.weight_quant.set_spec(spec)
    with torch.no_grad():
        m.weight.mul_(2)  # new weights: the learned rounding no longer applies
    assert torch.equal(m.weight_quant(m.weight), mixq.quant.fake.quantize_weight(m.weight, spec))


# -- the ptq= interface ----------------------------------------------------------------------------

FAST = {"adaround": {"iters": 80, "batch_size": 32}}


def test_run_applies_steps_in_order_records_them_and_is_deterministic():
    task = mixq.tasks.get("synthetic-cnn")
    steps = ["cle", "bias_correction", "adaround"]
    r1 = mixq.run(task, candidates=["w3-a8"], ptq=steps, ptq_args=FAST, seed=1)
    r2 = mixq.run(task, candidates=["w3-a8"], ptq=steps, ptq_args=FAST, seed=1)
    recs = r1.metrics.ptq
    assert [r["step"] for r in recs] == steps
    assert [r["stage"] for r in recs] == ["float", "plan", "plan"]
    assert all(r["seconds"] >= 0 for r in recs) and recs[2]["config"]["iters"] == 80
    assert r1.metrics.metric == r2.metrics.metric
    for (n, a), b in zip(sites(r1.model).items(), sites(r2.model).values(), strict=True):
        assert torch.equal(a.weight_quant(a.weight), b.weight_quant(b.weight)), n
        assert torch.equal(a.bias, b.bias), n
    plain = mixq.run(task, candidates=["w3-a8"], seed=1)
    assert plain.metrics.ptq == []


def test_cle_in_run_keeps_the_float_function():
    task = mixq.tasks.get("synthetic-mlp")
    res = mixq.run(task, candidates=["float"], ptq=["cle"])
    assert res.metrics.ptq[0]["pairs"] == [["0", "2"], ["2", "4"]]
    assert res.metrics.metric == res.metrics.fp_metric
    assert not torch.equal(sites(res.model)["0"].weight, task.model[0].weight)  # rescaled copy


@pytest.mark.parametrize(
    "ptq, args, match",
    [
        (["bogus"], None, "unknown PTQ step 'bogus'; valid: cle, bias_correction, adaround"),
        (["adaround", "cle"], None, r"float-model steps \(cle\) must come before plan steps"),
        (["cle", "cle"], None, "listed twice"),
        (["adaround"], {"adaround": {"iterz": 3}}, r"unknown settings \['iterz'\].*valid: iters"),
        (["cle"], {"adaround": {"iters": 3}}, r"ptq_args for steps not in ptq: \['adaround'\]"),
        (["adaround"], {"adaround": {"iters": 0}}, "iters and batch_size must be >= 1"),
    ],
)
def test_bad_ptq_raises_naming_the_choices(ptq, args, match):
    with pytest.raises(ValueError, match=match):
        resolve(ptq, args)
    with pytest.raises(ValueError, match=match):
        mixq.run("synthetic-mlp", candidates=["w4"], ptq=ptq, ptq_args=args)


def test_registry_and_string_form():
    assert list(STEPS) == ["cle", "bias_correction", "adaround", "awq", "gptq", "int32_bias"]
    assert [s.name for s in resolve("cle,adaround")] == ["cle", "adaround"]


def test_cli_ptq_writes_records(tmp_path):
    out = tmp_path / "run"
    steps = "cle,bias_correction,adaround"
    rc = cli.main(
        [
            "run",
            "--task",
            "synthetic-mlp",
            "--candidates",
            "w3",
            "--ptq",
            steps,
            "--ptq-arg",
            "adaround.iters=50",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in m["ptq"]] == ["cle", "bias_correction", "adaround"]
    assert m["ptq"][2]["config"]["iters"] == 50
    assert json.loads((out / "recipe.json").read_text())["ptq"] == ["cle", "bias_correction", "adaround"]
    assert cli.main(["run", "--task", "synthetic-mlp", "--candidates", "w3", "--ptq", "nope"]) == 2


def test_toml_recipe_takes_ptq(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        'task = "synthetic-mlp"\ncandidates = ["w3"]\nptq = ["bias_correction"]\n'
        "[ptq_args.bias_correction]\nbatches = 1\n"
    )
    out = tmp_path / "run"
    assert cli.main(["run", "--recipe", str(recipe), "--out", str(out)]) == 0
    (rec,) = json.loads((out / "metrics.json").read_text())["ptq"]
    assert rec["step"] == "bias_correction" and rec["calib_batches"] == 1 and rec["config"] == {"batches": 1}
