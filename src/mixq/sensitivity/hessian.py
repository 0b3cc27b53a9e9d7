"""Hessian-trace sensitivity (HAWQ-V2, Dong et al., 2020; HAWQ-V3, Yao et al., 2021).

The trace of the loss Hessian restricted to one layer's weight, ``H_l = ∂²L/∂W_l²``, is
estimated with Hutchinson's method: for Rademacher vectors ``v`` (entries ±1, so E[vvᵀ] = I),
``E[vᵀ H_l v] = tr(H_l)``, and ``H_l v`` is a Hessian-vector product by double
back-propagation, ``∂(∂L/∂W_l · v)/∂W_l``. The sensitivity of layer ``l`` at candidate ``c``
is then ``Ω_l(c) = tr(H_l)/n_l · ‖Q_c(W_l) − W_l‖²₂`` with ``n_l`` the number of weights.

Two estimators (``mode``):

* ``"block"``: one Hessian-vector product per layer and vector, ``v_lᵀ H_l v_l`` with ``v_l``
  on that layer alone: no cross-layer terms, the lowest variance, L backward passes per vector;
* ``"joint"``: one vector ``v`` over all the layers' weights at once and one Hessian-vector
  product ``Hv`` per vector, read per layer as ``v_lᵀ (Hv)_l = v_lᵀ H_l v_l + Σ_{m≠l} v_lᵀ H_lm v_m``.
  The cross terms have zero mean (independent ±1 entries), so the estimate is unbiased too, at
  an L-fold lower cost (HAWQ-V2's block traces are computed this way); their variance adds to
  the estimate's, so it needs more vectors for the same spread.

And one that needs no second derivative (``estimator="fisher"``, :func:`fisher_trace_samples`),
the default on causal language models (``hawq`` in `mixq.methods.sensitivity_ilp`): the loss is
the KL divergence of the output distribution from the float model's, averaged over the ``N``
output rows (tokens), whose Hessian at the float weights is exactly the Fisher information
``F = 1/N Σ_rows E_{y~p}[∇ log p(y) ∇ log p(y)ᵀ]`` (the KL is minimal there, so the Gauss-Newton
term is all there is). Its trace over layer ``l`` is ``E_y[‖∇_{W_l} Σ_rows log p(y_row)‖²]/N``
for labels ``y`` sampled from the float model per row (the cross-row terms have zero mean): one
backward pass per sample for every layer at once, against one double-backward pass per layer
and vector. [DESIGN] HAWQ-V2 takes the Hessian of the training loss; on a causal LM the
measured change of that loss is mostly noise (docs/methods.md, LLM section), while the KL is
what the other LM objectives measure, and its Hessian needs no labels.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mixq.plan import LayerSpec, as_layer_spec
from mixq.progress import Bar
from mixq.sensitivity.perturb import state_fingerprint
from mixq.sensitivity.proxies import check_layers, weight_error
from mixq.sensitivity.table import Sensitivity, mean_se, options_of
from mixq.store import Store, fingerprint_data
from mixq.tasks import Task
from mixq.wrap import applied

log = logging.getLogger(__name__)


_CHUNK = 64  # Hessian-vector products batched per backward pass
MODES = ("block", "joint")


def _rademacher(shape: tuple[int, ...], like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    v = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8)
    return (2 * v - 1).to(device=like.device, dtype=like.dtype)


def _batches(task: Task, batches: Sequence[Any] | None, n_samples: int, what: str) -> list[Any]:
    """The batches to estimate on (the task's calibration batches by default), checked."""
    batches = list(task.calib if batches is None else batches)
    if not batches:
        raise ValueError(f"{what} needs at least one batch")
    if n_samples < 1:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    return batches


@contextmanager
def _trainable_weights(qmodel: nn.Module, layers: list[str]) -> Iterator[list[torch.Tensor]]:
    """The layers' weights with ``requires_grad`` on; the flags are restored on exit."""
    qlayers = check_layers(qmodel, layers)
    weights = [qlayers[n].weight for n in layers]
    flags = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        yield weights
    finally:
        for w, flag in zip(weights, flags, strict=True):
            w.requires_grad_(flag)


def hutchinson_trace(
    qmodel: nn.Module,
    task: Task,
    layers: list[str],
    batches: Sequence[Any] | None = None,
    n_samples: int = 64,
    seed: int = 0,
    mode: str = "block",
) -> dict[str, float]:
    """Estimate ``tr(H_l)`` of the float model's loss for each layer's weight.

    The mean of :func:`hutchinson_samples` (see there for the arguments).

    Returns:
        ``{layer: trace}`` (not normalized by the layer's size).
    """
    samples = hutchinson_samples(qmodel, task, layers, batches, n_samples, seed, mode)
    return {n: float(v.mean()) for n, v in samples.items()}


def hutchinson_samples(
    qmodel: nn.Module,
    task: Task,
    layers: list[str],
    batches: Sequence[Any] | None = None,
    n_samples: int = 64,
    seed: int = 0,
    mode: str = "block",
) -> dict[str, torch.Tensor]:
    """Hutchinson's single-vector estimates of ``tr(H_l)`` for each layer's weight.

    ``tr(H_l) ≈ 1/(m·B) Σ_b Σ_i v_iᵀ H_l^{(b)} v_i`` over ``m = n_samples`` Rademacher vectors
    and the ``B`` batches, ``H_l^{(b)}`` the Hessian of ``task.loss`` on batch ``b`` w.r.t.
    ``W_l`` alone (other layers' blocks are not mixed in). Every site is float meanwhile;
    the specs and ``requires_grad`` flags are restored on exit.

    Args:
        qmodel: a wrapped model.
        task: gives ``loss(model, batch)``.
        layers: exact names of the layers.
        batches: the data; the task's calibration batches by default.
        options: :class:`HawqOptions` as keywords:
        n_samples: Rademacher vectors per batch.
        seed: seed of the vectors.
        mode: "block" (a vector per layer) or "joint" (one vector over all layers; see the module).

    Returns:
        ``{layer: samples}``, the ``m·B`` single-vector estimates ``v_iᵀ H_l^{(b)} v_i`` of
        each layer [m·B] (float64), batch-major: their mean is the trace, their spread gives
        its standard error for free.
    """
    if mode not in MODES:
        raise ValueError(f"unknown Hutchinson mode {mode!r}; valid: {', '.join(MODES)}")
    batches = _batches(task, batches, n_samples, "hutchinson_trace")
    gen = torch.Generator().manual_seed(seed)
    sums: list[list[torch.Tensor]] = [[] for _ in layers]  # per layer, per-vector estimates
    with _trainable_weights(qmodel, layers) as weights:
        steps = len(layers) if mode == "block" else n_samples
        bar = Bar(len(batches) * steps, "hutchinson trace", unit="layer" if mode == "block" else "vector")
        # Double back-propagation needs the math attention kernel: the fused CPU kernels of
        # scaled_dot_product_attention have no second derivative (transformers use them).
        with applied(qmodel, {}), torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]), bar:
            for batch in batches:
                loss = task.loss(qmodel, batch)
                grads = torch.autograd.grad(loss, weights, create_graph=True)
                if mode == "joint":
                    # one vector at a time: a batched whole-model product holds a copy of the
                    # double-backward graph per vector (gigabytes on a transformer)
                    for _ in range(n_samples):
                        vs = [_rademacher(tuple(w.shape), w, gen) for w in weights]
                        hvs = torch.autograd.grad(grads, weights, grad_outputs=vs, retain_graph=True)
                        for i, (hv, v) in enumerate(zip(hvs, vs, strict=True)):
                            sums[i].append((hv.double() * v.double()).sum().reshape(1))
                        bar.update()
                    continue
                for i, (w, g) in enumerate(zip(weights, grads, strict=True)):
                    for start in range(0, n_samples, _CHUNK):
                        shape = (min(_CHUNK, n_samples - start), *w.shape)
                        v = _rademacher(shape, w, gen)  # [m, *W.shape]
                        (hv,) = torch.autograd.grad(  # H_l v for m vectors at once
                            g, w, grad_outputs=v, retain_graph=True, is_grads_batched=True
                        )
                        sums[i].append((hv.double() * v.double()).flatten(1).sum(1))  # [m]
                    bar.update()
    samples = {n: torch.cat(s) for n, s in zip(layers, sums, strict=True)}
    log.debug("Hutchinson traces: %s", {n: float(v.mean()) for n, v in samples.items()})
    return samples


def fisher_trace_samples(
    qmodel: nn.Module,
    task: Task,
    layers: list[str],
    batches: Sequence[Any] | None = None,
    n_samples: int = 4,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Single-sample estimates of ``tr(H_l)``, ``H_l`` the Hessian of the output KL at the float model.

    For batch ``b`` with ``N_b`` output rows and sample ``s``, labels ``y ~ softmax(float
    logits)`` are drawn per row and ``‖∇_{W_l} Σ_rows log p(y)‖² / N_b`` is one estimate of the
    trace of layer ``l``'s block of the Fisher information (the Hessian of the row-averaged KL
    divergence to the float outputs; see the module). One forward and ``n_samples`` backward
    passes per batch, every layer at once. Every site is float meanwhile.

    Returns:
        ``{layer: samples}`` [n_samples·B] (float64), batch-major, as :func:`hutchinson_samples`.
    """
    from mixq.tasks import logits_of

    batches = _batches(task, batches, n_samples, "the Fisher trace")
    gen = torch.Generator().manual_seed(seed)
    sums: list[list[float]] = [[] for _ in layers]
    with _trainable_weights(qmodel, layers) as weights:
        bar = Bar(len(batches) * n_samples, "fisher trace", unit="sample")
        with applied(qmodel, {}), torch.enable_grad(), bar:
            for batch in batches:
                out = logits_of(task.forward(qmodel, batch))
                logp = torch.log_softmax(out.float(), -1).reshape(-1, out.shape[-1])  # [N, V]
                probs = logp.detach().exp()
                for s in range(n_samples):
                    y = torch.multinomial(probs, 1, generator=gen)  # [N, 1]
                    ll = logp.gather(1, y).sum()
                    grads = torch.autograd.grad(ll, weights, retain_graph=s + 1 < n_samples)
                    for i, g in enumerate(grads):
                        sums[i].append(float(g.double().pow(2).sum()) / logp.shape[0])
                    bar.update()
                del out, logp, probs
    return {n: torch.tensor(v, dtype=torch.float64) for n, v in zip(layers, sums, strict=True)}


ESTIMATORS = ("hutchinson", "fisher")


@dataclass(frozen=True)
class HawqOptions:
    """How :func:`hawq` estimates the traces (see its arguments)."""

    n_samples: int = 64
    seed: int = 0
    store: Store | None = None
    mode: str = "block"
    estimator: str = "hutchinson"


def hawq(
    qmodel: nn.Module,
    task: Task,
    layers: list[str],
    candidates: list[str | LayerSpec],
    batches: Sequence[Any] | None = None,
    **options: Any,
) -> Sensitivity:
    """Score layers and candidates by the HAWQ-V2/V3 second-order estimate.

    ``Ω_l(c) = tr(H_l)/n_l · ‖Q_c(W_l) − W_l‖²₂`` (HAWQ-V2, Dong et al., 2020; HAWQ-V3,
    Yao et al., 2021): the average Hessian trace of the layer times its squared weight
    quantization error. The trace comes from :func:`hutchinson_trace`.

    Args:
        qmodel: a wrapped model.
        task: gives ``loss(model, batch)``.
        layers: exact names of the layers.
        candidates: candidate names or specs.
        batches: the data; the task's calibration batches by default.
        options: :class:`HawqOptions` as keywords:
        n_samples: Rademacher vectors per batch.
        seed: seed of the vectors.
        store: finished traces, keyed by the fingerprints of the model and of the batches
            and by ``n_samples``, ``seed`` and ``mode``; stored traces are not recomputed (the
            traces do not depend on the candidates, so a budget sweep computes them once).
        mode: the Hutchinson estimator, "block" or "joint" (:func:`hutchinson_trace`).
        estimator: "hutchinson" (the task loss's Hessian, double back-propagation) or "fisher"
            (the output KL's Hessian, the Fisher information: :func:`fisher_trace_samples`,
            ``n_samples`` sampled label sets per batch; the task's forward must return logits).

    Returns:
        A Sensitivity of kind "hawq" with ``se`` [L, C], the standard errors of the Hutchinson
        estimate over its ``m·B`` vectors carried through the weight errors; ``meta["trace"]``
        holds the traces (``meta["trace_se"]`` their standard errors), ``meta["avg_trace"]``
        the traces divided by the layer sizes, negative ones clamped at 0 with a warning
        (named in ``meta["clamped"]``).
    """
    t0 = time.perf_counter()
    opts = options_of(HawqOptions, options)
    n_samples, seed, store, mode = opts.n_samples, opts.seed, opts.store, opts.mode
    if opts.estimator not in ESTIMATORS:
        raise ValueError(
            f"unknown Hessian trace estimator {opts.estimator!r}; valid: {', '.join(ESTIMATORS)}"
        )
    qlayers = check_layers(qmodel, layers)
    specs = [as_layer_spec(c) for c in candidates]
    batches = list(task.calib if batches is None else batches)
    prefix = "hutchinson" if mode == "block" else f"hutchinson-{mode}"  # block keys predate modes
    prefix = "fisher" if opts.estimator == "fisher" else prefix
    key = f"{prefix}-se:{n_samples}:{seed}:" + ",".join(layers)
    scope = None
    if store is not None:
        scope = store.scope(state_fingerprint(qmodel), fingerprint_data(batches))
    if scope is not None and key in scope.keys():
        stored = scope.get(key)
        traces, ses = stored["trace"], stored["se"]
    else:
        if opts.estimator == "fisher":
            samples = fisher_trace_samples(qmodel, task, layers, batches, n_samples, seed)
        else:
            samples = hutchinson_samples(qmodel, task, layers, batches, n_samples, seed, mode)
        stats = {n: mean_se(v) for n, v in samples.items()}
        traces = {n: float(m) for n, (m, _) in stats.items()}
        ses = {n: float(e) for n, (_, e) in stats.items()}
        if scope is not None:
            scope.put(key, {"trace": traces, "se": ses})
    clamped = clamp_traces(traces)
    size = {n: qlayers[n].weight.numel() for n in layers}
    avg = {n: max(traces[n], 0.0) / size[n] for n in layers}
    errors = torch.tensor([[weight_error(qlayers[n], s) for s in specs] for n in layers], dtype=torch.float64)
    single = torch.tensor([avg[n] for n in layers], dtype=torch.float64)[:, None] * errors  # [L, C]
    se = torch.tensor([ses[n] / size[n] for n in layers], dtype=torch.float64)[:, None] * errors  # [L, C]
    meta = {
        "trace": traces,
        "trace_se": ses,
        "avg_trace": avg,
        "clamped": clamped,
        "n_samples": n_samples,
        "seed": seed,
        "mode": mode,
        "estimator": opts.estimator,
        "seconds": time.perf_counter() - t0,
    }
    return Sensitivity(list(layers), [s.name for s in specs], single, kind="hawq", meta=meta, se=se)


def clamp_traces(traces: dict[str, float]) -> list[str]:
    """Name the layers whose estimated trace is negative, with a warning; their scores use 0.

    A loss Hessian is not PSD away from a minimum, and a Hutchinson estimate of a small trace
    can fall below zero by noise; a negative curvature weight would reward quantization error.
    """
    neg = [n for n, t in traces.items() if t < 0]
    if neg:
        shown = ", ".join(f"{n} ({traces[n]:.3g})" for n in neg[:8])
        more = f" and {len(neg) - 8} more" if len(neg) > 8 else ""
        log.warning(
            "HAWQ: %d Hessian trace(s) estimated below zero, clamped at 0: %s%s", len(neg), shown, more
        )
    return neg
