"""Test mixq.cost against numbers computed by hand on a small model."""

import doctest
import itertools
import math
import re

import pytest
import torch
from torch import nn

import mixq
from mixq import cost
from mixq.cost import InfeasibleBudgetError, LayerInfo
from mixq.plan import FLOAT, LayerSpec, parse_candidate


class Small(nn.Module):
    """conv 3->8 (3x3, 10x10 -> 8x8), depthwise 3x3 (no bias), BatchNorm, 2 tokens of 256, LayerNorm,
    Linear 256->4 on the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.ln = nn.LayerNorm(256)
        self.fc = nn.Linear(256, 4)

    def forward(self, x):
        h = self.bn(self.dw(self.conv(x)))  # [B, 8, 8, 8]
        return self.fc(self.ln(h.reshape(x.shape[0], 2, 256)))  # [B, 2, 4]


# by hand
CONV_W, CONV_B, DW_W, FC_W, FC_B = 8 * 3 * 9, 8, 8 * 1 * 9, 4 * 256, 4
OTHER = 2 * 8 + 2 * 256  # BatchNorm and LayerNorm weights and biases (buffers are not parameters)
FP32_BYTES = 4 * (CONV_W + CONV_B + DW_W + FC_W + FC_B + OTHER)
MACS = {
    "conv": 8 * 8 * 8 * (3 // 1) * 3 * 3,  # C_out * H_out * W_out * C_in/g * kh * kw
    "dw": 8 * 8 * 8 * (8 // 8) * 3 * 3,
    "fc": 2 * 256 * 4,  # every token
}


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    qm = mixq.wrap(Small().eval())
    infos = cost.probe(qm, (torch.randn(5, 3, 10, 10), torch.zeros(5)))
    return qm, infos


def test_probe_shapes_params_macs(small):
    _, infos = small
    assert [i.name for i in infos] == ["conv", "dw", "fc"]
    assert [i.kind for i in infos] == ["conv", "conv", "linear"]
    assert [i.weight_shape for i in infos] == [(8, 3, 3, 3), (8, 1, 3, 3), (4, 256)]
    assert [i.numel for i in infos] == [CONV_W, DW_W, FC_W]
    assert [i.bias for i in infos] == [CONV_B, 0, FC_B]
    assert [i.out_channels for i in infos] == [8, 8, 4]
    assert [i.row_len for i in infos] == [27, 9, 256]
    assert {i.name: i.macs for i in infos} == MACS
    mc = cost.model_costs(small[0], infos)
    assert mc.other_params == OTHER and mc.n_weights == CONV_W + DW_W + FC_W
    assert mc.fp32_bytes == FP32_BYTES == 4 * sum(p.numel() for p in Small().parameters())


def test_probe_does_not_depend_on_batch_size(small):
    qm, infos = small
    assert cost.probe(qm, torch.randn(1, 3, 10, 10)) == infos


class Reuse(nn.Module):
    """A Linear called twice on tokens, and a Linear on tokens flattened into the batch dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.tok = nn.Linear(8, 3)

    def forward(self, x):  # [B, 5, 8]
        h = self.fc(self.fc(x))
        return self.tok(h.reshape(-1, 8)).reshape(x.shape[0], -1)


def test_probe_counts_every_call_and_every_token():
    qm = mixq.wrap(Reuse())
    infos = cost.probe(qm, torch.randn(4, 5, 8))
    assert {i.name: i.macs for i in infos} == {"fc": 2 * 5 * 8 * 8, "tok": 5 * 8 * 3}


def test_probe_with_keyword_inputs_and_custom_forward():
    class Kw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 2)

        def forward(self, *, ids):
            return self.fc(ids.reshape(-1, 6))  # [B, 3 * 6] -> [B * 3, 6]

    qm = mixq.wrap(Kw())
    infos = cost.probe(qm, {"ids": torch.randn(7, 18)}, forward=lambda m, b: m(ids=b["ids"]))
    assert infos[0].macs == 3 * 6 * 2


# -- weight bits -------------------------------------------------------------------------------


def info(small, name) -> LayerInfo:
    return next(i for i in small[1] if i.name == name)


@pytest.mark.parametrize(
    "name, cand, expect",
    [
        ("fc", "w4", FC_W * 4 + 4 * 32),  # per-channel fp32 scales
        ("fc", "w4+asym", FC_W * 4 + 4 * (32 + 4)),  # + a 4-bit zero point per channel
        ("fc", "w4g128", FC_W * 4 + 4 * 2 * 16),  # two fp16 group scales per row
        ("fc", "w4g128+asym", FC_W * 4 + 4 * 2 * (16 + 4)),
        ("fc", "w4g100", FC_W * 4 + 4 * 3 * 16),  # 256 = 100 + 100 + 56: a partial group
        ("fc", "w8+tensor", FC_W * 8 + 32),
        ("fc", "w8+tensor+asym", FC_W * 8 + 32 + 8),
        ("fc", "wfp8_e4m3fn", FC_W * 8 + 4 * 32),
        ("fc", "wmxfp4_e2m1", FC_W * 4 + 4 * 8 * 8),  # 256 / 32 = 8 E8M0 scales per row
        ("fc", "float", FC_W * 32),
        ("fc", "a8", FC_W * 32),
        ("conv", "w4", CONV_W * 4 + 8 * 32),
        ("conv", "w2+asym", CONV_W * 2 + 8 * (32 + 2)),
        ("conv", "w4g8", CONV_W * 4 + 8 * 4 * 16),  # 27 = 8 + 8 + 8 + 3
        ("conv", "wmxfp4_e2m1", CONV_W * 4 + 8 * 1 * 8),  # ceil(27 / 32) = 1 block per row
        ("conv", "wmxfp4_e2m1_b16", CONV_W * 4 + 8 * 2 * 8),
        ("conv", "wuint8+asym", CONV_W * 8 + 8 * (32 + 8)),
        ("dw", "w3", DW_W * 3 + 8 * 32),
        ("dw", "wmxint8", DW_W * 8 + 8 * 8),
        ("dw", "wfp4_e2m1+tensor", DW_W * 4 + 32),
    ],
)
def test_weight_bits(small, name, cand, expect):
    assert cost.weight_bits(info(small, name), parse_candidate(cand).weight) == expect


def test_weight_bits_doctest_numbers():
    i = LayerInfo("fc", "linear", (4, 256), 4, 1024.0)
    assert cost.weight_bits(i, parse_candidate("w4").weight) == 4224.0
    assert cost.weight_bits(i, parse_candidate("w4g128+asym").weight) == 4256.0


# -- whole-model metrics ---------------------------------------------------------------------


def test_metrics_of_by_hand(small):
    qm, infos = small
    mc = cost.model_costs(qm, infos)
    specs = [parse_candidate("w4a8"), parse_candidate("w2+asym-a8+sym"), parse_candidate("wmxfp4_e2m1")]
    wbits = [CONV_W * 4 + 8 * 32, DW_W * 2 + 8 * (32 + 2), FC_W * 4 + 4 * 8 * 8]
    act_bits = [32 + 8, 32, 0]  # a8: scale + 8-bit zero point; a8+sym: scale; float input: none
    bias_bits = [CONV_B * 32, 0, FC_B * 32]
    size_bytes = (sum(wbits) + sum(act_bits) + sum(bias_bits)) / 8 + 4 * OTHER
    m = cost.metrics_of(mc, specs)
    assert m["avg_weight_bits"] == pytest.approx(sum(wbits) / (CONV_W + DW_W + FC_W), rel=1e-12)
    assert m["size_bytes"] == pytest.approx(size_bytes, rel=1e-12)
    assert m["size_ratio"] == pytest.approx(size_bytes / FP32_BYTES, rel=1e-12)
    bops = MACS["conv"] * 4 * 8 + MACS["dw"] * 2 * 8 + MACS["fc"] * 4 * 32
    assert m["bops"] == bops
    # all float: the fp32 model
    f = cost.metrics_of(mc, [FLOAT] * 3)
    assert f["avg_weight_bits"] == 32 and f["size_bytes"] == FP32_BYTES and f["size_ratio"] == 1.0
    assert f["bops"] == sum(MACS.values()) * 32 * 32
    # MX and fp8 activations
    fp8, mx = parse_candidate("wfp8_e4m3fn-afp8_e4m3fn"), parse_candidate("amxfp4_e2m1")
    g = cost.metrics_of(mc, [fp8, FLOAT, mx])
    assert g["bops"] == MACS["conv"] * 64 + MACS["dw"] * 32 * 32 + MACS["fc"] * 32 * 4
    assert g["size_bytes"] == pytest.approx(
        ((CONV_W * 8 + 8 * 32) + 32 + DW_W * 32 + FC_W * 32 + (CONV_B + FC_B) * 32) / 8 + 4 * OTHER
    )


def test_cost_table_matches_layer_costs(small):
    _, infos = small
    cands = [parse_candidate(c) for c in ["w2", "w4a8", "w8+asym", "float"]]
    table = cost.cost_table(infos, cands)
    assert set(table) == set(cost.COST_KEYS)
    for k in cost.COST_KEYS:
        assert table[k].shape == (3, 4) and table[k].dtype == torch.float64
    assert table["weight_bits"][2, 0] == FC_W * 2 + 4 * 32
    assert table["size_bits"][0, 1] == CONV_W * 4 + 8 * 32 + CONV_B * 32 + 40
    assert table["bops"][1, 3] == MACS["dw"] * 32 * 32


# -- budgets -----------------------------------------------------------------------------------


def test_budget_limits_and_from_limit_are_inverse(small):
    mc = cost.model_costs(*small)
    for key, value in [("avg_weight_bits", 3.5), ("size_bytes", 5000.0), ("size_ratio", 0.4), ("bops", 1e6)]:
        limits = cost.budget_limits(mc, {key: value})
        ((ck, total),) = limits.items()
        assert ck == cost.BUDGET_COST[key]
        assert cost.from_limit(mc, key, total) == pytest.approx(value, rel=1e-12)
    # by hand: avg bits times weights; bytes less the other parameters, in bits
    assert cost.budget_limits(mc, {"avg_weight_bits": 4})["weight_bits"] == 4 * (CONV_W + DW_W + FC_W)
    assert cost.budget_limits(mc, {"size_bytes": 5000})["size_bits"] == 8 * (5000 - 4 * OTHER)
    both = cost.budget_limits(mc, {"size_bytes": 5000, "size_ratio": 0.5})  # the tighter one wins
    assert both["size_bits"] == 8 * (min(5000, 0.5 * FP32_BYTES) - 4 * OTHER)


@pytest.mark.parametrize(
    "budget, match",
    [
        ({"avg_bits": 4}, "avg_bits.*avg_weight_bits, size_bytes, size_ratio, bops"),
        ({"avg_weight_bits": float("nan")}, "finite positive"),
        ({"avg_weight_bits": float("inf")}, "finite positive"),
        ({"bops": -1}, "finite positive"),
        ({"size_bytes": 0}, "finite positive"),
        ({"size_ratio": "half"}, "not a number"),
        ({"bops": None}, "not a number"),
    ],
)
def test_check_budget_rejects(budget, match):
    with pytest.raises(ValueError, match=match):
        cost.check_budget(budget)


def test_check_budget_rejects_non_dict():
    with pytest.raises(ValueError, match="dict"):
        cost.check_budget([("avg_weight_bits", 4)])  # type: ignore[arg-type]
    assert cost.check_budget({"avg_weight_bits": "4.5", "bops": 7}) == {"avg_weight_bits": 4.5, "bops": 7.0}


CANDS = ["w2+asym-a8", "w4a8", "w8", "wmxfp4_e2m1-a4"]


def smallest_feasible(mc, cands, key: str, uniform: bool) -> float:
    """Brute force over every assignment (or every uniform one) with metrics_of."""
    n = len(mc.infos)
    choices = [[c] * n for c in cands] if uniform else itertools.product(cands, repeat=n)
    return min(cost.metrics_of(mc, list(ch))[key] for ch in choices)


def message_number(msg: str) -> float:
    return float(re.search(r"smallest feasible \w+ is ([-+0-9.e]+)", msg).group(1))


@pytest.mark.parametrize("key", cost.BUDGET_KEYS)
@pytest.mark.parametrize("uniform", [True, False])
def test_check_feasible_names_the_smallest_feasible_budget(small, key, uniform):
    qm, infos = small
    mc = cost.model_costs(qm, infos)
    cands = [parse_candidate(c) for c in CANDS]
    table = cost.cost_table(infos, cands)
    best = smallest_feasible(mc, cands, key, uniform)
    with pytest.raises(InfeasibleBudgetError) as e:
        cost.check_feasible(mc, table, {key: best * 0.98}, uniform=uniform)
    assert isinstance(e.value, ValueError)
    assert message_number(str(e.value)) == pytest.approx(best, rel=1e-5)
    assert e.value.violated == [key] and e.value.minimums[key] == pytest.approx(best, rel=1e-9)
    cost.check_feasible(mc, table, {key: best}, uniform=uniform)  # exactly the smallest is fine
    cost.check_feasible(mc, table, {key: best * 1.01}, uniform=uniform)


def test_per_layer_smallest_is_below_uniform(small):
    qm, infos = small
    mc = cost.model_costs(qm, infos)
    cands = [parse_candidate(c) for c in CANDS]
    # the depthwise rows (9 weights) are cheapest in MX, the others with 2 bits and a zero point
    uni = smallest_feasible(mc, cands, "avg_weight_bits", True)
    mixed = smallest_feasible(mc, cands, "avg_weight_bits", False)
    assert mixed < uni  # so a budget between them is feasible per layer, infeasible uniformly
    table = cost.cost_table(infos, cands)
    budget = {"avg_weight_bits": (mixed + uni) / 2}
    cost.check_feasible(mc, table, budget, uniform=False)
    with pytest.raises(InfeasibleBudgetError, match="same candidate"):
        cost.check_feasible(mc, table, budget, uniform=True)


def test_uniform_budgets_that_no_single_candidate_meets_together(small):
    qm, infos = small
    mc = cost.model_costs(qm, infos)
    cands = [parse_candidate("w2"), parse_candidate("w8a4")]
    table = cost.cost_table(infos, cands)
    w2, w8a4 = (cost.metrics_of(mc, [c] * 3) for c in cands)
    # w2 meets the bits budget only, w8a4 the BOPs budget only
    budget = {"avg_weight_bits": w2["avg_weight_bits"] * 1.01, "bops": w8a4["bops"] * 1.01}
    assert w8a4["avg_weight_bits"] > budget["avg_weight_bits"] and w2["bops"] > budget["bops"]
    with pytest.raises(InfeasibleBudgetError, match="avg_weight_bits.*bops|bops.*avg_weight_bits"):
        cost.check_feasible(mc, table, budget, uniform=True)


def test_act_param_bits_and_spec_bits():
    assert cost.act_param_bits(None) == 0
    assert cost.act_param_bits(parse_candidate("a8").act) == 40
    assert cost.act_param_bits(parse_candidate("a4+sym").act) == 32
    assert cost.act_param_bits(parse_candidate("amxfp4_e2m1").act) == 0
    assert cost.spec_bits(None) == 32 and cost.spec_bits(parse_candidate("wfp6_e3m2").weight) == 6
    tiny = LayerInfo("x", "linear", (2, 3), 2, 6.0)
    assert math.isclose(cost.layer_costs(tiny, LayerSpec())["bops"], 6 * 1024)


def test_doctests():
    assert doctest.testmod(cost).failed == 0
