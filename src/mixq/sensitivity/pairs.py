"""Pairwise measured sensitivity: CLADO's cross-layer loss changes, with prefix reuse.

For layers ``l ≠ m`` and candidates ``s, s'`` (docs/methods.md §3.2, CLADO's forward-only terms)::

    single[l, s]        = L(l at s) − L(fp)
    pairs[l, s, m, s']  = L(l at s, m at s') − L(l at s) − L(m at s') + L(fp)      (= Ω_lm(s, s'))

with ``L`` the mean task loss over the batches and every other layer float. ``pairs`` is stored
symmetrically (``pairs[l, s, m, s'] = pairs[m, s', l, s]``); its diagonal blocks are zero.

Speed. There are ``C·L`` singles and ``C²·L(L−1)/2`` pairs; every one is exact, none copies the
model. Three things make them cheap:

* Candidates are prepared once: each (layer, candidate)'s quantized weight and a calibrated copy
  of its input quantizer; a layer is switched by pointing its sites' ``forward`` at them.
* Prefix reuse. Everything a model computes before its first quantized layer starts (in
  execution order) does not depend on the quantization, so the output of every submodule that
  *finished* before that point is replayed from a cache instead of computed. This holds for any
  graph (residual blocks, transformers), not only chains: one traced float pass finds, for each
  layer, the largest submodules called once that end before it starts (its "frontier").
* For the pair (l at s, m at s') with l first, the outputs computed with l at s are recorded
  once per (l, s, batch) in the pass that measures the single ``L(l at s)``, and every
  candidate s' of every later layer m replays them: each pair costs only the work from m on.

* Replays are handed out as they are, without a copy, unless the model writes into a replayed
  tensor (an in-place op on a module's output, as ``relu(inplace=True)`` after a conv): one
  float pass per layer with uncopied replays, compared with a snapshot, decides it up front.

Exactness is checked, not assumed: a few singles and pairs are compared with plain forward
passes first; on any difference (a model with hidden state, or one that mutates a module's
input in place) the reuse is switched off with a warning.

Timings (``meta``) are wall-clock and CPU seconds of this process; the CPU seconds are what a
shared machine's load disturbs least.

Error bars. Every loss is kept per batch and every term computed per batch before averaging,
so ``se`` and ``pairs_se`` (standard errors over the batches) sit beside ``single`` and
``pairs`` in the table: a pair term within a few standard errors of zero is noise.

Every row (l, s), i.e. ``L(l at s)`` and the pair losses with every later layer, is one job of
an executor kept in a result store, so an interrupted measurement resumes where it stopped.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from mixq.executor import Executor, InProcessExecutor, Job
from mixq.plan import LayerSpec, as_layer_spec
from mixq.sensitivity.blockwise import block_of
from mixq.sensitivity.perturb import (
    per_batch,
    split_batches,
    state_fingerprint,
    warn_below_noise,
    warn_few_batches,
)
from mixq.sensitivity.proxies import check_layers
from mixq.sensitivity.table import Sensitivity, mean_se, options_of
from mixq.store import Store, fingerprint_data
from mixq.tasks import Task
from mixq.wrap import applied, sites

log = logging.getLogger(__name__)

FP_KEY = "pairs/fp"
VERIFY_RTOL = 1e-5


# -- tracing: execution order and frontiers ------------------------------------------------------


def _replayable(out: Any) -> bool:
    """Whether an output is made only of tensors, None and plain tuples, lists and dicts."""
    if out is None or isinstance(out, torch.Tensor):
        return True
    if type(out) in (tuple, list):
        return all(_replayable(o) for o in out)
    if type(out) is dict:
        return all(_replayable(o) for o in out.values())
    return False


def _clone(out: Any) -> Any:
    """Copy the tensors of a replayable output (a replay must not be mutated in place)."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if type(out) in (tuple, list):
        return type(out)(_clone(o) for o in out)
    if type(out) is dict:
        return {k: _clone(v) for k, v in out.items()}
    return out


@dataclass(frozen=True)
class Trace:
    """Execution order of one forward pass: when each module starts and ends.

    Attributes:
        start: first pre-forward event index of each called module.
        end: last post-forward event index of each called module.
        once: modules called exactly once whose output can be replayed.
        children: direct children of each module, by full name.
    """

    start: dict[str, int]
    end: dict[str, int]
    once: frozenset[str]
    children: dict[str, list[str]]

    def frontier(self, t: int) -> list[str]:
        """Return the largest replayable modules that end before event ``t``."""
        out: list[str] = []
        todo = list(self.children[""])
        while todo:
            name = todo.pop(0)
            if name not in self.start or self.start[name] >= t:
                continue
            if name in self.once and self.end[name] < t:
                out.append(name)
            else:
                todo[:0] = self.children[name]
        return out


def trace(model: nn.Module, run: Callable[[], Any]) -> Trace:
    """Trace the module calls of ``run()`` (one forward pass of ``model``)."""
    counter = [0]
    start: dict[str, int] = {}
    end: dict[str, int] = {}
    calls: dict[str, int] = {}
    ok: dict[str, bool] = {}

    def pre(name: str, mod: nn.Module, args: Any) -> None:
        counter[0] += 1
        start.setdefault(name, counter[0])
        calls[name] = calls.get(name, 0) + 1

    def post(name: str, mod: nn.Module, args: Any, out: Any) -> None:
        counter[0] += 1
        end[name] = counter[0]
        ok[name] = ok.get(name, True) and _replayable(out)

    handles = []
    for name, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(partial(pre, name)))
        handles.append(mod.register_forward_hook(partial(post, name)))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    children = {
        name: [f"{name}.{c}" if name else c for c, _ in mod.named_children()]
        for name, mod in model.named_modules()
    }
    once = frozenset(n for n, c in calls.items() if c == 1 and n and ok.get(n, False) and n in end)
    return Trace(start, end, once, children)


# -- switching modules: constant outputs and quantized layers ---------------------------------


def _constant(value: Any, *args: Any, **kwargs: Any) -> Any:
    return value


def _replay(value: Any, *args: Any, **kwargs: Any) -> Any:
    return _clone(value)


@contextmanager
def _forwards(model: nn.Module, replace: dict[str, Callable[..., Any]]) -> Iterator[None]:
    """Point the ``forward`` of named submodules at other callables inside a ``with`` block.

    The modules stay in place (their attributes stay readable); their forward is restored on
    exit, always.
    """
    saved = []
    try:
        for name, fn in replace.items():
            mod = model.get_submodule(name)
            saved.append((mod, mod.__dict__.get("forward")))
            mod.forward = fn
        yield
    finally:
        for mod, before in reversed(saved):
            if before is None:
                del mod.forward
            else:
                mod.forward = before


@dataclass
class PairContext:
    """What every pair job shares: the model, the loss, the batches and the caches.

    Attributes:
        qmodel: the wrapped model, every site float.
        loss: ``loss(model, batch)``.
        batches: the sensitivity batches.
        order: the layers in execution order.
        switches: per (layer, candidate name), the site forwards that quantize the layer.
        tr: the traced execution order (None: no prefix reuse).
        float_cache: per batch, the float outputs of the modules on the float frontiers.
        fronts: the frontiers, by event.
        copy_replays: copy replayed outputs on every pass (needed when the model mutates them).
        block: the block index of each layer (None outside blocks): pairs only within a block.
    """

    qmodel: nn.Module
    loss: Callable[[nn.Module, Any], torch.Tensor]
    batches: Sequence[Any]
    order: list[str]
    switches: dict[tuple[str, str], dict[str, Callable[..., Any]]]
    tr: Trace | None = None
    float_cache: dict[int, dict[str, Any]] = field(default_factory=dict)
    fronts: dict[int, list[str]] = field(default_factory=dict)
    copy_replays: bool = True
    block: dict[str, int | None] | None = None

    def begin(self, layer: str) -> int:
        """Return the event at which ``layer`` first starts."""
        assert self.tr is not None
        return self.tr.start[layer]

    def frontier(self, t: int) -> list[str]:
        """Return (and cache) the trace's frontier before event ``t``."""
        assert self.tr is not None
        if t not in self.fronts:
            self.fronts[t] = self.tr.frontier(t)
        return self.fronts[t]

    def evaluate(
        self, batch: int, quant: dict[str, str], replay: dict[str, Any], record: set[str] | None = None
    ) -> tuple[float, dict[str, Any]]:
        """Return the loss on one batch with ``quant`` layers quantized and ``replay`` outputs replayed.

        ``record`` names modules whose outputs are returned (copied), recorded in this pass.
        """
        hand_out = _replay if self.copy_replays else _constant
        replace: dict[str, Callable[..., Any]] = {n: partial(hand_out, v) for n, v in replay.items()}
        for layer, cand in quant.items():
            replace.update(self.switches[(layer, cand)])
        seen: dict[str, Any] = {}
        handles = []
        for name in record or ():
            mod = self.qmodel.get_submodule(name)
            handles.append(mod.register_forward_hook(partial(_keep, seen, name)))
        try:
            with _forwards(self.qmodel, replace), torch.inference_mode():
                value = float(self.loss(self.qmodel, self.batches[batch]))
        finally:
            for h in handles:
                h.remove()
        return value, seen

    def float_outputs(self, batch: int) -> dict[str, Any]:
        """Return (and cache) the float outputs of every module on some layer's frontier."""
        if batch not in self.float_cache:
            assert self.tr is not None
            need = {n for layer in self.order for n in self.frontier(self.begin(layer))}
            _, self.float_cache[batch] = self.evaluate(batch, {}, {}, need)
        return self.float_cache[batch]


def _keep(seen: dict[str, Any], name: str, mod: nn.Module, args: Any, out: Any) -> None:
    seen[name] = _clone(out)


def _prefix(
    ctx: PairContext, batch: int, t: int, upper: dict[str, Any] | None, t_upper: int
) -> dict[str, Any]:
    """Return the replays of the frontier before event ``t``: float ones, else from ``upper``.

    ``upper`` holds outputs recorded with a layer starting at ``t_upper`` quantized.
    """
    assert ctx.tr is not None
    floats = ctx.float_outputs(batch)
    out = {}
    for name in ctx.frontier(t):
        out[name] = floats[name] if ctx.tr.end[name] < t_upper or upper is None else upper[name]
    return out


def row_job(
    ctx: PairContext,
    layer: str,
    cand: str,
    names: list[str],
    with_pairs: bool = True,
    window: int | None = None,
    pair_names: list[str] | None = None,
) -> dict[str, Any]:
    """Return ``L(layer at cand)`` and ``L(layer at cand, m at c)`` for every later layer m, c.

    Args:
        ctx: the shared context.
        layer: the first layer (in execution order) of the pairs.
        cand: its candidate name.
        names: the candidate names.
        with_pairs: measure the pairs too (False: the single only).
        window: pair ``layer`` only with the next ``window`` layers (None: every later layer).
        pair_names: the candidates whose pairs are measured (None: all); a pair with another
            candidate is not evaluated and its loss is NaN (``assemble`` takes its Ω as 0).

    Returns:
        ``{"single": loss, "pairs": [[loss per candidate] per later layer], "seconds": ...}``,
        losses averaged over the batches, and the same per batch (``single_batches`` [B],
        ``pairs_batches`` [later][candidate][B]); ``pair_seconds`` (``pair_cpu_seconds``) is the
        wall-clock (CPU) time of the pair passes alone.
    """
    first = ctx.order.index(layer) + 1
    later = ctx.order[first : None if window is None else first + window] if with_pairs else []
    if pair_names is not None and cand not in pair_names:
        later = []
    measured = [c in pair_names if pair_names is not None else True for c in names]
    if ctx.block is not None:  # a block's layers run contiguously: the pairs stay a prefix
        mine = ctx.block[layer]
        later = [] if mine is None else list(itertools.takewhile(lambda m: ctx.block[m] == mine, later))
    single: list[float] = []  # per batch
    pairs: list[list[list[float]]] = [[[] for _ in names] for _ in later]  # [later][cand][batch]
    t0, c0 = time.perf_counter(), time.process_time()
    pair_seconds = pair_cpu = 0.0
    for b in range(len(ctx.batches)):
        if ctx.tr is None:
            value, _ = ctx.evaluate(b, {layer: cand}, {})
            single.append(value)
            t1, c1 = time.perf_counter(), time.process_time()
            for i, m in enumerate(later):
                for j, c in enumerate(names):
                    value = ctx.evaluate(b, {layer: cand, m: c}, {})[0] if measured[j] else float("nan")
                    pairs[i][j].append(value)
            pair_seconds += time.perf_counter() - t1
            pair_cpu += time.process_time() - c1
            continue
        t_l = ctx.begin(layer)
        need = {n for m in later for n in ctx.frontier(ctx.begin(m)) if ctx.tr.end[n] >= t_l}
        value, rec = ctx.evaluate(b, {layer: cand}, _prefix(ctx, b, t_l, None, t_l), need)
        single.append(value)
        t1, c1 = time.perf_counter(), time.process_time()
        for i, m in enumerate(later):
            replay = _prefix(ctx, b, ctx.begin(m), rec, t_l)
            for j, c in enumerate(names):
                value = ctx.evaluate(b, {layer: cand, m: c}, replay)[0] if measured[j] else float("nan")
                pairs[i][j].append(value)
        pair_seconds += time.perf_counter() - t1
        pair_cpu += time.process_time() - c1
    n = len(ctx.batches)
    return {
        "single": sum(single) / n,
        "pairs": [[sum(v) / n for v in row] for row in pairs],
        "single_batches": single,
        "pairs_batches": pairs,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "pair_seconds": pair_seconds,
        "pair_cpu_seconds": pair_cpu,
        "pair_evals": len(later) * sum(measured) * n,
    }


def fp_job(ctx: PairContext) -> list[float]:
    """Return the float loss of each batch."""
    return [ctx.evaluate(b, {}, {})[0] for b in range(len(ctx.batches))]


# -- preparation ---------------------------------------------------------------------------------


def switches(qmodel: nn.Module, layer: str, spec: LayerSpec) -> dict[str, Callable[..., Any]]:
    """Return the site forwards that put ``layer`` at ``spec``: a fixed quantized weight, a copy of
    its input quantizer set to the spec (same calibration statistics)."""
    site = sites(qmodel)[layer]
    out: dict[str, Callable[..., Any]] = {}
    if spec.weight is not None:
        with applied(qmodel, {layer: LayerSpec(weight=spec.weight)}), torch.inference_mode():
            wq = site.weight_quant(site.weight).clone()
        out[f"{layer}.weight_quant"] = partial(_constant, wq)
    if spec.act is not None:
        aq = copy.deepcopy(site.input_quant)
        aq.set_spec(spec.act)
        out[f"{layer}.input_quant"] = aq.forward
    return out


def _verify(ctx: PairContext, names: list[str]) -> bool:
    """Compare a few reused losses with plain passes on the first batch; True when all match."""
    order, tr = ctx.order, ctx.tr
    assert tr is not None
    checks = [(order[-1], names[0], None, None), (order[0], names[-1], order[-1], names[0])]
    if len(order) > 2:
        checks.append((order[len(order) // 2 - 1], names[0], order[len(order) // 2], names[-1]))
    for first, s, m, c in checks:
        quant = {first: s} if m is None else {first: s, m: c}
        plain = ctx.evaluate(0, quant, {})[0]
        t_l = ctx.begin(first)
        rec_need = set() if m is None else {n for n in ctx.frontier(ctx.begin(m)) if tr.end[n] >= t_l}
        fast, rec = ctx.evaluate(0, {first: s}, _prefix(ctx, 0, t_l, None, t_l), rec_need)
        if m is not None:
            fast = ctx.evaluate(0, quant, _prefix(ctx, 0, ctx.begin(m), rec, t_l))[0]
        if abs(fast - plain) > VERIFY_RTOL * max(1.0, abs(plain)):
            log.warning(
                "prefix reuse changed a loss (%r: %.9g vs %.9g); reuse switched off", quant, fast, plain
            )
            return False
    return True


def _mutates(ctx: PairContext) -> bool:
    """Whether a pass writes into uncopied replays: one float pass per layer on the first batch.

    Each pass replays the float frontier of one layer without copies; the replayed tensors are
    then compared with a snapshot. The float cache is restored either way.
    """
    floats = ctx.float_outputs(0)
    snapshot = _clone(floats)
    saved, ctx.copy_replays = ctx.copy_replays, False
    try:
        for layer in ctx.order:
            t = ctx.begin(layer)
            ctx.evaluate(0, {}, _prefix(ctx, 0, t, None, t))
    finally:
        ctx.copy_replays = saved
    changed = not _same(floats, snapshot)
    ctx.float_cache[0] = snapshot
    return changed


def _same(a: Any, b: Any) -> bool:
    """Whether two replayable outputs hold equal tensors (NaNs equal), structure and all."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
    if type(a) in (tuple, list):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if type(a) is dict:
        return type(b) is dict and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


def _fmt_key(layers: list[str], names: list[str]) -> str:
    return hashlib.sha256(json.dumps([layers, names]).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PairwiseOptions:
    """How :func:`pairwise` measures (see its arguments)."""

    executor: Executor | None = None
    store: Store | None = None
    reuse: bool = True
    progress: bool = True
    with_pairs: bool = True
    window: int | None = None
    pair_names: tuple[str, ...] | None = None
    min_batches: int = 4
    blocks: tuple[str, ...] | None = None


def pairwise(
    qmodel: nn.Module,
    task: Task,
    layers: list[str],
    candidates: list[str | LayerSpec],
    batches: Sequence[Any] | None = None,
    **options: Any,
) -> Sensitivity:
    """Measure single and pairwise loss changes of every layer and candidate (CLADO).

    Args:
        qmodel: a wrapped (and, for activation candidates, calibrated) model.
        task: gives ``loss(model, batch)``.
        layers: exact names of the layers.
        candidates: candidate names or specs.
        batches: the sensitivity batches; the task's calibration batches by default.
        options: :class:`PairwiseOptions` as keywords:
        executor: runs the (layer, candidate) row jobs; in-process by default.
        store: finished jobs keyed by the model state and the batches (one store per loss).
        reuse: replay unchanged prefixes (checked against plain passes first).
        progress: show a progress bar on a terminal.
        with_pairs: False measures the singles only (``pairs`` is then None).
        window: measure the pairs of layers at most ``window`` apart in execution order only
            (None: all pairs). Pairs farther apart are taken as independent (Ω = 0, the
            diagonal model's assumption): ``L·window`` instead of ``L(L-1)/2`` layer pairs, for
            models whose all-pairs cost is out of reach.
        min_batches: cut the batches into equal parts until there are this many where the
            batch sizes allow, for the standard errors (``perturb.split_batches``; 4 by default).
            1 keeps the batches and does not warn about their number (a caller that forms
            its errors over several calls, as clado does over its parts).
        blocks: names of the model's repeated blocks (``blockwise.find_blocks``): measure the
            pairs of layers of one block only (block-local pairs, for LLMs: ``L·C²·(block size)``
            pairs instead of ``L²·C²/2``); pairs across blocks, and of layers outside every
            block, count as independent (Ω = 0). Combines with ``window``.
        pair_names: measure the pairs of these candidates only (None: all); a pair with any
            other candidate counts as independent (Ω = 0, SE 0). For a near-lossless candidate
            (8-bit weights) whose interactions are noise: ``C'²/C²`` of the pair passes.

    Returns:
        A Sensitivity of kind "pairwise" with ``single`` [L, C] and symmetric ``pairs``
        [L, C, L, C], and their standard errors over the batches beside them, ``se`` [L, C]
        and ``pairs_se`` [L, C, L, C] (each term computed per batch, then averaged: see
        :func:`assemble`); ``meta`` holds the float loss, timings and the singles below −2 SE.
    """
    opts = options_of(PairwiseOptions, options)
    executor, store, reuse, progress = opts.executor, opts.store, opts.reuse, opts.progress
    with_pairs, window = opts.with_pairs, opts.window
    check_layers(qmodel, layers)
    specs = [as_layer_spec(c) for c in candidates]
    names = [s.name for s in specs]
    if not names:
        raise ValueError("give at least one candidate, e.g. ['w4a8', 'w8a8']")
    if len(set(names)) != len(names) or len(set(layers)) != len(layers):
        raise ValueError(f"layers and candidates must be unique; got {layers} and {names}")
    batches = split_batches(task.calib if batches is None else batches, opts.min_batches)
    if not batches:
        raise ValueError("pairwise sensitivity needs at least one batch")
    if opts.min_batches > 1:  # min_batches=1: the caller forms its errors itself (clado's parts)
        warn_few_batches(len(batches))
    if window is not None and window < 1:
        raise ValueError(f"window must be at least 1 layer (or None for all pairs), got {window}")
    meta: dict[str, Any] = {"batches": len(batches), "window": window, "block_local": opts.blocks is not None}
    with applied(qmodel, {}):
        qmodel.eval()
        sw = {(n, s.name): switches(qmodel, n, s) for n in layers for s in specs}
        tr = trace(qmodel, lambda: _run_float(qmodel, task.loss, batches[0]))
        missing = [n for n in layers if n not in tr.start]
        if missing:
            raise ValueError(f"layers {missing[:5]} are never called by the task's loss; pass used layers")
        order = sorted(layers, key=lambda n: tr.start[n])
        ctx = PairContext(qmodel, task.loss, batches, order, sw, tr if reuse else None)
        if opts.blocks is not None:
            ctx.block = block_of(order, list(opts.blocks))
        if reuse:
            ctx.copy_replays = _mutates(ctx)
        if reuse and not _verify(ctx, names):
            ctx.tr = None
            ctx.float_cache.clear()
        meta["reuse"] = ctx.tr is not None
        meta["copy_replays"] = ctx.tr is not None and ctx.copy_replays
        key = ("pairs/" if with_pairs else "singles/") + _fmt_key(order, names)
        if with_pairs and window is not None:
            key += f"/window{window}"
        pair_names = None if opts.pair_names is None else [n for n in names if n in opts.pair_names]
        if with_pairs and pair_names is not None:
            unknown = sorted(set(opts.pair_names) - set(names))
            if unknown:
                raise ValueError(f"pair_names {unknown} are not candidates; valid: {', '.join(names)}")
            key += "/pairs" + _fmt_key(pair_names, [])
        if with_pairs and opts.blocks is not None:
            key += "/blocks" + _fmt_key(list(opts.blocks), [])
        jobs = [Job(FP_KEY, fp_job)]
        jobs += [
            Job(f"{key}/{n}/{c}", row_job, (n, c, names, with_pairs, window, pair_names))
            for n in order
            for c in names
        ]
        scope = None
        if store is not None:
            meta["model_fp"], meta["data_fp"] = state_fingerprint(qmodel), fingerprint_data(batches)
            scope = store.scope(meta["model_fp"], meta["data_fp"])
        runner = executor if executor is not None else InProcessExecutor(desc="pairwise sensitivity")
        t0 = time.perf_counter()
        results = runner.map(jobs, ctx, store=scope, progress=progress)
        meta["seconds"] = time.perf_counter() - t0
    rows = {(n, c): results[f"{key}/{n}/{c}"] for n in order for c in names}
    single, pairs, single_se, pairs_se = assemble(layers, order, names, rows, results[FP_KEY])
    meta.update(fp_loss=float(per_batch(results[FP_KEY]).mean()), **timings(rows.values()))
    log.info("pairwise: %d layers x %d candidates in %.1f s", len(layers), len(names), meta["seconds"])
    kind = "pairwise" if with_pairs else "measured"
    sens = Sensitivity(
        list(layers),
        names,
        single,
        kind=kind,
        pairs=pairs if with_pairs else None,
        meta=meta,
        se=single_se,
        pairs_se=pairs_se if with_pairs else None,
    )
    meta["below_noise"] = warn_below_noise(sens)
    return sens


def _run_float(qmodel: nn.Module, loss: Callable[[nn.Module, Any], torch.Tensor], batch: Any) -> None:
    with torch.inference_mode():
        loss(qmodel, batch)


def timings(rows: Any) -> dict[str, float]:
    """Sum the timings of row jobs: total, pair passes only, and the number of pair passes.

    CPU seconds are NaN when a stored row (from an older version) did not record them.
    """
    rows = list(rows)
    return {
        "job_seconds": sum(r["seconds"] for r in rows),
        "job_cpu_seconds": sum(r.get("cpu_seconds", float("nan")) for r in rows),
        "pair_seconds": sum(r["pair_seconds"] for r in rows),
        "pair_cpu_seconds": sum(r.get("pair_cpu_seconds", float("nan")) for r in rows),
        "pair_evals": int(sum(r["pair_evals"] for r in rows)),
        "row_evals": len(rows),
    }


def assemble(
    layers: list[str], order: list[str], names: list[str], rows: dict[tuple[str, str], dict], fp: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn row-job losses into ``single`` [L, C], symmetric ``pairs`` [L, C, L, C] (Ω) and their SEs.

    Every term is computed per batch from the same batch's losses (``Ω_b = L_b(l,m) − L_b(l) −
    L_b(m) + L_b(fp)``), then averaged; its standard error is that of the per-batch terms (NaN
    with one batch, or for rows stored by an older mixq without per-batch losses).
    """
    L, C = len(layers), len(names)
    fp_b = per_batch(fp)  # [B]
    B = fp_b.numel()
    if B == 1 or any(len(r.get("single_batches", ())) != B for r in rows.values()):
        fp_b = fp_b.mean().reshape(1)
        rows = {k: _means_only(r) for k, r in rows.items()}
        B = 1
    pos = {n: i for i, n in enumerate(layers)}
    loss1 = torch.zeros(L, C, B, dtype=torch.float64)
    for (n, c), r in rows.items():
        loss1[pos[n], names.index(c)] = torch.tensor(r["single_batches"], dtype=torch.float64)
    single, single_se = mean_se(loss1 - fp_b)  # [L, C] each
    pairs = torch.zeros(L, C, L, C, dtype=torch.float64)
    pairs_se = torch.zeros(L, C, L, C, dtype=torch.float64)
    for k, n in enumerate(order):
        for j, c in enumerate(names):
            for i, m in enumerate(order[k + 1 :]):
                if i >= len(rows[(n, c)]["pairs"]):  # outside the window, or singles only
                    break
                lm = torch.tensor(rows[(n, c)]["pairs_batches"][i], dtype=torch.float64)  # [C, B]
                omega, se = mean_se(lm - loss1[pos[n], j] - loss1[pos[m]] + fp_b)  # [C] each
                skipped = lm.isnan().any(-1)  # pairs not measured (pair_names): independent
                omega, se = omega.masked_fill(skipped, 0.0), se.masked_fill(skipped, 0.0)
                pairs[pos[n], j, pos[m]] = omega
                pairs[pos[m], :, pos[n], j] = omega
                pairs_se[pos[n], j, pos[m]] = se
                pairs_se[pos[m], :, pos[n], j] = se
    return single, pairs, single_se, pairs_se


def _means_only(row: dict) -> dict:
    """A row reduced to its batch means, as one batch (rows of an older mixq hold only those)."""
    return {
        **row,
        "single_batches": [row["single"]],
        "pairs_batches": [[[v] for v in cands] for cands in row["pairs"]],
    }
