"""Block-wise single-layer sensitivity for models built from repeated blocks (decoder layers).

A full forward per (layer, candidate) costs ``L·C`` model passes; on a model of ``K`` repeated
blocks most of each pass recomputes float blocks that the quantized layer does not touch. Here
the float model runs once to capture the inputs of the first block (per calibration batch);
the float inputs of block ``k+1`` are then block ``k``'s float output, computed block by block,
so only two blocks' activations are held at any time and a block's are freed when it is done.
A layer in block ``k`` at candidate ``c`` then costs:

* ``objective="mse"`` (local): one forward of block ``k`` on its captured inputs, scored by the
  mean squared change of the block's output, ``mean((B_k^{l,c}(X_k) − B_k(X_k))²)``;
* ``objective="kl"`` (the model's output): block ``k``'s perturbed output is computed the same
  way and then carried through blocks ``k+1 … K−1`` and the rest of the model (final norm, head)
  by the task's own forward, with blocks ``0 … k`` replaced by that constant: the KL divergence
  of the output distribution to the float one (:class:`~mixq.sensitivity.perturb.OutputKL`),
  equal to the full-model measurement without the prefix's work.

* ``objective="fisher"`` (the model's output, to second order): one forward of block ``k`` as for
  "mse", and the change ``δ`` of its output weighed by the output distribution's Fisher
  information carried back to ``h_k``: ``KL ≈ E_y[(g_k·δ)²] / (2N)``, with ``g_k`` the gradient
  at ``h_k`` of the log-likelihood of labels sampled from the float model (``N`` output rows,
  ``fisher_samples`` backward passes per batch, once for all layers; :func:`fisher_grads`). The
  KL's scale at the cost of the local objective; the linearization of the blocks after ``k``
  is its approximation (good for small changes, rougher for 2-3 bit weights). Measured one
  batch at a time: that batch's gradients at every block are held (``blocks × samples``
  hidden-state tensors), not every batch's.

Layers outside every block (an embedding, the head) are measured with full forwards on the same
objective's data (for "mse": the squared change of the model's logits; for "fisher": the exact KL).

The default is "kl" ([DESIGN]): the search adds the scores of layers of different blocks, and
only an objective measured at the model's output puts them on one scale (the residual stream's
magnitude grows from block to block, so block-local MSEs of different blocks are not
comparable). Its cost is that of the blocks after the layer and the head, about half a model
forward per score. "fisher" keeps the output scale at one block forward per score, for models
where that is out of reach; "mse" is the cheap ranking within a block.

Every score keeps its per-batch values, so ``Sensitivity.se`` holds the standard errors over
the batches, as for :func:`~mixq.sensitivity.perturb.measured`.

Capture ([DESIGN], generic over transformers models, no model-specific code; `mixq.blocks`): the first block's
positional and keyword arguments are recorded by a forward pre-hook (the forward is stopped
there); a key-value cache argument is dropped and ``use_cache`` set False, so that re-running a
block has no side effect. Every block's other arguments are captured the same way in one float
pass (:func:`mixq.blocks.block_arguments`: blocks may differ, e.g. Gemma-3's sliding-window and
full-attention masks), and its hidden states (the first positional argument, else
``hidden_states=``) are the previous block's output (its first element when it returns a
tuple). This streaming is checked once against a hooked plain
pass on the first batch (the last block's inputs); a model that does not pass hidden states this
way is refused, naming the block.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mixq.blocks import (
    BlockInput,
    block_arguments,
    call,
    capture_inputs,
    first_tensor,
    hidden_states,
    with_hidden,
)
from mixq.blocks import find_blocks as find_block_list
from mixq.plan import LayerSpec, as_layer_spec
from mixq.sensitivity.perturb import (
    OutputKL,
    objective_data,
    split_batches,
    state_fingerprint,
    warn_below_noise,
    warn_few_batches,
)
from mixq.sensitivity.proxies import check_layers
from mixq.sensitivity.table import Sensitivity, mean_se, options_of
from mixq.store import Store, fingerprint_data
from mixq.tasks import Task, logits_of
from mixq.wrap import SITE_TYPES, applied

log = logging.getLogger(__name__)

OBJECTIVES = ("kl", "mse", "fisher")
PAIRS = ("none", "block", "all")


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the model's repeated blocks: the ``nn.ModuleList`` of ≥ 2 modules of one class
    holding the most quantized sites (e.g. ``model.layers.0 …``); [] when there is none.

    >>> from torch import nn
    >>> find_blocks(nn.Sequential(nn.Linear(2, 2)))
    []
    """
    found = find_block_list(
        model,
        count=lambda m: sum(isinstance(x, SITE_TYPES) for x in m.modules()),
        containers=(nn.ModuleList,),
    )
    return found.names() if found is not None else []


def is_causal_lm(task: Task) -> bool:
    """Whether ``task`` is a causal-LM task (`mixq.tasks.causal_lm`: its metric is the negative
    perplexity), where the methods' "auto" settings pick the Fisher estimates."""
    from mixq.llm import NegPerplexity

    return isinstance(task.metric, NegPerplexity)


def block_of(layers: Sequence[str], blocks: Sequence[str]) -> dict[str, int | None]:
    """The index of the block holding each layer (None: outside every block)."""
    out: dict[str, int | None] = {}
    for layer in layers:
        out[layer] = next((k for k, b in enumerate(blocks) if layer.startswith(b + ".")), None)
    return out


# -- capture (mixq.blocks) --------------------------------------------------------------------------


hidden_of = first_tensor  # the hidden states of a block's output: the output, or its first element


@contextmanager
def _skipping(model: nn.Module, blocks: Sequence[str], k: int, out: Any) -> Iterator[None]:
    """Blocks ``0 … k`` return ``out`` without computing (their successors ignore their input)."""
    mods = [model.get_submodule(b) for b in blocks[: k + 1]]
    saved = [m.__dict__.get("forward") for m in mods]

    def constant(*args: Any, **kwargs: Any) -> Any:
        return out

    try:
        for m in mods:
            m.forward = constant
        yield
    finally:
        for m, before in zip(mods, saved, strict=True):
            if before is None:
                del m.forward
            else:
                m.forward = before


def _nbytes(x: Any) -> int:
    if isinstance(x, BlockInput):
        return _nbytes(x.args) + _nbytes(x.kwargs)
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(v) for v in x)
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    return 0


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


# -- measurement ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockwiseOptions:
    """How :func:`blockwise` measures (see its arguments)."""

    objective: str = "kl"
    store: Store | None = None
    blocks: tuple[str, ...] | None = None
    min_batches: int = 8
    fisher_samples: int = 4
    seed: int = 0
    pairs: str = "none"


@dataclass
class _Run:
    """What the per-block measurement shares."""

    qmodel: nn.Module
    task: Task
    blocks: list[str]
    objective: str
    loss: Callable[[nn.Module, Any], torch.Tensor]
    items: Sequence[Any]
    specs: list[LayerSpec]
    batches: list[Any]
    grads: list[list[torch.Tensor]] | None = None  # fisher: [block][batch] -> [S, *hidden]
    rows: list[int] | None = None  # fisher: output rows (tokens) of each batch
    seed: int = 0
    samples: int = 0  # fisher: sampled label sets per batch
    vs: dict[str, list[list[list[float]]]] | None = None  # fisher pairs: layer -> [C][B][S] of g·δ


def _local_losses(run: _Run, k: int, layer: str, inputs: list, ref: list) -> list[list[float]]:
    """Per candidate, per batch: the block-output MSE (mse), the model's KL (kl) or its Fisher estimate."""
    block = run.qmodel.get_submodule(run.blocks[k])
    out: list[list[float]] = []
    kept: list[list[list[float]]] = []  # fisher: [C][B][S] of g·δ
    for spec in run.specs:
        values, vals_v = [], []
        with applied(run.qmodel, {layer: spec}):
            for b, x in enumerate(inputs):
                y = call(block, x)
                if run.objective == "mse":
                    values.append(float((hidden_of(y).double() - hidden_of(ref[b]).double()).pow(2).mean()))
                    continue
                if run.objective == "fisher":
                    assert run.grads is not None and run.rows is not None
                    delta = (hidden_of(y) - hidden_of(ref[b])).double()
                    g = run.grads[k][b].double()  # [S, *hidden]
                    v = (g * delta).flatten(1).sum(1)  # [S]
                    values.append(float(v.pow(2).mean()) / (2 * run.rows[b]))
                    vals_v.append(v.tolist())
                    continue
                with _skipping(run.qmodel, run.blocks, k, y), torch.inference_mode():
                    values.append(float(run.loss(run.qmodel, run.items[b])))
        out.append(values)
        kept.append(vals_v)
    if run.vs is not None:
        run.vs[layer] = kept
    return out


class FloatItems(Sequence):
    """The KL's items ``(batch, float logits)``, the logits computed when an item is read.

    [DESIGN] The "fisher" objective needs the float logits only for the layers outside the blocks
    (the head: exact KL from whole forwards), one batch at a time: they are not kept for every
    batch (SmolLM2, 8 x 256 positions x 49,152 x 4 B = 400 MB), at the cost of one more float
    forward per batch and such layer. The values, and the store's data fingerprint, are those of
    the kept logits.
    """

    def __init__(self, qmodel: nn.Module, task: Task, batches: Sequence[Any]) -> None:
        self.qmodel, self.task, self.batches = qmodel, task, list(batches)
        self.fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: Any) -> Any:
        if isinstance(b, slice):
            return [self[i] for i in range(*b.indices(len(self)))]
        with applied(self.qmodel, {}), torch.inference_mode():
            return self.batches[b], logits_of(self.task.forward(self.qmodel, self.batches[b])).clone()

    def rows(self, need_fingerprint: bool) -> list[int]:
        """The output rows of each batch's logits (one float pass), and the items' fingerprint."""
        rows: list[int] = []

        def each() -> Iterator[Any]:
            for i in range(len(self)):
                item = self[i]
                rows.append(item[1].reshape(-1, item[1].shape[-1]).shape[0])
                yield item

        if need_fingerprint:
            self.fingerprint = fingerprint_data(each())
        else:
            for _ in each():
                pass
        return rows


def _full_losses(run: _Run, layer: str, refs: list[torch.Tensor] | None) -> list[list[float]]:
    """Per candidate, per batch, with full forwards (layers outside the blocks)."""
    if isinstance(run.items, FloatItems):  # one batch's float logits at a time
        per_batch = []
        for b in range(len(run.items)):
            item = run.items[b]
            row = []
            for spec in run.specs:
                with applied(run.qmodel, {layer: spec}), torch.inference_mode():
                    row.append(float(run.loss(run.qmodel, item)))
            per_batch.append(row)
            del item
        return [list(v) for v in zip(*per_batch, strict=True)]
    assert refs is not None
    out = []
    for spec in run.specs:
        with applied(run.qmodel, {layer: spec}), torch.inference_mode():
            if run.objective == "mse":
                vals = [
                    float((logits_of(run.task.forward(run.qmodel, b)).double() - r.double()).pow(2).mean())
                    for b, r in zip(run.batches, refs, strict=True)
                ]
            else:
                vals = [float(run.loss(run.qmodel, item)) for item in run.items]
        out.append(vals)
    return out


def fisher_grads(run: _Run, samples: int, seed: int) -> tuple[list[list[torch.Tensor]], list[int]]:
    """Gradients of sampled log-likelihoods at every block's output: one backward pass per sample.

    For batch ``b`` and sample ``s``, labels ``y ~ softmax(float logits)`` are drawn per output
    row and ``g_{k,b,s} = ∂ Σ_rows log p(y) / ∂h_k`` (``h_k`` the output of block ``k``). Then
    ``E_y[(g·δ)²] = δᵀ Jᵀ F J δ`` (the cross-row terms have zero mean), twice the second-order
    expansion of the summed KL divergence for a change ``δ`` of ``h_k``.

    Returns:
        ``grads[k][b]`` [samples, *hidden] (float32) and the rows of each batch.
    """
    gen = torch.Generator().manual_seed(seed)
    grads: list[list[torch.Tensor]] = [[] for _ in run.blocks]
    rows = []
    for batch in run.batches:
        per_block, n = _batch_grads(run, batch, samples, gen)
        for k, g in enumerate(per_block):
            grads[k].append(g)
        rows.append(n)
    return grads, rows


def _batch_grads(run: _Run, batch: Any, samples: int, gen: torch.Generator) -> tuple[list[torch.Tensor], int]:
    """:func:`fisher_grads` of one batch: per block [samples, *hidden], and the output rows."""
    hs: list[torch.Tensor] = []

    def leaf(mod: nn.Module, args: Any, kwargs: Any) -> Any:
        inp = BlockInput(tuple(args), dict(kwargs))
        inp = with_hidden(inp, hidden_states(inp).detach().requires_grad_())
        return inp.args, inp.kwargs

    def keep(mod: nn.Module, args: Any, out: Any) -> None:
        hs.append(hidden_of(out))

    handles = [run.qmodel.get_submodule(run.blocks[0]).register_forward_pre_hook(leaf, with_kwargs=True)]
    handles += [run.qmodel.get_submodule(b).register_forward_hook(keep) for b in run.blocks]
    per_block: list[list[torch.Tensor]] = [[] for _ in run.blocks]
    try:
        with torch.enable_grad():
            logits = logits_of(run.task.forward(run.qmodel, batch))
            logp = torch.log_softmax(logits.float(), -1).reshape(-1, logits.shape[-1])  # [N, V]
            probs = logp.detach().exp()
            for s in range(samples):
                y = torch.multinomial(probs, 1, generator=gen)  # [N, 1]
                ll = logp.gather(1, y).sum()
                gs = torch.autograd.grad(ll, hs[: len(run.blocks)], retain_graph=s + 1 < samples)
                for k, g in enumerate(gs):
                    per_block[k].append(g.detach().float())
    finally:
        for h in handles:
            h.remove()
    return [torch.stack(g) for g in per_block], logp.shape[0]


def _check_stream(run: _Run, batch: Any, streamed_last: BlockInput) -> None:
    """Compare the streamed inputs of the last block with a hooked plain pass on one batch."""
    last = run.qmodel.get_submodule(run.blocks[-1])
    (plain,) = capture_inputs(run.qmodel, last, [batch], run.task.forward)
    a, b = hidden_of(hidden_states(plain)), hidden_of(hidden_states(streamed_last))
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(a.abs().max()))):
        raise ValueError(
            f"block-wise capture: the streamed inputs of {run.blocks[-1]!r} differ from a plain pass "
            f"(max |diff| {float((a - b).abs().max()) if a.shape == b.shape else 'shape'}): the blocks "
            "do not pass their hidden states to each other as arguments; use sensitivity.measured"
        )


def blockwise(
    qmodel: nn.Module,
    task: Task,
    layers: list[str],
    candidates: list[str | LayerSpec],
    batches: Sequence[Any] | None = None,
    **options: Any,
) -> Sensitivity:
    """Measure each layer alone at each candidate, block by block (see the module).

    Args:
        qmodel: a wrapped (and, for activation candidates, calibrated) model with repeated blocks.
        task: gives ``forward(model, batch)`` returning logits.
        layers: exact names of the layers.
        candidates: candidate names or specs.
        batches: the data; the task's calibration batches by default.
        options: :class:`BlockwiseOptions` as keywords:
        objective: "kl" (the model's output distribution vs the float one; default), "fisher"
            (its second-order estimate from the block's output change and one backward pass per
            sample, :func:`fisher_grads`) or "mse" (the mean squared change of the block's output).
        store: finished layers keyed by the model state and the data; stored layers are not
            measured again (a block whose layers are all stored is not run either).
        blocks: the block names (default: :func:`find_blocks`).
        fisher_samples: sampled label sets (backward passes) per batch, for "fisher".
        seed: seed of the sampled labels, for "fisher".
        pairs: "none", or (objective "fisher") CLADO's pair terms from the same measurements
            (:func:`fisher_pairs`): "block" for two layers of one block, "all" for any two
            layers inside the blocks (a layer outside them has none); no extra forward.
        min_batches: cut the batches into equal parts until there are this many where the
            batch sizes allow, for the standard errors (``perturb.split_batches``).

    Returns:
        A Sensitivity of kind "blockwise" with ``se`` [L, C]; ``meta`` holds the objective,
        the blocks, timings (``seconds``, ``capture_seconds``), ``peak_activation_bytes`` (the
        most captured block inputs and outputs held at once) and ``peak_rss_bytes``.
    """
    opts = options_of(BlockwiseOptions, options)
    if opts.objective not in OBJECTIVES:
        raise ValueError(f"unknown block-wise objective {opts.objective!r}; valid: {', '.join(OBJECTIVES)}")
    if opts.pairs not in PAIRS:
        raise ValueError(f"unknown block-wise pairs {opts.pairs!r}; valid: {', '.join(PAIRS)}")
    if opts.pairs != "none" and opts.objective != "fisher":
        raise ValueError(f"pairs={opts.pairs!r} needs objective 'fisher', got {opts.objective!r}")
    check_layers(qmodel, layers)
    specs = [as_layer_spec(c) for c in candidates]
    names = [s.name for s in specs]
    if not names:
        raise ValueError("give at least one candidate, e.g. ['w4g32', 'w8g64']")
    blocks = list(opts.blocks) if opts.blocks is not None else find_blocks(qmodel)
    if not blocks:
        raise ValueError(
            "the model has no repeated blocks (a ModuleList of one class); use sensitivity.measured"
        )
    batches = split_batches(task.calib if batches is None else batches, opts.min_batches)
    if not batches:
        raise ValueError("block-wise sensitivity needs at least one batch")
    warn_few_batches(len(batches))
    t0 = time.perf_counter()
    qmodel.eval()
    meta: dict[str, Any] = {"batches": len(batches), "objective": opts.objective, "blocks": len(blocks)}
    with applied(qmodel, {}):
        if opts.objective == "fisher":  # no float logits kept (see FloatItems)
            items: Sequence[Any] = FloatItems(qmodel, task, batches)
            loss, refs = OutputKL(task.forward), None
            run = _Run(qmodel, task, blocks, opts.objective, loss, items, specs, batches)
            run.samples, run.seed = opts.fisher_samples, opts.seed  # gradients: in _measure, if needed
            run.rows = items.rows(need_fingerprint=opts.store is not None)
            run.vs = {} if opts.pairs != "none" else None
        else:
            loss, items = objective_data(qmodel, task, batches, "kl")
            refs = [item[1] for item in items]
            run = _Run(qmodel, task, blocks, opts.objective, loss, items, specs, batches)
        scope = None
        if opts.store is not None:
            data_fp = items.fingerprint if isinstance(items, FloatItems) else fingerprint_data(items)
            meta["model_fp"], meta["data_fp"] = state_fingerprint(qmodel), data_fp
            scope = opts.store.scope(meta["model_fp"], meta["data_fp"])
        if opts.objective == "fisher":
            meta.update(fisher_samples=opts.fisher_samples, seed=opts.seed)
        results = _measure(run, layers, refs, batches, scope, meta)
    losses = torch.tensor([results[n] for n in layers], dtype=torch.float64)  # [L, C, B]
    single, se = mean_se(losses)
    meta["seconds"] = time.perf_counter() - t0
    meta["peak_rss_bytes"] = peak_rss_bytes()
    pairs = pairs_se = None
    if run.vs is not None:
        where = block_of(layers, blocks)
        pairs, pairs_se = fisher_pairs(
            layers, run.vs, run.rows or [], where, opts.pairs == "block", len(names)
        )
        meta["pairs"] = opts.pairs
    sens = Sensitivity(
        list(layers), names, single, kind="blockwise", meta=meta, se=se, pairs=pairs, pairs_se=pairs_se
    )
    if opts.objective != "mse":
        meta["below_noise"] = warn_below_noise(sens)
    log.info(
        "block-wise (%s): %d layers x %d candidates in %.1f s",
        opts.objective,
        len(layers),
        len(names),
        meta["seconds"],
    )
    return sens


def fisher_pairs(
    layers: list[str],
    vs: dict[str, list[list[list[float]]]],
    rows: list[int],
    where: dict[str, int | None],
    same_block: bool,
    n_candidates: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLADO's pair terms ``Ω_lm(c, c')`` [L, C, L, C] of the Fisher objective, and their standard errors.

    With ``v = g·δ`` the sampled gradient at a block's output times the change of that output
    (one per layer, candidate, batch and sample; see the module), the single terms are
    ``E[v_l²]/2N`` and the second-order change of quantizing ``l`` and ``m`` together is
    ``E[(v_l + v_m)²]/2N``, so ``Ω_lm = E[v_l v_m]/N`` (per batch, the mean over its samples; the
    blocks' changes added to first order). Pairs of one layer, of a layer outside the blocks
    (no ``v``) and, with ``same_block``, of layers of different blocks are 0.
    """
    L, B = len(layers), len(rows)
    if not vs:
        zero = torch.zeros(L, n_candidates, L, n_candidates, dtype=torch.float64)
        return zero, zero.clone()
    samples = len(next(iter(vs.values()))[0][0])
    v = torch.zeros(L, n_candidates, B, samples, dtype=torch.float64)
    has = torch.zeros(L, dtype=torch.bool)
    for i, n in enumerate(layers):
        if n in vs:
            v[i], has[i] = torch.tensor(vs[n], dtype=torch.float64), True
    n_rows = torch.tensor(rows, dtype=torch.float64)
    per_batch = torch.einsum("lcbs,mdbs->lcmdb", v, v) / v.shape[-1] / n_rows  # [L, C, L, C, B]
    mask = has[:, None] & has[None, :] & ~torch.eye(L, dtype=torch.bool)
    if same_block:
        k = torch.tensor([-1 if where[n] is None else where[n] for n in layers])
        mask &= k[:, None] == k[None, :]
    per_batch *= mask[:, None, :, None, None]
    return mean_se(per_batch)


def _key(run: _Run, layer: str, names: list[str]) -> str:
    what = f"fisher{run.samples}s{run.seed}" if run.objective == "fisher" else run.objective
    return f"blockwise/{what}/{layer}/" + ",".join(names) + ("+v" if run.vs is not None else "")


def _stored(run: _Run, layer: str, value: Any) -> list[list[float]]:
    """A stored layer's losses ([C][B]; with pairs, also its ``v`` into ``run.vs``)."""
    if run.vs is None:
        return value
    if value["v"]:
        run.vs[layer] = value["v"]
    return value["losses"]


def _to_store(run: _Run, layer: str, losses: list[list[float]]) -> Any:
    return losses if run.vs is None else {"losses": losses, "v": run.vs.get(layer, [])}


def _measure(run: _Run, layers: list[str], refs: list | None, batches: list, scope: Any, meta: dict) -> dict:
    """Per layer [C][B] losses, block by block, then the layers outside the blocks."""
    names = [s.name for s in run.specs]
    where = block_of(layers, run.blocks)
    stored = set(scope.keys()) if scope is not None else set()
    results: dict[str, list[list[float]]] = {
        n: _stored(run, n, scope.get(_key(run, n, names))) for n in layers if _key(run, n, names) in stored
    }
    if all(where[n] is None or n in results for n in layers):  # every block layer is stored
        meta["peak_activation_bytes"] = 0
    else:
        _stream(run, layers, where, results, batches, scope, meta)
    for layer in (n for n in layers if where[n] is None and n not in results):
        results[layer] = _full_losses(run, layer, refs)
        if scope is not None:
            scope.put(_key(run, layer, names), _to_store(run, layer, results[layer]))
    return results


def _stream(
    run: _Run, layers: list[str], where: dict, results: dict, batches: list, scope: Any, meta: dict
) -> None:
    """Measure the missing layers of the blocks, streaming the float inputs block by block."""
    names = [s.name for s in run.specs]
    if run.objective == "fisher":
        _stream_fisher(run, layers, where, results, batches, scope, meta)
        return
    t0 = time.perf_counter()
    modules = [run.qmodel.get_submodule(b) for b in run.blocks]
    inputs = capture_inputs(run.qmodel, modules[0], batches, run.task.forward)
    block_args = [  # each block's own other arguments (masks may differ between blocks)
        block_arguments(run.qmodel, modules, lambda b=b: run.task.forward(run.qmodel, b)) for b in batches
    ]
    meta["capture_seconds"] = time.perf_counter() - t0
    peak = 0
    for k, name in enumerate(run.blocks):
        block = run.qmodel.get_submodule(name)
        outs = [call(block, x) for x in inputs]  # the float outputs of block k
        peak = max(peak, _nbytes(inputs) + _nbytes(outs))
        for layer in (n for n in layers if where[n] == k and n not in results):
            results[layer] = _local_losses(run, k, layer, inputs, outs)
            if scope is not None:
                scope.put(_key(run, layer, names), _to_store(run, layer, results[layer]))
        if k + 1 < len(run.blocks):
            inputs = [with_hidden(a[k + 1], hidden_of(y)) for a, y in zip(block_args, outs, strict=True)]
            if k + 2 == len(run.blocks):
                _check_stream(run, batches[0], inputs[0])
        del outs
    meta["peak_activation_bytes"] = peak


def _stream_fisher(
    run: _Run, layers: list[str], where: dict, results: dict, batches: list, scope: Any, meta: dict
) -> None:
    """:func:`_stream` for "fisher", one batch at a time: that batch's gradients at every block's
    output (:func:`_batch_grads`, the same samples in the same order as :func:`fisher_grads`),
    then its inputs streamed block by block and every missing layer and candidate scored on it.

    [DESIGN] Batches outer, blocks inner: the gradients of one batch are held
    (``blocks x samples`` hidden-state tensors), not those of every batch; the scores are the same
    numbers (each is one batch's), at the cost of re-quantizing a layer's weight per batch.
    """
    names = [s.name for s in run.specs]
    todo = [n for n in layers if where[n] is not None and n not in results]
    values: dict[str, list[list[float]]] = {n: [[] for _ in run.specs] for n in todo}
    kept: dict[str, list[list[list[float]]]] = {n: [[] for _ in run.specs] for n in todo}
    modules = [run.qmodel.get_submodule(b) for b in run.blocks]
    gen = torch.Generator().manual_seed(run.seed)
    assert run.rows is not None
    meta["fisher_seconds"] = meta["capture_seconds"] = 0.0
    peak = 0
    for b, batch in enumerate(batches):
        t1 = time.perf_counter()
        grads, _ = _batch_grads(run, batch, run.samples, gen)
        t0 = time.perf_counter()
        meta["fisher_seconds"] += t0 - t1
        (x,) = capture_inputs(run.qmodel, modules[0], [batch], run.task.forward)
        own = block_arguments(run.qmodel, modules, lambda batch=batch: run.task.forward(run.qmodel, batch))
        meta["capture_seconds"] += time.perf_counter() - t0
        for k, block in enumerate(modules):
            ref = call(block, x)  # the float output of block k on this batch
            peak = max(peak, _nbytes(x) + _nbytes(ref) + _nbytes(grads))
            g = grads[k].double()  # [S, *hidden]
            for layer in (n for n in todo if where[n] == k):
                for c, spec in enumerate(run.specs):
                    with applied(run.qmodel, {layer: spec}):
                        delta = (hidden_of(call(block, x)) - hidden_of(ref)).double()
                    v = (g * delta).flatten(1).sum(1)  # [S]
                    values[layer][c].append(float(v.pow(2).mean()) / (2 * run.rows[b]))
                    kept[layer][c].append(v.tolist())
            if k + 1 < len(modules):
                x = with_hidden(own[k + 1], hidden_of(ref))
                if b == 0 and k + 2 == len(modules):
                    _check_stream(run, batch, x)
        del grads
    for layer in todo:
        results[layer] = values[layer]
        if run.vs is not None:
            run.vs[layer] = kept[layer]
        if scope is not None:
            scope.put(_key(run, layer, names), _to_store(run, layer, results[layer]))
    meta["peak_activation_bytes"] = peak
