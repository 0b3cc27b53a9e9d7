"""Is the SmolLM2 asset's weight already on a 4-bit grid? Distinct values per group of its weights.

The ``smollm2`` task's fp32 model is dequantized from a Q4_1 GGUF (a scale and a minimum per 32
consecutive weights, 4-bit codes: ``w = min + step * q``, ``q`` in 0..15). For each 2-D weight
this counts the distinct values per group of 32, 64 and 128 consecutive weights of a row, and
the share of groups whose values all lie on the 16-level min/max grid of the group
(``|(w - min) / step - round(.)| < 1e-3`` with ``step = (max - min) / 15``), and for the
embedding also on a symmetric 8-bit grid (``w / (max|w| / 127)`` integral, Q8_0).

Reads the cached safetensors only (no model is built):

    python -m bench.llm_grid     # -> bench/results/llm_grid.json

``--quantizers`` adds (key ``quantizers``) mixq's round-to-nearest weight quantizers on every
2-D weight, read one tensor at a time: per setting, the relative squared error
``||Q(w) - w||^2 / ||w||^2`` and the share of weights ``Q`` leaves unchanged; the summary
counts the block weights each setting reproduces exactly (``+fzero``, the float zero point,
is Q4_1's own grid at w4g32).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from bench.common import RESULTS, provenance, write_rows

NAME = "llm_grid"
GROUPS = (32, 64, 128)


def on_grid(g: torch.Tensor, levels: int) -> torch.Tensor:
    """Per group (rows of ``g``): all values on the ``levels``-level min/max grid of the group."""
    lo, hi = g.min(1, keepdim=True).values, g.max(1, keepdim=True).values
    step = ((hi - lo) / (levels - 1)).clamp_min(1e-30)
    codes = (g - lo) / step
    return (codes - codes.round()).abs().amax(1) < 1e-3


def on_sym8(g: torch.Tensor) -> torch.Tensor:
    """Per group: all values integer multiples of ``max|w| / 127`` (a Q8_0 block)."""
    d = (g.abs().amax(1, keepdim=True) / 127).clamp_min(1e-30)
    codes = g / d
    return (codes - codes.round()).abs().amax(1) < 1e-3


def describe(w: torch.Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {"shape": list(w.shape)}
    for size in GROUPS:
        g = w.double().reshape(-1, size)
        srt = g.sort(1).values
        distinct = (srt[:, 1:] != srt[:, :-1]).sum(1) + 1
        out[f"g{size}"] = {
            "distinct_median": float(distinct.double().median()),
            "distinct_max": int(distinct.max()),
            "on_4bit_minmax_grid": float(on_grid(g, 16).double().mean()),
            "on_8bit_sym_grid": float(on_sym8(g).double().mean()),
        }
    return out


QUANTIZERS = ("w4g32+fzero", "w4g32+asym", "w4g32", "w4g64+fzero", "w4g128+fzero", "w4g128+asym", "w8g32")


def quantizers() -> dict[str, Any]:
    """mixq's RTN quantizers on the asset's weights, one tensor at a time."""
    from safetensors import safe_open

    from mixq import llm
    from mixq.plan import parse_candidate
    from mixq.quant import fake

    t0 = time.perf_counter()
    path, _ = llm.smollm2_files()
    rows: dict[str, Any] = {}
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for k in f.keys():  # noqa: SIM118 - safe_open has keys(), no iteration
            w = f.get_tensor(k).float()
            if w.dim() != 2:
                continue
            rows[k] = {}
            for cand in QUANTIZERS:
                wq = fake.quantize_weight(w, parse_candidate(cand).weight, cache=None)
                d = (wq - w).double()
                rows[k][cand] = {
                    "rel_sq_error": float(d.pow(2).sum() / w.double().pow(2).sum()),
                    "unchanged": float((d == 0).double().mean()),
                }
    blocks = [k for k in rows if ".layers." in k]
    summary = {
        cand: {
            "block_weights_exact": sum(rows[k][cand]["unchanged"] == 1.0 for k in blocks),
            "block_rel_sq_error_mean": sum(rows[k][cand]["rel_sq_error"] for k in blocks) / len(blocks),
            "embedding_rel_sq_error": rows.get("model.embed_tokens.weight", rows.get("lm_head.weight", {}))
            .get(cand, {})
            .get("rel_sq_error"),
        }
        for cand in QUANTIZERS
    }
    return {
        "summary": summary,
        "block_weights": len(blocks),
        "rows": rows,
        "seconds": time.perf_counter() - t0,
        "command": "python -m bench.llm_grid --quantizers",
    }


def main() -> None:
    from safetensors.torch import load_file

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantizers", action="store_true", help="mixq's RTN quantizers on the weights")
    if ap.parse_args().quantizers:
        doc = json.loads((RESULTS / f"{NAME}.json").read_text())
        doc["quantizers"] = quantizers()
        doc["provenance"] = provenance()
        write_rows(NAME, doc)
        print(json.dumps(doc["quantizers"]["summary"], indent=1))
        return

    from mixq import llm

    t0 = time.perf_counter()
    path, _ = llm.smollm2_files()
    sd = load_file(str(path / "model.safetensors"))
    names = [k for k, v in sd.items() if v.dim() == 2]
    rows = {k: describe(sd[k].float()) for k in names}
    blocks = [k for k in names if ".layers." in k]
    summary = {
        f"g{size}": {
            "block_weights": len(blocks),
            "block_weights_all_groups_on_4bit_grid": sum(
                rows[k][f"g{size}"]["on_4bit_minmax_grid"] == 1.0 for k in blocks
            ),
        }
        for size in GROUPS
    }
    doc = {
        "summary": summary,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
        "command": "python -m bench.llm_grid",
        "provenance": provenance(),
    }
    write_rows(NAME, doc)
    for k in [n for n in names if ".layers." not in n] + blocks[:7]:
        print(k, {s: rows[k][s] for s in ("g32", "g128")})
    print(summary)


if __name__ == "__main__":
    main()
