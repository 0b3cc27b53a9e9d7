"""Real architectures through the methods, offline (issue #25, item 7).

Tiny Llama, Qwen2, Gemma-3, GPT-2 and BERT models built from ``transformers`` configs (random
weights, hidden 32, 2 layers: nothing is downloaded) and a conv net written the way model
libraries write them ("same"-padding ``nn.Conv2d`` subclasses, one ReLU6 module shared by
several places, depthwise blocks, squeeze-excitation gating, ``ZeroPad2d``, batch norm;
``bench.nets.conv_net``) go through uniform, sensitivity-ilp and hawq. Each run must plan every
Linear/Conv-like layer (compared with a list built here by ``isinstance``), name every other weight tensor in
``metrics.float_layers`` (tied copies by the layer they are tied to), meet the budget
(checked against the bits counted here), give a finite metric and leave the user's model as it
was. A model with nothing to quantize is refused, naming the module types it holds.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import mixq
from bench.nets import conv_net
from mixq.plan import parse_candidate

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402 - after the importorskip

VOCAB, SEQ = 64, 8
CANDIDATES = ["w4a8", "w8a8"]
METHOD_ARGS = {
    "uniform": None,
    "sensitivity-ilp": {"batches": 1},
    "hawq": {"batches": 1, "hutchinson_samples": 2},
}
LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, Conv1D)

# -- the conv net --------------------------------------------------------------------------------


def image_batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(5, (4,), generator=g)) for _ in range(n)]


# -- the transformers ----------------------------------------------------------------------------

DECODER = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32}


def llama() -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER, **HEADS))


def qwen2() -> nn.Module:
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**DECODER, **HEADS))


def gemma3() -> nn.Module:
    cfg = transformers.Gemma3TextConfig(
        **DECODER,
        **HEADS,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,  # shorter than the sequences: the sliding layer masks
        layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=30.0,
    )
    return transformers.Gemma3ForCausalLM(cfg)  # embeddings tied to lm_head (Gemma's default)


def gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg)  # Conv1D layers; wte tied to lm_head


def bert() -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(cfg)


def token_batches(n: int, seed: int, labels: bool = False) -> list[dict[str, torch.Tensor]]:
    """Unlabelled ``input_ids`` batches (a causal LM's: KL to float per token), or a classifier's
    with a padded ``attention_mask`` and integer labels (cross-entropy, top-1)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        b = {"input_ids": torch.randint(1, VOCAB, (2, SEQ), generator=g)}
        if labels:
            b["attention_mask"] = torch.ones_like(b["input_ids"])
            b["attention_mask"][0, SEQ - 3 :] = 0
            b["labels"] = torch.randint(3, (2,), generator=g)
        out.append(b)
    return out


def make_task(arch: str) -> mixq.Task:
    if arch == "conv-net":
        return mixq.Task(conv_net(), image_batches(2, 1), image_batches(1, 2), name=arch)
    torch.manual_seed(0)
    model = {"llama": llama, "qwen2": qwen2, "gemma3": gemma3, "gpt2": gpt2, "bert": bert}[arch]().eval()
    labels = arch == "bert"
    return mixq.Task(model, token_batches(2, 1, labels), token_batches(1, 2, labels), name=arch)


ARCHS = ("llama", "qwen2", "gemma3", "gpt2", "bert", "conv-net")

# -- independent expectations --------------------------------------------------------------------


def layers_of(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear/Conv-like layer, by isinstance (subclasses and transformers' Conv1D included)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)}


def float_tensors(model: nn.Module) -> dict[str, str | None]:
    """Every parameter with two or more dimensions that is no layer's weight, by every name it has,
    with the layer whose weight it is tied to (or None)."""
    layers = layers_of(model)
    weight_of = {id(m.weight): n for n, m in layers.items()}
    return {
        name: weight_of.get(id(p))
        for name, p in model.named_parameters(remove_duplicate=False)
        if p.dim() >= 2 and name not in {f"{n}.weight" for n in layers}
    }


def avg_bits(model: nn.Module, plan: mixq.Plan | None = None) -> float:
    """Average bits per quantized weight: the code bits plus one fp32 scale per output row
    (``plan`` None: every layer at 4 bits)."""
    bits = count = 0
    for name, m in layers_of(model).items():
        w = m.weight.t() if isinstance(m, Conv1D) else m.weight  # Conv1D stores [in, out]
        elem = plan.layers[name].weight.fmt.bits if plan is not None else 4
        bits += elem * w.numel() + 32 * w.shape[0]
        count += w.numel()
    return bits / count


def snapshot(model: nn.Module) -> tuple[dict, list]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, [(n, type(m)) for n, m in model.named_modules()]


def unchanged(model: nn.Module, snap: tuple[dict, list]) -> bool:
    state, types = snap
    now = model.state_dict()
    same = list(now) == list(state) and all(torch.equal(now[k], v) for k, v in state.items())
    return same and [(n, type(m)) for n, m in model.named_modules()] == types


@pytest.fixture(scope="module")
def built() -> dict[str, mixq.Task]:
    """The tasks built so far in this module, by architecture (each is built once)."""
    return {}


# -- every architecture through every method ------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*of the model's weights stay float")  # the embeddings: checked below
@pytest.mark.parametrize("method", sorted(METHOD_ARGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_every_layer_planned_budget_met_model_unchanged(arch, method, built):
    if arch not in built:
        built[arch] = make_task(arch)
    task = built[arch]
    snap = snapshot(task.model)
    budget = {"avg_weight_bits": avg_bits(task.model) + 2}  # halfway: uniform takes w4a8, others mix
    r = mixq.run(task, method, CANDIDATES, budget, method_args=METHOD_ARGS[method])
    layers = layers_of(task.model)
    assert set(r.plan.layers) == set(layers) and r.metrics.layers == len(layers)
    specs = {parse_candidate(c) for c in CANDIDATES}
    assert all(s in specs for s in r.plan.layers.values())
    floats = float_tensors(task.model)
    assert set(r.metrics.float_layers) == set(floats)
    for name, tied in floats.items():
        reason = r.metrics.float_layers[name]
        assert reason.startswith(f"tied to {tied}.weight" if tied else "embedding"), (name, reason)
    assert r.metrics.avg_weight_bits == pytest.approx(avg_bits(task.model, r.plan), rel=1e-9)
    assert r.metrics.avg_weight_bits <= budget["avg_weight_bits"] and r.metrics.within == {
        "avg_weight_bits": True
    }
    assert math.isfinite(r.metrics.metric) and math.isfinite(r.metrics.fp_metric)
    if arch in ("conv-net", "bert"):  # integer labels: top-1 (%)
        assert r.metrics.metric_name == "top1 (%)" and 0 <= r.metrics.metric <= 100
    else:  # a causal LM's unlabelled tokens: minus the KL to the float logits
        assert r.metrics.metric_name == "-KL to float outputs (nats)" and r.metrics.metric < 0
    if method == "uniform":
        assert set(r.plan.layers.values()) == {parse_candidate("w4a8")}
    assert unchanged(task.model, snap)


def test_the_expected_layers_and_float_tensors_are_the_architectures():
    """The independent lists above find what each architecture really holds (not an empty set)."""
    counts = {a: len(layers_of(make_task(a).model)) for a in ARCHS}
    # 7 projections per decoder layer + lm_head; GPT-2: 4 Conv1D per layer + lm_head; BERT: 6 per
    # layer + pooler + classifier; the conv net: stem, dw, 2 x (expand, dw, project + 2 in SE), head, fc
    assert counts == {"llama": 15, "qwen2": 15, "gemma3": 15, "gpt2": 9, "bert": 14, "conv-net": 14}
    assert float_tensors(make_task("gemma3").model) == {"model.embed_tokens.weight": "lm_head"}
    assert float_tensors(make_task("gpt2").model) == {
        "transformer.wte.weight": "lm_head",
        "transformer.wpe.weight": None,
    }
    assert float_tensors(make_task("conv-net").model) == {}


def test_conv_net_folds_every_norm_and_equalizes_only_the_safe_pair():
    """Batch norm after the subclass convs is found on the graph and folded; CLE equalizes the
    plain stem -> dw pair (through its own ReLU6 and the ZeroPad2d) and names why it leaves the
    others (subclasses with their own forward, the shared ReLU6), keeping the function."""
    task = make_task("conv-net")
    snap = snapshot(task.model)
    r = mixq.run(task, "uniform", ["w8"], ptq=["cle"])
    fold = r.metrics.extra["fold_bn"]
    norms = [n for n, m in task.model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(bn for _, bn in fold["folded"]) == sorted(norms) and fold["kept"] == {}
    (cle,) = r.metrics.ptq
    assert cle["pairs"] == [["stem", "dw"]] and cle["max_abs_diff"] < 1e-4
    reasons = {tuple(s[:2]): s[2] for s in cle["skipped"]}
    assert reasons[("dw", "blocks.0.expand")] == "called at more than one place: act (6 places)"
    assert reasons[("blocks.0.expand", "blocks.0.dw")].startswith("blocks.0.dw has its own forward")
    assert set(r.plan.layers) == set(layers_of(task.model))
    assert unchanged(task.model, snap)


# -- nothing to quantize -------------------------------------------------------------------------


class RecurrentTagger(nn.Module):
    """An embedding, an LSTM and a norm: no layer mixq quantizes unless embeddings are asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.rnn = nn.LSTM(16, 5, batch_first=True)
        self.norm = nn.LayerNorm(5)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.rnn(self.emb(input_ids))[0][:, -1])


def test_a_model_with_nothing_to_quantize_names_the_module_types_it_holds():
    torch.manual_seed(0)
    model = RecurrentTagger().eval()
    data = token_batches(1, 3)
    task = mixq.Task(model, data, data)
    snap = snapshot(model)
    for method in METHOD_ARGS:
        with pytest.raises(
            ValueError, match="nothing to quantize: it holds Embedding, LSTM, LayerNorm;"
        ) as e:
            mixq.run(task, method, CANDIDATES, {"avg_weight_bits": 6.0})
        assert "\n" not in str(e.value)
    assert unchanged(model, snap)
    with pytest.warns(UserWarning, match=r"rnn.weight_ih_l0 \(not a supported layer type: LSTM\)"):
        r = mixq.run(task, "uniform", ["w4"], embeddings=True)  # what the message offers works
    assert list(r.plan.layers) == ["emb"]
