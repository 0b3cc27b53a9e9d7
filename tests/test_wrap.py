"""Test mixq.nn and mixq.wrap: exact float equivalence, quantized layers against F.linear / F.conv2d,
plans on sites, calibration, the weight cache. Real models: the MNIST CNN and MiniLM."""

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixq
from mixq import formats
from mixq.formats import Fp, Int, Mx
from mixq.nn import QConv2d, QLinear
from mixq.plan import LayerSpec, Plan, parse_candidate
from mixq.quant import fake
from mixq.wrap import current_plan


@pytest.fixture(scope="module")
def mnist():
    return mixq.tasks.mnist_cnn(val_size=1000)


@pytest.fixture(scope="module")
def minilm():
    return mixq.tasks.minilm(val_size=64, calib_size=64)


@pytest.fixture(scope="module")
def cnn():
    return mixq.tasks.get("synthetic-cnn")


@pytest.fixture(scope="module")
def calibrated_cnn(cnn):
    """The wrapped synthetic CNN, calibrated with Gram matrices (tests take copies)."""
    qm = wrapped(cnn)
    mixq.calibrate(qm, cnn.calib, gram=True)
    return qm


def wrapped(task):
    return mixq.wrap(copy.deepcopy(task.model))


# -- an independent activation quantizer ------------------------------------------------------


def input_ranges(model: nn.Module, batches) -> dict[str, tuple[float, float]]:
    """Min and max of every Linear/Conv2d input over ``batches``, with hooks on the float model."""
    out: dict[str, tuple[float, float]] = {}

    def hook(name):
        def fn(mod, inp):
            x = inp[0]
            lo, hi = float(x.min()), float(x.max())
            old = out.get(name, (lo, hi))
            out[name] = (min(old[0], lo), max(old[1], hi))

        return fn

    hs = [
        m.register_forward_pre_hook(hook(n))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    with torch.no_grad():
        for b in batches:
            model(b[0])
    for h in hs:
        h.remove()
    return out


def act_oracle(x: torch.Tensor, lo: float, hi: float, spec, channel_axis: int) -> torch.Tensor:
    """Quantize an input tensor from the calibration range [lo, hi] as documented."""
    fmt = spec.fmt
    if isinstance(fmt, Mx):
        return formats.mx_quantize(x, fmt, axis=channel_axis)
    lo32, hi32 = torch.tensor(min(lo, 0.0)), torch.tensor(max(hi, 0.0))
    if isinstance(fmt, Fp):
        s = torch.maximum(-lo32, hi32) / formats.max_value(fmt)
        return formats.round_to_format(x / s, fmt) * s
    assert isinstance(fmt, Int) and not spec.symmetric
    n = 2**fmt.bits - 1
    s = (hi32 - lo32) / n
    z = torch.clamp(torch.round(-lo32 / s), 0, n)
    return (torch.clamp(torch.round(x / s) + z, 0, n) - z) * s


# -- wrap with no spec is the float model ---------------------------------------------------


def test_wrap_mnist_cnn_no_spec_is_bit_exact(mnist):
    x = mnist.val[0][0]
    with torch.no_grad():
        ref = mnist.model(x)
    qm = wrapped(mnist)
    qs = mixq.sites(qm)
    assert list(qs) == ["conv_layers.0", "conv_layers.3", "conv_layers.6", "fc_layers.0", "fc_layers.2"]
    assert [type(m) for m in qs.values()] == [QConv2d] * 3 + [QLinear] * 2
    with torch.no_grad():
        assert torch.equal(qm(x), ref)
    assert set(qm.state_dict()) == set(mnist.model.state_dict())
    mixq.calibrate(qm, mnist.calib)  # observing alone changes nothing either
    with torch.no_grad():
        assert torch.equal(qm(x), ref)
    assert mnist.model.fc_layers[0].__class__ is nn.Linear  # the task's own model is untouched


def test_wrap_synthetic_cnn_grouped_depthwise_bit_exact(cnn):
    x = cnn.val[0][0]
    with torch.no_grad():
        ref = cnn.model(x)
    qm = wrapped(cnn)
    qs = mixq.sites(qm)
    assert [(n, m.groups) for n, m in qs.items() if isinstance(m, QConv2d)] == [
        ("conv1", 1),
        ("dw", 16),
        ("conv2", 2),
    ]
    with torch.no_grad():
        assert torch.equal(qm(x), ref)
    # gradients flow exactly as in the float model
    loss = F.cross_entropy(qm(x), cnn.val[0][1])
    loss.backward()
    ref_model = copy.deepcopy(cnn.model)
    F.cross_entropy(ref_model(x), cnn.val[0][1]).backward()
    for (n, p), (_, r) in zip(qm.named_parameters(), ref_model.named_parameters(), strict=True):
        assert torch.equal(p.grad, r.grad), n


class PadModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")
        self.b = nn.Conv2d(4, 4, 3, padding="same", padding_mode="circular", groups=2, dilation=2)
        self.c = nn.Conv2d(4, 8, (3, 1), padding="valid", bias=False)
        self.head = nn.Sequential(nn.Flatten(), nn.LazyLinear(3))

    def forward(self, x):
        return self.head(self.c(self.b(self.a(x))))


def test_wrap_padding_modes_bit_exact():
    torch.manual_seed(0)
    model = PadModel()
    x = torch.randn(2, 2, 7, 6)
    with torch.no_grad():
        ref = model(x)
    qm = mixq.wrap(copy.deepcopy(model))
    with torch.no_grad():
        assert torch.equal(qm(x), ref)


# -- with specs: the quantized layers compute F.linear / F.conv2d on quantized operands -----------

SPECS = [
    "w4a8",
    "w2+asym+mse-a8",
    "wfp8_e4m3fn-afp8_e4m3fn",
    "w4g4-a8",
    "wmxfp4_e2m1-amxfp4_e2m1",
    "w8+tensor",
    "w3+asym+omse-a4",
    "a8",
]


@pytest.mark.parametrize("name", SPECS)
def test_quantized_layers_equal_functional_ops(cnn, calibrated_cnn, name):
    spec = parse_candidate(name)
    qm = copy.deepcopy(calibrated_cnn)
    ranges = input_ranges(cnn.model, cnn.calib)
    qs = mixq.sites(qm)
    for n, m in qs.items():  # the recorded statistics are the float inputs' ranges
        assert (float(m.input_quant.stats_min), float(m.input_quant.stats_max)) == ranges[n]
    mixq.apply(qm, Plan({n: spec for n in qs}))
    # each layer alone, on the float inputs it sees in the float model
    inputs = {}
    hs = [
        mod.register_forward_pre_hook(lambda mod, i, n=n: inputs.__setitem__(n, i[0]))
        for n, mod in cnn.model.named_modules()
        if n in qs
    ]
    x = cnn.val[0][0]
    with torch.no_grad():
        cnn.model(x)
    for h in hs:
        h.remove()
    for n, m in qs.items():
        xin = inputs[n]
        axis = 1 if isinstance(m, QConv2d) else -1
        xq = xin if spec.act is None else act_oracle(xin, *ranges[n], spec.act, axis)
        gram = m.weight_quant.gram.float() if m.weight_quant.gram is not None else None
        wq = m.weight if spec.weight is None else fake.quantize_weight(m.weight, spec.weight, gram)
        with torch.no_grad():
            got = m(xin)
            if isinstance(m, QConv2d):
                expect = F.conv2d(xq, wq, m.bias, m.stride, m.padding, m.dilation, m.groups)
            else:
                expect = F.linear(xq, wq, m.bias)
        assert torch.allclose(got, expect, rtol=1e-5, atol=1e-6), n
        assert not torch.allclose(got, m.float_module(xin), rtol=1e-4, atol=1e-5), n  # really quantized


def test_qlinear_on_mnist_equals_f_linear(mnist):
    qm = wrapped(mnist)
    mixq.calibrate(qm, mnist.calib)
    spec = parse_candidate("w4a8")
    mixq.apply(qm, {"fc_layers.0": spec})
    layer = qm.fc_layers[0]
    x = torch.randn(7, 128 * 9)
    wq = fake.quantize_weight(layer.weight, spec.weight)
    lo, hi = float(layer.input_quant.stats_min), float(layer.input_quant.stats_max)
    with torch.no_grad():
        xq = act_oracle(x, lo, hi, spec.act, -1)
        assert torch.allclose(layer(x), F.linear(xq, wq, layer.bias), atol=1e-6)
        assert torch.equal(layer(x), F.linear(layer.input_quant(x), wq, layer.bias))
        # the other layers stay float
        conv = qm.conv_layers[0]
        img = mnist.val[0][0][:4]
        assert torch.equal(conv(img), mnist.model.conv_layers[0](img))


# -- unwrap, apply, applied ------------------------------------------------------------------


def test_unwrap_restores_original_modules(cnn):
    model = copy.deepcopy(cnn.model)
    before = dict(model.named_modules())
    mixq.wrap(model)
    assert isinstance(model.conv1, QConv2d) and model.conv1.weight is before["conv1"].weight
    mixq.apply(model, Plan({"conv1": parse_candidate("w2")}))
    assert mixq.unwrap(model) is model
    after = dict(model.named_modules())
    assert after.keys() == before.keys()
    for n in before:
        assert after[n] is before[n], n
    assert not mixq.sites(model)
    x = cnn.val[0][0]
    with torch.no_grad():
        assert torch.equal(model(x), cnn.model(x))
    mixq.wrap(model)  # it can be wrapped again
    assert len(mixq.sites(model)) == 4


def test_wrap_skip_and_errors(cnn):
    model = copy.deepcopy(cnn.model)
    mixq.wrap(model, skip=["fc"])
    assert list(mixq.sites(model)) == ["conv1", "dw", "conv2"] and type(model.fc) is nn.Linear
    with pytest.raises(ValueError, match="already wrapped"):
        mixq.wrap(model)
    with pytest.raises(ValueError, match="bare layer"):
        mixq.wrap(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="wrap"):
        mixq.apply(nn.Sequential(nn.ReLU()), {})
    with pytest.raises(ValueError, match="wrap"):
        mixq.calibrate(nn.Sequential(nn.ReLU()), [torch.zeros(1)])


def specs_of(qm):
    return {n: (m.weight_quant.spec, m.input_quant.spec) for n, m in mixq.sites(qm).items()}


def test_apply_sets_specs_and_omitted_layers_are_float(cnn, calibrated_cnn):
    qm = copy.deepcopy(calibrated_cnn)
    w4a8, w2 = parse_candidate("w4a8"), parse_candidate("w2")
    mixq.apply(qm, Plan({n: w4a8 for n in ["conv1", "dw", "conv2", "fc"]}))
    mixq.apply(qm, Plan({"conv1": w2, "fc": w4a8}))
    assert specs_of(qm) == {
        "conv1": (w2.weight, None),
        "dw": (None, None),
        "conv2": (None, None),
        "fc": (w4a8.weight, w4a8.act),
    }
    assert current_plan(qm) == Plan({"conv1": w2, "fc": w4a8})
    mixq.apply(qm, {})
    assert all(s == (None, None) for s in specs_of(qm).values())
    x = cnn.val[0][0]
    with torch.no_grad():
        assert torch.equal(qm(x), cnn.model(x))


def test_apply_rejects_unknown_layers(cnn):
    qm = wrapped(cnn)
    with pytest.raises(ValueError) as e:
        mixq.apply(qm, Plan({"conv1": parse_candidate("w4"), "conv9": parse_candidate("w4")}))
    msg = str(e.value)
    assert "conv9" in msg and all(n in msg for n in ["conv1", "dw", "conv2", "fc"])
    assert all(s == (None, None) for s in specs_of(qm).values())  # nothing was half-applied


def test_applied_restores_previous_specs_even_on_exceptions(calibrated_cnn):
    qm = copy.deepcopy(calibrated_cnn)
    base = Plan({"conv1": parse_candidate("w8"), "fc": parse_candidate("w4a8")})
    mixq.apply(qm, base)
    before = specs_of(qm)
    other = Plan({"dw": parse_candidate("w2+asym"), "fc": parse_candidate("w3")})
    with mixq.applied(qm, other) as m:
        assert m is qm and current_plan(qm) == other
    assert specs_of(qm) == before
    with pytest.raises(KeyError, match="boom"):
        with mixq.applied(qm, other):
            assert specs_of(qm)["dw"][0] == parse_candidate("w2+asym").weight
            raise KeyError("boom")
    assert specs_of(qm) == before
    with pytest.raises(ValueError, match="nope"):  # a bad plan leaves the specs as they were
        with mixq.applied(qm, {"nope": parse_candidate("w4")}):
            pass
    assert specs_of(qm) == before


# -- calibration -----------------------------------------------------------------------------


def test_calibrate_with_zero_batches_raises(cnn):
    qm = wrapped(cnn)
    with pytest.raises(ValueError, match="empty"):
        mixq.calibrate(qm, [])
    with pytest.raises(ValueError, match="empty"):
        mixq.calibrate(qm, iter(()))
    assert mixq.calibrate(qm, cnn.calib) == len(cnn.calib)


def test_activation_spec_without_calibration_raises(cnn):
    qm = wrapped(cnn)
    mixq.apply(qm, {"conv2": parse_candidate("w4a8")})
    with pytest.raises(RuntimeError, match=r"mixq\.calibrate"):
        qm(cnn.val[0][0])
    mixq.apply(qm, {"conv2": parse_candidate("w4")})  # weights alone need no calibration
    qm(cnn.val[0][0])


def test_calibrate_turns_specs_off_while_observing(cnn, calibrated_cnn):
    qm = copy.deepcopy(calibrated_cnn)

    def ranges():
        qs = mixq.sites(qm).items()
        return {n: (float(m.input_quant.stats_min), float(m.input_quant.stats_max)) for n, m in qs}

    first = ranges()
    mixq.apply(qm, {n: parse_candidate("w2a4") for n in mixq.sites(qm)})
    mixq.calibrate(qm, cnn.calib)  # statistics are of the float model, not the quantized one
    again = ranges()
    assert again == first == input_ranges(cnn.model, cnn.calib)
    assert all(s[0] is not None for s in specs_of(qm).values())  # specs are back on


def test_calibrate_gram_matrices(cnn, calibrated_cnn):
    qm = copy.deepcopy(calibrated_cnn)
    inputs = {}
    hs = [
        mod.register_forward_pre_hook(lambda mod, i, n=n: inputs.setdefault(n, []).append(i[0]))
        for n, mod in cnn.model.named_modules()
        if isinstance(mod, (nn.Linear, nn.Conv2d))
    ]
    with torch.no_grad():
        for b in cnn.calib:
            cnn.model(b[0])
    for h in hs:
        h.remove()
    for n, m in mixq.sites(qm).items():
        x = torch.cat(inputs[n]).double()
        if isinstance(m, QLinear):
            expect = (x.T @ x)[None]
        else:
            cols = m.input_columns(x)
            expect = torch.bmm(cols.transpose(1, 2), cols)
        assert m.weight_quant.gram.shape == expect.shape
        assert torch.allclose(m.weight_quant.gram, expect, rtol=1e-9), n
    mixq.calibrate(qm, cnn.calib)  # without gram: the matrices are dropped
    assert all(m.weight_quant.gram is None for m in mixq.sites(qm).values())


def test_omse_follows_the_current_gram(cnn, calibrated_cnn):
    qm = copy.deepcopy(calibrated_cnn)
    spec = parse_candidate("w2+omse")
    x = cnn.val[0][0]
    mixq.apply(qm, {"fc": spec})
    with torch.no_grad():
        qm(x)
    # new calibration data with a different input distribution: the cached weight must follow
    shifted = [(b[0] * torch.linspace(0.1, 3, 8)[None, None, :, None], b[1]) for b in cnn.calib]
    mixq.calibrate(qm, shifted, gram=True)
    fc = qm.fc
    expect = fake.quantize_weight(fc.weight, spec.weight, fc.weight_quant.gram.float())
    with torch.no_grad():
        assert torch.equal(fc.weight_quant(fc.weight), expect)
        qm(x)
    mixq.calibrate(qm, cnn.calib)  # no Gram matrices any more: omse cannot run on stale ones
    with pytest.raises(RuntimeError, match="gram=True"), torch.no_grad():
        qm(x)


# -- the weight cache --------------------------------------------------------------------------


def test_weight_cache_invalidates_on_in_place_changes_and_spec_changes(cnn):
    qm = wrapped(cnn)
    fc = qm.fc
    x = torch.randn(5, 32)
    w4, w2 = parse_candidate("w4"), parse_candidate("w2")
    mixq.apply(qm, {"fc": w4})

    def expect(spec):
        return F.linear(x, fake.quantize_weight(fc.weight, spec.weight), fc.bias)

    with torch.no_grad():
        y1 = fc(x)
        assert torch.equal(y1, expect(w4))
        fc.weight.data.mul_(2)  # bypasses the version counter
        assert torch.equal(fc(x), expect(w4))
        assert not torch.equal(fc(x), y1)
        fc.weight.mul_(-1)  # an ordinary in-place update
        assert torch.equal(fc(x), expect(w4))
    mixq.apply(qm, {"fc": w2})
    with torch.no_grad():
        assert torch.equal(fc(x), expect(w2))
    fc.float_module.load_state_dict({"weight": torch.randn(6, 32), "bias": fc.bias.detach()})
    with torch.no_grad():
        assert torch.equal(fc(x), expect(w2))
    fc.weight.data = torch.randn(6, 32)  # a new tensor behind the same parameter
    with torch.no_grad():
        assert torch.equal(fc(x), expect(w2))


def test_cached_weight_from_inference_mode_works_with_autograd(cnn):
    qm = wrapped(cnn)
    mixq.apply(qm, {n: parse_candidate("w4") for n in mixq.sites(qm)})
    for p in qm.parameters():
        p.requires_grad_(False)
    x = cnn.val[0][0][:8]
    with torch.inference_mode():
        ref = qm(x)
    xg = x.clone().requires_grad_()
    out = qm(xg)
    out.sum().backward()  # gradient with respect to the input, weights frozen
    assert torch.equal(out.detach(), ref) and xg.grad is not None


def test_training_through_sites_uses_straight_through(cnn):
    qm = wrapped(cnn)
    mixq.apply(qm, {"fc": parse_candidate("w8+p90")})
    x = torch.randn(4, 3, 8, 8)
    loss = qm(x).square().sum()
    loss.backward()
    w = qm.fc.weight.detach()
    amax = torch.tensor(np.percentile(w.abs().numpy(), 90, axis=1, method="inverted_cdf"))[:, None]
    s = amax / 127
    inside = (w >= -128 * s) & (w <= 127 * s)
    assert bool((qm.fc.weight.grad[~inside] == 0).all())
    assert bool((qm.fc.weight.grad[inside] != 0).any())


# -- MiniLM (real) ---------------------------------------------------------------------------


def test_minilm_wrap_exact_and_w8_close(minilm):
    from mixq.tasks import embed, mean_cosine

    qm = mixq.wrap(minilm.model)  # this module's own copy of the task
    qs = mixq.sites(qm)
    assert len(qs) == 36 and all(isinstance(m, QLinear) for m in qs.values())
    with torch.inference_mode():
        for b in minilm.val:
            assert torch.equal(embed(qm, b), b["target"])
    # MACs per sentence: every token counts, with keyword inputs (input_ids=..., attention_mask=...)
    batch = minilm.val[0]
    tokens = batch["input_ids"].shape[1]
    macs = {i.name: i.macs for i in mixq.cost.probe(qm, batch, embed)}
    assert macs["encoder.layer.0.attention.self.query"] == tokens * 384 * 384
    assert macs["encoder.layer.5.output.dense"] == tokens * 1536 * 384
    mixq.apply(qm, Plan({n: parse_candidate("w8") for n in qs}))
    cos = mean_cosine(qm, minilm.val)
    assert 0.99 < cos < 1.0
    mixq.apply(qm, Plan({n: LayerSpec() for n in qs}))
    assert mean_cosine(qm, minilm.val) == pytest.approx(1.0, abs=1e-6)
    # The task's loss backpropagates (Hessian traces need it): targets are no inference tensors.
    from mixq.tasks import cosine_loss

    layer = qs["encoder.layer.0.attention.self.query"]
    mixq.apply(qm, Plan({n: parse_candidate("w4") for n in qs}))
    grad = torch.autograd.grad(cosine_loss(qm, minilm.calib[0]), layer.weight)[0]
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # ... twice: Hutchinson's Hessian-vector products run through the attention kernels.
    from mixq.sensitivity import hutchinson_trace

    small = dataclasses.replace(minilm, calib=[{k: v[:4] for k, v in minilm.calib[0].items()}])
    trace = hutchinson_trace(qm, small, ["encoder.layer.0.attention.self.query"], n_samples=2)
    assert math.isfinite(trace["encoder.layer.0.attention.self.query"])
