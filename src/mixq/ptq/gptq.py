"""GPTQ: round a layer's weight column by column, feeding each column's error to the rest.

Frantar, Ashkboos, Hoefler and Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023 (Algorithm 1). For a layer ``y = W x`` with
calibration inputs ``X`` [k, N], the output error ``||W X - W^ X||^2`` has the Hessian
``H = 2 X X^T`` (the same for every output row). With ``H^-1`` the inverse of the damped
Hessian ``H + lambda I`` (``lambda = damp * mean(diag H)``), columns ``j = 0 .. k-1`` (in
order, or by decreasing ``diag H`` with ``act_order``) are quantized one at a time:

    q_j  = Q(w_j)                                 (the layer's grid, column j's scales)
    e_j  = (w_j - q_j) / [U]_jj                   (U: upper Cholesky factor of H^-1)
    w_l -= e_j [U]_jl  for the columns l > j      (the OBS update of the remaining weights)

where ``U``'s row ``j`` is the row of the inverse Hessian of the remaining columns scaled by
``1 / sqrt([H^-1]_jj)`` (Cholesky reformulation, Section 4 "Step 3"). Updates are applied
lazily: within a block of ``block_size`` columns at once, to the columns after the block as one
matrix product (Section 4 "Step 2").

Symbol map: ``W`` -> ``w`` [out, k] (a convolution's weight flattened, per conv group),
``H`` -> :class:`Hessian` (``2/N X X^T``, float32; the damping and Cholesky factorization in
float64 for one layer at a time), ``lambda`` -> ``damp * mean(diag H)`` (``Config.damp``,
0.01 as in the paper), ``B`` -> ``Config.block_size`` (128), ``Q`` -> the layer's integer grid
under its plan's spec (:func:`mixq.kinds.scaled.row_params`).

Sequential calibration (Section 5, "the inputs of each layer come from the partially quantized
model"): the model's repeated blocks (:mod:`mixq.blocks`) are processed in order; the float
run over the calibration batches happens once, up to the first block, whose inputs are cached;
inside a block, the layers are taken in the order they run, those reading the very same input
tensor together (q, k, v; gate, up: one Hessian), recorded from the cached inputs with the
earlier layers of the block already quantized (forwards stopped before the next layer); the
layers are quantized and the Hessian freed; the quantized block's outputs are the next block's
inputs. Layers outside the blocks (before: in module order, first; after, e.g. ``lm_head``:
last) and models without repeated blocks use forwards of the whole (partially quantized) model,
stopped before the next layer, the same way.

Deviations, each [DESIGN]:

* Grids. Per tensor and per channel, every column's scale and zero point are those the layer's
  spec computes from the stored weight (min/max, mse, omse or percentile, symmetric or
  asymmetric), before any update: the result is a rounding choice on the site's own grid,
  handed to the weight site as a :class:`~mixq.ptq.adaround.FixedRounding` (the stored float
  weight is unchanged). Per group (``Config.groups="dynamic"``, the default), as in the paper's
  code, a group's scale and zero point are computed by the spec's own range method when GPTQ
  reaches the group's first column, from the weights updated so far (the groups that follow
  then absorb the earlier groups' errors inside their own ranges); the site gets a
  :class:`~mixq.ptq.adaround.FixedGrid` holding those scales, which the exports store. With
  ``act_order``, with clip "omse" (its range needs the whole row's output error) or with
  ``groups="static"``, group grids are static like the others.
* Columns whose input is always zero (``H_jj = 0``) keep their weight (rounded to nearest)
  instead of being zeroed: they cannot change the calibration output either way.
* Only integer weight specs are GPTQ'd; other specs (fp and MX formats, multipoint) and
  weight-only sites (embeddings: their input is indices) keep their rounding and are named in
  the record's ``skipped``, with the reason.
* A layer with an input quantizer gets its Hessian from the quantized inputs it computes with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mixq import blocks as blk
from mixq.kinds import kind_of
from mixq.kinds.scaled import row_params
from mixq.nn import LOW_PRECISION
from mixq.plan import QSpec
from mixq.ptq.adaround import FixedGrid, FixedRounding, share_tied_rounding
from mixq.quant import fake
from mixq.tasks import Task
from mixq.wrap import sites

GROUPS = ("dynamic", "static")
ROWS = 4096  # output rows quantized together (rows are independent given the Hessian)


@dataclass(frozen=True)
class Config:
    """Settings of GPTQ.

    Attributes:
        damp: damping added to the Hessian's diagonal, as a fraction of its mean diagonal.
        block_size: columns updated together before the lazy update of the rest.
        act_order: quantize columns in order of decreasing ``diag H`` (the paper's "act-order").
        batches: calibration batches used (0: all of them).
        blockwise: cache the repeated blocks' inputs and run block by block (False: a forward of
            the whole model per layer, as for models without repeated blocks).
        groups: "dynamic" (a group's scale and zero point from the updated weights, when GPTQ
            reaches the group) or "static" (from the stored weight, before any update).
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    batches: int = 0
    blockwise: bool = True
    groups: str = "dynamic"

    def __post_init__(self) -> None:
        if self.groups not in GROUPS:
            raise ValueError(f"groups must be one of {', '.join(GROUPS)}; got {self.groups!r}")
        if not 0 <= self.damp < 1 or not math.isfinite(self.damp):
            raise ValueError(f"damp must be in [0, 1), got {self.damp}")
        if self.block_size < 1 or self.batches < 0:
            raise ValueError(f"block_size must be >= 1 and batches >= 0, got {self}")


@dataclass(frozen=True)
class ColumnGrid:
    """Per-element scale and zero point [out, k] of a weight's grid, and its code range."""

    scale: torch.Tensor
    zero: torch.Tensor
    qmin: int
    qmax: int
    float_zero: bool = False  # ``zero`` is the float offset m of ``s q + m`` (+fzero)

    def quantize(self, w: torch.Tensor, col: int) -> torch.Tensor:
        """Round column ``col`` [out] on the grid: the very operations of ``fake.quantize_rows``."""
        return self.round(w, self.scale[:, col], self.zero[:, col])

    def round(self, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``w`` rounded on the grid of scales ``s`` and zero points ``z`` (broadcast with ``w``)."""
        if self.float_zero:
            return torch.clamp(torch.round((w - z) / s), self.qmin, self.qmax) * s + z
        q = torch.clamp(torch.round(w / s) + z, self.qmin, self.qmax)
        return (q - z) * s

    def sub(self, rows: Any = slice(None), cols: Any = slice(None)) -> ColumnGrid:
        """The grid of some rows and columns (views where the indices are slices)."""
        return ColumnGrid(
            self.scale[rows][:, cols], self.zero[rows][:, cols], self.qmin, self.qmax, self.float_zero
        )


def supported(spec: QSpec | None) -> bool:
    """Whether GPTQ applies to a weight spec: the integer kind (not fp, MX, multipoint)."""
    return spec is not None and kind_of(spec).name == "integer"


def column_grid(w: torch.Tensor, spec: QSpec, gram: torch.Tensor | None = None) -> ColumnGrid:
    """The grid of weight ``w`` [out, ...] under ``spec`` exactly as the weight site computes it,
    spread to one scale and zero point per element of ``w`` flattened to [out, k]."""
    rows, scale, zero = row_params(w, spec, gram)
    out = w.shape[0]

    def spread(v: torch.Tensor) -> torch.Tensor:
        return fake.from_rows(rows, v[:, None].expand_as(rows.data)).reshape(out, -1).contiguous()

    qmin, qmax = fake.int_grid(spec.fmt, spec.symmetric)
    return ColumnGrid(spread(scale), spread(zero), qmin, qmax, spec.float_zero)


def inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Return ``U``, the upper Cholesky factor of ``(H + lambda I)^-1`` (float64).

    Dead columns (``H_jj = 0``) get ``H_jj = 1``. Raises a ValueError naming ``damp`` when the
    damped Hessian is not positive definite.
    """
    h = h.double().clone()
    diag = h.diagonal()
    diag[diag == 0] = 1.0
    diag += damp * diag.mean()
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise ValueError(f"the damped Hessian is not positive definite (damp={damp}); raise damp")
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)


Regroup = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def quantize_matrix(
    w: torch.Tensor,
    h: torch.Tensor,
    grid: ColumnGrid,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    dtype: torch.dtype = torch.float32,
    regroup: tuple[int, Regroup] | None = None,
) -> torch.Tensor:
    """GPTQ (Algorithm 1) of ``w`` [out, k] with Hessian ``h`` [k, k] on ``grid``.

    ``dtype`` is that of the weight updates (float32; the tests also use float64). ``regroup``
    ``(g, fn)`` makes groups of ``g`` columns dynamic (not with ``act_order``): at each group's
    first column, ``fn(columns)`` ([out, g] updated weights, zero-padded at the row's end) gives
    the group's scale and zero point [out], written into ``grid`` in place. Returns the quantized
    weight [out, k] in float32, every element a value of the grid.
    """
    k = w.shape[1]
    w = w.detach().to(dtype).clone()
    perm = None
    if act_order:
        if regroup is not None:
            raise ValueError("dynamic groups follow the column order: not with act_order")
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        w, h = w[:, perm], h[perm][:, perm]
        grid = grid.sub(cols=perm)
    if regroup is not None:  # a group lies inside one lazy-update block: its columns are current
        block_size = max(regroup[0], block_size // regroup[0] * regroup[0])
    u = inverse_factor(h, damp).to(dtype)
    q = torch.zeros(w.shape, dtype=torch.float32)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = i1 + i
            if regroup is not None and col % regroup[0] == 0:
                _set_group(grid, w1[:, i : i + regroup[0]], col, regroup)
            qc = grid.quantize(w1[:, i].float(), col)
            q[:, col] = qc
            e = (w1[:, i] - qc.to(dtype)) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err[:, i] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q


def _set_group(grid: ColumnGrid, cols: torch.Tensor, col: int, regroup: tuple[int, Regroup]) -> None:
    g, fn = regroup
    cols = cols.float()
    if cols.shape[1] < g:  # the row's last group, padded with zeros as fake.to_rows pads it
        cols = torch.nn.functional.pad(cols, (0, g - cols.shape[1]))
    scale, zero = fn(cols)
    end = min(col + g, grid.scale.shape[1])
    grid.scale[:, col:end] = scale[:, None]
    grid.zero[:, col:end] = zero[:, None]


def dynamic(spec: QSpec, cfg: Config) -> tuple[int, Regroup] | None:
    """The dynamic-group setting of ``quantize_matrix`` for ``spec``, or None (static grid)."""
    if cfg.groups != "dynamic" or cfg.act_order or spec.granularity != "group" or spec.clip == "omse":
        return None
    assert spec.group_size is not None
    return spec.group_size, lambda cols: fake.calibrate_rows(cols, spec)


class Hessian:
    """Accumulates ``H = 2/N X^T X`` [G, k, k] (float32) of a site's input columns."""

    def __init__(self, site: nn.Module) -> None:
        self.site = site
        self.h: torch.Tensor | None = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """Add one batch of the site's input (before its input quantizer, applied here)."""
        x = x.detach()
        if self.site.input_quant.spec is not None:
            x = self.site.input_quant(x)
        cols = self.site.input_columns(x).float()  # [G, N, k]
        g = torch.bmm(cols.transpose(1, 2), cols)
        self.h = g if self.h is None else self.h + g
        self.n += cols.shape[1]

    def value(self) -> torch.Tensor:
        if self.h is None:
            raise ValueError("the layer saw no calibration input")
        return self.h * (2.0 / self.n)


def output_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    """``sum over conv groups of tr(D H D^T) / 2`` with ``D = W - W^`` [out, k]: the calibration
    output error per sample (``H = 2/N X^T X``)."""
    groups = h.shape[0]
    d = (w.reshape(w.shape[0], -1).float() - wq.reshape(w.shape[0], -1).float()).reshape(
        groups, -1, h.shape[1]
    )
    return float((torch.bmm(d, h.float()) * d).double().sum() / 2)


def quantize_site(site: nn.Module, h: torch.Tensor, cfg: Config) -> dict[str, float]:
    """Run GPTQ on one site with Hessian ``h`` [G, k, k]; store the result on its weight site.

    Rows are independent given ``H``: they are done ``ROWS`` at a time (per conv group), so a
    large layer (an LM head) needs no full-size temporaries beyond its result.

    Returns the calibration output error with round-to-nearest and with GPTQ.
    """
    wq_site = site.weight_quant
    spec = wq_site.spec
    w = site.weight.detach()
    gram = wq_site.gram.float() if wq_site.gram is not None else None
    grid = column_grid(w, spec, gram)
    regroup = dynamic(spec, cfg)
    static = grid  # round-to-nearest's grid (the one GPTQ fills when its groups are dynamic)
    if regroup is not None:  # filled in group by group (the static grid gives round-to-nearest's error)
        grid = ColumnGrid(grid.scale.clone(), grid.zero.clone(), grid.qmin, grid.qmax, grid.float_zero)
    flat = w.reshape(w.shape[0], -1).float()
    per = flat.shape[0] // h.shape[0]
    # A bfloat16/float16 weight reaches its site in float32 (mixq.nn.LOW_PRECISION): so is it keyed.
    key = w.float() if w.dtype in LOW_PRECISION else w
    wq = torch.empty(flat.shape, dtype=key.dtype)
    err = {"rtn": 0.0, "gptq": 0.0}
    for g in range(h.shape[0]):
        for r0 in range(g * per, (g + 1) * per, ROWS):
            rows = slice(r0, min(r0 + ROWS, (g + 1) * per))
            sub, rtn = grid.sub(rows), static.sub(rows)  # views
            q = quantize_matrix(
                flat[rows], h[g], sub, cfg.damp, cfg.block_size, cfg.act_order, regroup=regroup
            )
            wq[rows] = q
            near = rtn.round(flat[rows], rtn.scale, rtn.zero)  # fake.quantize_rows' operations
            err["rtn"] += output_error(flat[rows], near, h[g][None])
            err["gptq"] += output_error(flat[rows], q, h[g][None])
    if not torch.isfinite(wq).all():
        raise ValueError("GPTQ produced non-finite weights")
    wq = wq.reshape(w.shape)
    if regroup is None:
        wq_site.set_rounding(FixedRounding(spec, key, wq))
    else:  # one scale and zero point per group: the first column of each
        g = regroup[0]
        wq_site.set_rounding(
            FixedGrid(spec, key, wq, grid.scale[:, ::g].reshape(-1), grid.zero[:, ::g].reshape(-1))
        )
    return err


def _classify(qmodel: nn.Module) -> tuple[list[str], dict[str, str]]:
    todo, skipped = [], {}
    for name, m in sites(qmodel).items():
        spec = m.weight_quant.spec
        if spec is None:
            continue
        if getattr(m, "weight_only", False):
            skipped[name] = "weight-only (embedding): its input is indices"
        elif not supported(spec):
            skipped[name] = f"not an integer weight spec ({kind_of(spec).name}: {spec.fmt})"
        else:
            todo.append(name)
    return todo, skipped


def next_group(
    runs: Sequence[Callable[[], Any]], todo: dict[str, nn.Module]
) -> tuple[list[str], torch.Tensor | None]:
    """The next layers of ``todo`` to run and their Hessian: the first that runs, and those that
    read the very same input tensor with the same input spec (q, k and v; gate and up); each run
    stops at the first layer with another input. ([], None) when none of them runs."""
    acc: Hessian | None = None
    group: list[str] = []
    for i, run in enumerate(runs):
        leader: list[tuple[str, torch.Tensor]] = []

        def record(name: str, args: tuple, kwargs: dict, first: bool = i == 0, leader: list = leader) -> bool:
            nonlocal acc
            x = args[0] if args else kwargs["input"]
            if not leader:
                leader.append((name, x))
                acc = acc or Hessian(todo[name])
                acc.add(x)
            elif x is not leader[0][1] or todo[name].input_quant.spec != todo[leader[0][0]].input_quant.spec:
                return True
            if first:
                group.append(name)
            return False

        blk.run_until_any(run, todo, record)
    return group, (acc.value() if acc is not None else None)


def _sequential(
    runs: Sequence[Callable[[], Any]], todo: dict[str, nn.Module], cfg: Config, errors: dict
) -> None:
    """GPTQ the layers ``todo`` in the order they run, group by group (one Hessian alive)."""
    todo = dict(todo)
    while todo:
        group, h = next_group(runs, todo)
        if not group:  # the rest never run on these inputs (named by gptq as skipped)
            return
        for name in group:
            errors[name] = quantize_site(todo.pop(name), h, cfg)
        del h


def _whole_model(
    qmodel: nn.Module, names: list[str], batches: list, task: Task, cfg: Config, errors: dict
) -> None:
    """Quantize ``names`` from forwards of the whole model, each stopped at the next group."""
    all_sites = sites(qmodel)
    runs = [lambda b=b: task.forward(qmodel, b) for b in batches]
    with blk.no_cache(qmodel):
        _sequential(runs, {n: all_sites[n] for n in names}, cfg, errors)


def _split(
    qmodel: nn.Module, todo: list[str], blocks: blk.Blocks
) -> tuple[list[str], list[list[str]], list[str]]:
    """Layers before the blocks (in module order), per block, and after them."""
    prefixes = [b + "." for b in blocks.names()]
    per_block: list[list[str]] = [[n for n in todo if n.startswith(p)] for p in prefixes]
    inside = {n for layers in per_block for n in layers}
    order = [n for n, _ in qmodel.named_modules()]
    at = order.index(blocks.name) if blocks.name in order else 0
    position = {n: i for i, n in enumerate(order)}
    before = [n for n in todo if n not in inside and position[n] < at]
    after = [n for n in todo if n not in inside and position[n] >= at]
    return before, per_block, after


def gptq(qmodel: nn.Module, task: Task, cfg: Config = Config(), seed: int = 0) -> dict:
    """Run GPTQ on every integer-weight layer of ``qmodel`` (plan applied), sequentially, in place.

    Args:
        qmodel: the wrapped model with its plan applied.
        task: the calibration batches and the forward function.
        cfg: settings.
        seed: unused (GPTQ is deterministic).

    Returns:
        A record: layers quantized, skipped (with reasons), whether it ran block-wise (and the
        blocks' module name), and each layer's calibration output error with round-to-nearest
        and with GPTQ.
    """
    del seed
    batches = list(task.calib)[: cfg.batches or None]
    todo, skipped = _classify(qmodel)
    qmodel.eval()
    errors: dict[str, dict[str, float]] = {}
    ids = {id(m) for n, m in sites(qmodel).items() if n in set(todo)}
    blocks = (
        blk.find_blocks(qmodel, count=lambda m: sum(id(s) in ids for s in m.modules()))
        if cfg.blockwise
        else None
    )
    if blocks is None:
        _whole_model(qmodel, todo, batches, task, cfg, errors)
    else:
        before, per_block, after = _split(qmodel, todo, blocks)
        all_sites = sites(qmodel)
        _whole_model(qmodel, before, batches, task, cfg, errors)
        inputs = blk.capture_inputs(qmodel, blocks.modules[0], batches, task.forward)
        with blk.no_cache(qmodel):  # each block's own masks and position embeddings, per batch
            own = [
                blk.block_arguments(qmodel, blocks.modules, lambda b=b: task.forward(qmodel, b))
                for b in batches
            ]
        for k, (block, layers) in enumerate(zip(blocks.modules, per_block, strict=True)):
            runs = [lambda inp=inp, b=block: blk.call(b, inp) for inp in inputs]
            _sequential(runs, {n: all_sites[n] for n in layers}, cfg, errors)
            following = [a[k + 1] for a in own] if k + 1 < len(blocks.modules) else None
            inputs = blk.run_block(block, inputs, following)
        del inputs
        _whole_model(qmodel, after, batches, task, cfg, errors)
    skipped.update({n: "never ran on the calibration batches" for n in todo if n not in errors})
    for name in share_tied_rounding(qmodel):  # an embedding tied to lm_head: lm_head's GPTQ rounding
        skipped[name] = "tied: takes its leader's GPTQ rounding"
    return {
        "layers": len(errors),
        "skipped": skipped,
        "blocks": None if blocks is None else {"name": blocks.name, "count": len(blocks.modules)},
        "calib_batches": len(batches),
        "output_error": errors,
    }
