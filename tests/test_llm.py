"""Causal language models: the perplexity task, exclusions and tied weights.

Tiny random-config transformers models (Llama, Qwen2 with an untied lm_head, Gemma-3 with a
tied, large vocabulary, GPT-2 with Conv1D layers and a tied lm_head) and a word-level tokenizer
trained in memory: nothing is downloaded. Oracles: perplexity by a direct loop over positions,
budgets by counting the tensors by hand.
"""

import json
import math

import pytest
import torch

import mixq
from mixq import cost, llm, tasks
from mixq.search.problem import InfeasibleBudgetError

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXT = (
    "the quick brown fox jumps over the lazy dog . a model reads the text and predicts the next word . "
    "mixed precision keeps the sensitive layers at more bits and the others at fewer bits . "
) * 6
SEQ = 16


def tokenizer(extra: int = 0):
    """A word-level tokenizer trained on TEXT (plus ``extra`` made-up words), offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words = TEXT + " ".join(f"w{i}" for i in range(extra))
    tok.train_from_iterator([words], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


VOCAB = len(tokenizer())
DECODER = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64}


def build(name: str):
    torch.manual_seed(0)
    if name in ("llama", "llama-tied"):  # Llama's default: an untied lm_head
        cfg = transformers.LlamaConfig(**DECODER, **HEADS, tie_word_embeddings=name == "llama-tied")
        return transformers.LlamaForCausalLM(cfg)
    if name == "qwen2":
        return transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(**DECODER, **HEADS, tie_word_embeddings=False)
        )
    if name == "gemma3":  # tied, vocabulary large relative to the hidden size
        cfg = transformers.Gemma3TextConfig(
            **{**DECODER, "vocab_size": VOCAB + 200, "hidden_size": 16},
            **HEADS,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        )
        return transformers.Gemma3ForCausalLM(cfg)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg)  # Conv1D layers, wte tied to lm_head


MODELS = ("llama", "qwen2", "gemma3", "gpt2")


def make_task(name: str) -> mixq.Task:
    return tasks.causal_lm(build(name), tokenizer(), TEXT, seq_len=SEQ, calib=2, val=2)


def perplexity_oracle(model, windows) -> float:
    """exp of the mean -log p(token t+1 | tokens <= t), position by position, in float64."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = w["input_ids"]
            probs = model(input_ids=ids).logits.double().log_softmax(-1)
            for t in range(ids.shape[1] - 1):
                nll -= float(probs[0, t, ids[0, t + 1]])
                n += 1
    return math.exp(nll / n)


# -- the task ------------------------------------------------------------------------------------


def test_windows_are_disjoint_and_the_metric_is_negative_perplexity():
    task = make_task("llama")
    ids = llm.tokenize(tokenizer(), TEXT)
    n = ids.numel() // SEQ
    assert task.info["val_windows"] == [n - 2, n - 1] and task.info["calib_windows"] == [0, 1]
    for b, i in zip(task.val, task.info["val_windows"], strict=True):
        assert torch.equal(b["input_ids"][0], ids[i * SEQ : (i + 1) * SEQ])
    assert task.metric_name == "-perplexity" and task.output_kind() == "logits"
    ppl = perplexity_oracle(task.model, task.val)
    assert task.fp_metric() == pytest.approx(-ppl, rel=1e-9)
    out = task.forward(task.model, task.calib[0])
    assert isinstance(out, torch.Tensor) and out.shape == (1, SEQ, VOCAB)
    with torch.no_grad():
        loss = task.loss(task.model, task.calib[0])
    assert float(loss) == pytest.approx(math.log(perplexity_oracle(task.model, task.calib[:1])), rel=1e-5)


def test_explicit_windows_and_overlap_refused():
    model, tok = build("llama"), tokenizer()
    task = tasks.causal_lm(model, tok, TEXT, seq_len=SEQ, calib=[0, 2], val=range(3, 5))
    assert task.info["calib_windows"] == [0, 2] and task.info["val_windows"] == [3, 4]
    with pytest.raises(ValueError, match=r"overlap at \[3\]"):
        tasks.causal_lm(model, tok, TEXT, seq_len=SEQ, calib=[3], val=[3, 4])
    with pytest.raises(ValueError, match="windows 0 to"):
        tasks.causal_lm(model, tok, TEXT, seq_len=SEQ, calib=1, val=[999])


def test_text_shorter_than_one_window_is_refused():
    with pytest.raises(ValueError, match=r"the text has 5 tokens, shorter than one window of seq_len=16"):
        tasks.causal_lm(build("llama"), tokenizer(), "the quick brown fox jumps", seq_len=SEQ)


def test_tokenizer_larger_than_the_model_vocabulary_is_refused():
    with pytest.raises(ValueError, match=rf"larger than the model's vocab_size {VOCAB}"):
        tasks.causal_lm(build("llama"), tokenizer(extra=50), TEXT, seq_len=SEQ)


def test_smollm2_is_a_builtin_task_name():
    assert "smollm2" in tasks.TASKS and tasks.SIZES["smollm2"] == ("val_size", "calib_size")


# -- every architecture through mixq.run ---------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_runs_with_exclusions_on_every_architecture(name):
    task = make_task(name)
    emb = next(n for n, m in task.model.named_modules() if m is task.model.get_input_embeddings())
    res = mixq.run(task, "uniform", ["w4g16"], exclude=["lm_head"])
    assert "lm_head" not in res.plan.layers and res.metrics.within is None
    floats = res.metrics.float_layers
    assert floats["lm_head.weight"].startswith("excluded (exclude=...)") and emb + ".weight" in floats
    # Counted as float: the lm_head's weights at 32 bits in the average (a tied tensor once).
    sites = mixq.sites(res.model)
    quant = sum(m.weight.numel() for m in sites.values())
    head = task.model.lm_head.weight.numel()
    bits = sum(
        cost.weight_bits(i, res.plan.layers[i.name].weight)
        for i in cost.probe(res.model, task.calib[0], task.forward)
    )
    assert res.metrics.avg_weight_bits == pytest.approx((bits + 32 * head) / (quant + head), rel=1e-12)
    assert -res.metrics.metric == pytest.approx(perplexity_oracle(res.model, task.val), rel=1e-6)
    assert res.metrics.extra["perplexity"] == pytest.approx(-res.metrics.metric)
    high = mixq.run(task, "uniform", ["w8"], exclude=["lm_head"]).metrics.avg_weight_bits
    budget = {"avg_weight_bits": (res.metrics.avg_weight_bits + high) / 2}
    ilp = mixq.run(task, "sensitivity-ilp", ["w4g16", "w8"], budget, exclude=["lm_head"])
    assert ilp.metrics.within == {"avg_weight_bits": True} and "lm_head" not in ilp.plan.layers
    assert res.metrics.avg_weight_bits < ilp.metrics.avg_weight_bits <= budget["avg_weight_bits"]
    with pytest.raises(InfeasibleBudgetError, match="smallest feasible avg_weight_bits is"):
        mixq.run(task, "sensitivity-ilp", ["w4g16", "w8"], {"avg_weight_bits": 4.0}, exclude=["lm_head"])


def test_exclude_pattern_matching_nothing_names_it_and_some_layers():
    with pytest.raises(
        ValueError, match=r"exclude pattern 'decoder\.\*' matches no layer; .*model\.layers\.0"
    ):
        mixq.run(make_task("llama"), "uniform", ["w8"], exclude=["decoder.*"])


def test_infeasible_budget_because_of_exclusions_names_the_smallest():
    task = make_task("qwen2")
    with pytest.raises(InfeasibleBudgetError, match="smallest feasible avg_weight_bits is") as e:
        mixq.run(
            task, "sensitivity-ilp", ["w4", "w8"], {"avg_weight_bits": 5.0}, exclude=["lm_head", "*.mlp.*"]
        )
    # Oracle: every quantized weight at w4 (4 bits + a float32 scale per row), the excluded at 32.
    model = task.model
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    excluded = [m for n, m in linears.items() if n == "lm_head" or ".mlp." in n]
    rest = [m for m in linears.values() if all(m is not x for x in excluded)]
    bits = sum(m.weight.numel() * 4 + 32 * m.weight.shape[0] for m in rest)
    bits += 32 * sum(m.weight.numel() for m in excluded)
    n = sum(m.weight.numel() for m in rest + excluded)
    assert e.value.minimums["avg_weight_bits"] == pytest.approx(bits / n, rel=1e-9)


# -- tied weights --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama-tied", "gemma3", "gpt2"])
def test_a_tied_tensor_has_one_precision_and_is_counted_once(name):
    task = make_task(name)
    emb = next(n for n, m in task.model.named_modules() if m is task.model.get_input_embeddings())
    res = mixq.run(
        task,
        "sensitivity-ilp",
        ["w4g16", "w8"],
        {"avg_weight_bits": 6.0},
        embeddings=True,
        method_args={"objective": "kl"},
    )
    plan = res.plan
    assert plan.layers[emb].weight == plan.layers["lm_head"].weight
    assert plan.meta["tied"] == {emb: "lm_head"}
    # Oracle: each distinct weight tensor once, at its spec.
    infos = cost.probe(res.model, task.calib[0], task.forward)
    by_name = {i.name: i for i in infos}
    assert by_name[emb].tied_to == "lm_head"
    params = {
        id(m.weight): (n, m) for n, m in mixq.sites(res.model).items() if not getattr(m, "transposed", False)
    }
    params.update(
        {
            id(m.float_module.weight): (n, m)
            for n, m in mixq.sites(res.model).items()
            if getattr(m, "transposed", False)
        }
    )
    bits = sum(cost.weight_bits(by_name[n], plan.layers[n].weight) for n, _ in params.values())
    numel = sum(by_name[n].numel for n, _ in params.values())
    assert len(params) == len(infos) - 1
    assert (
        res.metrics.avg_weight_bits == pytest.approx(bits / numel, rel=1e-12)
        and res.metrics.avg_weight_bits <= 6
    )
    fp32 = sum(p.numel() for p in task.model.parameters())  # parameters() lists a tied tensor once
    assert res.metrics.size_bytes / res.metrics.size_ratio == pytest.approx(4 * fp32, rel=1e-12)


def test_tied_sites_at_different_specs_are_refused_by_evaluate():
    task = make_task("llama-tied")
    res = mixq.run(task, "uniform", ["w8"], embeddings=True)
    layers = dict(res.plan.layers)
    layers["model.embed_tokens"] = mixq.plan.parse_candidate("w4g16")
    bad = mixq.Plan(layers, {k: v for k, v in res.plan.meta.items() if k != "tied"})
    with pytest.raises(ValueError, match="share one weight tensor"):
        mixq.evaluate(task, bad)


@pytest.mark.parametrize("name", ["llama-tied", "gpt2"])
def test_packed_export_stores_a_tied_tensor_once_and_ties_it_again(name, tmp_path):
    task = make_task(name)
    res = mixq.run(task, "uniform", ["w4g16"], embeddings=True, exclude=["*.wpe"] if name == "gpt2" else None)
    path = mixq.export.save(res, tmp_path / "m.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    emb = next(n for n, m in task.model.named_modules() if m is task.model.get_input_embeddings())
    assert not [k for k in keys if k.startswith(emb + ".")], keys  # stored once: as lm_head's codes
    assert "lm_head.weight.codes" in keys
    loaded = mixq.export.load(path, model=task.model)
    assert loaded.get_input_embeddings().weight is loaded.lm_head.weight
    ids = task.val[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, res.model(input_ids=ids).logits)
    # Oracle: the same plan without the embedding site stores the float embedding beside the
    # lm_head's codes; the tied file is smaller by that float tensor (less a little metadata).
    kw = {"exclude": ["*.wpe"]} if name == "gpt2" else {}
    untied = mixq.export.save(mixq.run(task, "uniform", ["w4g16"], **kw), tmp_path / "u.safetensors")
    emb_bytes = 4 * task.model.get_input_embeddings().weight.numel()
    assert untied.stat().st_size - emb_bytes < path.stat().st_size < untied.stat().st_size - emb_bytes + 1024


def test_cli_and_recipe_take_exclude(tmp_path):
    from mixq.options import Recipe

    rec = tmp_path / "r.toml"
    rec.write_text('task = "synthetic-mlp"\ncandidates = ["w4"]\nexclude = ["2", "4"]\n')
    r = Recipe.from_toml(rec)
    assert r.options.exclude == ["2", "4"]
    with pytest.raises(ValueError, match="exclude"):
        Recipe.from_dict({"exclude": "lm_head"})
    from mixq.cli import main

    out = tmp_path / "run"
    assert main(["run", "--recipe", str(rec), "--exclude", "0", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["float_layers"]["0.weight"].startswith("excluded")
    # The run rebuilds from its directory with its exclusions (file sizes checked against the plan).
    import mixq.export

    rebuilt, _ = mixq.export.rebuild(out)
    assert rebuilt.metrics.size_bytes == metrics["size_bytes"]
    assert rebuilt.metrics.metric == pytest.approx(metrics["metric"], abs=1e-9)


def test_smollm2_cache_is_read_from_mixq_cache_dir(tmp_path, monkeypatch):
    """A complete cache entry is returned as it is (no GGUF load); an incomplete one is not used."""
    monkeypatch.setenv(llm.CACHE_ENV, str(tmp_path))
    assert llm.cache_dir() == tmp_path
    size = llm._gguf_dir()[1].stat().st_size
    entry = tmp_path / f"smollm2-135m-instruct-fp32-{size}"
    entry.mkdir()
    (entry / "config.json").write_text("{}")
    (entry / "model.safetensors").write_bytes(b"")
    assert llm.smollm2_files() == (entry, False)
