"""Memory of the causal-LM path: the chunked float64 paths give the very same bits.

The perplexity's next-token log-likelihoods and the sensitivity's output KL are computed a few
positions at a time, so no whole float64 copy of a large vocabulary's logits exists. Oracles: the
same formulas on the whole logits at once (what the code computed before), bit for bit, at one and
at two threads, on random logits with awkward sizes and on a tiny random-config Llama.
"""

import pytest
import torch
import torch.nn.functional as F

import mixq
from mixq import llm
from mixq.sensitivity.perturb import OutputKL, kl_rows

transformers = pytest.importorskip("transformers")


def tiny_llama(vocab: int = 300):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def llama_windows(vocab: int, seed: int, n: int, seq: int) -> tuple[torch.nn.Module, list, mixq.Task]:
    """A tiny Llama, ``n`` random token windows of ``seq`` tokens and the causal-LM task on them."""
    model = tiny_llama(vocab=vocab)
    g = torch.Generator().manual_seed(seed)
    wins = [{"input_ids": w, "labels": w} for w in torch.randint(0, vocab, (n, 1, seq), generator=g)]
    task = mixq.Task(
        model=model, calib=wins, val=wins[:1], forward=llm.logits, loss=llm.next_token_loss, outputs="logits"
    )
    return model, wins, task


def whole_nll(logit: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Every position at once: the float64 logits of all positions, one cross-entropy."""
    pred = logit[:, :-1].reshape(-1, logit.shape[-1]).double()
    return F.cross_entropy(pred, ids[:, 1:].reshape(-1), reduction="none").sum()


def whole_kl(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """OutputKL's formula on the whole logits (before chunking)."""
    logq = torch.log_softmax(out.double(), -1)
    logp = torch.log_softmax(ref.double(), -1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


@pytest.fixture(params=[1, 2])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [(1, 130, 3000), (2, 65, 1000), (1, 2, 50), (3, 1, 70)])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_nll_and_kl_equal_the_whole_computation(shape, chunk, threads):
    g = torch.Generator().manual_seed(sum(shape) + chunk)
    logit = torch.randn(shape, generator=g) * 4
    ref = logit + 0.3 * torch.randn(shape, generator=g)
    ids = torch.randint(0, shape[-1], shape[:2], generator=g)
    got, n = llm.token_nll(logit, ids, chunk=chunk)
    assert n == shape[0] * (shape[1] - 1)
    assert torch.equal(got, whole_nll(logit, ids))
    assert torch.equal(llm.token_nll(logit, ids, chunk=None)[0], whole_nll(logit, ids))
    assert torch.equal(kl_rows(ref, logit, chunk).mean(), whole_kl(ref, logit))
    assert torch.equal(kl_rows(ref, logit, None).mean(), whole_kl(ref, logit))


def test_row_chunks_cover_the_rows_in_nearly_equal_parts():
    for rows in range(1, 300, 7):
        for chunk in (1, 5, 64):
            parts = llm.row_chunks(rows, chunk)
            assert parts[0][0] == 0 and parts[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))
            sizes = [j - i for i, j in parts]
            assert max(sizes) <= chunk and max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        llm.token_nll(torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), chunk=0)


def test_perplexity_and_output_kl_of_a_tiny_llama_are_bit_equal(threads):
    model = tiny_llama()
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": w, "labels": w} for w in torch.randint(0, 300, (3, 1, 97), generator=g)]
    metric = llm.NegPerplexity()
    with torch.no_grad():
        logits = [model(input_ids=b["input_ids"]).logits for b in batches]
    total = sum(float(whole_nll(x, b["labels"])) for x, b in zip(logits, batches, strict=True))
    count = sum(b["labels"].shape[1] - 1 for b in batches)
    import math

    assert metric(model, batches) == -math.exp(total / count)
    # the KL of a perturbed model against the float logits, chunked and whole
    other = tiny_llama()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    kl = OutputKL(llm.logits)
    with torch.no_grad():
        for b, ref in zip(batches, logits, strict=True):
            want = whole_kl(ref, other(input_ids=b["input_ids"]).logits)
            assert torch.equal(kl(other, (b, ref)), want)
            assert torch.equal(OutputKL(llm.logits, chunk=None)(other, (b, ref)), want)
            assert float(want) > 0


def test_loss_backward_through_the_chunks():
    """The causal-LM loss (QAT's objective) still differentiates through the chunked path."""
    model = tiny_llama()
    ids = torch.randint(0, 300, (1, 70), generator=torch.Generator().manual_seed(5))
    loss = llm.next_token_loss(model, {"input_ids": ids, "labels": ids})
    loss.backward()
    grad = model.lm_head.weight.grad
    model.zero_grad()
    want = whole_nll(model(input_ids=ids).logits, ids) / 69
    want.float().backward()
    assert torch.allclose(grad, model.lm_head.weight.grad, rtol=1e-5, atol=1e-8)
    assert mixq is not None


def test_a_runs_own_cache_keeps_no_copy_of_the_prepared_model(monkeypatch):
    from mixq import api
    from mixq.cache import Cache

    built = []
    lone = Cache(models=False)
    assert lone.prepared("k", lambda: built.append(1) or "model") == "model"
    assert lone.prepared("k", lambda: built.append(1) or "model") == "model"
    assert len(built) == 2 and lone._prepared is None
    kept = Cache()
    kept.prepared("k", lambda: ["model"])
    assert kept._prepared is not None
    made = []

    def spy(*args, **kwargs):
        made.append(Cache(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(api, "Cache", spy)
    res = mixq.run("synthetic-mlp", "uniform", ["w8a8"])
    assert made and all(c._prepared is None and not c.models for c in made)
    assert res.metrics.metric > 0


@pytest.mark.filterwarnings("ignore:.*weights stay float")
def test_fisher_objective_keeps_no_float_logits_and_measures_the_head_as_before(tmp_path):
    """Block-wise "fisher": the head's scores are the exact KL of whole forwards, as the "kl"
    objective (whose items keep every batch's float logits) measures them, bit for bit; the
    store's data fingerprint is that of the kept logits."""
    import copy

    from mixq import wrap
    from mixq.sensitivity.blockwise import FloatItems, blockwise
    from mixq.sensitivity.perturb import objective_data
    from mixq.store import Store, fingerprint_data

    model, wins, task = llama_windows(vocab=200, seed=7, n=2, seq=24)
    q = wrap(copy.deepcopy(model)).eval()
    cands = ["w3g8", "w4g8"]
    layers = ["model.layers.1.mlp.down_proj", "lm_head"]
    fisher = blockwise(
        q, task, layers, cands, objective="fisher", min_batches=2, store=Store(tmp_path / "s.db")
    )
    kl = blockwise(q, task, layers, cands, objective="kl", min_batches=2)
    assert torch.equal(fisher.single[1], kl.single[1]) and torch.equal(fisher.se[1], kl.se[1])
    assert (fisher.single[0] > 0).all()
    _, items = objective_data(q, task, wins, "kl")
    lazy = FloatItems(q, task, wins)
    assert lazy.rows(need_fingerprint=True) == [24, 24]  # every position's logits
    assert lazy.fingerprint == fingerprint_data(items) == fisher.meta["data_fp"]
    for (b, ref), (b2, ref2) in zip(items, lazy[:], strict=True):
        assert b is b2 and torch.equal(ref, ref2)


@pytest.mark.filterwarnings("ignore:.*weights stay float")
def test_fisher_scores_one_batch_at_a_time_equal_the_all_batches_formula():
    """The block-wise "fisher" singles and pair terms, measured batch by batch, against the
    formula evaluated with every batch's gradients held at once (``fisher_grads``) and every
    block's float inputs from one capture: ``E_s[(g_kbs . delta)^2] / 2N`` per batch."""
    import copy

    from mixq import wrap
    from mixq.blocks import block_arguments, call, capture_inputs, find_blocks, with_hidden
    from mixq.plan import as_layer_spec
    from mixq.sensitivity.blockwise import _Run, blockwise, fisher_grads, hidden_of
    from mixq.wrap import applied

    model, wins, task = llama_windows(vocab=120, seed=11, n=3, seq=20)
    q = wrap(copy.deepcopy(model)).eval()
    cands = ["w3g8", "w4g8+asym"]
    layers = [
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.1.self_attn.o_proj",
    ]
    got = blockwise(
        q, task, layers, cands, objective="fisher", fisher_samples=3, seed=5, min_batches=3, pairs="all"
    )
    names = find_blocks(q).names()
    specs = [as_layer_spec(c) for c in cands]
    with applied(q, {}):
        run = _Run(q, task, names, "fisher", None, [], specs, wins, seed=5, samples=3)
        grads, rows = fisher_grads(run, 3, 5)
        mods = [q.get_submodule(n) for n in names]
        xs = capture_inputs(q, mods[0], wins, llm.logits)
        own = [block_arguments(q, mods, lambda b=b: llm.logits(q, b)) for b in wins]
        want = torch.zeros(len(layers), len(cands), len(wins), dtype=torch.float64)
        for k, block in enumerate(mods):
            refs = [call(block, x) for x in xs]
            for i, layer in enumerate(layers):
                if not layer.startswith(names[k] + "."):
                    continue
                for c, spec in enumerate(specs):
                    with applied(q, {layer: spec}):
                        for b, x in enumerate(xs):
                            d = (hidden_of(call(block, x)) - hidden_of(refs[b])).double()
                            v = (grads[k][b].double() * d).flatten(1).sum(1)
                            want[i, c, b] = float(v.pow(2).mean()) / (2 * rows[b])
            if k + 1 < len(mods):
                xs = [with_hidden(o[k + 1], hidden_of(y)) for o, y in zip(own, refs, strict=True)]
    assert torch.equal(got.single, want.mean(-1))
    assert got.pairs is not None and got.pairs.abs().sum() > 0
