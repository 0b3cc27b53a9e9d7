"""AdaRound: learn whether each weight rounds up or down, layer by layer, on calibration data.

Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020.
With the layer's scale ``s`` and zero point ``z`` (from the plan's spec, range calibration
unchanged), the quantized weight is

    W~ = s * (clamp(floor(W / s) + h(V) + z, q_min, q_max) - z),
    h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),   zeta = 1.1, gamma = -0.1,

with ``V`` initialized so that ``h(V) = frac(W / s)``. ``V`` minimizes, with Adam (lr 1e-3),

    || f(x; W, b) - f(x~; W~, b~) ||^2  +  lambda * sum_ij (1 - |2 h(V_ij) - 1|^beta)

where ``x`` is the layer's input in the float model and ``x~`` its input in the network whose
earlier layers are already rounded (and whose activations are quantized as planned), ``b~`` the
layer's current bias. The regularizer is off for the first 20 % of the iterations, then ``beta``
falls linearly from 20 to 2; ``lambda = 0.01``; 20000 iterations of batches of 32 by default
(docs/methods.md §8.1, as in the BRECQ code). At the end ``h = 1[V >= 0]`` and the result is stored on
the layer's weight site (:class:`FixedRounding`, :meth:`mixq.nn.Quantizer.set_rounding`).

Mapping of symbols: ``V`` -> ``v``, ``h`` -> :func:`rectified_sigmoid`, ``lambda`` -> ``reg``.
Deviations: the squared error is summed over output channels and averaged over samples and
positions (as in the BRECQ code); for linear layers every row (a token of a sequence) is a sample.
Only integer grids are learned; layers with float or MX weight formats, and weight-only layers
(embeddings: their input is indices), keep plain rounding. With
``keep_better`` (default) a layer whose learned rounding has a larger calibration output error
than round-to-nearest keeps round-to-nearest (short schedules can end worse on small layers,
where the regularizer outweighs the reconstruction error).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from mixq.formats import Int
from mixq.kinds import kind_of
from mixq.plan import QSpec
from mixq.progress import Bar
from mixq.ptq.capture import layer_io
from mixq.quant import fake
from mixq.quant.codes import Encoded
from mixq.tasks import Task
from mixq.wrap import sites, tied_sites

ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class Config:
    """Settings of AdaRound (defaults of docs/methods.md §8.1).

    Attributes:
        iters: optimization steps per layer.
        batch_size: samples per step (images; rows for linear layers).
        reg: weight ``lambda`` of the rounding regularizer.
        beta_start, beta_end: the annealed exponent of the regularizer.
        warmup: fraction of the iterations without the regularizer.
        lr: Adam's learning rate.
        batches: calibration batches used (0: all of them).
        keep_better: keep round-to-nearest for a layer whose learned rounding has a larger output
            error on the calibration data (a mixq safeguard, not in the paper).
    """

    iters: int = 20000
    batch_size: int = 32
    reg: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    lr: float = 1e-3
    batches: int = 0
    keep_better: bool = True

    def __post_init__(self) -> None:
        if self.iters < 1 or self.batch_size < 1 or self.batches < 0:
            raise ValueError(f"iters and batch_size must be >= 1 and batches >= 0, got {self}")
        if not 0 <= self.warmup < 1 or self.reg < 0 or self.lr <= 0:
            raise ValueError(f"need 0 <= warmup < 1, reg >= 0, lr > 0; got {self}")


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """Return ``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``.

    >>> rectified_sigmoid(torch.tensor([0.0])).tolist()
    [0.5]
    """
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def init_v(frac: torch.Tensor) -> torch.Tensor:
    """Return ``V`` with ``h(V) = frac`` (``frac`` in [0, 1)).

    >>> rectified_sigmoid(init_v(torch.tensor([0.25, 0.5]))).tolist()
    [0.25, 0.5]
    """
    p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p) - torch.log1p(-p)


def beta_at(t: int, cfg: Config) -> float | None:
    """Return the regularizer's exponent at step ``t``, or None during the warm-up."""
    start = int(cfg.warmup * cfg.iters)
    if t < start:
        return None
    rel = (t - start) / max(1, cfg.iters - start)
    return cfg.beta_end + (cfg.beta_start - cfg.beta_end) * max(0.0, 1.0 - rel)


def supported(spec: QSpec | None) -> bool:
    """Whether AdaRound applies to a weight spec: integer grids (not MX, not float formats)."""
    return spec is not None and isinstance(spec.fmt, Int) and spec.granularity != "block"


@dataclass(frozen=True)
class Grid:
    """A weight's integer grid under a spec: rows, per-row scale and zero, code range."""

    rows: fake.Rows
    scale: torch.Tensor  # [R]
    zero: torch.Tensor  # [R]
    qmin: int
    qmax: int
    float_zero: bool = False  # ``zero`` is the float offset m of ``s q + m`` (+fzero)

    def units(self) -> torch.Tensor:
        """The rows in units of the scale: ``x / s`` (``(x - m) / s`` with a float zero point)."""
        if self.float_zero:
            return (self.rows.data - self.zero[:, None]) / self.scale[:, None]
        return self.rows.data / self.scale[:, None]

    def weight(self, h: torch.Tensor) -> torch.Tensor:
        """Return the quantized weight with rounding offsets ``h`` [R, k] (0: floor, 1: ceil)."""
        s, z = self.scale[:, None], self.zero[:, None]
        floor = torch.floor(self.units())
        if self.float_zero:
            return fake.from_rows(self.rows, torch.clamp(floor + h, self.qmin, self.qmax) * s + z)
        q = torch.clamp(floor + h + z, self.qmin, self.qmax)
        return fake.from_rows(self.rows, (q - z) * s)


def grid_of(w: torch.Tensor, spec: QSpec, gram: torch.Tensor | None = None) -> Grid:
    """Compute the grid of weight ``w`` under ``spec`` exactly as the weight site calibrates it."""
    if not supported(spec):
        raise ValueError(f"AdaRound needs an integer weight format, got {spec.fmt}")
    rows = fake.to_rows(w.detach().float(), spec)
    error = fake.output_error(gram.float(), spec, w.shape[0]) if gram is not None else None
    scale, zero = fake.calibrate_rows(rows.data, spec, error)
    qmin, qmax = fake.int_grid(spec.fmt, spec.symmetric)
    return Grid(rows, scale, zero, qmin, qmax, spec.float_zero)


def _layer_fn(m: nn.Module):
    return m.forward_with  # (x, w, b) -> the layer's output, as the site's float layer computes it


@dataclass(frozen=True)
class FixedRounding:
    """The rounding AdaRound chose: ``wq`` while the spec is ``spec`` and the weight equals ``w``.

    Given to the weight site (:meth:`mixq.nn.Quantizer.set_rounding`), it survives later
    forwards and plan switches; another spec or changed weights fall back to plain rounding.
    """

    spec: QSpec
    w: torch.Tensor
    wq: torch.Tensor

    def __post_init__(self) -> None:
        if self.wq.shape != self.w.shape:
            raise ValueError(
                f"fixed weight shape {tuple(self.wq.shape)} differs from the weight's {tuple(self.w.shape)}"
            )
        object.__setattr__(self, "w", self.w.detach().clone())
        object.__setattr__(self, "wq", self.wq.detach().clone())

    def __call__(self, w: torch.Tensor, spec: QSpec) -> torch.Tensor | None:
        """``wq`` for this spec and weight value, else None."""
        if spec == self.spec and self.w.shape == w.shape and torch.equal(self.w, w.detach()):
            return self.wq
        return None


@dataclass(frozen=True)
class FixedGrid(FixedRounding):
    """A chosen rounding on a grid of its own: ``wq`` with a scale and zero point per row of
    ``fake.to_rows`` (GPTQ's dynamic groups), which the exports store instead of the scales
    the spec computes from ``w``."""

    scale: torch.Tensor
    zero: torch.Tensor

    def encode(self, w: torch.Tensor, spec: QSpec) -> Encoded | None:
        """The codes of ``wq`` on this grid (None when ``spec`` or ``w`` are not this rounding's)."""
        if self(w, spec) is None:
            return None
        rows = fake.to_rows(self.wq.float(), spec)
        kind = kind_of(spec)
        codes = fake.from_rows(rows, kind.row_codes(rows.data, self.scale, self.zero, spec))
        return Encoded(spec, tuple(w.shape), codes, self.scale, None if spec.symmetric else self.zero)


def share_tied_rounding(qmodel: nn.Module) -> list[str]:
    """Give each tied follower (:func:`mixq.wrap.tied_sites`) its leader's chosen rounding.

    A PTQ step that chooses roundings skips weight-only sites (an embedding): one tied to a learned
    lm_head would round the very same tensor to nearest, and the packed export stores a tied tensor
    once (it refuses two quantized copies). Returns the followers given a rounding.
    """
    qs = sites(qmodel)
    shared = []
    for follower, leader in tied_sites(qmodel).items():
        rounding = qs[leader].weight_quant.rounding
        if rounding is not None and qs[follower].weight_quant.spec == qs[leader].weight_quant.spec:
            qs[follower].weight_quant.set_rounding(rounding)
            shared.append(follower)
    return shared


def learn_rounding(
    m: nn.Module, x_hat: torch.Tensor, target: torch.Tensor, cfg: Config, gen: torch.Generator, bar: Bar
) -> tuple[torch.Tensor, Grid]:
    """Learn the rounding of one quantized layer ``m`` (a QLinear or QConv2d with a weight spec).

    Args:
        m: the layer; its ``input_quant`` is applied to ``x_hat`` first.
        x_hat: the layer's inputs in the quantized network [N, ...].
        target: the float layer's outputs [N, ...].
        cfg: settings; gen: the sampling generator; bar: a progress bar advanced per step.

    Returns:
        The hard-rounded weight and its grid.
    """
    spec = m.weight_quant.spec
    grid = grid_of(m.weight, spec, m.weight_quant.gram)
    with torch.no_grad():
        x_q = m.input_quant(x_hat)
        frac = grid.units()
        frac = frac - torch.floor(frac)
    v = init_v(frac).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=cfg.lr)
    f = _layer_fn(m)
    bias = m.bias.detach() if m.bias is not None else None
    n = x_q.shape[0]
    step = max(1, cfg.iters // 100)
    for t in range(cfg.iters):
        idx = torch.randint(n, (min(cfg.batch_size, n),), generator=gen)
        h = rectified_sigmoid(v)
        out = f(x_q[idx], grid.weight(h).to(m.weight.dtype), bias)
        loss = (out - target[idx]).pow(2).sum(1).mean()
        beta = beta_at(t, cfg)
        if beta is not None and cfg.reg > 0:
            loss = loss + cfg.reg * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (t + 1) % step == 0 or t + 1 == cfg.iters:
            bar.update(step if (t + 1) % step == 0 else (t + 1) % step)
            bar.set(loss=f"{loss.item():.4g}")
    with torch.no_grad():
        wq = grid.weight((v >= 0).to(grid.rows.data.dtype)).to(m.weight.dtype)
    return wq, grid


def output_error(m: nn.Module, x_hat: torch.Tensor, target: torch.Tensor, wq: torch.Tensor) -> float:
    """Return the layer's squared output error with weight ``wq`` (summed over channels, mean)."""
    with torch.no_grad():
        out = _layer_fn(m)(m.input_quant(x_hat), wq, m.bias)
        return float((out - target).pow(2).sum(1).mean())


def adaround(qmodel: nn.Module, task: Task, cfg: Config = Config(), seed: int = 0) -> dict:
    """Learn the rounding of every integer-weight layer of ``qmodel`` in module order (in place).

    Args:
        qmodel: the wrapped model with its plan applied.
        task: gives the float model, the calibration batches and the forward function.
        cfg: settings.
        seed: seeds the batch sampling (layer ``i`` uses ``seed * 1_000_003 + i``).

    Returns:
        A record: layers learned and skipped, and the calibration output error of each learned
        layer with round-to-nearest and with the learned rounding.
    """
    batches = list(task.calib)[: cfg.batches or None]
    all_sites = sites(qmodel)
    # A weight-only site (an embedding) reads indices, and its output is its rows: it keeps plain
    # rounding (listed in "skipped").
    layers = [
        n
        for n, m in all_sites.items()
        if supported(m.weight_quant.spec) and not getattr(m, "weight_only", False)
    ]
    skipped = [n for n, m in all_sites.items() if m.weight_quant.spec is not None and n not in layers]
    ref = copy.deepcopy(task.model).eval()
    qmodel.eval()
    errors = {}
    hint = f"--ptq-arg adaround.iters=N sets the {cfg.iters} iterations per layer (2000 is often enough)"
    with Bar(
        len(layers) * cfg.iters, "adaround", unit="step", per_line=cfg.iters, line_unit="layer", hint=hint
    ) as bar:
        for i, name in enumerate(layers):
            m = all_sites[name]
            target = layer_io(ref, name, batches, task.forward, "output")
            x_hat = layer_io(qmodel, name, batches, task.forward, "input")
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            with torch.enable_grad():
                wq, _ = learn_rounding(m, x_hat, target, cfg, gen, bar)
            gram = m.weight_quant.gram.float() if m.weight_quant.gram is not None else None
            rtn = fake.quantize_weight(m.weight, m.weight_quant.spec, gram)
            before, after = output_error(m, x_hat, target, rtn), output_error(m, x_hat, target, wq)
            if not math.isfinite(after):
                raise ValueError(f"AdaRound diverged on layer {name!r}")
            kept = cfg.keep_better and after > before
            m.weight_quant.set_rounding(FixedRounding(m.weight_quant.spec, m.weight, rtn if kept else wq))
            errors[name] = {"rtn": before, "adaround": after, "kept_nearest": kept}
    tied = share_tied_rounding(qmodel)  # an embedding tied to a learned lm_head: the same rounding
    return {
        "layers": len(layers),
        "skipped": skipped,
        "tied": tied,
        "iters": cfg.iters,
        "batch_size": cfg.batch_size,
        "calib_batches": len(batches),
        "output_error": errors,
    }
