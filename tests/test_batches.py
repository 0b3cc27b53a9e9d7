"""Batches, outputs, dtypes and the default loss and metric of a user's own task (issue #25, 4-6).

Hugging Face models are built from a ``transformers`` config with random weights (hidden 32,
2 layers): nothing is downloaded.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mixq
import mixq.export
from mixq import tasks
from mixq.methods.sensitivity_ilp import resolve_objective
from mixq.plan import parse_candidate
from mixq.quant import fake
from mixq.wrap import wrap

transformers = pytest.importorskip("transformers")


def mlp_data(n: int = 192, labels: str = "class"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(n, 8)
    with torch.no_grad():
        y = model(x).argmax(-1) if labels == "class" else model(x)
    return model, x, y


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in now)


# -- batches -------------------------------------------------------------------------------------


class Recorder(nn.Module):
    """Records how it was called; returns a linear map of ``x``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.calls: list[tuple[int, list[str]]] = []

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.calls.append((1, ["mask"] if mask is not None else []))
        return self.lin(x if mask is None else x * mask)


def test_default_forward_takes_tensors_tuples_dicts_and_batch_encodings():
    m, x = Recorder(), torch.randn(2, 4)
    mask = torch.ones(2, 4)
    want = m.lin(x)
    for batch in (x, (x, torch.tensor([0, 1])), [x], {"x": x, "labels": torch.tensor([0, 1])}):
        assert torch.equal(tasks.default_forward(m, batch), want)
    enc = transformers.BatchEncoding({"x": x, "mask": mask, "label": torch.tensor([1, 0])})
    assert torch.equal(tasks.default_forward(m, enc), m.lin(x * mask))
    assert m.calls[-1] == (1, ["mask"])  # keyword arguments, the label left out
    assert tasks.model_inputs({"x": x, "target": x}) == ((), {"x": x})


def test_a_batch_the_forward_cannot_take_is_a_one_line_error():
    m, x = Recorder(), torch.randn(2, 4)
    with pytest.raises(TypeError, match=r"Recorder cannot take a dict batch with keys \['input_ids'\]") as e:
        tasks.default_forward(m, {"input_ids": x})
    assert "\n" not in str(e.value) and "keyword arguments" in str(e.value)
    with pytest.raises(TypeError, match=r"Task.calib\[0\]: the default forward cannot take a str batch"):
        mixq.Task(m, ["abc"], [x])
    with pytest.raises(TypeError, match="cannot take a dict batch with keys"):
        mixq.Task(m, [x], [{}])
    task = mixq.Task(m, [{"input_ids": x, "labels": torch.tensor([0, 1])}], [(x, torch.tensor([0, 1]))])
    with pytest.raises(TypeError, match=r"keys \['input_ids', 'labels'\]"):
        mixq.run(task, "uniform", ["w8"])


def test_dataloader_and_generator_sources_give_the_same_run_as_lists():
    model, x, y = mlp_data()
    lists = mixq.Task(model, [(x[i : i + 64], y[i : i + 64]) for i in (0, 64)], [(x[128:], y[128:])])
    loader = DataLoader(TensorDataset(x[:128], y[:128]), batch_size=64)
    gen = ((x[128:], y[128:]) for _ in range(1))
    task = mixq.Task(model, loader, gen)
    assert isinstance(task.calib, list) and len(task.calib) == 2 and len(task.val) == 1
    assert all(
        isinstance(b, list) and torch.equal(b[0], a[0]) for a, b in zip(lists.calib, task.calib, strict=True)
    )
    a = mixq.run(lists, "uniform", ["w4a8"])
    b = mixq.run(task, "uniform", ["w4a8"])
    assert a.metrics.metric == b.metrics.metric and a.metrics.metric_name == "top1 (%)"


def test_empty_endless_and_oversized_sources_are_refused():
    model, x, y = mlp_data()
    val = [(x, y)]
    with pytest.raises(ValueError, match="Task.calib is empty"):
        mixq.Task(model, iter([]), val)
    with pytest.raises(ValueError, match=r"Task.calib yields more than max_batches=5 batches \(an endless"):
        mixq.Task(model, ((x, y) for _ in itertools.count()), val, max_batches=5)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)  # 24 batches
    with pytest.raises(ValueError, match="Task.val has 24 batches, more than max_batches=10"):
        mixq.Task(model, val, loader, max_batches=10)
    assert len(mixq.Task(model, val, loader, max_batches=24).val) == 24
    with pytest.raises(TypeError, match="Task.calib must be an iterable of batches .* got a Tensor"):
        mixq.Task(model, x, val)
    with pytest.raises(ValueError, match="max_batches must be a positive int, got 0"):
        mixq.Task(model, val, val, max_batches=0)
    with pytest.raises(ValueError, match="Task.outputs must be one of auto, logits, values; got 'probs'"):
        mixq.Task(model, val, val, outputs="probs")


# -- outputs and the KL objective ----------------------------------------------------------------


def test_logits_of_outputs():
    t = torch.randn(2, 3)
    out = transformers.modeling_outputs.SequenceClassifierOutput(logits=t)
    for o in (t, out, {"logits": t, "h": None}, (t, None), [(t,)]):
        assert tasks.logits_of(o) is t
    hidden = transformers.modeling_outputs.BaseModelOutput(last_hidden_state=t)
    with pytest.raises(TypeError, match=r"BaseModelOutput with keys \['last_hidden_state'\]"):
        tasks.logits_of(hidden)
    assert tasks.output_tensor(hidden) is t
    assert tasks.output_kind(out) == "logits" and tasks.output_kind(t) == "values"


def own_ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def test_kl_objective_follows_the_declared_outputs_not_the_loss_function():
    model, x, y = mlp_data()
    data = [(x[:96], y[:96]), (x[96:], y[96:])]
    assert resolve_objective(mixq.Task(model, data, data), "auto") == "kl"  # the default classifier
    assert resolve_objective(mixq.Task(model, data, data, loss=tasks.cross_entropy), "auto") == "kl"
    # a user's own cross-entropy: "loss" unless the task declares logits
    own = mixq.Task(model, data, data, loss=own_ce, metric=tasks.top1)
    assert own.outputs == "logits"  # top1 declares logit outputs
    assert resolve_objective(own, "auto") == "kl"
    bare = mixq.Task(model, data, data, loss=own_ce, metric=lambda m, bs: 0.0)
    assert bare.outputs == "auto" and resolve_objective(bare, "auto") == "loss"
    declared = mixq.Task(model, data, data, loss=own_ce, metric=lambda m, bs: 0.0, outputs="logits")
    res = mixq.run(declared, "sensitivity-ilp", ["w2", "w8"], {"avg_weight_bits": 5})
    assert res.sensitivity.meta["objective"] == "kl"
    assert resolve_objective(declared, "loss") == "loss"


def tiny_bert(labels: int = 3) -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=labels,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


def bert_batches(n: int, seed: int, encoding: bool) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 64, (8, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[:4, 9:] = 0
        b = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (8,), generator=g)}
        out.append(transformers.BatchEncoding(b) if encoding else b)
    return out


def linear_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_hf_model_with_dict_and_batch_encoding_batches_through_uniform_and_sensitivity_ilp():
    model = tiny_bert()
    before = state(model)
    task = mixq.Task(model, bert_batches(2, 0, encoding=True), bert_batches(2, 1, encoding=False))
    assert task.outputs == "logits" and task.metric_name == "top1 (%)"
    uni = mixq.run(task, "uniform", ["w8a8"])
    assert set(uni.plan.layers) == linear_names(model)
    assert uni.metrics.fp_metric == tasks.top1(model, task.val)
    ilp = mixq.run(task, "sensitivity-ilp", ["w4", "w8"], {"avg_weight_bits": 6})
    assert ilp.sensitivity.meta["objective"] == "kl"  # a ModelOutput's logits
    assert ilp.metrics.within["avg_weight_bits"] and set(ilp.plan.layers) == linear_names(model)
    assert same_state(model, before)


def test_hf_model_output_without_labels_uses_kl_to_float():
    model = tiny_bert()
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in bert_batches(2, 0, encoding=False)]
    task = mixq.Task(model, batches, batches)
    assert task.outputs == "logits" and task.metric_name == "-KL to float outputs (nats)"
    assert task.fp_metric() == 0.0
    res = mixq.run(task, "sensitivity-ilp", ["w2", "w8"], {"avg_weight_bits": 5})
    assert res.sensitivity.meta["objective"] == "kl"
    q = res.model
    kl = 0.0
    rows = 0
    with torch.no_grad():  # oracle: KL(float || quantized) of the softmax outputs, per row
        for b in batches:
            p = F.log_softmax(model(**b).logits.double(), -1)
            r = F.log_softmax(q(**b).logits.double(), -1)
            kl += float((p.exp() * (p - r)).sum())
            rows += p.shape[0]
    assert res.metrics.metric == pytest.approx(-kl / rows, rel=1e-9, abs=1e-12)
    assert res.metrics.metric < 0


# -- honest defaults -----------------------------------------------------------------------------


def test_regression_task_gets_mse_to_float_not_top1():
    model, x, y = mlp_data(labels="float")
    data = [(x[:96], y[:96]), (x[96:], y[96:])]
    before = state(model)
    task = mixq.Task(model, data, data)
    assert task.outputs == "values" and task.metric_name == "-MSE to float outputs"
    assert task.fp_metric() == 0.0
    res = mixq.run(task, "uniform", ["w3"])
    with torch.no_grad():
        mse = (
            sum(float(((res.model(b[0]).double() - model(b[0]).double()) ** 2).sum()) for b in data)
            / y.numel()
        )
    assert res.metrics.metric == pytest.approx(-mse, rel=1e-9) and mse > 0
    assert res.metrics.metric_name == "-MSE to float outputs"
    hawq = mixq.run(task, "hawq", ["w2", "w8"], {"avg_weight_bits": 5})  # Hessians of the MSE loss
    assert hawq.metrics.within["avg_weight_bits"]
    assert same_state(model, before)


def test_unlabelled_tensor_batches_and_named_metrics():
    model, x, _ = mlp_data()
    unlabelled = [x[:96], x[96:]]
    task = mixq.Task(model, unlabelled, unlabelled)
    assert task.metric_name == "-MSE to float outputs" and task.loss(model, x).item() == 0.0
    assert (
        mixq.Task(model, unlabelled, unlabelled, outputs="logits").metric_name
        == "-KL to float outputs (nats)"
    )
    with pytest.raises(
        ValueError, match="Task metric top1 needs batches with integer class labels, got a tensor"
    ):
        mixq.Task(model, unlabelled, unlabelled, metric=tasks.top1)
    with pytest.raises(ValueError, match="Task loss cross_entropy needs batches with integer class labels"):
        mixq.Task(model, [(x, x)], [(x, x)], loss=tasks.cross_entropy)
    named = mixq.Task(model, unlabelled, unlabelled, metric=lambda m, bs: 1.0, metric_name="mine")
    assert named.metric_name == "mine" and isinstance(named.loss, tasks.ToFloat)


def test_resolving_outputs_leaves_the_models_modes_alone():
    model, x, _ = mlp_data()
    model.train()
    model[0].eval()
    task = mixq.Task(model, [x], [x], loss=lambda m, b: m(b).sum())
    assert task.outputs == "values"
    assert model.training and not model[0].training and model[2].training


# -- dtypes --------------------------------------------------------------------------------------


def low_precision_task(dtype: torch.dtype) -> mixq.Task:
    base = tasks.synthetic_cnn()
    model = copy.deepcopy(base.model).to(dtype)
    cast = [(x.to(dtype), y) for x, y in base.calib[:2]]
    return mixq.Task(model, cast, [(x.to(dtype), y) for x, y in base.val[:1]])


def test_a_low_precision_site_computes_in_float32():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8).to(torch.bfloat16)
    q = wrap(nn.Sequential(lin))
    site = q[0]
    site.weight_quant.set_spec(parse_candidate("w4").weight)
    got = site.weight_quant(lin.weight)
    want = fake.quantize_weight(lin.weight.detach().float(), parse_candidate("w4").weight)  # the oracle
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_model_through_w4a8_sensitivity_ilp_and_packed_round_trip(dtype, tmp_path):
    """bf16 and fp16 sites compute in float32; a float64 model keeps computing in float64."""
    task = low_precision_task(dtype)
    before = state(task.model)
    x = task.val[0][0]
    for res in (
        mixq.run(task, "uniform", ["w4a8"]),
        mixq.run(task, "sensitivity-ilp", ["w4a8", "w8a8"], {"avg_weight_bits": 6}),
    ):
        out = res.model(x)
        assert out.dtype == dtype and torch.isfinite(out).all()
        path = mixq.export.save(res, tmp_path / "m.safetensors")
        loaded = mixq.export.load(path, model=task.model)
        assert torch.equal(loaded(x), out)  # bit for bit
        assert all(v.dtype == dtype for k, v in loaded.state_dict().items() if k.endswith("weight"))
    assert same_state(task.model, before)


def test_bf16_onnx_export_is_a_float32_graph_of_the_same_codes(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    task = low_precision_task(torch.bfloat16)
    res = mixq.run(task, "uniform", ["w8a8"])
    path = mixq.export.save(res, tmp_path / "m.onnx", format="onnx", task=task)
    x = task.val[0][0][:4]
    got = ort.InferenceSession(str(path)).run(None, {"input": x.float().numpy()})[0]
    with torch.no_grad():
        fp32 = copy.deepcopy(res.model).float()(x.float()).numpy()  # the same codes, in float32
    np.testing.assert_allclose(got, fp32, atol=1e-4)


def test_a_dtype_mixq_cannot_quantize_is_a_one_line_error():
    model, x, y = mlp_data()
    model[2].weight = nn.Parameter(model[2].weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    task = mixq.Task(model, [(x, y)], [(x, y)], loss=lambda m, b: 0, metric=lambda m, bs: 0.0)
    with pytest.raises(
        ValueError, match=r"^2.weight has dtype float8_e4m3fn, which mixq cannot quantize; valid"
    ):
        mixq.run(task, "uniform", ["w8"])


def test_hf_model_output_exports_to_onnx_from_batch_encoding_batches(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = tiny_bert()
    task = mixq.Task(model, bert_batches(1, 0, encoding=True), bert_batches(1, 1, encoding=True))
    res = mixq.run(task, "uniform", ["w8"])
    path = mixq.export.save(res, tmp_path / "m.onnx", format="onnx", task=task)
    b = task.val[0]
    feeds = {k: b[k][:4].numpy() for k in ("input_ids", "attention_mask")}
    session = ort.InferenceSession(str(path))
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]  # "labels" left out
    got = session.run(None, feeds)[0]
    with torch.no_grad():
        want = res.model(input_ids=b["input_ids"][:4], attention_mask=b["attention_mask"][:4]).logits
    assert got.shape == (4, 3)  # the ModelOutput's logits
    np.testing.assert_allclose(got, want.numpy(), atol=5e-4)  # ONNX Runtime's float kernels


def test_causal_lm_logits_per_token_through_kl_objectives():
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    before = state(model)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 64, (4, 8), generator=g)} for _ in range(2)]
    task = mixq.Task(model, batches, batches)
    assert task.outputs == "logits" and task.metric_name == "-KL to float outputs (nats)"
    res = mixq.run(task, "sensitivity-ilp", ["w2", "w8"], {"avg_weight_bits": 5}, {"batches": 1})
    assert res.sensitivity.meta["objective"] == "kl"
    assert set(res.plan.layers) == linear_names(model) and res.metrics.within["avg_weight_bits"]
    with torch.no_grad():  # oracle: the KL per token position, averaged over every position
        p = torch.cat([F.log_softmax(model(**b).logits.double(), -1).reshape(-1, 64) for b in batches])
        q = torch.cat([F.log_softmax(res.model(**b).logits.double(), -1).reshape(-1, 64) for b in batches])
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    assert p.shape[0] == 2 * 4 * 8 and res.metrics.metric == pytest.approx(-kl, rel=1e-9)
    assert same_state(model, before)
