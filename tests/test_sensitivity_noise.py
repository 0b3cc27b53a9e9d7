"""Error bars of the sensitivities, the KL objective on a causal LM, and block-wise measurement.

Oracles: standard errors recomputed by hand from per-batch losses of plain forward passes, a
direct KL computation, and full-model passes with hooks for the block-local objective.
"""

import copy
import dataclasses
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from mixq import tasks, wrap
from mixq.plan import parse_candidate
from mixq.sensitivity import Sensitivity, hawq, measured, pairwise
from mixq.sensitivity.blockwise import blockwise, find_blocks
from mixq.sensitivity.hessian import hutchinson_samples
from mixq.wrap import applied, sites

CANDS = ["w2", "w4", "w8"]
pytestmark = pytest.mark.filterwarnings("ignore:.*weights stay float")


def hand_se(values: list[float]) -> float:
    """The standard error of the mean, written out: sqrt(sum((x - mean)^2) / (n - 1) / n)."""
    n = len(values)
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def plain_losses(q, task, plan) -> list[float]:
    with applied(q, plan), torch.inference_mode():
        return [float(task.loss(q, b)) for b in task.calib]


class NoisyLinear(nn.Linear):
    """A Linear whose output moves by ``scale·‖W − W₀‖·ε(x)``: quantization noise that depends
    on the batch (ε is a fixed function of the input), so its per-batch loss changes scatter."""

    def __init__(self, *args, scale: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = scale
        self.register_buffer("w0", self.weight.detach().clone())

    def forward(self, x):
        if not self.scale:
            return F.linear(x, self.weight, self.bias)
        gen = torch.Generator().manual_seed(int(x.abs().sum() * 1e4) % (2**31))
        eps = torch.randn(x.shape[0], self.out_features, generator=gen)
        return F.linear(x, self.weight, self.bias) + self.scale * (self.weight - self.w0).norm() * eps


def mlp_task(scale: float = 0.0, n_batches: int = 6):
    torch.manual_seed(0)
    model = nn.Sequential(NoisyLinear(8, 16, scale=scale), nn.Tanh(), nn.Linear(16, 4)).eval()
    x, y = torch.randn(16 * n_batches, 8), torch.randint(0, 4, (16 * n_batches,))
    calib = [(x[i : i + 16], y[i : i + 16]) for i in range(0, len(x), 16)]
    task = tasks.Task(model=model, calib=calib, val=calib[:1])
    return task, wrap(copy.deepcopy(model)).eval()


def test_measured_se_equals_hand_computed_se_of_per_batch_changes():
    task, q = mlp_task()
    s = measured(q, task, ["0", "2"], CANDS, objective="loss", progress=False, min_batches=1)
    fp = plain_losses(q, task, {})
    for i, layer in enumerate(["0", "2"]):
        for j, c in enumerate(CANDS):
            d = [a - b for a, b in zip(plain_losses(q, task, {layer: parse_candidate(c)}), fp, strict=True)]
            assert float(s.single[i, j]) == pytest.approx(sum(d) / len(d), rel=1e-9, abs=1e-12)
            assert float(s.se[i, j]) == pytest.approx(hand_se(d), rel=1e-6, abs=1e-12)
    assert s.error("0", "w2") == float(s.se[0, 0])


def test_split_batches_keep_the_scores_and_give_the_parts_spread():
    task, q = mlp_task(n_batches=2)
    whole = measured(q, task, ["0"], CANDS, objective="loss", progress=False, min_batches=1)
    split = measured(q, task, ["0"], CANDS, objective="loss", progress=False)  # 8 parts of 4
    assert whole.meta["batches"] == 2 and split.meta["batches"] == 8
    torch.testing.assert_close(split.single, whole.single, rtol=0, atol=1e-6)  # float32 losses
    parts = [(x[i : i + 4], y[i : i + 4]) for x, y in task.calib for i in range(0, 16, 4)]
    ptask = tasks.Task(model=task.model, calib=parts, val=task.val)
    d = [
        a - b
        for a, b in zip(
            plain_losses(q, ptask, {"0": parse_candidate("w2")}), plain_losses(q, ptask, {}), strict=True
        )
    ]
    assert float(split.se[0, 0]) == pytest.approx(hand_se(d), rel=1e-6)


def test_injected_noise_gives_a_larger_se():
    (task, q), (noisy_task, noisy_q) = mlp_task(0.0), mlp_task(3.0)
    clean = measured(q, task, ["0"], CANDS, objective="loss", progress=False)
    noisy = measured(noisy_q, noisy_task, ["0"], CANDS, objective="loss", progress=False)
    # w2 and w4 move the weight, so the injected term scatters the per-batch changes
    assert (noisy.se[0, :2] > 3 * clean.se[0, :2]).all()


def test_one_batch_gives_unknown_se_and_table_round_trips(tmp_path, caplog):
    task, q = mlp_task()
    one = task.calib[:1]
    with caplog.at_level(logging.WARNING):
        s = measured(q, task, ["0", "2"], CANDS, batches=one, objective="loss", progress=False, min_batches=1)
    assert torch.isnan(s.se).all()
    assert "measured on 1 batch(es): its standard errors are unknown" in caplog.text
    s2 = pairwise(q, task, ["0", "2"], CANDS, progress=False)
    s2.save(tmp_path / "s.safetensors")
    back = Sensitivity.load(tmp_path / "s.safetensors")
    torch.testing.assert_close(back.se, s2.se)
    torch.testing.assert_close(back.pairs_se, s2.pairs_se)


def test_pairwise_se_equals_hand_computed_se_of_per_batch_terms():
    task, q = mlp_task()
    s = pairwise(q, task, ["0", "2"], CANDS, progress=False, min_batches=1)
    fp = plain_losses(q, task, {})
    for j, c in enumerate(CANDS):
        for jj, cc in enumerate(CANDS):
            a = plain_losses(q, task, {"0": parse_candidate(c)})
            b = plain_losses(q, task, {"2": parse_candidate(cc)})
            ab = plain_losses(q, task, {"0": parse_candidate(c), "2": parse_candidate(cc)})
            omega = [w - x - y + z for w, x, y, z in zip(ab, a, b, fp, strict=True)]
            assert float(s.pairs[0, j, 1, jj]) == pytest.approx(sum(omega) / len(omega), abs=1e-9)
            assert float(s.pairs_se[0, j, 1, jj]) == pytest.approx(hand_se(omega), rel=1e-4, abs=1e-9)
            assert float(s.pairs_se[1, jj, 0, j]) == float(s.pairs_se[0, j, 1, jj])
        d = [x - z for x, z in zip(plain_losses(q, task, {"0": parse_candidate(c)}), fp, strict=True)]
        assert float(s.se[0, j]) == pytest.approx(hand_se(d), rel=1e-4, abs=1e-9)


def test_hawq_se_from_hutchinson_samples():
    task, q = mlp_task()
    samples = hutchinson_samples(q, task, ["0", "2"], n_samples=8, seed=1)
    s = hawq(q, task, ["0", "2"], CANDS, n_samples=8, seed=1)
    assert samples["0"].numel() == 8 * len(task.calib)
    for i, layer in enumerate(["0", "2"]):
        vals = samples[layer].tolist()
        assert s.meta["trace"][layer] == pytest.approx(sum(vals) / len(vals))
        assert s.meta["trace_se"][layer] == pytest.approx(hand_se(vals), rel=1e-9)
        ratio = s.se[i] / s.single[i]  # the weight error cancels: se/score = trace_se/trace
        torch.testing.assert_close(ratio, torch.full_like(ratio, hand_se(vals) / (sum(vals) / len(vals))))


def test_hawq_clamps_negative_traces_with_a_warning(caplog):
    """A loss with negative curvature (−‖f(x)‖²) has negative Hessian traces."""
    task, q = mlp_task()
    neg = tasks.Task(
        model=task.model, calib=task.calib, val=task.val, loss=lambda m, b: -(m(b[0]) ** 2).sum()
    )
    with caplog.at_level(logging.WARNING):
        s = hawq(q, neg, ["0", "2"], CANDS, n_samples=4)
    assert s.meta["trace"]["2"] < 0 and "2" in s.meta["clamped"]
    assert (s.single[1] == 0).all()
    assert "clamped at 0" in caplog.text and "2 (" in caplog.text


def test_scores_negative_beyond_noise_are_reported(caplog):
    """A loss that rewards moving away from the float outputs: every change is negative."""
    task, q = mlp_task()
    fp_model = task.model
    gain = tasks.Task(
        model=task.model,
        calib=task.calib,
        val=task.val,
        loss=lambda m, b: -((m(b[0]) - fp_model(b[0])) ** 2).mean(),
    )
    with caplog.at_level(logging.WARNING):
        s = measured(q, gain, ["0", "2"], CANDS, objective="loss", progress=False)
    hits = {(h["layer"], h["candidate"]) for h in s.meta["below_noise"]}
    assert ("0", "w2") in hits and ("2", "w2") in hits
    assert all(h["score"] < -2 * h["se"] for h in s.meta["below_noise"])
    assert "negative beyond noise" in caplog.text
    table = Sensitivity(["a"], ["w4"], torch.tensor([[-1.0]]), "measured", se=torch.tensor([[0.6]]))
    assert table.below_noise() == [] and len(table.below_noise(k=1.0)) == 1


# -- a tiny causal LM ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        initializer_range=0.3,  # peaked output distributions: KLs far above float32 rounding
    )
    model = LlamaForCausalLM(cfg).eval()
    windows = [{"input_ids": torch.randint(0, 64, (2, 12))} for _ in range(4)]

    def forward(m, b):
        return m(input_ids=b["input_ids"], use_cache=False).logits

    def loss(m, b):
        logits = forward(m, b)
        return F.cross_entropy(logits[:, :-1].reshape(-1, 64), b["input_ids"][:, 1:].reshape(-1))

    task = tasks.Task(
        model=model, calib=windows, val=windows[:1], forward=forward, loss=loss, outputs="logits"
    )
    return task, wrap(copy.deepcopy(model)).eval()


LM_CANDS = ["w2g8", "w4g8"]


def direct_kl(q, task, plan) -> list[float]:
    """KL(p_fp ‖ p_q) per window, averaged over tokens, written with F.kl_div."""
    out = []
    with torch.inference_mode():
        for b in task.calib:
            with applied(q, {}):
                p = F.log_softmax(task.forward(q, b).double(), -1)
            with applied(q, plan):
                lq = F.log_softmax(task.forward(q, b).double(), -1)
            out.append(float(F.kl_div(lq, p, log_target=True, reduction="none").sum(-1).mean()))
    return out


def test_kl_objective_equals_direct_kl_on_a_causal_lm(llama):
    task, q = llama
    layers = ["model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj", "lm_head"]
    s = measured(q, task, layers, LM_CANDS, objective="kl", progress=False, min_batches=1)
    for i, layer in enumerate(layers):
        for j, c in enumerate(LM_CANDS):
            kl = direct_kl(q, task, {layer: parse_candidate(c)})
            assert float(s.single[i, j]) == pytest.approx(sum(kl) / len(kl), rel=1e-6)
            assert float(s.se[i, j]) == pytest.approx(hand_se(kl), rel=1e-4)
    assert s.meta["batches"] == 4 and s.meta["below_noise"] == []


def test_blockwise_kl_equals_full_model_kl(llama):
    task, q = llama
    assert find_blocks(q) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    layers = list(sites(q))
    full = measured(q, task, layers, LM_CANDS, objective="kl", progress=False)
    blk = blockwise(q, task, layers, LM_CANDS, objective="kl")
    torch.testing.assert_close(blk.single, full.single, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(blk.se, full.se, rtol=1e-4, atol=1e-9)
    assert blk.meta["peak_activation_bytes"] > 0


def test_blockwise_mse_equals_block_output_mse_of_full_passes(llama):
    task, q = llama
    layers = [
        "model.layers.0.self_attn.k_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.2.self_attn.o_proj",
    ]
    blk = blockwise(q, task, layers, LM_CANDS, objective="mse", min_batches=1)
    for i, layer in enumerate(layers):
        for j, vals in enumerate(full_block_mses(q, task, layer)):
            assert float(blk.single[i, j]) == pytest.approx(sum(vals) / len(vals), rel=1e-4)
            assert float(blk.se[i, j]) == pytest.approx(hand_se(vals), rel=1e-3)


def test_blockwise_refuses_models_without_blocks():
    task, q = mlp_task()
    with pytest.raises(ValueError, match="no repeated blocks"):
        blockwise(q, task, ["0"], CANDS)
    with pytest.raises(ValueError, match="valid: kl, mse"):
        blockwise(q, task, ["0"], CANDS, objective="l2")


def full_block_output(q, task, block, batch, plan):
    seen = []
    handle = block.register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with applied(q, plan), torch.inference_mode():
            task.forward(q, batch)
    finally:
        handle.remove()
    return seen[0]


def full_block_mses(q, task, layer) -> list[list[float]]:
    """Per candidate, per batch: the MSE of the layer's block output between full passes with the
    layer at that candidate and float."""
    block = q.get_submodule(".".join(layer.split(".")[:3]))
    out = []
    for c in LM_CANDS:
        vals = []
        for b in task.calib:
            ref = full_block_output(q, task, block, b, {})
            got = full_block_output(q, task, block, b, {layer: parse_candidate(c)})
            vals.append(float((got.double() - ref.double()).pow(2).mean()))
        out.append(vals)
    return out


def test_block_local_pairs_equal_all_pairs_within_blocks_and_zero_across(llama):
    task, q = llama
    layers = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.v_proj",
        "lm_head",
    ]
    full = pairwise(q, task, layers, LM_CANDS, progress=False, min_batches=1)
    local = pairwise(q, task, layers, LM_CANDS, progress=False, min_batches=1, blocks=tuple(find_blocks(q)))
    torch.testing.assert_close(local.single, full.single)
    torch.testing.assert_close(local.pairs[0, :, 1], full.pairs[0, :, 1], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(local.pairs_se[1, :, 0], full.pairs_se[1, :, 0], rtol=1e-4, atol=1e-9)
    assert full.pairs[0, :, 2].abs().sum() > 0 and full.pairs[2, :, 3].abs().sum() > 0
    for a, b in [(0, 2), (1, 2), (0, 3), (2, 3)]:
        assert (local.pairs[a, :, b] == 0).all() and (local.pairs[b, :, a] == 0).all()
    assert local.meta["pair_evals"] < full.meta["pair_evals"]


def test_sensitivity_ilp_measures_a_causal_lm_block_by_block(llama):
    import mixq
    from mixq.llm import NegPerplexity

    task, _ = llama

    def labelled(batches):
        return [{**b, "labels": b["input_ids"]} for b in batches]

    lm = dataclasses.replace(  # as tasks.causal_lm makes it
        task, calib=labelled(task.calib), val=labelled(task.val), metric=NegPerplexity(), metric_name="metric"
    )
    res = mixq.run(lm, "sensitivity-ilp", LM_CANDS, budget={"avg_weight_bits": 4.0})
    assert res.sensitivity.kind == "blockwise" and res.sensitivity.meta["objective"] == "fisher"
    assert res.sensitivity.se is not None and torch.isfinite(res.sensitivity.se).all()
    # Another task on the same blocks keeps full forwards unless asked ("auto" is for LMs).
    res = mixq.run(task, "sensitivity-ilp", LM_CANDS, budget={"avg_weight_bits": 4.0})
    assert res.sensitivity.kind == "measured"


def test_fisher_objective_ranks_like_the_measured_kl(llama):
    """The second-order estimate from one block forward agrees with the measured KL: same order,
    same scale; a layer outside the blocks (lm_head) gets the exact KL."""
    from scipy.stats import spearmanr

    task, q = llama
    layers = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.gate_proj",
        "model.layers.1.self_attn.o_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.2.self_attn.v_proj",
        "model.layers.2.mlp.up_proj",
        "lm_head",
    ]
    cands = ["w2g8", "w4g8", "w8g8"]
    kl = blockwise(q, task, layers, cands, objective="kl", min_batches=1)
    fi = blockwise(q, task, layers, cands, objective="fisher", fisher_samples=16, min_batches=1)
    torch.testing.assert_close(fi.single[-1], kl.single[-1])
    assert spearmanr(fi.single[:-1].flatten(), kl.single[:-1].flatten()).statistic > 0.9
    ratio = fi.single[:-1, 1:] / kl.single[:-1, 1:]  # 4 and 8 bits: small changes
    assert 0.5 < float(ratio.median()) < 2.0
    assert fi.meta["fisher_samples"] == 16 and torch.isfinite(fi.se).all()


def test_blockwise_gives_each_block_its_own_mask_and_no_cache():
    """Gemma-3 alternates sliding-window and full-attention blocks, each with its own mask and
    position embeddings, and its forward passes a key-value cache object: every block is run on
    its own captured arguments, with no cache (a shared one would grow with each re-run)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * 2,
        max_position_embeddings=64,
    )
    model = Gemma3ForCausalLM(cfg).eval()
    windows = [{"input_ids": torch.randint(0, 64, (1, 12))} for _ in range(2)]

    def forward(m, b):
        return m(input_ids=b["input_ids"]).logits  # the model's default: a cache is passed

    task = tasks.Task(
        model=model, calib=windows, val=windows[:1], forward=forward, loss=lambda m, b: forward(m, b).mean()
    )
    q = wrap(copy.deepcopy(model)).eval()
    layers = [
        "model.layers.1.self_attn.q_proj",
        "model.layers.2.mlp.up_proj",
        "model.layers.3.self_attn.o_proj",
    ]
    blk = blockwise(q, task, layers, LM_CANDS, objective="mse", min_batches=1)
    for i, layer in enumerate(layers):
        for j, vals in enumerate(full_block_mses(q, task, layer)):
            assert float(blk.single[i, j]) == pytest.approx(sum(vals) / len(vals), rel=1e-4)
