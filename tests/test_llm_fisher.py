"""HAWQ and CLADO on causal LMs: the Fisher trace and the Fisher pair terms.

Oracles: the exact Hessian trace of the token-averaged KL to the float outputs over one layer's
weight (one double-backward Hessian-vector product per basis vector), and the exact mixed second
derivative of that KL along two layers' block-output changes (double back-propagation through
the rest of the model). Tiny random-config Llama models; nothing is downloaded.
"""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import LlamaConfig, LlamaForCausalLM

import mixq
from mixq import tasks, wrap
from mixq.llm import NegPerplexity
from mixq.plan import parse_candidate
from mixq.sensitivity.blockwise import blockwise
from mixq.sensitivity.hessian import fisher_trace_samples, hawq
from mixq.wrap import applied

pytestmark = pytest.mark.filterwarnings("ignore:.*weights stay float")
V = 32
CANDS = ["w3g8", "w4g8"]


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        initializer_range=0.3,
    )
    model = LlamaForCausalLM(cfg).eval()
    windows = [{"input_ids": torch.randint(0, V, (1, 10))} for _ in range(2)]
    labelled = [{**w, "labels": w["input_ids"]} for w in windows]

    def forward(m, b):
        return m(input_ids=b["input_ids"], use_cache=False).logits

    def loss(m, b):
        return F.cross_entropy(forward(m, b)[0, :-1], b["input_ids"][0, 1:])

    task = tasks.Task(  # as tasks.causal_lm makes it: the metric is the negative perplexity
        model=model,
        calib=labelled,
        val=labelled[:1],
        forward=forward,
        loss=loss,
        metric=NegPerplexity(),
        outputs="logits",
    )
    return task, wrap(copy.deepcopy(model)).eval()


def kl_to(fp_logits, logits):
    """The token-averaged KL(p_fp ‖ p), in float64."""
    p = F.log_softmax(fp_logits.double(), -1)
    return (p.exp() * (p - F.log_softmax(logits.double(), -1))).sum(-1).mean()


def exact_kl_trace(q, task, layer, batch) -> float:
    """tr(∂²KL/∂W²) at the float weights, one Hessian-vector product per weight entry."""
    w = q.get_submodule(layer).weight
    with applied(q, {}), torch.no_grad():
        fp = task.forward(q, batch)
    w.requires_grad_(True)
    try:
        with applied(q, {}), torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
            (g,) = torch.autograd.grad(kl_to(fp, task.forward(q, batch)), w, create_graph=True)
            total = 0.0
            flat = g.reshape(-1)
            for i in range(flat.numel()):
                (row,) = torch.autograd.grad(flat[i], w, retain_graph=True)
                total += float(row.reshape(-1)[i])
    finally:
        w.requires_grad_(False)
    return total


def test_fisher_trace_is_the_exact_hessian_trace_of_the_output_kl(lm):
    task, q = lm
    batch = task.calib[0]
    one = dataclasses.replace(task, calib=[batch])
    for layer in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        exact = exact_kl_trace(q, task, layer, batch)
        samples = fisher_trace_samples(q, one, [layer], n_samples=600, seed=0)[layer]
        mean, se = float(samples.mean()), float(samples.std() / len(samples) ** 0.5)
        assert exact > 0 and abs(mean - exact) < 4 * se + 1e-9, (layer, mean, se, exact)
        assert se < 0.15 * exact  # the check above is not vacuous


def test_hawq_fisher_scores_are_trace_per_weight_times_weight_error(lm):
    from mixq.sensitivity.proxies import weight_error

    task, q = lm
    layers = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "lm_head"]
    s = hawq(q, task, layers, CANDS, n_samples=8, estimator="fisher")
    samples = fisher_trace_samples(q, task, layers, n_samples=8, seed=0)
    for i, n in enumerate(layers):
        site = q.get_submodule(n)
        avg = float(samples[n].mean()) / site.weight.numel()
        for j, c in enumerate(CANDS):
            assert float(s.single[i, j]) == pytest.approx(avg * weight_error(site, parse_candidate(c)))
    assert s.meta["estimator"] == "fisher" and torch.isfinite(s.se).all()
    with pytest.raises(ValueError, match="valid: hutchinson, fisher"):
        hawq(q, task, layers, CANDS, estimator="exact")


def test_hawq_method_uses_the_fisher_trace_on_a_causal_lm_only(lm):
    task, _ = lm
    res = mixq.run(task, "hawq", CANDS, budget={"avg_weight_bits": 5.5})
    assert res.sensitivity.meta["estimator"] == "fisher" and res.metrics.avg_weight_bits <= 5.5 + 1e-9
    plain = dataclasses.replace(task, metric=lambda m, bs: 0.0)
    res = mixq.run(
        plain, "hawq", CANDS, budget={"avg_weight_bits": 5.5}, method_args={"hutchinson_samples": 2}
    )
    assert res.sensitivity.meta["estimator"] == "hutchinson"
    with pytest.raises(ValueError, match="trace"):
        mixq.run(task, "hawq", CANDS, budget={}, method_args={"trace": "exact"})


def block_delta(q, task, block, layer, spec, batch):
    """The change of ``block``'s output hidden states when ``layer`` alone is at ``spec``."""
    seen = []
    h = q.get_submodule(block).register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            for plan in ({}, {layer: spec}):
                with applied(q, plan):
                    task.forward(q, batch)
    finally:
        h.remove()
    return seen[1] - seen[0]


def exact_mixed_derivative(q, task, where, batch) -> float:
    """∂²KL/∂a∂b at 0, with ``a·δ_l`` and ``b·δ_m`` added to the outputs of their blocks."""
    with applied(q, {}), torch.no_grad():
        fp = task.forward(q, batch)
    a = torch.zeros((), dtype=torch.float32, requires_grad=True)
    b = torch.zeros((), dtype=torch.float32, requires_grad=True)
    handles = []
    for (block, delta), t in zip(where, (a, b), strict=True):

        def add(m, args, out, delta=delta, t=t):
            return (out[0] + t * delta, *out[1:]) if isinstance(out, tuple) else out + t * delta

        handles.append(q.get_submodule(block).register_forward_hook(add))
    try:
        with applied(q, {}), torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
            (ga,) = torch.autograd.grad(kl_to(fp, task.forward(q, batch)), a, create_graph=True)
            (gab,) = torch.autograd.grad(ga, b)
    finally:
        for h in handles:
            h.remove()
    return float(gab)


@pytest.mark.parametrize(
    "pair",
    [
        ("model.layers.0.self_attn.v_proj", "model.layers.0.mlp.gate_proj"),  # one block
        ("model.layers.0.mlp.gate_proj", "model.layers.1.self_attn.v_proj"),  # two blocks
    ],
)
def test_fisher_pair_terms_are_the_kl_mixed_second_derivative(lm, pair):
    task, q = lm
    layers = [*pair, "lm_head"]
    batch = task.calib[0]
    one = dataclasses.replace(task, calib=[batch])
    s = blockwise(q, one, layers, CANDS, objective="fisher", pairs="all", fisher_samples=1500, min_batches=1)
    blocks = [".".join(n.split(".")[:3]) for n in pair]
    for c, cand in enumerate(CANDS):
        spec = parse_candidate(cand)
        where = [
            (blk, block_delta(q, task, blk, n, spec, batch)) for blk, n in zip(blocks, pair, strict=True)
        ]
        exact = exact_mixed_derivative(q, task, where, batch)
        got = float(s.pairs[0, c, 1, c])
        bound = 2 * float((s.single[0, c] * s.single[1, c]).sqrt())  # Cauchy-Schwarz: |Ω_lm| ≤ this
        assert abs(got - exact) < 0.06 * bound, (cand, got, exact, bound)  # ~4 Monte-Carlo SEs
        assert abs(exact) > 0.15 * bound  # the layers do interact: the check above is not vacuous
    assert torch.equal(s.pairs, s.pairs.permute(2, 3, 0, 1))
    assert (s.pairs[:, :, 2] == 0).all() and (s.pairs[0, :, 0] == 0).all()  # lm_head; a layer with itself
    local = blockwise(
        q, one, layers, CANDS, objective="fisher", pairs="block", fisher_samples=4, min_batches=1
    )
    assert (local.pairs[0, :, 1] != 0).all() == (blocks[0] == blocks[1])
    assert (local.pairs[0, :, 1] == 0).all() == (blocks[0] != blocks[1])


def test_fisher_pairs_need_the_fisher_objective(lm):
    task, q = lm
    with pytest.raises(ValueError, match="needs objective 'fisher'"):
        blockwise(q, task, ["lm_head"], CANDS, objective="kl", pairs="block")
    with pytest.raises(ValueError, match="valid: none, block, all"):
        blockwise(q, task, ["lm_head"], CANDS, objective="fisher", pairs="some")


def test_clado_on_a_causal_lm_uses_block_local_fisher_pairs_and_resumes(lm, tmp_path):
    task, _ = lm
    res = mixq.run(task, "clado", CANDS, budget={"avg_weight_bits": 5.5}, out=tmp_path / "run")
    sens = res.sensitivity
    assert sens.kind == "blockwise" and sens.meta["pairs"] == "block" and sens.pairs is not None
    assert res.metrics.avg_weight_bits <= 5.5 + 1e-9
    i, j = sens.layers.index("model.layers.0.mlp.gate_proj"), sens.layers.index("model.layers.1.mlp.up_proj")
    assert (sens.pairs[i, :, j] == 0).all() and sens.pairs.abs().sum() > 0
    again = mixq.run(task, "clado", CANDS, budget={"avg_weight_bits": 5.5}, out=tmp_path / "run")
    assert again.plan.layers == res.plan.layers
    torch.testing.assert_close(again.sensitivity.pairs, sens.pairs)
    assert "fisher_seconds" in sens.meta and "fisher_seconds" not in again.sensitivity.meta  # all stored
    with pytest.raises(ValueError, match="needs loss='kl'"):
        mixq.run(task, "clado", CANDS, budget={}, method_args={"blockwise": "fisher", "loss": "task"})


def test_psd_repair_of_a_block_diagonal_matrix_keeps_the_blocks():
    """The repairs act per block: equal to the whole-matrix projection, unmeasured pairs exactly 0."""
    import numpy as np

    from mixq.methods.clado import psd_projection, repaired

    rng = np.random.default_rng(0)
    blocks = [rng.normal(size=(k, k)) for k in (3, 1, 4)]
    g = np.zeros((8, 8))
    at = 0
    for b in blocks:
        k = len(b)
        g[at : at + k, at : at + k] = b + b.T
        at += k
    got = repaired(g, "psd")
    np.testing.assert_allclose(got, psd_projection(g), atol=1e-12)  # the whole-matrix projection
    assert np.linalg.eigvalsh(got).min() > -1e-8
    for repair in ("psd", "psd-diag"):
        got = repaired(g, repair)
        assert (got[g == 0] == 0).all() and (got[:3, 3:] == 0).all()
    np.testing.assert_allclose(np.diag(repaired(g, "psd-diag")), np.clip(np.diag(g), 0, None))
