"""DDQ quantizers: learnable levels, Kronecker-merged bit-width gates, and learned-range integers.

Differentiable Dynamic Quantization (Zhang et al., ICML 2021, arXiv 2106.02295) quantizes a
tensor to ``x_q = qᵀ Z U x_o`` (docs/methods.md §2.2):

* ``q`` [2^B]: sorted learnable levels (B the largest bit-width);
* ``x_o``: the one-hot index of the level nearest to x (ends clip);
* ``U = U_1 ⊗ … ⊗ U_B`` with ``U_i = g_i I₂ + (1 − g_i) 𝟙𝟙ᵀ`` merges adjacent levels into
  groups, ``Z = diag(1 / U𝟙)`` averages each group; ``b = Σ g_i`` is the bit-width.

Computed here without U or x_o: ``U𝟙 = Π(2 − g_i) 𝟙``, so ``Z U = ⊗_i V_i`` with
``V_i = [[p_i, 1 − p_i], [1 − p_i, p_i]]``, ``p_i = 1 / (2 − g_i)``, applied to q as B mode
products on a [2, …, 2] view: the merged-level table ``m = Z U q`` [2^B] gives every fine level
the value of its group (O(B·2^B) per row). The forward pass is then ``m[searchsorted(t, x)]``
with ``t`` the midpoints of q. Autograd through ``m`` gives exact gradients for q and the gates
(U is multilinear in g); x gets a straight-through gradient (1 inside [q_0, q_last], 0 outside)
plus the optional correction ``α (x − x_q)`` (the gradient of ``½ α ‖x − x_q‖²``).

Gates are monotone (DDQ's ordering pitfall): ``g_i = H(β − i + ½)``, i = 1..B, one real β per
quantizer, so the zero gates are always the last factors and merged groups are contiguous.
H's gradient is a triangular surrogate ``max(0, 1 − |β − i + ½|)`` [DESIGN].

``LearnedInt`` is the deployable form: mixq's integer grid (the formulas of
:mod:`mixq.quant.fake`) with a learned range, LSQ-style (rounding straight-through, the range
trained through the scale). Its forward equals ``fake.quantize_rows`` of the same range.
"""

from __future__ import annotations

import torch
from torch import nn

from mixq import formats
from mixq.formats import Int
from mixq.plan import QSpec
from mixq.quant import fake

LEVEL_MODES = ("uniform", "learned")


def merge_table(q: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Return ``Z U q`` per row: each fine level's merged (group-mean) value.

    Args:
        q: levels [R, 2^B], sorted along the last axis.
        gates: [B] or [R, B] in [0, 1]; gate i (0-based) acts on bit i, the most significant first.

    >>> merge_table(torch.tensor([[0.0, 1.0, 2.0, 4.0]]), torch.tensor([1.0, 0.0])).tolist()
    [[0.5, 0.5, 3.0, 3.0]]
    """
    rows, n = q.shape
    bits = gates.shape[-1]
    if n != 2**bits:
        raise ValueError(f"levels must have 2^B = {2**bits} entries per row, got {n}")
    p = 1.0 / (2.0 - gates)  # [B] or [R, B]
    p = p.expand(rows, bits)
    m = q.reshape(rows, *([2] * bits))
    for i in range(bits):
        pi = p[:, i].reshape(rows, *([1] * bits))
        m = pi * m + (1.0 - pi) * m.flip(i + 1)
    return m.reshape(rows, n)


class _MonotoneGates(torch.autograd.Function):
    """g_i = H(β − i + ½) for i = 1..B; backward: the triangular surrogate of H."""

    @staticmethod
    def forward(ctx, beta: torch.Tensor, bits: int) -> torch.Tensor:  # noqa: ANN001
        i = torch.arange(1, bits + 1, dtype=beta.dtype, device=beta.device)
        ctx.save_for_backward(beta, i)
        return (beta - i + 0.5 > 0).to(beta.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        beta, i = ctx.saved_tensors
        surrogate = (1.0 - (beta - i + 0.5).abs()).clamp_min(0.0)
        return (grad * surrogate).sum().reshape(beta.shape), None


def monotone_gates(beta: torch.Tensor, bits: int) -> torch.Tensor:
    """Return the B gates of a scalar β: ones for i ≤ round(β), zeros after (contiguous merging).

    >>> monotone_gates(torch.tensor(2.3), 4).tolist()
    [1.0, 1.0, 0.0, 0.0]
    """
    return _MonotoneGates.apply(beta, bits)


class _InputGrad(torch.autograd.Function):
    """Zero in the forward pass; backward: ``grad · inside + α (x − x_q)`` for x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, xq: torch.Tensor, inside: torch.Tensor, alpha: float):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x, xq, inside)
        ctx.alpha = alpha
        return torch.zeros_like(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        x, xq, inside = ctx.saved_tensors
        gx = grad * inside
        if ctx.alpha:
            gx = gx + ctx.alpha * (x - xq)
        return gx, None, None, None


def quantize_levels(
    x: torch.Tensor, q: torch.Tensor, gates: torch.Tensor, alpha: float = 0.0
) -> torch.Tensor:
    """Quantize rows ``x`` [R, k] to the merged levels of ``q`` [R, 2^B] under ``gates``.

    The nearest fine level is found by ``searchsorted`` on the midpoints of q (a value on a
    midpoint goes to the lower level), then the merged table gives its group mean. With every
    gate on this is plain rounding to the nearest level.

    >>> q = torch.tensor([[-1.0, 0.0, 1.0, 2.0]])
    >>> quantize_levels(torch.tensor([[-3.0, 0.4, 0.6, 9.0]]), q, torch.ones(2)).tolist()
    [[-1.0, 0.0, 1.0, 2.0]]
    """
    table = merge_table(q, gates)
    with torch.no_grad():
        mids = (q[:, 1:] + q[:, :-1]) * 0.5
        idx = torch.searchsorted(mids.contiguous(), x.detach().contiguous())
    out = table.gather(1, idx)
    if x.requires_grad:
        inside = (x.detach() >= q[:, :1].detach()) & (x.detach() <= q[:, -1:].detach())
        out = out + _InputGrad.apply(x, out.detach(), inside.to(x.dtype), alpha)
    return out


class _AffineSTE(torch.autograd.Function):
    """``(clamp(round(x / s) + z, qmin, qmax) − z) · s`` with LSQ's straight-through gradients.

    One fused pass each way (the activation tensors are the large ones): x gets 1 inside the
    grid and 0 outside; s gets ``round(v) − v`` inside and ``q − z`` outside (v = x / s); z gets
    ``−s`` outside and 0 inside. The forward is ``fake.quantize_rows``'s, operation for operation.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x, scale, zero)
        ctx.grid = (qmin, qmax)
        q = torch.round(x / scale).add_(zero).clamp_(qmin, qmax)
        return q.sub_(zero).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        x, scale, zero = ctx.saved_tensors
        qmin, qmax = ctx.grid
        v = x / scale
        r = torch.round(v)
        q = r + zero
        inside = (q >= qmin) & (q <= qmax)
        gx = grad * inside
        ds = torch.where(inside, r.sub_(v), q.clamp_(qmin, qmax).sub_(zero))
        gs = (grad * ds).sum_to_size(scale.shape) if ctx.needs_input_grad[1] else None
        gz = None
        if ctx.needs_input_grad[2]:
            gz = grad.masked_fill(inside, 0.0).sum_to_size(zero.shape) * -scale
        return gx, gs, gz, None, None


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class DDQQuantizer(nn.Module):
    """A DDQ quantizer of rows that share levels: ``rows`` = 1 (per tensor) or output channels.

    Args:
        rows: rows with their own levels (weights per channel: out_channels; activations: 1).
        max_bits: B, the largest bit-width (2^B fine levels).
        min_bits: the gates never go below this many bits.
        lo, hi: initial range per row [rows] (levels start as a uniform grid over it).
        levels: "uniform" (learned range, equal steps; the integer-deployable mode) or "learned"
            (every level learned, kept sorted as ``q_0 + cumsum(softplus(δ))``).
        alpha: the gradient-correction weight α (0: off).
    """

    def __init__(
        self,
        rows: int,
        max_bits: int,
        min_bits: int,
        lo: torch.Tensor,
        hi: torch.Tensor,
        levels: str = "uniform",
        alpha: float = 0.0,
    ) -> None:
        super().__init__()
        if levels not in LEVEL_MODES:
            raise ValueError(f"unknown levels mode {levels!r}; valid: {', '.join(LEVEL_MODES)}")
        if not 1 <= min_bits <= max_bits <= 8:
            raise ValueError(f"need 1 <= min_bits <= max_bits <= 8, got {min_bits}, {max_bits}")
        lo, hi = lo.detach().float().reshape(rows), hi.detach().float().reshape(rows)
        hi = torch.maximum(hi, lo + 1e-6)
        self.max_bits, self.min_bits, self.mode, self.alpha = max_bits, min_bits, levels, alpha
        n = 2**max_bits
        self.beta = nn.Parameter(torch.tensor(float(max_bits)))
        if levels == "uniform":
            self.lo = nn.Parameter(lo.clone())
            self.hi = nn.Parameter(hi.clone())
        else:
            step = (hi - lo) / (n - 1)
            self.q0 = nn.Parameter(lo.clone())
            # softplus(δ) = step  <=>  δ = log(expm1(step))
            self.delta = nn.Parameter(torch.log(torch.expm1(step)).reshape(rows, 1).repeat(1, n - 1))

    def levels(self) -> torch.Tensor:
        """Return the sorted fine levels [rows, 2^B]."""
        n = 2**self.max_bits
        if self.mode == "uniform":
            k = torch.arange(n, dtype=self.lo.dtype, device=self.lo.device) / (n - 1)
            return self.lo[:, None] + (self.hi - self.lo)[:, None] * k
        steps = torch.nn.functional.softplus(self.delta)
        return torch.cat([self.q0[:, None], self.q0[:, None] + steps.cumsum(1)], dim=1)

    def gates(self) -> torch.Tensor:
        """Return the B monotone gates (straight-through in β)."""
        return monotone_gates(self.beta.clamp(self.min_bits, self.max_bits), self.max_bits)

    def soft_bits(self) -> torch.Tensor:
        """Return b = Σ g_i (its gradient flows to β through the gates' surrogate)."""
        return self.gates().sum()

    @property
    def bits(self) -> int:
        """The current bit-width."""
        return int(self.gates().sum().item())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.levels().shape[0]
        flat = x.reshape(rows, -1) if rows > 1 else x.reshape(1, -1)
        return quantize_levels(flat, self.levels(), self.gates(), self.alpha).reshape(x.shape)


class LearnedInt(nn.Module):
    """mixq's integer fake quantization with a learned range (LSQ-style; the deployable form).

    Symmetric weights learn a range R per row; the grid is the restricted symmetric one, codes
    in [−(2^(b−1) − 1), 2^(b−1) − 1], s = R / (2^(b−1) − 1), with R capped at the row's largest
    |w|: the quantized weight then holds ±R, and mixq's min/max quantizer of the same spec
    reproduces it (see :meth:`bake`). Asymmetric weights learn [lo, hi] per row, capped at the
    row's [min, max] for the same reason. Activations learn [lo, hi]; weights and activations
    then use ``fake.scale_zero``'s affine grid, so setting a site's statistics to [lo, hi]
    reproduces an activation quantizer.

    Args:
        spec: an integer QSpec (granularity "tensor" or "channel").
        kind: "weight" or "act".
        lo, hi: initial range per row (symmetric weights: R = max(−lo, hi)).
    """

    def __init__(self, spec: QSpec, kind: str, lo: torch.Tensor, hi: torch.Tensor) -> None:
        super().__init__()
        check_int_spec(spec, kind)
        self.spec, self.kind = spec, kind
        if kind == "weight" and spec.symmetric:
            self.range = nn.Parameter(torch.maximum(-lo, hi).detach().float().clone())
        else:
            self.lo = nn.Parameter(lo.detach().float().reshape(-1).clone())
            self.hi = nn.Parameter(hi.detach().float().reshape(-1).clone())

    def _weight(self, w: torch.Tensor) -> torch.Tensor:
        rows = fake.to_rows(w.float(), self.spec).data
        if not self.spec.symmetric:
            lo = torch.maximum(self.lo, rows.detach().amin(1))[:, None]
            hi = torch.minimum(self.hi, rows.detach().amax(1))[:, None]
            return self._affine(rows, lo, hi).reshape(w.shape).to(w.dtype)
        qmax = 2 ** (self.spec.fmt.bits - 1) - 1
        r = torch.minimum(self.range.abs(), rows.detach().abs().amax(1)).clamp_min(1e-8)
        s = (r / qmax)[:, None]
        return (torch.clamp(_round_ste(rows / s), -qmax, qmax) * s).reshape(w.shape).to(w.dtype)

    def _affine(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        fmt = self.spec.fmt
        lo = torch.minimum(lo, torch.zeros_like(lo))
        hi = torch.maximum(hi, torch.zeros_like(hi))
        qmin, qmax = fake.int_grid(fmt, self.spec.symmetric)
        if not self.spec.symmetric:
            scale = (hi - lo) / (2**fmt.bits - 1)
        else:
            amax = hi if not fmt.signed else torch.maximum(-lo, hi)
            scale = amax / formats.max_value(fmt)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        if self.spec.symmetric:
            zero = torch.zeros_like(scale)
        else:
            zero = torch.clamp(_round_ste(-lo / scale), 0, 2**fmt.bits - 1)
        return _AffineSTE.apply(x, scale, zero, qmin, qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._weight(x) if self.kind == "weight" else self._affine(x, self.lo, self.hi)

    @torch.no_grad()
    def bake(self, w: torch.Tensor) -> None:
        """Overwrite weight ``w`` (in place) with its quantized value (weights only)."""
        w.copy_(self._weight(w))


def check_int_spec(spec: QSpec, kind: str) -> None:
    """Raise a ValueError unless ``spec`` is one DDQ can train and mixq deploys exactly."""
    if not isinstance(spec.fmt, Int):
        raise ValueError(f"ddq trains integer formats only, got {spec.fmt}; valid: int2..int8 candidates")
    if spec.granularity not in ("tensor", "channel"):
        raise ValueError(f"ddq needs granularity 'tensor' or 'channel', got {spec.granularity!r}")
    if kind == "weight" and spec.symmetric and not spec.fmt.signed:
        raise ValueError(f"ddq weights must be signed when symmetric, got {spec.fmt}; valid: int2..int8")
    if kind == "act" and (spec.clip != "minmax" or spec.granularity != "tensor"):
        raise ValueError(
            f"ddq activations need clip 'minmax' per tensor (the learned range is deployed as the "
            f"site's min/max), got clip={spec.clip!r}, granularity={spec.granularity!r}"
        )


def init_range(x: torch.Tensor, spec: QSpec, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return an initial [lo, hi] per row [rows] for ``spec``: the squared-error-optimal range."""
    mse = QSpec(spec.fmt, "tensor" if rows == 1 else "channel", symmetric=spec.symmetric, clip="mse")
    data = x.detach().float().reshape(rows, -1)
    scale, zero = fake.calibrate_rows(data, mse)
    qmin, qmax = fake.int_grid(spec.fmt, spec.symmetric)
    if spec.symmetric and spec.fmt.signed:
        qmin = -qmax
    return (qmin - zero) * scale, (qmax - zero) * scale
