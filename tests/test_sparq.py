"""SPARQ: window numerics against a plain-Python oracle, the format in plans and costs, the
site path, the integer path, and the ``sparq`` method through mixq.run and the CLI."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixq
from mixq import cli, cost, formats
from mixq.cost import InfeasibleBudgetError, LayerInfo
from mixq.formats import ACT_FORMAT_NAMES, Int, Sparq
from mixq.kinds import sparq as sparq_kind
from mixq.nn import QConv2d, QLinear, Quantizer
from mixq.plan import LayerSpec, Plan, QSpec, parse_candidate
from mixq.quant import sparq
from mixq.wrap import apply, calibrate, sites, wrap

OPTIONS = ("5opt", "3opt", "2opt")
SETTINGS = [(o, r) for o in OPTIONS for r in (True, False)]


# -- the oracle: written straight from the definition, one Python int at a time ------------------


def oracle_window_lsb(a: int, option: str) -> int:
    """The LSB position of the 4-bit window chosen for code ``a`` (docs/methods.md §5.3 table)."""
    if option == "5opt":  # first set bit from the top: 7 -> [7:4], 6 -> [6:3], ... else [3:0]
        for top in (7, 6, 5, 4):
            if a >> top & 1:
                return top - 3
        return 0
    if option == "3opt":  # bits 7-6 any set -> [7:4]; bits 5-4 any set -> [5:2]; else [3:0]
        if a & 0b11000000:
            return 4
        return 2 if a & 0b00110000 else 0
    return 4 if a & 0b11110000 else 0  # 2opt


def oracle_bsparq(a: int, option: str, rounding: bool) -> int:
    lsb = oracle_window_lsb(a, option)
    window = [b for b in range(lsb, lsb + 4)]
    mask = sum(1 << b for b in window)
    kept = a & mask
    if rounding and lsb > 0:
        r = 1 << (lsb - 1)  # the bit just below the window
        sticky = any(a >> b & 1 for b in range(lsb - 1))  # any bit below r
        if a & r and (sticky or a >> lsb & 1):
            kept += 1 << lsb
            if kept > mask:  # saturate inside the window, never move to the next one
                kept = mask
    return kept


ORACLE = {(o, r): [oracle_bsparq(a, o, r) for a in range(256)] for o, r in SETTINGS}


def oracle_pair(a1: int, a2: int, option: str, rounding: bool) -> tuple[int, int]:
    if a1 == 0 or a2 == 0:  # the non-zero one (if any) keeps all 8 bits
        return a1, a2
    return ORACLE[option, rounding][a1], ORACLE[option, rounding][a2]


# -- 1. numerics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("option,rounding", SETTINGS)
def test_all_256_codes_match_the_oracle(option, rounding):
    got = sparq.quantize_codes(torch.arange(256), option, rounding)
    assert got.tolist() == ORACLE[option, rounding]


@pytest.mark.parametrize("option,rounding", SETTINGS)
def test_all_65536_pairs_match_the_oracle(option, rounding):
    a1, a2 = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    codes = torch.stack([a1.flatten(), a2.flatten()], -1)  # [65536, 2]: channels 0 and 1
    got = sparq.quantize_codes(codes, option, rounding, pairs=True)
    expected = [oracle_pair(x, y, option, rounding) for x in range(256) for y in range(256)]
    assert got.tolist() == [list(p) for p in expected]


def test_rounding_is_round_half_even_on_the_window_and_saturates():
    # Second, arithmetic oracle: Python's round() is half-to-even.
    for option, _ in SETTINGS:
        for a in range(256):
            lsb = oracle_window_lsb(a, option)
            step = 1 << lsb
            assert ORACLE[option, True][a] == min(round(a / step), 15) * step
            assert ORACLE[option, False][a] == a // step * step
    cases = {  # hand-worked from the spec's examples
        ("5opt", 0xF8): 0xF0,  # [7:4] overflows to 0x100: saturates to 0xF0
        ("5opt", 0x7C): 0x78,  # [6:3] overflows to 0x80: saturates to 0x78
        ("3opt", 0x3E): 0x3C,  # [5:2] overflowing to 0x40 becomes 0x3C = 60
        ("5opt", 100): 96,  # a tie: rounds to even (down)
        ("5opt", 108): 112,  # a tie with an odd window LSB: up
        ("5opt", 101): 104,  # above the tie: up
        ("2opt", 0x18): 0x20,  # [7:4] of 24: 1.5 LSB ties to even, 2
    }
    for (option, a), kept in cases.items():
        assert sparq.quantize_codes(torch.tensor([a]), option).item() == kept


def test_small_codes_are_exact_and_raw_never_rounds_up():
    small = torch.arange(16)
    for option, rounding in SETTINGS:
        assert torch.equal(sparq.quantize_codes(small, option, rounding), small)
        kept = sparq.quantize_codes(torch.arange(256), option, rounding)
        value, shift = sparq.window_codes(torch.arange(256), option, rounding)
        assert torch.equal(value << shift, kept) and int(value.max()) <= 15
        if not rounding:
            assert bool((kept <= torch.arange(256)).all())


def test_pairs_follow_the_last_dimension_and_an_odd_channel_keeps_8_bits():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (3, 4, 7), generator=g) * (torch.rand(3, 4, 7, generator=g) > 0.4)
    got = sparq.quantize_codes(codes, "3opt", True, pairs=True)
    for idx in torch.cartesian_prod(torch.arange(3), torch.arange(4)).tolist():
        row = codes[idx[0], idx[1]].tolist() + [0]  # the 7th channel pairs with an implicit zero
        want = [v for k in range(0, 8, 2) for v in oracle_pair(row[k], row[k + 1], "3opt", True)][:7]
        assert got[idx[0], idx[1]].tolist() == want
    assert sparq.quantize_codes(torch.tensor([201]), pairs=True).item() == 201


def test_dtype_is_kept():
    codes = torch.tensor([255, 17, 0], dtype=torch.uint8)
    out = sparq.quantize_codes(codes, "2opt")
    assert out.dtype == torch.uint8 and out.tolist() == [240, 16, 0]


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"codes": torch.tensor([256])}, "256"),
        ({"codes": torch.tensor([-1])}, "-1"),
        ({"codes": torch.tensor([1.0])}, "float"),
        ({"codes": torch.tensor([1]), "option": "4opt"}, "5opt, 3opt, 2opt"),
        ({"codes": torch.tensor([1]), "rounding": 1}, "rounding"),
        ({"codes": torch.tensor(3)}, "dimension"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        sparq.quantize_codes(**kwargs)


# -- 2. the format, plans and costs -----------------------------------------------------------------


def test_format_names_round_trip_and_count_their_bits():
    assert len(ACT_FORMAT_NAMES) == 12 and not set(ACT_FORMAT_NAMES) & set(formats.FORMAT_NAMES)
    for name in ACT_FORMAT_NAMES:
        fmt = formats.parse(name)
        assert isinstance(fmt, Sparq) and str(fmt) == name and formats.elem_bits(fmt) == 4
    position = {"5opt": 3, "3opt": 2, "2opt": 1}  # ceil(log2(placements))
    for o in OPTIONS:
        assert formats.bits(Sparq(o)) == 4 + position[o]
        assert formats.bits(Sparq(o, rounding=False, pairs=True)) == 4 + position[o] + 0.5
    with pytest.raises(ValueError, match="5opt, 3opt, 2opt"):
        Sparq("4opt")


@pytest.mark.parametrize("name", [f"w8-a{n}" for n in ACT_FORMAT_NAMES] + ["w4g32+asym-asparq4_3opt_v+p99.9"])
def test_candidates_round_trip_through_the_grammar_and_json(name, tmp_path):
    spec = parse_candidate(name)
    assert isinstance(spec.act.fmt, Sparq) and spec.act.granularity == "tensor" and spec.act.symmetric
    assert parse_candidate(spec.name) == spec
    plan = Plan({"fc": spec})
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json").layers == {"fc": spec}


def test_sparq_is_for_activations_only():
    for bad, needle in [
        ("wsparq4_5opt", "activation format"),
        ("w8-asparq4_5opt+asym", "asymmetric"),
        ("w8-asparq4_5opt+channel", "per tensor"),
    ]:
        with pytest.raises(ValueError, match=needle):
            parse_candidate(bad)
    d = {"weight": {"fmt": "sparq4_5opt", "granularity": "tensor"}, "act": None}
    with pytest.raises(ValueError, match="activation format"):
        LayerSpec.from_dict(d)
    with pytest.raises(ValueError, match="activation format"):
        Quantizer("weight").set_spec(QSpec(Sparq(), granularity="tensor"))


def test_cost_counts_window_and_position_bits():
    info = LayerInfo("fc", "linear", (10, 64), 10, 640.0)
    for name, a_bits in [
        ("w8-asparq4_5opt_v", 7.5),
        ("w8-asparq4_2opt", 5.0),
        ("w4-asparq4_3opt_raw_v", 6.5),
    ]:
        spec = parse_candidate(name)
        c = cost.layer_costs(info, spec)
        assert c["bops"] == 640.0 * spec.weight.bits * a_bits
        assert c["size_bits"] == cost.weight_bits(info, spec.weight) + 10 * 32 + 32  # one fp32 scale


# -- site path ---------------------------------------------------------------------------------------


def conv_site(spec_name: str, x: torch.Tensor, groups: int = 1) -> QConv2d:
    torch.manual_seed(0)
    c = x.shape[1]
    model = nn.Sequential(nn.Conv2d(c, 6, 3, padding=1, stride=2, groups=groups))
    q = wrap(model)
    calibrate(q, [x])
    apply(q, Plan({"0": parse_candidate(spec_name)}))
    return sites(q)["0"]


@pytest.mark.parametrize("name", ["w8-asparq4_5opt_v", "w8-asparq4_2opt_raw", "w8-asparq4_3opt"])
def test_site_applies_windows_to_unsigned_8bit_codes_along_channels(name):
    g = torch.Generator().manual_seed(1)
    x = torch.relu(torch.randn(2, 5, 6, 6, generator=g))  # odd channel count
    layer = conv_site(name, x)
    fmt = layer.input_quant.spec.fmt
    scale = x.max() / 255  # min/max range of a non-negative site: unsigned 8-bit, zero at 0
    codes = torch.clamp(torch.round(x / scale), 0, 255).long()
    kept = codes.clone()  # filled from the oracle: channel pairs (0, 1), (2, 3), (4, implicit 0)
    for n, h, w in torch.cartesian_prod(torch.arange(2), torch.arange(6), torch.arange(6)).tolist():
        ch = codes[n, :, h, w].tolist() + [0]
        for k in range(0, 5, 2):
            table = ORACLE[fmt.option, fmt.rounding]
            if fmt.pairs:
                pair = oracle_pair(ch[k], ch[k + 1], fmt.option, fmt.rounding)
            else:
                pair = table[ch[k]], table[ch[k + 1]]
            kept[n, k, h, w] = pair[0]
            if k + 1 < 5:
                kept[n, k + 1, h, w] = pair[1]
    assert not sparq_kind.fallback(layer.input_quant.act_params())
    assert torch.equal(layer.input_quant(x), kept.float() * scale)


def test_signed_site_falls_back_to_the_plain_8bit_asymmetric_code():
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    layer = conv_site("w8-asparq4_5opt_v", x)
    assert sparq_kind.fallback(layer.input_quant.act_params())
    a8 = Quantizer("act", channel_axis=1)
    a8.observe(x)
    a8.set_spec(parse_candidate("a8").act)
    assert torch.equal(layer.input_quant(x), a8(x))


def test_site_gradient_is_straight_through_inside_the_range():
    x = torch.relu(torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3)))
    layer = conv_site("w8-asparq4_5opt_v", x)
    xg = (x * 1.5).requires_grad_()  # values above the calibrated max get zero gradient
    layer.input_quant(xg).sum().backward()
    assert torch.equal(xg.grad, (xg.detach() <= x.max()).float())


def test_site_without_calibration_raises():
    site = Quantizer("act")
    site.set_spec(parse_candidate("asparq4_5opt").act)
    with pytest.raises(RuntimeError, match="calibrat"):
        site(torch.ones(2, 3))


# -- 3. integer path ---------------------------------------------------------------------------------


def weight_codes(w: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes and per-channel scales of a symmetric per-channel weight spec."""
    scale = w.detach().reshape(w.shape[0], -1).abs().amax(1) / 127
    shape = (-1,) + (1,) * (w.dim() - 1)
    return torch.clamp(torch.round(w.detach() / scale.reshape(shape)), -128, 127).long(), scale


@pytest.mark.parametrize("groups,channels", [(1, 5), (2, 6)])
def test_integer_conv_equals_the_fake_quantized_conv(groups, channels):
    g = torch.Generator().manual_seed(4)
    x = torch.relu(torch.randn(3, channels, 7, 7, generator=g)) * (
        torch.rand(3, channels, 7, 7, generator=g) > 0.3
    )
    for name in ["w8-asparq4_5opt_v", "w8-asparq4_3opt_raw"]:
        layer = conv_site(name, x, groups=groups)
        fmt = layer.input_quant.spec.fmt
        s_x = layer.input_quant.act_params().scale
        w_codes, s_w = weight_codes(layer.weight, layer.weight_quant.spec)
        assert torch.equal(layer.weight_quant(layer.weight), w_codes.float() * s_w[:, None, None, None])
        x_codes = sparq.to_codes(x, s_x)
        acc = sparq.int_conv2d(x_codes, w_codes, fmt, stride=(2, 2), padding=(1, 1), groups=groups)
        assert acc.dtype == torch.int32
        kept = sparq.quantize_codes(x_codes.movedim(1, -1), fmt.option, fmt.rounding, fmt.pairs).movedim(
            -1, 1
        )
        exact = F.conv2d(kept.double(), w_codes.double(), stride=2, padding=1, groups=groups)
        assert torch.equal(acc.double(), exact)  # integers, exact in float64
        out = (
            acc.double() * (s_x * s_w).double()[None, :, None, None]
            + layer.bias.double()[None, :, None, None]
        )
        with torch.no_grad():
            fq = layer(x).double()
        assert torch.allclose(out, fq, rtol=1e-5, atol=1e-5)


def test_integer_linear_equals_the_fake_quantized_linear():
    g = torch.Generator().manual_seed(5)
    x = torch.relu(torch.randn(16, 9, generator=g))
    model = nn.Sequential(nn.Linear(9, 4))
    q = wrap(model)
    calibrate(q, [x])
    apply(q, Plan({"0": parse_candidate("w8-asparq4_2opt_v")}))
    layer: QLinear = sites(q)["0"]
    s_x = layer.input_quant.act_params().scale
    w_codes, s_w = weight_codes(layer.weight, layer.weight_quant.spec)
    acc = sparq.int_linear(sparq.to_codes(x, s_x), w_codes, Sparq("2opt", True, True))
    kept = sparq.quantize_codes(sparq.to_codes(x, s_x), "2opt", True, True)
    assert torch.equal(acc.long(), kept @ w_codes.T)
    with torch.no_grad():
        fq = layer(x).double()
    assert torch.allclose(acc.double() * (s_x * s_w).double() + layer.bias.double(), fq, rtol=1e-5, atol=1e-6)


def test_fake_quantize_equals_codes_times_scale():
    x = torch.relu(torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(6)))
    s = x.max() / 255
    for name in ACT_FORMAT_NAMES:
        fmt = formats.parse(name)
        kept = sparq.quantize_codes(sparq.to_codes(x, s).movedim(1, -1), fmt.option, fmt.rounding, fmt.pairs)
        assert torch.equal(sparq.fake_quantize(x, s, fmt, 1), kept.movedim(-1, 1).float() * s)


# -- 4. the method, composition, CLI -----------------------------------------------------------------


def test_sparq_method_through_run(tmp_path):
    task = mixq.tasks.get("synthetic-cnn")
    res = mixq.run(
        task, method="sparq", candidates=["w8-asparq4_5opt_v", "w8-asparq4_2opt_raw"], out=tmp_path / "run"
    )
    record = res.plan.meta["sparq"]
    assert record["signed_layers"] == ["conv1"]  # fed random normal images
    assert res.plan.layers["conv1"] == parse_candidate("w8a8")
    chosen = parse_candidate(record["candidate"])
    assert all(res.plan.layers[n] == chosen for n in ("dw", "conv2", "fc"))
    assert res.metrics.metric > 50 and json.loads((tmp_path / "run" / "metrics.json").read_text())
    again = mixq.run(task, method="sparq", candidates=["w8-asparq4_5opt_v", "w8-asparq4_2opt_raw"])
    assert again.plan.layers == res.plan.layers and again.metrics.metric == res.metrics.metric


def test_sparq_method_adds_its_format_to_plain_candidates_and_respects_the_budget():
    task = mixq.tasks.get("synthetic-mlp")
    res = mixq.run(
        task,
        method="sparq",
        candidates=["w4a8", "w8a8"],
        budget={"avg_weight_bits": 6},
        method_args={"act": "sparq4_3opt"},
    )
    chosen = parse_candidate("w4-asparq4_3opt")
    assert res.plan.layers == {"0": parse_candidate("w4a8"), "2": chosen, "4": chosen}
    assert res.metrics.within["avg_weight_bits"]
    res = mixq.run(task, method="sparq", candidates=["w4a8"], method_args={"float_first_last": True})
    assert res.plan.layers == {"2": parse_candidate("w4-asparq4_5opt_v")}
    assert res.plan.meta["sparq"]["float_layers"] == ["0", "4"]
    with pytest.raises(ValueError, match="sparq4_5opt_v"):
        mixq.run(task, method="sparq", candidates=["w8"], method_args={"act": "sparq4_9opt"})
    with pytest.raises(InfeasibleBudgetError):
        mixq.run(task, method="sparq", candidates=["w8"], budget={"avg_weight_bits": 4})


def test_sparq_candidates_compose_with_other_methods():
    task = mixq.tasks.get("synthetic-mlp")
    res = mixq.run(
        task,
        method="sensitivity-ilp",
        candidates=["w4-asparq4_5opt_v", "w8-asparq4_5opt_v"],
        budget={"avg_weight_bits": 6},
    )
    assert res.metrics.within["avg_weight_bits"]
    assert {type(s.act.fmt) for s in res.plan.layers.values()} == {Sparq}
    fallback = [n for n, m in sites(res.model).items() if sparq_kind.fallback(m.input_quant.act_params())]
    assert fallback == ["0"]  # the first layer sees signed inputs


def test_cli_runs_sparq(tmp_path, capsys):
    out = tmp_path / "cli"
    args = [
        "run",
        "--task",
        "synthetic-mlp",
        "--method",
        "sparq",
        "--candidates",
        "w8-asparq4_5opt_v",
        "--method-arg",
        "select=bits",
        "--out",
        str(out),
    ]
    assert cli.main(args) == 0
    plan = Plan.load(out / "plan.json", layer_names=["0", "2", "4"])
    assert plan.layers["2"] == parse_candidate("w8-asparq4_5opt_v")
    assert plan.layers["0"].act == QSpec(Int(8), granularity="tensor", symmetric=False)
