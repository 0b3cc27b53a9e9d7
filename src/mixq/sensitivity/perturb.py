"""Measured sensitivity: the loss change of quantizing one layer alone (CLADO's singles).

``single[l, c] = L_D(layer l at candidate c, every other layer float) − L_D(float)``, the mean
task loss over the batches ``D`` (docs/methods.md §3.2; CLADO's forward-only single terms). Each
(layer, candidate) loss is one job, and so is the float loss, run through an executor and
kept in a result store, so an interrupted measurement resumes where it stopped.

Error bars. A job keeps the loss of every batch, so each score is the mean of the per-batch
differences ``d_b = L_b(l at c) − L_b(fp)`` (paired: the batch-to-batch spread of the loss
itself cancels) and its standard error ``s(d)/√B`` goes into ``Sensitivity.se``. A score below
``−2·se`` (the layer "works better quantized" beyond noise) is logged as a warning and listed in
``meta["below_noise"]``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mixq.executor import Executor, InProcessExecutor, Job
from mixq.plan import LayerSpec, as_layer_spec, parse_candidate
from mixq.sensitivity.proxies import check_layers
from mixq.sensitivity.table import Sensitivity, mean_se, options_of
from mixq.store import Store, fingerprint_data, fingerprint_model
from mixq.tasks import Task, logits_of
from mixq.wrap import applied, sites

log = logging.getLogger(__name__)

FP_KEY = "measured/fp"


@dataclass(frozen=True)
class LossContext:
    """What every loss job shares: the wrapped model, the loss and the batches."""

    qmodel: nn.Module
    loss: Callable[[nn.Module, Any], torch.Tensor]
    batches: Sequence[Any]


OBJECTIVES = ("loss", "kl")


KL_CHUNK_ROWS = 64  # rows whose float64 log-probabilities exist at once


@dataclass(frozen=True)
class OutputKL:
    """``KL(softmax(fp) ‖ softmax(q))`` of a classifier's logits on ``(batch, fp_logits)`` items.

    The logits are :func:`mixq.tasks.logits_of` the forward's output (a tensor, a ``ModelOutput``).

    Never negative, zero for the float model, and sensitive to changes the task loss misses:
    on a model that fits its calibration data, quantization noise can lower the cross-entropy
    by chance (a negative "sensitivity"), while it always moves the output distribution.

    The float64 log-probabilities are computed ``chunk`` rows (all axes but the last) at a
    time (None: all at once): the rows' divergences are bit for bit the same either way, and a
    causal LM's large vocabulary never has whole float64 copies of its logits (SmolLM2: 256
    positions x 49,152 x 8 B = 100 MB each, four of them).
    """

    forward: Callable[[nn.Module, Any], torch.Tensor]
    chunk: int | None = KL_CHUNK_ROWS

    def __call__(self, model: nn.Module, item: tuple[Any, torch.Tensor]) -> torch.Tensor:
        batch, ref = item
        return kl_rows(ref, logits_of(self.forward(model, batch)), self.chunk).mean()


def kl_rows(ref: torch.Tensor, out: torch.Tensor, chunk: int | None = KL_CHUNK_ROWS) -> torch.Tensor:
    """``KL(softmax(ref) ‖ softmax(out))`` per row (float64, the shape of all axes but the last)."""
    from mixq.llm import row_chunks

    if ref.shape != out.shape:
        raise ValueError(f"the float logits {tuple(ref.shape)} and the model's {tuple(out.shape)} differ")
    shape, vocab = ref.shape[:-1], ref.shape[-1]
    r, o = ref.reshape(-1, vocab), out.reshape(-1, vocab)
    parts = []
    for i, j in row_chunks(r.shape[0], chunk or max(1, r.shape[0])):
        logp = torch.log_softmax(r[i:j].double(), -1)
        logq = torch.log_softmax(o[i:j].double(), -1)
        parts.append((logp.exp() * (logp - logq)).sum(-1))
    return torch.cat(parts).reshape(shape)


def objective_data(
    qmodel: nn.Module, task: Task, batches: Sequence[Any], objective: str
) -> tuple[Callable[[nn.Module, Any], torch.Tensor], list[Any]]:
    """The loss function and data items of an objective: "loss" (the task's) or "kl".

    For "kl" the float model's outputs are computed once per batch and travel with the batch.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown sensitivity objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    if objective == "loss":
        return task.loss, list(batches)
    with applied(qmodel, {}), torch.inference_mode():
        refs = [logits_of(task.forward(qmodel, b)).clone() for b in batches]
    return OutputKL(task.forward), list(zip(batches, refs, strict=True))


def _rows(batch: Any) -> int | None:
    """The common first-axis size of a batch's tensors (None: none, or sizes that differ)."""
    sizes: set[int] = set()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            sizes.add(x.shape[0])
        elif isinstance(x, (tuple, list)):
            for v in x:
                walk(v)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)

    walk(batch)
    return sizes.pop() if len(sizes) == 1 else None


def _rows_slice(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() > 0 else batch
    if isinstance(batch, dict):
        return {k: _rows_slice(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_rows_slice(v, start, stop) for v in batch)
    return batch


def split_batches(batches: Sequence[Any], at_least: int) -> list[Any]:
    """Cut each batch into equal parts (first axis) so that there are ``at_least`` of them if possible.

    Only for the error bars: a mean loss (cross-entropy, KL) averaged over equal parts is the
    loss of the whole batch, so the scores keep their value while the spread over the parts
    gives their standard error. A batch is cut into the largest number of equal parts not above
    ``ceil(at_least / len(batches))`` that divides its size (a batch of one example stays whole).

    >>> [b.tolist() for b in split_batches([torch.arange(4)], 2)]
    [[0, 1], [2, 3]]
    """
    batches = list(batches)
    if at_least < 1:
        raise ValueError(f"min_batches must be at least 1, got {at_least}")
    if not batches or len(batches) >= at_least:
        return batches
    want = -(-at_least // len(batches))
    out = []
    for b in batches:
        n = _rows(b)
        parts = min(want, n or 1)
        while n and n % parts:
            parts -= 1
        size = (n or 1) // parts
        out += [b] if parts == 1 else [_rows_slice(b, i * size, (i + 1) * size) for i in range(parts)]
    return out


def job_key(layer: str, candidate: str) -> str:
    """Return the store key of the loss of ``layer`` quantized at ``candidate``."""
    return f"measured/{layer}/{candidate}"


def loss_job(ctx: LossContext, layer: str | None, candidate: str | None) -> list[float]:
    """Return the loss of each batch of ``ctx.batches`` with only ``layer`` at ``candidate`` (None: float).

    A module-level function of simple arguments, so that any executor can run it.
    """
    plan = {} if layer is None else {layer: parse_candidate(candidate)}
    with applied(ctx.qmodel, plan), torch.inference_mode():
        return [float(ctx.loss(ctx.qmodel, batch)) for batch in ctx.batches]


def per_batch(value: Any) -> torch.Tensor:
    """The per-batch losses of a job result [B]; a stored mean of an older mixq is one value [1]."""
    if isinstance(value, (int, float)):
        return torch.tensor([float(value)], dtype=torch.float64)
    return torch.tensor([float(v) for v in value], dtype=torch.float64)


def differences(results: dict[str, Any], layers: list[str], names: list[str]) -> torch.Tensor:
    """The per-batch loss changes ``L_b(l at c) − L_b(fp)`` [L, C, B] (B = 1 for stored means)."""
    fp = per_batch(results[FP_KEY])
    rows = [[per_batch(results[job_key(n, c)]) for c in names] for n in layers]
    if any(r.numel() != fp.numel() for row in rows for r in row):  # a store of an older mixq
        fp = fp.mean().reshape(1)
        rows = [[r.mean().reshape(1) for r in row] for row in rows]
    return torch.stack([torch.stack(row) for row in rows]) - fp  # [L, C, B]


MIN_BATCHES_FOR_SE = 4


def warn_few_batches(n: int) -> None:
    """Warn when the standard errors rest on fewer than 4 batches (parts of batches)."""
    if n < MIN_BATCHES_FOR_SE:
        log.warning(
            "sensitivity measured on %d batch(es): its standard errors are %s; give at least %d "
            "calibration batches (for a causal LM, %d windows)",
            n,
            "unknown" if n == 1 else "unreliable",
            MIN_BATCHES_FOR_SE,
            MIN_BATCHES_FOR_SE,
        )


def warn_below_noise(sens: Sensitivity, k: float = 2.0) -> list[dict[str, Any]]:
    """Log (warning) and return the scores below ``−k`` standard errors (``Sensitivity.below_noise``)."""
    hits = sens.below_noise(k)
    if hits:
        shown = ", ".join(
            f"{h['layer']} at {h['candidate']} ({h['score']:.3g} ± {h['se']:.2g})" for h in hits[:8]
        )
        more = f" and {len(hits) - 8} more" if len(hits) > 8 else ""
        log.warning(
            "%d sensitivity score(s) are negative beyond noise (< -%g SE): the layer scores better "
            "quantized than float on the calibration data: %s%s",
            len(hits),
            k,
            shown,
            more,
        )
    return hits


def state_fingerprint(qmodel: nn.Module) -> str:
    """Fingerprint the weights and the calibration state of the sites (ranges, samples, Grams).

    Activation specs take their ranges from the recorded statistics, which are no parameters,
    so they enter the fingerprint here.
    """
    state = [
        {"name": n, "min": q.stats_min, "max": q.stats_max, "sample": q.sample, "gram": w.gram}
        for n, m in sites(qmodel).items()
        for q, w in [(m.input_quant, m.weight_quant)]
    ]
    h = hashlib.sha256(fingerprint_model(qmodel).encode())
    h.update(fingerprint_data(state).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class MeasureOptions:
    """How :func:`measured` runs its jobs (see its arguments)."""

    executor: Executor | None = None
    store: Store | None = None
    progress: bool = True
    objective: str = "loss"
    min_batches: int = 8


def measured(
    qmodel: nn.Module,
    task: Task,
    layers: list[str],
    candidates: list[str | LayerSpec],
    batches: Sequence[Any] | None = None,
    **options: Any,
) -> Sensitivity:
    """Measure the loss change of quantizing each layer alone at each candidate.

    ``single[l, c] = L(l at c) − L(fp)`` with ``L`` the mean of ``task.loss`` over ``batches``
    under ``torch.inference_mode``; every other layer is float, and the model's specs are
    restored after each job. ``L(fp)`` is computed once, as a job of its own.

    Args:
        qmodel: a wrapped (and, for activation candidates, calibrated) model.
        task: gives ``loss(model, batch)``.
        layers: exact names of the layers to measure.
        candidates: candidate names or specs.
        batches: the data; the task's calibration batches by default.
        options: :class:`MeasureOptions` as keywords:
        executor: runs the jobs; an :class:`~mixq.executor.InProcessExecutor` by default.
        store: finished jobs, keyed by the fingerprints of the model (weights and calibration
            state) and of the batches; stored jobs are not recomputed. The loss function is
            not part of the key: use one store per loss.
        progress: show a progress bar on a terminal.
        objective: "loss" (the task's loss) or "kl" (KL divergence of a classifier's output
            distribution from the float model's: :class:`OutputKL`). The float outputs enter
            the data fingerprint, so each objective has its own stored jobs.
        min_batches: cut the batches into equal parts until there are this many where the
            batch sizes allow (:func:`split_batches`): the same scores, with standard errors
            over enough parts to mean something.

    Returns:
        A Sensitivity of kind "measured" with ``se`` [L, C], the standard errors over the
        batches; ``meta["fp_loss"]`` is ``L(fp)``, ``meta["below_noise"]`` the scores below
        −2 standard errors.
    """
    opts = options_of(MeasureOptions, options)
    executor, store, progress, objective = opts.executor, opts.store, opts.progress, opts.objective
    check_layers(qmodel, layers)
    names = [as_layer_spec(c).name for c in candidates]
    if not names:
        raise ValueError("give at least one candidate, e.g. ['w4a8', 'w8a8']")
    batches = split_batches(task.calib if batches is None else batches, opts.min_batches)
    if not batches:
        raise ValueError("measured sensitivity needs at least one batch")
    warn_few_batches(len(batches))
    jobs = [Job(FP_KEY, loss_job, (None, None))]
    jobs += [Job(job_key(n, c), loss_job, (n, c)) for n in layers for c in names]
    loss_fn, batches = objective_data(qmodel, task, batches, objective)
    scope = None
    meta: dict[str, Any] = {"batches": len(batches), "objective": objective}
    if store is not None:
        meta["model_fp"], meta["data_fp"] = state_fingerprint(qmodel), fingerprint_data(batches)
        scope = store.scope(meta["model_fp"], meta["data_fp"])
    runner = executor if executor is not None else InProcessExecutor(desc="sensitivity")
    ctx = LossContext(qmodel, loss_fn, batches)
    results = runner.map(jobs, ctx, store=scope, progress=progress)
    fp = float(per_batch(results[FP_KEY]).mean())
    single, se = mean_se(differences(results, layers, names))  # [L, C] each
    meta["fp_loss"] = fp
    log.info("measured %d layers x %d candidates; fp loss %.6g", len(layers), len(names), fp)
    sens = Sensitivity(list(layers), names, single, kind="measured", meta=meta, se=se)
    meta["below_noise"] = warn_below_noise(sens)
    return sens
