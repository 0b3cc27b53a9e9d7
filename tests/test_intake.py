"""Intake (issue #25, item 1): wrap finds every quantizable layer of a model as users ship it.

Subclasses of nn.Conv2d with their own "same"-padding forward, transformers' GPT-2 ``Conv1D``
(weight [in, out]), nn.Conv1d and, on request, nn.Embedding become sites; every other weight
that stays float is named with its reason; a model with nothing to quantize is refused, naming
what it holds; the user's model object never changes. Tiny models, random weights.
"""

import copy
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixq
from bench.nets import SameConv2d
from mixq.methods import METHODS
from mixq.nn import QCall, QConv1d, QLinear
from mixq.plan import Plan, parse_candidate
from mixq.quant import fake
from mixq.tasks import cross_entropy, top1

SameConv = SameConv2d  # a conv whose own forward pads as TensorFlow's "same" (bench/nets.py)


# -- models ------------------------------------------------------------------------------------


class SubclassCNN(nn.Module):
    """Convs that are all SameConv (full, depthwise, pointwise) and a plain Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = SameConv(3, 8, 4, stride=2)
        self.dw = SameConv(8, 8, 3, groups=8)
        self.pw = SameConv(8, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.pw(torch.relu(self.dw(x))))
        return self.fc(x.mean((2, 3)))


def batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 11, 11, generator=g), torch.randint(5, (8,), generator=g)) for _ in range(n)]


def cnn_task() -> mixq.Task:
    torch.manual_seed(0)
    return mixq.Task(
        SubclassCNN().eval(), batches(2, 1), batches(2, 2), cross_entropy, top1, name="subclass-cnn"
    )


def snapshot(model: nn.Module) -> tuple[dict, list]:
    """The model's state (values cloned) and its module types, to check that nothing changed."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, [(n, type(m)) for n, m in model.named_modules()]


def unchanged(model: nn.Module, snap: tuple[dict, list]) -> bool:
    state, types = snap
    now = model.state_dict()
    same = list(now) == list(state) and all(torch.equal(now[k], v) for k, v in state.items())
    return same and [(n, type(m)) for n, m in model.named_modules()] == types


def act_oracle(x: torch.Tensor, lo: float, hi: float, bits: int) -> torch.Tensor:
    """Asymmetric integer quantization of ``x`` from the calibration range [lo, hi] (min/max)."""
    lo32, hi32 = torch.tensor(min(lo, 0.0)), torch.tensor(max(hi, 0.0))
    n = 2**bits - 1
    s = (hi32 - lo32) / n
    z = torch.clamp(torch.round(-lo32 / s), 0, n)
    return (torch.clamp(torch.round(x / s) + z, 0, n) - z) * s


# -- conv subclasses with their own forward ------------------------------------------------------


def test_subclass_convs_are_sites_and_compute_the_float_model_exactly():
    task = cnn_task()
    snap = snapshot(task.model)
    qm = mixq.wrap(copy.deepcopy(task.model))
    qs = mixq.sites(qm)
    assert {n: type(m) for n, m in qs.items()} == {"stem": QCall, "dw": QCall, "pw": QCall, "fc": QLinear}
    assert list(qm.state_dict()) == list(task.model.state_dict())  # same keys: the site holds the layer's
    x = task.val[0][0]
    with torch.no_grad():
        assert torch.equal(qm(x), task.model(x))
    assert unchanged(task.model, snap)  # wrap worked on a copy: the user's model is untouched
    assert mixq.float_layers(qm) == {}
    mixq.unwrap(qm)
    assert [type(m) for m in qm.modules()] == [type(m) for m in task.model.modules()]


def test_subclass_convs_w4a8_equal_an_oracle_through_their_own_forward():
    """The site's w4a8 model against the float model whose weights are replaced by
    ``fake.quantize_weight`` and whose layer inputs are quantized by an independent a8 oracle."""
    task = cnn_task()
    spec = parse_candidate("w4a8")
    qm = mixq.wrap(copy.deepcopy(task.model))
    mixq.calibrate(qm, task.calib)
    mixq.apply(qm, Plan({n: spec for n in mixq.sites(qm)}))
    oracle = copy.deepcopy(task.model)
    ranges: dict[str, tuple[float, float]] = {}
    float_model = copy.deepcopy(task.model)

    def record(name):
        def fn(mod, inp):
            lo, hi = float(inp[0].min()), float(inp[0].max())
            old = ranges.get(name, (lo, hi))
            ranges[name] = (min(old[0], lo), max(old[1], hi))

        return fn

    hs = [m.register_forward_pre_hook(record(n)) for n, m in float_model.named_modules() if n]
    with torch.no_grad():
        for x, _ in task.calib:
            float_model(x)
    for h in hs:
        h.remove()
    for name, layer in oracle.named_modules():
        if name:
            with torch.no_grad():
                layer.weight.copy_(fake.quantize_weight(layer.weight, spec.weight))
            layer.register_forward_pre_hook(lambda mod, inp, n=name: (act_oracle(inp[0], *ranges[n], 8),))
    x = task.val[0][0]
    with torch.no_grad():
        got, want, ref = qm(x), oracle(x), task.model(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, ref, rtol=1e-3, atol=1e-4)  # really quantized


def test_run_uniform_w4_quantizes_every_subclass_conv_and_leaves_the_model(tmp_path):
    task = cnn_task()
    snap = snapshot(task.model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing stays float: no warning
        result = mixq.run(task, "uniform", ["w4"])
    assert sorted(result.plan.layers) == ["dw", "fc", "pw", "stem"]
    assert all(s == parse_candidate("w4") for s in result.plan.layers.values())
    m = result.metrics
    assert m.layers == 4 and m.float_layers == {}
    n = sum(p.numel() for name, p in task.model.named_parameters() if name.endswith("weight"))
    rows = sum(p.shape[0] for name, p in task.model.named_parameters() if name.endswith("weight"))
    assert m.avg_weight_bits == pytest.approx((4 * n + 32 * rows) / n)  # every weight at 4 bits
    assert unchanged(task.model, snap)
    # The packed export runs the subclasses' own forward: the loaded model equals the simulated one.
    loaded = mixq.export.load(mixq.export.save(result, tmp_path / "m.safetensors"), model=task.model)
    x = task.val[0][0]
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
    mixq.run(task, "uniform", ["w4"], out=tmp_path / "run")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["float_layers"] == {}
    assert (tmp_path / "run" / "model.safetensors").exists()


def conv_by_columns(m, x: torch.Tensor) -> torch.Tensor:
    """The layer's conv without bias from its input columns: [G, N * positions, out/G]."""
    w = m.weight.detach().double().reshape(m.groups, m.out_channels // m.groups, -1)
    return torch.bmm(m.input_columns(x), w.transpose(1, 2))


def conv_by_forward(m, x: torch.Tensor) -> torch.Tensor:
    """The float layer's own output without bias, in the same layout as conv_by_columns."""
    y = (m.float_module(x) - m.bias[:, None, None]).detach().double()  # [N, out, H, W]
    n, out = y.shape[:2]
    y = y.reshape(n, m.groups, out // m.groups, -1).permute(1, 0, 3, 2)
    return y.reshape(m.groups, -1, out // m.groups)


def test_subclass_input_columns_are_those_of_its_own_padded_conv():
    """The Gram matrix (clip "omse") comes from the conv the forward really runs: its columns
    times the weight rows give the layer's "same"-padded output."""
    task = cnn_task()
    qm = mixq.wrap(copy.deepcopy(task.model))
    qs = mixq.sites(qm)
    x = task.calib[0][0]
    inputs = {}
    hs = [qs[n].register_forward_pre_hook(lambda mod, i, n=n: inputs.__setitem__(n, i[0])) for n in qs]
    with torch.no_grad():
        qm(x)
    for h in hs:
        h.remove()
    for name in ("stem", "dw", "pw"):
        got = conv_by_columns(qs[name], inputs[name])
        assert torch.allclose(got, conv_by_forward(qs[name], inputs[name]), atol=1e-5), name
    mixq.calibrate(qm, [(x, None)], gram=True)
    cols = qs["stem"].input_columns(inputs["stem"])
    assert torch.allclose(qs["stem"].weight_quant.gram, cols.transpose(1, 2) @ cols)
    mixq.apply(qm, Plan({n: parse_candidate("w3+omse") for n in qs}))
    with torch.no_grad():
        assert torch.isfinite(qm(x)).all()


class HalfLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x * 0.5, self.weight, self.bias)


def test_linear_subclass_runs_its_own_forward():
    torch.manual_seed(0)
    model = nn.Sequential(HalfLinear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 6)
    qm = mixq.wrap(copy.deepcopy(model))
    site = mixq.sites(qm)["0"]
    assert isinstance(site, QCall) and site.layout == "linear"
    with torch.no_grad():
        assert torch.equal(qm(x), model(x))
        assert torch.equal(site.input_columns(x), (x * 0.5).double()[None])
    spec = parse_candidate("w4")
    mixq.apply(qm, Plan({"0": spec}))
    with torch.no_grad():
        want = F.linear(x * 0.5, fake.quantize_weight(model[0].weight, spec.weight), model[0].bias)
        assert torch.equal(site(x), want)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_plans_every_subclass_conv(method):
    args = {"hawq": {"hutchinson_samples": 4}, "fliqs": {"steps": 20}, "ddq": {"steps": 20}}.get(method)
    r = mixq.run(cnn_task(), method, ["w4", "w8"], {"avg_weight_bits": 6.5}, method_args=args)
    assert set(r.plan.layers) == {"stem", "dw", "pw", "fc"} and r.metrics.within == {"avg_weight_bits": True}


def test_ptq_steps_on_subclass_convs():
    task = cnn_task()
    r = mixq.run(
        task, "uniform", ["w4a8"], ptq=["bias_correction", "adaround"], ptq_args={"adaround": {"iters": 10}}
    )
    bc, ada = r.metrics.ptq
    assert bc["layers"] == 4 and ada["layers"] == 4 and set(ada["output_error"]) == {"stem", "dw", "pw", "fc"}


# -- transformers' Conv1D (GPT-2) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_gpt2_conv1d_layers_and_lm_head_are_sites(gpt2):
    snap = snapshot(gpt2)
    with pytest.warns(UserWarning, match="stay float: transformer.wte.weight"):
        qm = mixq.wrap(copy.deepcopy(gpt2))
    qs = mixq.sites(qm)
    blocks = [
        f"transformer.h.{i}.{s}"
        for i in range(2)
        for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert list(qs) == [*blocks, "lm_head"]
    assert all(isinstance(m, QLinear) and m.transposed for n, m in qs.items() if n != "lm_head")
    c_attn = gpt2.transformer.h[0].attn.c_attn
    assert tuple(qs[blocks[0]].weight.shape) == (3 * 32, 32) == tuple(c_attn.weight.shape[::-1])
    ids = torch.randint(64, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(qm(ids).logits, gpt2(ids).logits, rtol=0, atol=1e-5)
    # Tied to the quantized lm_head, the input embedding reads the float weight: listed.
    tied = "tied to lm_head.weight (quantized there; this module reads the float weight)"
    assert mixq.float_layers(qm) == {
        "transformer.wte.weight": tied,
        "transformer.wpe.weight": "embedding (embeddings=False)",
    }
    mc = mixq.cost.model_costs(qm, mixq.cost.probe(qm, ids))
    assert mc.n_weights == sum(m.weight.numel() for m in qs.values())
    assert (
        mc.other_params
        == sum(p.numel() for p in gpt2.parameters())
        - sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in qs.values())
        + gpt2.transformer.wte.weight.numel()
    )  # the tied float copy counts in size_bytes
    assert unchanged(gpt2, snap)


def test_gpt2_conv1d_scales_run_along_output_channels(gpt2):
    """Oracle: every Conv1D replaced by an nn.Linear holding the transposed weight, quantized as a
    Linear's by ``fake.quantize_weight`` (one scale per output channel), and lm_head likewise."""
    spec = parse_candidate("w4")
    model = copy.deepcopy(gpt2)
    with torch.no_grad():  # output channels of very different sizes: a wrong axis would show
        for i, blk in enumerate(model.transformer.h):
            blk.mlp.c_fc.weight.mul_(torch.logspace(-2, 1, blk.mlp.c_fc.weight.shape[1]) * (i + 1))
    with pytest.warns(UserWarning):
        qm = mixq.wrap(copy.deepcopy(model))
    mixq.apply(qm, Plan({n: spec for n in mixq.sites(qm)}))
    oracle = copy.deepcopy(model)
    for name, m in list(oracle.named_modules()):
        if type(m).__name__ == "Conv1D":
            lin = nn.Linear(*m.weight.shape)
            with torch.no_grad():
                lin.weight.copy_(fake.quantize_weight(m.weight.t().contiguous(), spec.weight))
                lin.bias.copy_(m.bias)
            parent, _, attr = name.rpartition(".")
            setattr(oracle.get_submodule(parent), attr, lin)
    oracle.lm_head = nn.Linear(32, 64, bias=False)
    with torch.no_grad():
        oracle.lm_head.weight.copy_(fake.quantize_weight(model.lm_head.weight, spec.weight))
    ids = torch.randint(64, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got, want, ref = qm(ids).logits, oracle(ids).logits, model(ids).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, ref, rtol=1e-2, atol=1e-3)
    # the per-channel scales along the input axis (the stored [in, out] rows) give other outputs
    site = mixq.sites(qm)["transformer.h.0.mlp.c_fc"]
    wrong = fake.quantize_weight(model.transformer.h[0].mlp.c_fc.weight, spec.weight).t()
    assert not torch.allclose(site.weight_quant(site.weight), wrong)


def test_gpt2_packed_round_trip_is_bit_exact(gpt2, tmp_path):
    """The packed file of GPT-2 at w4a8 (Conv1D layers) and w8 (lm_head) loads into the float
    model as Linear layers whose outputs equal the fake-quantized model's bit for bit."""
    from mixq.export.packed import load_safetensors, save_safetensors

    snap = snapshot(gpt2)
    with pytest.warns(UserWarning):
        qm = mixq.wrap(copy.deepcopy(gpt2))
    gen = torch.Generator().manual_seed(6)
    calib = [torch.randint(64, (2, 12), generator=gen) for _ in range(2)]
    mixq.calibrate(qm, calib)
    plan = Plan({n: parse_candidate("w8" if n == "lm_head" else "w4a8") for n in mixq.sites(qm)})
    mixq.apply(qm, plan)
    save_safetensors(qm, plan, tmp_path / "gpt2.safetensors")
    loaded = load_safetensors(tmp_path / "gpt2.safetensors", model=gpt2)
    assert type(loaded.transformer.h[0].attn.c_attn).__name__ == "DeployLinear"
    ids = torch.randint(64, (3, 10), generator=gen)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, qm(ids).logits)
    assert unchanged(gpt2, snap)


def test_gpt2_embeddings_on_request(gpt2):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qm = mixq.wrap(copy.deepcopy(gpt2), embeddings=True)
    qs = mixq.sites(qm)
    assert list(qs)[:2] == ["transformer.wte", "transformer.wpe"] and len(qs) == 11
    assert mixq.float_layers(qm) == {}


# -- nn.Conv1d -----------------------------------------------------------------------------------


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(4, 6, 3, padding="same")
        self.b = nn.Conv1d(6, 6, 5, stride=2, dilation=2, groups=2, padding=3, padding_mode="reflect")
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(torch.relu(self.a(x))).mean(2))


def test_conv1d_sites_exact_quantized_and_input_columns():
    torch.manual_seed(0)
    model = Conv1dNet().eval()
    x = torch.randn(3, 4, 20)
    qm = mixq.wrap(copy.deepcopy(model))
    qs = mixq.sites(qm)
    assert [type(m) for m in qs.values()] == [QConv1d, QConv1d, QLinear]
    with torch.no_grad():
        assert torch.equal(qm(x), model(x))
    spec = parse_candidate("w4")
    mixq.apply(qm, Plan({"a": spec}))
    wq = fake.quantize_weight(model.a.weight, spec.weight)
    with torch.no_grad():
        assert torch.equal(qs["a"](x), F.conv1d(x, wq, model.a.bias, padding="same"))
    # input columns: the conv without bias is columns @ weight rows, per group
    h = torch.relu(model.a(x)).detach()
    for name, xin in (("a", x), ("b", h)):
        m = qs[name]
        cols = m.input_columns(xin)  # [G, N * positions, k]
        w = m.weight.detach().double().reshape(m.groups, m.out_channels // m.groups, -1)
        y = torch.bmm(cols, w.transpose(1, 2))  # [G, N * L, out/G]
        ref = (m.float_module(xin) - m.bias[:, None]).detach().double()  # [N, out, L]
        n, out, length = ref.shape
        ref = (
            ref.reshape(n, m.groups, out // m.groups, length)
            .permute(1, 0, 3, 2)
            .reshape(m.groups, -1, out // m.groups)
        )
        assert torch.allclose(y, ref, atol=1e-5), name
    assert mixq.cost.probe(qm, x)[1].macs == model.b(h).shape[-1] * 6 * 3 * 5


# -- nn.Embedding on request -------------------------------------------------------------------


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids).mean(1))


def bag_task() -> mixq.Task:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    data = [(torch.randint(50, (4, 7), generator=g), torch.randint(5, (4,), generator=g)) for _ in range(2)]
    return mixq.Task(Bag().eval(), data, data, cross_entropy, top1, name="bag")


def test_embedding_weight_only_per_row():
    task = bag_task()
    with pytest.warns(UserWarning, match=r"stay float: emb.weight \(embedding \(embeddings=False\)\)"):
        plain = mixq.wrap(copy.deepcopy(task.model))
    assert list(mixq.sites(plain)) == ["fc"]
    assert mixq.float_layers(plain) == {"emb.weight": "embedding (embeddings=False)"}
    qm = mixq.wrap(copy.deepcopy(task.model), embeddings=True)
    qs = mixq.sites(qm)
    assert list(qs) == ["emb", "fc"] and qs["emb"].weight_only
    mixq.calibrate(qm, task.calib)
    mixq.apply(qm, Plan({"emb": parse_candidate("w4a8"), "fc": parse_candidate("w8")}))
    assert qs["emb"].input_quant.spec is None  # indices are not quantized
    ids = task.val[0][0]
    spec = parse_candidate("w4").weight
    table = fake.quantize_weight(task.model.emb.weight, spec)  # one scale per row
    with torch.no_grad():
        assert torch.equal(qs["emb"](ids), table[ids])
        scale = task.model.emb.weight.abs().amax(1) / 7
        assert torch.allclose((table / scale[:, None]).round() * scale[:, None], table, atol=1e-6)


def test_run_with_embeddings_option(tmp_path):
    task = bag_task()
    r = mixq.run(task, "uniform", ["w4"], embeddings=True)
    assert sorted(r.plan.layers) == ["emb", "fc"] and r.metrics.float_layers == {}
    info = {i.name: i for i in mixq.cost.probe(r.model, task.calib[0])}
    assert info["emb"].kind == "embedding" and info["emb"].macs == 0
    assert mixq.evaluate(task, r.plan).metrics.metric == r.metrics.metric  # evaluate wraps it again
    with pytest.warns(UserWarning, match="emb.weight"):
        r = mixq.run(task, "uniform", ["w4"], out=tmp_path)
    assert list(r.plan.layers) == ["fc"] and r.metrics.float_layers == {
        "emb.weight": "embedding (embeddings=False)"
    }
    assert "| `emb.weight` | embedding (embeddings=False) |" in (tmp_path / "report.md").read_text()
    assert r.metrics.size_bytes == pytest.approx((16 * 5 * 4 + 5 * 32) / 8 + 5 * 4 + 50 * 16 * 4)
    with pytest.raises(ValueError, match="embeddings must be bool"):
        mixq.run(task, "uniform", ["w4"], embeddings="yes")


# -- what stays float, and why -------------------------------------------------------------------


class Mixed(nn.Module):
    """A linear layer, an attention block, a custom matrix and a layer type mixq does not take."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mix = nn.Parameter(torch.randn(d, d))
        self.up = nn.ConvTranspose1d(d, d, 2)
        self.head = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        h = self.attn(h, h, h, need_weights=False)[0] @ self.mix
        h = self.up(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h)


def test_float_layers_named_with_reasons_and_a_warning():
    torch.manual_seed(0)
    model = Mixed().eval()
    with pytest.warns(UserWarning, match=r"stay float: .*attn.in_proj_weight") as rec:
        qm = mixq.wrap(copy.deepcopy(model), skip=["head"])
    assert list(mixq.sites(qm)) == ["proj"]  # attn.out_proj is read by the attention block, never called
    assert mixq.float_layers(qm, skip=["head"]) == {
        "mix": "not a supported layer type: Mixed",
        "attn.in_proj_weight": "not a supported layer type: MultiheadAttention",
        "attn.out_proj.weight": "read directly by MultiheadAttention (its forward never calls the layer)",
        "up.weight": "not a supported layer type: ConvTranspose1d",
        "head.weight": "skipped by name",
    }
    assert "head.weight (skipped by name)" in str(rec[0].message)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.equal(qm(x), model(x))


def test_no_warning_when_float_tensors_hold_at_most_one_percent():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    model.extra = nn.Parameter(torch.randn(8, 8))  # 64 of 8256 weights: 0.8 %
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qm = mixq.wrap(model)
    assert mixq.float_layers(qm) == {"extra": "not a supported layer type: Sequential"}


def test_nothing_to_quantize_names_the_module_types():
    model = nn.Sequential(nn.Conv3d(2, 2, 1), nn.BatchNorm3d(2), nn.ReLU())
    with pytest.raises(ValueError, match="nothing to quantize: it holds BatchNorm3d, Conv3d, ReLU"):
        mixq.wrap(copy.deepcopy(model))
    data = [(torch.randn(2, 2, 3, 3, 3), torch.zeros(2, dtype=torch.long))]
    task = mixq.Task(model, data, data, cross_entropy, top1)
    with pytest.raises(ValueError, match="nothing to quantize: it holds BatchNorm3d, Conv3d, ReLU"):
        mixq.run(task, "uniform", ["w4"])


def test_plain_layers_keep_their_sites():
    """nn.Linear and nn.Conv2d keep QLinear and QConv2d (the exports and the zoo's numbers)."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3, 2))
    qm = mixq.wrap(model)
    assert [type(m).__name__ for m in mixq.sites(qm).values()] == ["QConv2d", "QLinear"]
    assert all(m.exportable for m in mixq.sites(qm).values())


# -- embedding sites in every method and PTQ step (weight-only: no activation path) --------------


class EmbConvNet(nn.Module):
    """Embedding -> Conv1d -> a Conv2d subclass with its own forward -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 8)
        self.conv = nn.Conv1d(8, 6, 3, padding=1)
        self.same = SameConv(6, 6, (1, 3))
        self.fc = nn.Linear(6, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(self.emb(ids).transpose(1, 2)))
        return self.fc(torch.relu(self.same(x[:, :, None])).mean((2, 3)))


def emb_task() -> mixq.Task:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randint(40, (4, 9), generator=g), torch.randint(4, (4,), generator=g)) for _ in range(2)]
    return mixq.Task(EmbConvNet().eval(), data, data, cross_entropy, top1, name="emb-conv")


# BOPs between all-w4a8 (73,344) and all-w8a8: the embedding has no MACs, so the budget binds the
# other layers alone, as with embeddings=False.
EMB_CASES = {
    "sparq": ("sparq", None, None, ["w4a8", "w8a8"]),
    "ddq": ("ddq", {"steps": 10}, None, ["w4a8", "w8a8"]),
    "ddq-act-bits": ("ddq", {"steps": 10}, None, ["w4a4", "w8a8"]),  # input bits learned too
    "multipoint": ("multipoint", None, None, ["w4a8", "w8a8"]),
    "adaround": ("uniform", None, ["adaround"], ["w4a8", "w8a8"]),
}


@pytest.mark.parametrize("case", sorted(EMB_CASES))
def test_embedding_sites_take_no_activation_path(case):
    method, args, ptq, cands = EMB_CASES[case]
    kw = {"method_args": args, "ptq": ptq, "ptq_args": {"adaround": {"iters": 10}} if ptq else None}
    budget = {"bops": 110_000}
    with pytest.warns(UserWarning, match="emb.weight"):
        plain = mixq.run(emb_task(), method, cands, budget, **kw)
    r = mixq.run(emb_task(), method, cands, budget, embeddings=True, **kw)
    emb = r.plan.layers["emb"]
    assert emb.weight is not None and emb.act is None  # in the plan, weight-only
    site = mixq.sites(r.model)["emb"]
    assert site.weight_only and site.weight_quant.spec == emb.weight and site.input_quant.spec is None
    assert {n: s for n, s in r.plan.layers.items() if n != "emb"} == plain.plan.layers
    assert r.metrics.float_layers == {} and r.metrics.bops == plain.metrics.bops
    assert math.isfinite(r.metrics.metric)
    if case == "ddq-act-bits":
        (search,) = [h for h in r.history if h.get("phase") == "search"]
        assert set(search["learned_bits"]) == {"emb", "conv", "same", "fc"}
        assert set(search["learned_act_bits"]) == {"conv", "same", "fc"}
        assert len({s.act.bits for s in r.plan.layers.values() if s.act}) == 2  # the budget mixes them
    if case == "multipoint":
        assert {"multipoint": "weight-only layers keep the base plan", "layers": ["emb"]} in r.history
        assert r.plan.meta["multipoint"]["weight_only_kept"] == ["emb"]
        assert "weight_only_kept" not in plain.plan.meta["multipoint"]
    if case == "adaround":
        (ada,) = r.metrics.ptq
        assert ada["skipped"] == ["emb"] and set(ada["output_error"]) == {"conv", "same", "fc"}
        assert set(plain.metrics.ptq[0]["output_error"]) == {"conv", "same", "fc"}


def test_omse_on_an_embedding_is_refused_naming_the_layer_and_the_clips():
    want = r"layer 'emb' is an embedding .*valid clips for it: minmax, mse, p<percentile>"
    with pytest.raises(ValueError, match=want):
        mixq.run(emb_task(), "uniform", ["w4+omse"], embeddings=True)
    with pytest.warns(UserWarning, match="emb.weight"):
        plain = mixq.run(emb_task(), "uniform", ["w4+omse"])
    assert set(plain.plan.layers) == {"conv", "same", "fc"}
    r = mixq.run(emb_task(), "uniform", ["w4+mse"], embeddings=True)
    assert r.plan.layers["emb"] == parse_candidate("w4+mse")
    with pytest.raises(ValueError, match=want):  # a plan applied by hand is refused the same way
        mixq.apply(r.model, Plan({"emb": parse_candidate("w4+omse")}))
