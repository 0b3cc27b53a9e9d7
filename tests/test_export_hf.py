"""Hugging Face checkpoints in the compressed-tensors format: transformers loads what mixq writes.

The oracle is transformers itself: ``AutoModelForCausalLM.from_pretrained`` with the
compressed-tensors package decompresses the checkpoint by its own code, and the logits must
equal mixq's simulated model's.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open

import mixq
from mixq.export import deploy_model, save_hf
from mixq.plan import Plan, parse_candidate
from test_architectures import DECODER, HEADS, make_task, token_batches

MIXED = ["w4g16", "w8", "w3+asym", "w8+tensor", "w4g16+asym", "w2", "w6+asym+tensor"]


@pytest.fixture(scope="module")
def tasks() -> dict[str, mixq.Task]:
    return {arch: make_task(arch) for arch in ("llama", "gemma3")}


def linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def reload_logits(
    res: mixq.Result, task: mixq.Task, path
) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    mixq.export.save(res, path, format="hf")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    x = task.val[0]["input_ids"]
    with torch.no_grad():
        return res.model(input_ids=x).logits, loaded(input_ids=x).logits, loaded


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_uniform_and_mixed_plans_reload_with_the_simulated_logits(arch, tasks, tmp_path):
    task = tasks[arch]
    uniform = mixq.run(task, "uniform", ["w4"])
    names = list(uniform.plan.layers)
    mixed = Plan({n: parse_candidate(MIXED[i % len(MIXED)]) for i, n in enumerate(names)})
    for i, res in enumerate([uniform, mixq.evaluate(task, mixed)]):
        sim, got, loaded = reload_logits(res, task, tmp_path / str(i))
        float_logits = task.model(input_ids=task.val[0]["input_ids"]).logits
        assert not torch.equal(sim, float_logits)  # the plan changes the model
        torch.testing.assert_close(got, sim, rtol=1e-5, atol=1e-5)
        cfg = json.loads((tmp_path / str(i) / "config.json").read_text())["quantization_config"]
        assert cfg["quant_method"] == "compressed-tensors" and cfg["quantization_status"] == "compressed"
        targets = {t for g in cfg["config_groups"].values() for t in g["targets"]}
        assert len(targets) == len(names)  # every quantized layer, each in one group
        weights = [g["weights"] for g in cfg["config_groups"].values()]
        if i == 1:  # per-layer bits and group sizes
            assert {w["num_bits"] for w in weights} == {2, 3, 4, 6, 8}
            assert {w["group_size"] for w in weights} == {None, 16}
            assert {w["strategy"] for w in weights} == {"tensor", "channel", "group"}
        with safe_open(str(tmp_path / str(i) / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
            q = f.get_tensor(f"{names[0]}.weight_packed")
        assert f"{names[0]}.weight" not in keys and q.dtype == torch.int32  # packed codes, not floats
        assert q.numel() * 32 == loaded.get_submodule(names[0]).weight.numel() * 4  # 4 bits (uniform w4)


def test_tied_weights_stay_tied_when_float_and_float_layers_are_ignored(tasks, tmp_path):
    task = tasks["gemma3"]  # embeddings tied to lm_head
    names = [n for n in linear_names(task.model) if n != "lm_head"]
    plan = Plan({n: parse_candidate(["w4g16", "w3+asym"][i % 2]) for i, n in enumerate(names)})
    res = mixq.evaluate(task, plan)
    for i, model in enumerate([res.model, deploy_model(res.model)[0]]):  # wrapped, and deployed (copies)
        out = save_hf(model, tmp_path / str(i))
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
        cfg = json.loads((out / "config.json").read_text())["quantization_config"]
        assert cfg["ignore"] == ["lm_head"]
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in set(f.keys())  # stored once
        x = task.val[0]["input_ids"]
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=x).logits, res.model(input_ids=x).logits)


def test_a_quantized_head_on_a_float_tied_embedding_is_stored_apart(tasks, tmp_path):
    task = tasks["gemma3"]
    res = mixq.run(task, "uniform", ["w4"])
    with pytest.warns(UserWarning, match="stored separately.*embed_tokens.*lm_head"):
        sim, got, loaded = reload_logits(res, task, tmp_path)
    torch.testing.assert_close(got, sim, rtol=1e-5, atol=1e-5)
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("cand", ["w4g16+asym", "w4"])
def test_a_quantized_tied_embedding_reloads_with_the_simulated_logits(cand, tmp_path):
    """embeddings=True on a tied Llama: lm_head's codes, the embedding as the same dequantized values."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**DECODER, **HEADS, tie_word_embeddings=True)
    )
    task = mixq.Task(model.eval(), token_batches(2, 1, False), token_batches(1, 2, False), name="tied-llama")
    res = mixq.run(task, "uniform", [cand], embeddings=True, out=tmp_path / "run")
    assert res.plan.meta["tied"]  # the embedding follows lm_head's spec
    back, _ = mixq.export.rebuild(tmp_path / "run", task=task)  # from the run's packed file
    x = task.val[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(back.model(input_ids=x).logits, res.model(input_ids=x).logits)
    assert back.metrics.size_bytes == res.metrics.size_bytes
    with pytest.warns(UserWarning, match="embed_tokens is tied to the quantized lm_head"):
        sim, got, loaded = reload_logits(res, task, tmp_path / "hf")
    assert torch.equal(got, sim)
    with torch.no_grad():  # the reloaded embedding holds the quantized values, not the float ones
        emb = res.model.model.embed_tokens(task.val[0]["input_ids"])
    assert torch.equal(loaded.model.embed_tokens(task.val[0]["input_ids"]), emb)
    assert not torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert [t for g in cfg["config_groups"].values() for t in g["targets"] if "lm_head" in t]


@pytest.mark.parametrize(
    ("cands", "said"),
    [
        (["w4a8"], "input int8"),
        (["wfp8_e4m3fn"], "weight minifloat fp8_e4m3fn"),
        (["wmxfp4_e2m1"], "weight mx"),
        (["w4g16+fzero"], r"weight w4g16\+fzero: a float zero point \(fzero\)"),
    ],
)
def test_formats_it_cannot_hold_are_refused_naming_the_layers(cands, said, tasks, tmp_path):
    res = mixq.run(tasks["llama"], "uniform", cands)
    with pytest.raises(
        ValueError, match=rf"cannot hold 15 layer\(s\): model\.layers\.0\.self_attn\.q_proj: {said}"
    ):
        mixq.export.save(res, tmp_path / "x", format="hf")
    assert not (tmp_path / "x").exists()  # nothing written


def test_a_model_that_is_not_a_transformers_one_is_refused(tmp_path):
    task = make_task("conv-net")
    res = mixq.run(task, "uniform", ["w8"])
    with pytest.raises(TypeError, match="format 'hf' writes transformers models; got a LibraryConvNet"):
        mixq.export.save(res, tmp_path / "x", format="hf")


def test_save_pretrained_refuses_to_drop_the_quantization(tasks, tmp_path):
    task = tasks["llama"]
    res = mixq.run(task, "uniform", ["w4"])
    with pytest.raises(ValueError, match=r"lose mixq's quantization of 15 layer.*format='hf'.*--format hf"):
        res.model.save_pretrained(tmp_path / "a")
    deployed = deploy_model(res.model)[0]
    with pytest.raises(ValueError, match="--format hf"):
        deployed.save_pretrained(tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # The guarded models still pickle (torch.save of a whole model), and the copy keeps its guard.
    for i, m in enumerate((res.model, deployed)):
        torch.save(m, tmp_path / f"m{i}.pt")
        back = torch.load(tmp_path / f"m{i}.pt", weights_only=False)  # written by this test
        with pytest.raises(ValueError, match="--format hf"):
            back.save_pretrained(tmp_path / f"m{i}")
    plain = mixq.unwrap(mixq.wrap(make_task("llama").model))  # unwrapped: the float model saves as before
    plain.save_pretrained(tmp_path / "c")
    assert (tmp_path / "c" / "config.json").is_file()


def llama_task() -> mixq.Task:
    """The tiny Llama task, importable as ``test_export_hf:llama_task`` (a run can rebuild it)."""
    return make_task("llama")


def test_cli_exports_a_run_directory_as_hf(tmp_path, capsys):
    from mixq import cli

    run_dir = tmp_path / "run"
    res = mixq.run("test_export_hf:llama_task", "uniform", ["w4g16"], out=run_dir)
    assert cli.main(["export", str(run_dir), "--format", "hf"]) == 0  # from the run's packed model
    assert "wrote" in capsys.readouterr().out
    loaded = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "hf").eval()
    x = llama_task().val[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, res.model(input_ids=x).logits)


def test_gptq_dynamic_group_scales_are_the_ones_written(tasks, tmp_path):
    """GPTQ's dynamic groups give a layer scales of its own (not those computed from the float
    weight): the checkpoint holds them, and transformers rebuilds the simulated logits."""
    task = tasks["llama"]
    res = mixq.run(task, "uniform", ["w4g16+asym"], ptq=["gptq"])
    own = {type(m.weight_quant.rounding).__name__ for m in mixq.sites(res.model).values()}
    assert own == {"FixedGrid"}
    sim, got, _ = reload_logits(res, task, tmp_path / "gptq")
    torch.testing.assert_close(got, sim, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cand", ["w3+asym", "w4g16+asym", "w5g32+asym"])
def test_codes_with_zero_points_are_packed_at_their_width(cand, tasks, tmp_path):
    """Asymmetric channel and group weights: codes packed at their width (pack-quantized, not one
    byte each), zero points packed too; unpacked by compressed-tensors' own code they are the
    codes and zero points mixq encodes, and transformers reloads the simulated logits."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from mixq.export.deploy import collect
    from mixq.quant.codes import code_to_int

    task = tasks["llama"]
    res = mixq.run(task, "uniform", [cand])
    sim, got, _ = reload_logits(res, task, tmp_path)
    torch.testing.assert_close(got, sim, rtol=1e-5, atol=1e-5)
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized"
    bits = int(cand[1])
    name = "model.layers.0.mlp.down_proj"
    enc = collect(res.model)[name].weight
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        packed, zp = f.get_tensor(f"{name}.weight_packed"), f.get_tensor(f"{name}.weight_zero_point")
    out, cols = enc.shape
    assert packed.dtype == torch.int32 and packed.numel() * 32 == out * cols * bits  # b bits per code
    half = 1 << (bits - 1)
    v = code_to_int(enc.codes, enc.spec.fmt, enc.spec.symmetric).reshape(enc.shape)
    assert torch.equal(unpack_from_int32(packed, bits, enc.shape).int(), (v - half).int())
    groups = enc.zero.reshape(out, -1)
    assert zp.shape == groups.shape and zp.dtype == torch.int32
    words = -(-out * bits // 32)  # the packed words; the rows after them are zero
    assert not zp[words:].any()
    assert torch.equal(unpack_from_int32(zp, bits, groups.shape, packed_dim=0).int(), (groups - half).int())
