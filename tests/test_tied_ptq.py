"""PTQ steps that choose a rounding (GPTQ, AdaRound) on a tied embedding/lm_head: one tensor, one
rounding, so the packed export of the run stores it once and loads back to the same logits."""

import pytest
import torch

import mixq
from mixq.wrap import sites, tied_sites


def tiny_tied_llama(seed: int = 0) -> mixq.Task:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    assert model.get_input_embeddings().weight is model.lm_head.weight
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (4, 12), generator=g)
    calib = [{"input_ids": ids[i : i + 2]} for i in range(0, 4, 2)]
    return mixq.Task(model, calib, [{"input_ids": torch.randint(0, 96, (2, 12), generator=g)}])


ADAROUND = {"iters": 4, "batch_size": 8, "batches": 1, "keep_better": False}  # learned, even if worse


@pytest.mark.parametrize(("step", "args"), [("gptq", {}), ("adaround", ADAROUND)])
def test_a_tied_tensor_gets_one_rounding_and_the_run_exports(step, args, tmp_path):
    task = tiny_tied_llama()
    res = mixq.run(
        task, "uniform", ["w3g16"], embeddings=True, ptq=[step], ptq_args={step: args}, out=tmp_path
    )
    qs = sites(res.model)
    tied = tied_sites(res.model)
    assert tied == {"model.embed_tokens": "lm_head"}
    emb, head = qs["model.embed_tokens"], qs["lm_head"]
    assert head.weight_quant.rounding is not None  # lm_head's rounding was chosen by the step
    with torch.no_grad():
        wq_emb, wq_head = emb.weight_quant(emb.weight), head.weight_quant(head.weight)
        rtn = mixq.quant.fake.quantize_weight(head.weight, head.weight_quant.spec, None)
    assert not torch.equal(wq_head, rtn)  # the chosen rounding is not round-to-nearest ...
    assert torch.equal(wq_emb, wq_head)  # ... and the embedding has the very same one
    path = tmp_path / "model.safetensors"
    assert path.exists()  # the packed export accepted the tied tensor
    loaded = mixq.export.load(path, model=task.model)
    ids = task.val[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, res.model(input_ids=ids).logits)
