"""AWQ (mixq.ptq.awq): folded scales keep the float function, find their producers without
model-specific code, refuse what cannot be folded, and lower the quantized error."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mixq
from mixq import export
from mixq.plan import Plan, parse_candidate
from mixq.ptq import awq, gptq
from mixq.wrap import applied, sites


def llama(kv_heads: int, seed: int = 0) -> mixq.Task:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # norms with outlier channels, as trained LLMs have
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
                p[:3] *= 8
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 80, (8, 12), generator=g)
    calib = [{"input_ids": ids[i : i + 2]} for i in range(0, 8, 2)]
    return mixq.Task(model, calib, [{"input_ids": torch.randint(0, 80, (2, 12), generator=g)}])


def quantized(task: mixq.Task, cand: str) -> nn.Module:
    qmodel = mixq.wrap(copy.deepcopy(task.model))  # wrap works in place
    mixq.apply(qmodel, Plan({n: parse_candidate(cand) for n in sites(qmodel)}))
    return qmodel


def logits(model: nn.Module, task: mixq.Task) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([task.forward(model, b).logits for b in task.calib])


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_awq_keeps_the_float_function_and_names_its_producers(kv_heads):
    task = llama(kv_heads)
    qmodel = quantized(task, "w3g16")
    ref = logits(task.model, task)
    rec = awq.awq(qmodel, task)
    with applied(qmodel, {}):
        torch.testing.assert_close(logits(qmodel, task), ref, rtol=1e-5, atol=1e-5)
    producers = {g: v["producer"] for g, v in rec["groups"].items()}
    want = {
        "model.layers.0.self_attn.q_proj": "model.layers.0.input_layernorm",
        "model.layers.0.mlp.gate_proj": "model.layers.0.post_attention_layernorm",
        "model.layers.0.mlp.down_proj": "model.layers.0.mlp.up_proj",  # through SiLU(gate) * up
    }
    if kv_heads == 4:  # v_proj -> o_proj only when every head has its own values
        want["model.layers.0.self_attn.o_proj"] = "model.layers.0.self_attn.v_proj"
    else:
        assert (
            rec["skipped"]["model.layers.0.self_attn.o_proj"]
            == "no producer of its input to fold a scale into"
        )
    assert {g: p for g, p in producers.items() if g.startswith("model.layers.0.")} == want
    assert rec["groups"]["model.layers.1.self_attn.q_proj"]["layers"] == [
        f"model.layers.1.self_attn.{p}_proj" for p in "qkv"
    ]
    assert rec["skipped"]["lm_head"] == "outside the repeated blocks" and rec["blocks"]["count"] == 2
    for g in rec["groups"].values():
        assert g["error_after"] <= g["error_before"]
    assert any(g["alpha"] > 0 for g in rec["groups"].values())


class Norm(nn.Module):
    """RMSNorm with a weight (``one_plus``: Gemma's ``x * (1 + weight)``, which a scale cannot fold into)."""

    def __init__(self, k: int, one_plus: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(k))
        self.one_plus = one_plus

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x * (1 + self.weight if self.one_plus else self.weight)


class NormLinear(nn.Module):
    def __init__(self, k: int = 32, out: int = 24, one_plus: bool = False) -> None:
        super().__init__()
        self.norm = Norm(k, one_plus)
        self.fc = nn.Linear(k, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


def outlier_task(one_plus: bool = False, seed: int = 0) -> mixq.Task:
    torch.manual_seed(seed)
    model = NormLinear(one_plus=one_plus).eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.weight[[3, 17]] = 30.0  # two outlier channels
    g = torch.Generator().manual_seed(seed)
    calib = [torch.randn(64, 32, generator=g) for _ in range(4)]
    return mixq.Task(model, calib, [torch.randn(64, 32, generator=g)])


def layer_error(qmodel: nn.Module, task: mixq.Task, batches) -> float:
    with torch.no_grad():
        return sum(float((qmodel(x) - task.model(x)).pow(2).sum()) for x in batches)


@pytest.mark.parametrize("cand", ["w3", "w3g16+asym", "w4g8"])
def test_awq_lowers_the_quantized_error_with_outlier_channels(cand):
    task = outlier_task()
    plain, scaled = quantized(task, cand), quantized(task, cand)
    rec = awq.awq(scaled, task)
    assert rec["groups"]["fc"]["producer"] == "norm" and rec["blocks"] is None
    with applied(scaled, {}):
        torch.testing.assert_close(scaled(task.val[0]), task.model(task.val[0]), rtol=1e-5, atol=1e-5)
    for batches in (task.calib, task.val):  # calibration and held-out inputs
        assert layer_error(scaled, task, batches) < layer_error(plain, task, batches)
    assert rec["groups"]["fc"]["alpha"] > 0


def test_awq_refuses_a_norm_it_cannot_fold_into_and_keeps_the_model():
    task = outlier_task(one_plus=True)
    qmodel = quantized(task, "w3")
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    rec = awq.awq(qmodel, task)
    assert rec["groups"] == {} and rec["skipped"] == {"fc": "no producer of its input to fold a scale into"}
    for k, v in qmodel.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_awq_through_relu_on_a_model_without_blocks_and_its_order_with_gptq():
    task = mixq.tasks.get("synthetic-mlp")
    res = mixq.run(task, candidates=["w3-a8"], ptq=["awq", "gptq"])
    rec = res.metrics.ptq[0]
    assert rec["step"] == "awq" and rec["blocks"] is None
    assert {g["producer"] for g in rec["groups"].values()} <= set(sites(res.model))  # through ReLU
    with applied(res.model, {}):
        for x in task.val[:2]:
            x = x[0] if isinstance(x, (tuple, list)) else x
            torch.testing.assert_close(res.model(x), task.model(x), rtol=1e-5, atol=1e-5)
    qmodel = quantized(task, "w3")
    gptq.gptq(qmodel, task)
    with pytest.raises(ValueError, match="already has a fixed rounding.*list awq before them"):
        awq.awq(qmodel, task)
    with pytest.raises(ValueError, match="grid must be >= 1"):
        awq.Config(grid=0)


def test_awq_then_gptq_on_llama_exports_bit_exact(tmp_path):
    task = llama(4, seed=1)
    rtn = mixq.run(task, candidates=["w3g16"])
    res = mixq.run(task, candidates=["w3g16"], ptq=["awq", "gptq"])
    assert [r["step"] for r in res.metrics.ptq] == ["awq", "gptq"]
    assert res.metrics.metric > rtn.metrics.metric
    loaded = export.load(export.save(res, tmp_path / "m.safetensors"), model=task.model)
    ids = task.val[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, res.model(input_ids=ids).logits)


@pytest.mark.parametrize("cand", ["w3", "w4g8+asym"])
def test_group_error_from_the_gram_equals_the_error_over_tokens(cand):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g) * torch.linspace(0.1, 5, 16)
    ws = [torch.randn(12, 16, generator=g), torch.randn(5, 16, generator=g)]
    specs = [parse_candidate(cand).weight] * 2
    s = torch.rand(16, generator=g) + 0.5
    direct = sum(
        float(((x / s) @ mixq.quant.fake.quantize_weight(w * s, sp).T - x @ w.T).double().pow(2).sum())
        for w, sp in zip(ws, specs, strict=True)
    )
    assert awq.group_error(x.T @ x, ws, specs, s) == pytest.approx(direct, rel=1e-4)
