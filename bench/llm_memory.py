"""Where the memory of a SmolLM2 ``mixq.run`` goes: the peak resident memory of each stage.

One process runs the ``smollm2`` task's mixed plan (sensitivity-ilp at 4.25 average bits, the
candidates of ``bench.llm``, GPTQ at each layer's own bits) and records, for every stage, the
resident memory when it began and its peak (``VmHWM`` of /proc/self/status, reset by writing 5
to /proc/self/clear_refs when a stage begins; an enclosing stage's peak is the largest of its own
and its inner stages'). The stages are mixq's own functions, wrapped here in this process only:

* ``load``: the task (the fp32 model from its safetensors cache, the tokenizer, the windows);
* ``fp metric``: the float model's perplexity on the validation windows;
* ``prepare``: the model copied, wrapped and probed (``mixq.api.prepare``);
* ``sensitivity`` (``sensitivity.blockwise``), inside it ``float logits`` (the float model's
  logits kept for the KL, or their pass when they are not kept), ``fisher gradients`` (the sampled
  gradients at every block's output; ``one batch's gradients`` each batch's),
  ``block stream`` (each layer and candidate on one block) and ``outside blocks`` (lm_head: the
  KL of whole forwards);
* ``ilp``; ``apply`` (the plan on the wrapped model);
* ``gptq`` (``mixq.ptq.apply_ptq``), inside it ``gptq block`` (one block's layers: Hessians and
  column updates) and ``gptq outside`` (lm_head);
* ``evaluation`` (``mixq.api.measure``: the quantized model's perplexity).

Beside each peak the bound of the causal-LM issue: the model's parameters (a tied tensor once)
+ two blocks' activations (the hidden states entering a block, for every calibration window)
+ one layer's statistics (the largest GPTQ Hessian, ``k x k`` float32), above the resident memory
of the process before the model was loaded (Python, torch, transformers).

    OMP_NUM_THREADS=2 python -m bench.llm_memory --label after
    OMP_NUM_THREADS=2 python -m bench.llm_memory --label before   # on the commit before the fixes

writes the label's row to bench/results/llm_memory.json (resumable: a label there is skipped
unless ``--redo``). Every stage gets the issue's bound beside its peak (``bound_mb``: the
runtime + model + two blocks' activations + one layer's statistics; ``over_bound_mb``: its peak
above it);

    python -m bench.llm_memory --report

writes those into the rows already there and prints the stages of every row side by side.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from typing import Any

from bench.common import RESULTS, provenance, write_rows

NAME = "llm_memory"
ROW = "mixed/sensitivity-ilp/4.25/gptq"


def status_kb(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> None:
    """Reset VmHWM to the current resident memory (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Stages:
    """Per-stage peak resident memory: stages nest; each keeps the largest VmHWM seen while open."""

    def __init__(self) -> None:
        self.open: list[dict[str, Any]] = []
        self.done: dict[str, dict[str, Any]] = {}

    def _flush(self) -> None:
        hwm = status_kb("VmHWM")
        for st in self.open:
            st["peak_kb"] = max(st["peak_kb"], hwm)

    def enter(self, name: str) -> None:
        self._flush()
        path = "/".join([s["name"] for s in self.open] + [name])
        rss = status_kb("VmRSS")
        reset_peak()
        self.open.append(
            {"name": name, "path": path, "start_kb": rss, "peak_kb": rss, "t0": time.perf_counter()}
        )

    def exit(self) -> None:
        self._flush()
        st = self.open.pop()
        rec = self.done.setdefault(
            st["path"], {"calls": 0, "seconds": 0.0, "start_mb": st["start_kb"] / 1024, "peak_mb": 0.0}
        )
        rec["calls"] += 1
        rec["seconds"] += time.perf_counter() - st["t0"]
        rec["peak_mb"] = max(rec["peak_mb"], st["peak_kb"] / 1024)
        rec["end_mb"] = status_kb("VmRSS") / 1024
        reset_peak()

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        """Make ``owner.attr`` (a function) a stage of this name."""
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def staged(*args: Any, **kwargs: Any) -> Any:
            self.enter(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.exit()

        setattr(owner, attr, staged)


def install(stages: Stages) -> None:
    """Wrap mixq's stage functions (in this process)."""
    import mixq
    from mixq import api, ptq
    from mixq.methods import sensitivity_ilp
    from mixq.ptq import gptq

    bw = sys.modules["mixq.sensitivity.blockwise"]
    stages.wrap(mixq.tasks, "get", "load")
    stages.wrap(api, "prepare", "prepare")
    stages.wrap(mixq.sensitivity, "blockwise", "sensitivity")
    stages.wrap(bw, "objective_data", "float logits")
    stages.wrap(bw, "fisher_grads", "fisher gradients")
    stages.wrap(bw, "_batch_grads", "one batch's gradients")
    if hasattr(bw, "FloatItems"):  # the float logits' pass when they are not kept
        stages.wrap(bw.FloatItems, "rows", "float logits")
    stages.wrap(bw, "_stream", "block stream")
    stages.wrap(bw, "_full_losses", "outside blocks")
    stages.wrap(sensitivity_ilp, "solve", "ilp")
    stages.wrap(api, "apply", "apply")
    stages.wrap(ptq, "apply_ptq", "ptq")
    stages.wrap(gptq, "_sequential", "gptq layers")
    stages.wrap(api, "measure", "evaluation")


def bound(task: Any) -> dict[str, float]:
    """The issue's bound, in MB: parameters (tied once) + 2 blocks' inputs + the largest Hessian."""
    from torch import nn

    from mixq import blocks as blk

    model = task.model
    params = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    found = blk.find_blocks(model)
    hidden = getattr(model.config, "hidden_size", None)
    tokens = sum(int(b["input_ids"].numel()) for b in task.calib)
    act = tokens * hidden * 4 if hidden and found is not None else 0
    k = max(m.in_features for m in model.modules() if isinstance(m, nn.Linear))
    mb = 2.0**20
    return {
        "model_mb": sum(params.values()) / mb,
        "block_activations_mb": act / mb,
        "layer_statistics_mb": k * k * 4 / mb,
        "bound_mb": (sum(params.values()) + 2 * act + k * k * 4) / mb,
    }


def measure_once() -> dict[str, Any]:
    import torch

    import mixq
    from bench import llm

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import transformers  # noqa: F401  (the runtime's memory, before any model)

    base_mb = status_kb("VmRSS") / 1024
    stages = Stages()
    install(stages)
    row = llm.rows()[ROW]
    t0 = time.perf_counter()
    task = mixq.tasks.get("smollm2")
    stages.enter("fp metric")
    fp = task.fp_metric()
    stages.exit()
    stages.enter("run")
    res = mixq.run(
        task, row["method"], row["candidates"], row["budget"], ptq=row["ptq"], embeddings=row["embeddings"]
    )
    stages.exit()
    b = bound(task)
    out = {
        "row": ROW,
        "perplexity": res.metrics.extra.get("perplexity"),
        "fp_perplexity": -fp,
        "avg_weight_bits": res.metrics.avg_weight_bits,
        "runtime_mb": base_mb,
        **b,
        "bound_with_runtime_mb": base_mb + b["bound_mb"],
        "peak_mb": status_kb("VmHWM") / 1024,
        "ru_maxrss_mb": __import__("resource").getrusage(0).ru_maxrss / 1024,
        "stages": stages.done,
        "seconds": time.perf_counter() - t0,
    }
    return out


def annotate(doc: dict[str, Any]) -> dict[str, Any]:
    """Put the row's bound (with the runtime) and each stage's peak above it next to every stage."""
    for rec in doc["rows"].values():
        limit = rec["bound_with_runtime_mb"]
        # VmHWM is reset as each stage begins: the process's peak is the largest stage peak
        rec["stage_peak_mb"] = max(st["peak_mb"] for st in rec["stages"].values())
        for st in rec["stages"].values():
            st["bound_mb"] = limit
            st["over_bound_mb"] = st["peak_mb"] - limit
    return doc


def report(doc: dict[str, Any]) -> None:
    """Print every stage's peak per row, with the bound."""
    labels = list(doc["rows"])
    names = list(dict.fromkeys(n for rec in doc["rows"].values() for n in rec["stages"]))
    print(f"{'stage':58s}" + "".join(f"{lb + ' peak MB':>18s}" for lb in labels))
    for n in names:
        cells = [doc["rows"][lb]["stages"].get(n) for lb in labels]
        print(f"{n:58s}" + "".join(f"{c['peak_mb']:18.0f}" if c else f"{'-':>18s}" for c in cells))
    for lb in labels:
        rec = doc["rows"][lb]
        print(
            f"{lb}: peak {rec['stage_peak_mb']:.0f} MB, bound {rec['bound_with_runtime_mb']:.0f} MB "
            f"(runtime {rec['runtime_mb']:.0f} + model {rec['model_mb']:.0f} + 2 x blocks "
            f"{rec['block_activations_mb']:.1f} + layer {rec['layer_statistics_mb']:.1f}), "
            f"perplexity {rec['perplexity']:.3f}, {rec['seconds']:.0f} s"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", help="the row's name in the results (e.g. before, after)")
    ap.add_argument("--report", action="store_true", help="annotate the rows with the bound; print them")
    ap.add_argument("--redo", action="store_true", help="measure a label already in the results again")
    args = ap.parse_args()
    path = RESULTS / f"{NAME}.json"
    doc = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    if args.report:
        write_rows(NAME, annotate(doc))
        report(doc)
        return
    if not args.label:
        ap.error("--label is required (or --report)")
    if args.label in doc["rows"] and not args.redo:
        print(f"{args.label}: already in {path} (--redo to measure again)")
        return
    rec = measure_once()
    rec["command"] = (
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python -m bench.llm_memory "
        + " ".join(sys.argv[1:])
    )
    doc = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    doc["rows"][args.label] = rec
    doc["provenance"] = provenance()
    write_rows(NAME, annotate(doc))
    print(json.dumps({k: v for k, v in rec.items() if k != "stages"}, indent=1))
    for name, st in rec["stages"].items():
        print(f"{name:50s} start {st['start_mb']:8.0f}  peak {st['peak_mb']:8.0f}  {st['seconds']:7.1f} s")


if __name__ == "__main__":
    main()
