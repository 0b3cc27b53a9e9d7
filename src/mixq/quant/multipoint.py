"""Multipoint quantization: each output channel as a sum of several low-bit vectors.

Liu, Ye, Zhou and Liu, "Post-training Quantization with Multiple Points: Mixed Precision
without Mixed Precision", AAAI 2021 (arXiv 2002.09049). One output channel ``w`` (a row of a
Linear weight, one flattened conv filter) is approximated as

    w ≈ w̃ = Σ_{i=1..n} a_i ŵ_i,   ŵ_i ∈ G_b^d,   G_b = {k / K : k = −K, …, K},   K = 2^(b−1) − 1,

a symmetric grid of 2^b − 1 levels (the "restricted" signed b-bit grid). mixq stores a point as
integer codes ``q_i = K ŵ_i`` ∈ [−K, K] and a step ``s_i = a_i / K`` (float32), so
``w̃ = Σ_i s_i q_i``. The points are built greedily on the residual ``r`` (r ← w; then
(a_i, ŵ_i) = argmin ‖r − a ŵ‖²; r ← r − a_i ŵ_i). For a fixed ``a`` the best ``ŵ`` rounds
``r / a`` to the grid; ``a`` is searched over ``NUM_CANDIDATES`` values ``‖r‖∞ · k / M``,
k = 1..M, then refined by least squares (``a = ⟨r, ŵ⟩ / ‖ŵ‖²``, re-round), keeping the best.

Error bound (the invariant tested): with ``a = ‖r‖∞`` (``a_search="absmax"``), ``r / a`` lies in
[−1, 1], so nothing is clipped and rounding to a grid of step 1/K leaves at most ``a / (2K)`` per
coordinate: ``‖r'‖∞ ≤ ‖r‖∞ / (2K) = ‖r‖∞ / (2^b − 2)``, hence after n points
``‖w − w̃‖∞ ≤ ‖w‖∞ · (2^b − 2)^(−n)`` (b ≥ 2). Since 0 is on the grid each coordinate error is also
at most |r_j|, and the largest coordinate is hit exactly, so the ℓ2 error falls strictly with
every point while r ≠ 0. The greedy search includes ``a = ‖r‖∞`` among its candidates and keeps
the smallest ℓ2 error, so each greedy step does at least as well in ℓ2 as the ``absmax`` step
from the same residual (not necessarily after several steps: greedy is myopic).

Paper symbols: ``w`` weight vector, ``ŵ_i`` low-bit vectors, ``a_i`` coefficients, ``n`` points.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from mixq.plan import QSpec

A_SEARCH = ("best", "greedy", "absmax")
FIRST = ("channel", "tensor")
KEYS = ("gain", "error")
MAX_POINTS = 16
NUM_CANDIDATES = 256  # values of a in (0, ‖r‖∞] searched per point (docs/methods.md §1.3 [DESIGN])
NUM_WIDE = 32  # values of a above ‖r‖∞ (a deviation from docs/methods.md §1.3: they can help)
REFINE = 2  # least-squares refinements of a
REFIT = 4  # alternations of the joint step refit and re-rounding ("best")
STEP_DTYPE = torch.float16  # the extra points' steps (the first point keeps its base scale, float32)
CHUNK = 1 << 22  # elements of one [rows, candidates, d] block of the search


def levels(bits: int) -> int:
    """Return K = 2^(b−1) − 1, the largest code of the symmetric b-bit grid.

    >>> levels(4)
    7
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"multipoint bits must be an integer in 2..8, got {bits!r}")
    return 2 ** (bits - 1) - 1


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def round_codes(r: torch.Tensor, step: torch.Tensor, k: int) -> torch.Tensor:
    """Round rows ``r`` [R, d] to codes in [−k, k] with per-row ``step`` [R] (0 steps give 0 codes)."""
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.clamp(torch.round(r / safe[:, None]), -k, k)
    return torch.where(step[:, None] > 0, q, torch.zeros_like(q))


def _sq_error(r: torch.Tensor, step: torch.Tensor, k: int) -> torch.Tensor:
    return (r - round_codes(r, step, k) * step[:, None]).pow(2).sum(1)


def search_step(r: torch.Tensor, bits: int, a_search: str = "greedy") -> torch.Tensor:
    """Return the step ``a / K`` of the next point of every row of the residual ``r`` [R, d].

    ``absmax``: a = ‖r‖∞. ``greedy``: the a among ‖r‖∞·k/M (k = 1..M) and ``NUM_WIDE`` values
    between ‖r‖∞ and 2K‖r‖∞ with the smallest ‖r − a ŵ(a)‖², then ``REFINE`` least-squares
    refinements; all rows at once, in blocks.
    Rows of zeros get step 0 (no point).
    """
    _check_choice("a_search", a_search, A_SEARCH)
    k = levels(bits)
    top = r.abs().amax(1) / k  # [R]
    if a_search == "absmax" or r.numel() == 0:
        return top
    rows, d = r.shape
    # a = ‖r‖∞·k/M (k = 1..M, the last one absmax), and a = ‖r‖∞·K/t for t in [0.5, K): larger
    # a that leave the outer codes unused can fit better (codes (1, -2, 1) with K = 3, say).
    low = torch.arange(1, NUM_CANDIDATES + 1, dtype=r.dtype) / NUM_CANDIDATES
    t = k - torch.arange(1, NUM_WIDE + 1, dtype=r.dtype) * (k - 0.5) / NUM_WIDE
    frac = torch.cat([low, k / t])  # [M + M_wide]
    best_err = torch.full((rows,), math.inf, dtype=r.dtype)
    best = top.clone()
    per_block = max(1, CHUNK // max(1, rows * d))
    for c0 in range(0, len(frac), per_block):
        steps = top[:, None] * frac[c0 : c0 + per_block]  # [R, m]
        safe = torch.where(steps > 0, steps, torch.ones_like(steps))
        q = torch.clamp(torch.round(r[:, None, :] / safe[..., None]), -k, k)
        err = (r[:, None, :] - q * steps[..., None]).pow(2).sum(-1)  # [R, m]
        e, idx = err.min(1)
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best = torch.where(better, steps.gather(1, idx[:, None]).squeeze(1), best)
    for _ in range(REFINE):
        q = round_codes(r, best, k)
        qq = q.pow(2).sum(1)
        ls = (r * q).sum(1) / torch.where(qq > 0, qq, torch.ones_like(qq))
        cand = torch.where((qq > 0) & (ls > 0), ls, best)
        e = _sq_error(r, cand, k)
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best = torch.where(better, cand, best)
    return torch.where(top > 0, best, torch.zeros_like(best))


def next_point(r: torch.Tensor, bits: int, a_search: str = "greedy") -> tuple[torch.Tensor, torch.Tensor]:
    """Return (steps [R], codes [R, d]) of the next greedy point of every row of ``r``."""
    step = search_step(r, bits, a_search)
    return step, round_codes(r, step, levels(bits))


def first_point(
    w: torch.Tensor, bits: int, a_search: str = "greedy", first: str = "channel"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first point: per channel (greedy or absmax), or one layer-wide step (``first="tensor"``).

    The layer-wide step is ``max|W| / K`` (the per-layer baseline quantizer, docs/methods.md §1.4).
    ``a_search="best"`` starts from the greedy (ℓ2-optimal) point.
    """
    _check_choice("first", first, FIRST)
    if first == "channel":
        return next_point(w, bits, "greedy" if a_search == "best" else a_search)
    k = levels(bits)
    step = (w.abs().amax() / k).expand(w.shape[0]).clone() if w.numel() else w.new_zeros(w.shape[0])
    return step, round_codes(w, step, k)


@dataclass(frozen=True)
class Start:
    """A given first point (the base quantizer of a plan's spec): steps [C], codes [C, d] and the
    code range ``[qmin, qmax]`` of its grid (−2^(b−1)..K for mixq's symmetric integer grid, which
    keeps the most negative code; 0..2^b − 1 for an asymmetric one; the extra points use the
    restricted grid [−K, K]).

    ``zero`` [C]: the asymmetric grid's zero points (None: symmetric). ``codes`` are then the
    stored codes minus the zero point, ``q − z`` (so every point is ``step · codes`` alike), and a
    row's first-point codes lie in ``[qmin − z, qmax − z]``.
    """

    steps: torch.Tensor
    codes: torch.Tensor
    qmin: int
    qmax: int | None = None
    zero: torch.Tensor | None = None

    def bounds(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first point's code range per row, ``(lo [C], hi [C])`` (``k``: K of the bits)."""
        z = self.zero if self.zero is not None else torch.zeros(self.steps.shape[0])
        z = z.to(torch.float64)
        qmax = k if self.qmax is None else self.qmax
        return self.qmin - z, qmax - z


def code_dtype(start: Start | None) -> torch.dtype:
    """int8 holds every code of a symmetric grid; ``q − z`` of an asymmetric one needs int16 (8 bits)."""
    return torch.int16 if start is not None and start.zero is not None else torch.int8


def sq_error(w: torch.Tensor, steps: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """‖w_j − Σ_i steps[j, i] codes[j, i]‖² of every row ``j`` (float64)."""
    wt = (steps[..., None].double() * codes.double()).sum(1)
    return (w.double() - wt).pow(2).sum(1)


def refit(
    w: torch.Tensor,
    steps: torch.Tensor,
    codes: torch.Tensor,
    bits: int,
    qmin0: int | tuple[torch.Tensor, torch.Tensor],
    fixed_first: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Alternate a joint least-squares refit of all steps (codes fixed) with re-rounding every
    point's codes given the other points (steps fixed), ``REFIT`` times, rows in parallel.

    Both moves minimise ‖w − Σ_i s_i q_i‖² over their own variables, and a row keeps a new
    (steps, codes) only when its error fell, so the error never grows. A negative step is turned
    positive by negating its codes (clamped to the grid). ``fixed_first``: step 0 is shared by the
    layer (``first="tensor"``) and stays. Point 0's codes lie in [qmin0, K], or per row in
    ``qmin0 = (lo [R], hi [R])`` (an asymmetric first point, :meth:`Start.bounds`); the others' in
    [−K, K].
    """
    k = levels(bits)
    rows, n = steps.shape
    lo = torch.full((rows, n), -float(k), dtype=steps.dtype)
    hi = torch.full((rows, n), float(k), dtype=steps.dtype)
    if isinstance(qmin0, tuple):
        lo[:, 0], hi[:, 0] = qmin0[0].to(steps.dtype), qmin0[1].to(steps.dtype)
    else:
        lo[:, 0] = qmin0
    best_e = sq_error(w, steps, codes)
    steps, codes = steps.clone(), codes.clone()
    free = slice(1 if fixed_first else 0, n)
    for _ in range(REFIT):
        q = codes.double()
        target = w.double() - (steps[:, 0:1].double() * q[:, 0] if fixed_first else 0.0)
        qf = q[:, free]
        if qf.shape[1] == 0:
            break
        gram = qf @ qf.transpose(1, 2)
        rhs = (qf @ target[..., None]).squeeze(-1)
        s = (torch.linalg.pinv(gram) @ rhs[..., None]).squeeze(-1)
        ns, nq = steps.clone(), codes.clone().to(steps.dtype)
        ns[:, free] = s.to(steps.dtype)
        neg = ns < 0
        ns, nq = ns.abs(), torch.where(neg[..., None], -nq, nq)
        nq = torch.maximum(torch.minimum(nq, hi[..., None]), lo[..., None])
        for i in range(n):  # re-round point i against the rest
            r = w - (ns[..., None] * nq).sum(1) + ns[:, i : i + 1] * nq[:, i]
            safe = torch.where(ns[:, i] > 0, ns[:, i], torch.ones_like(ns[:, i]))
            qi = torch.maximum(
                torch.minimum(torch.round(r / safe[:, None]), hi[:, i : i + 1]), lo[:, i : i + 1]
            )
            nq[:, i] = torch.where(ns[:, i : i + 1] > 0, qi, torch.zeros_like(qi))
        e = sq_error(w, ns, nq)
        better = e < best_e
        if not bool(better.any()):
            break
        best_e = torch.where(better, e, best_e)
        steps = torch.where(better[:, None], ns, steps)
        codes = torch.where(better[:, None, None], nq.to(codes.dtype), codes)
    return steps, codes


def to_step_dtype(
    w: torch.Tensor, steps: torch.Tensor, codes: torch.Tensor, bits: int, dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round the extra points' steps (points 1..) to ``dtype`` and re-round their codes against the
    other points, twice (coordinate descent with the steps fixed); None: unchanged."""
    if dtype is None or steps.shape[1] < 2:
        return steps, codes
    k = levels(bits)
    s = steps.clone()
    s[:, 1:] = s[:, 1:].to(dtype).to(s.dtype)
    q = codes.to(s.dtype).clone()
    for _ in range(2):
        for i in range(1, s.shape[1]):
            r = w - (s[..., None] * q).sum(1) + s[:, i : i + 1] * q[:, i]
            safe = torch.where(s[:, i] > 0, s[:, i], torch.ones_like(s[:, i]))
            qi = torch.clamp(torch.round(r / safe[:, None]), -k, k)
            q[:, i] = torch.where(s[:, i : i + 1] > 0, qi, torch.zeros_like(qi))
    return s, q.to(codes.dtype)


def _extend(
    w: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], bits: int, a_search: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``state`` (steps [R, i], codes [R, i, d]) plus the next point on its residual."""
    steps, codes = state
    r = w - (steps[..., None] * codes.to(steps.dtype)).sum(1)
    s, q = next_point(r, bits, a_search)
    return torch.cat([steps, s[:, None]], 1), torch.cat([codes, q.to(codes.dtype)[:, None]], 1)


def _pick(
    cands: list[tuple[torch.Tensor, torch.Tensor]], w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the candidate (steps, codes) with the smallest ℓ2 error (the first on ties)."""
    errs = torch.stack([sq_error(w, s, q) for s, q in cands])  # [m, R]
    idx = errs.argmin(0)
    steps = torch.stack([s for s, _ in cands])[idx, torch.arange(w.shape[0])]
    codes = torch.stack([q for _, q in cands])[idx, torch.arange(w.shape[0])]
    return steps, codes


def chain_levels(
    w: torch.Tensor,
    bits: int,
    n: int,
    a_search: str = "best",
    first: str = "channel",
    start: Start | None = None,
    active: torch.Tensor | None = None,
):
    """Yield ``(rows, steps [R, i], codes [R, i, d])`` of the i-point decomposition, i = 1..n.

    ``rows`` are the rows still active (``active[i]``: the rows that need an i-th point; all by
    default). ``greedy`` and ``absmax`` are plain chains: each point is the greedy (ℓ2-optimal) or
    the a = ‖r‖∞ point on the residual. ``best`` (per row, the best of the known choices): at
    level i the candidates are the best (i−1)-point form plus a greedy point, plus an absmax
    point, the plain absmax chain and the plain greedy chain of i points, each refined by
    :func:`refit`; the smallest ℓ2 error wins. So ``best`` is never worse than either plain chain
    nor than its own i−1 points (a greedy or absmax point never raises the error). An asymmetric
    ``start`` (``start.zero``) is every candidate's first point: the plain chains then extend it,
    so every row keeps the base's zero point (the codes are ``q − z``, int16).
    """
    _check_choice("a_search", a_search, A_SEARCH)
    k = levels(bits)
    cdt = code_dtype(start)
    asym = start is not None and start.zero is not None
    if start is not None:
        s0, q0, qmin0 = start.steps, start.codes.to(cdt), start.qmin
        bounds = start.bounds(k) if asym else None
    else:
        s0, q0 = first_point(w, bits, a_search, first)
        q0, qmin0, bounds = q0.to(cdt), -k, None
    rows = torch.arange(w.shape[0])
    best = (s0[:, None], q0[:, None])
    yield rows, best[0], best[1]
    if a_search != "best":
        for i in range(1, n):
            if active is not None:
                sel = active[i][rows]
                rows, best = rows[sel], (best[0][sel], best[1][sel])
            best = _extend(w[rows], best, bits, a_search)
            yield rows, best[0], best[1]
        return
    fixed = first == "tensor"
    if fixed or asym:
        plain = {"absmax": best, "greedy": best}
    else:
        plain = {
            "absmax": tuple(x[:, None] for x in next_point(w, bits, "absmax")),
            "greedy": tuple(x[:, None] for x in next_point(w, bits, "greedy")),
        }
        plain = {a: (s, q.to(cdt)) for a, (s, q) in plain.items()}
    for i in range(1, n):
        if active is not None:
            sel = active[i][rows]
            rows, best = rows[sel], (best[0][sel], best[1][sel])
            plain = {a: (s[sel], q[sel]) for a, (s, q) in plain.items()}
        wr = w[rows]
        lim = (bounds[0][rows], bounds[1][rows]) if bounds is not None else qmin0
        plain = {a: _extend(wr, st, bits, a) for a, st in plain.items()}
        cands = [_extend(wr, best, bits, "greedy"), _extend(wr, best, bits, "absmax"), *plain.values()]
        cands = [refit(wr, s, q, bits, lim, fixed) for s, q in cands]
        best = _pick(cands, wr)
        yield rows, best[0], best[1]


@dataclass(frozen=True)
class Points:
    """The multipoint form of a layer: ``w̃[j] = Σ_{i < counts[j]} steps[j, i] · codes[j, i]``.

    Attributes:
        bits: bits of every code.
        steps: [C, n] float steps ``a_i / K`` (0 for points a channel does not have).
        codes: [C, n, d] integer codes in [−K, K] (int8; point 0 may use −2^(b−1) when it is a
            base quantizer's point, see :class:`Start`; with ``zero``, point 0's codes are
            ``q − z`` of the asymmetric grid, int16).
        counts: [C] points per channel.
        zero: [C] the first point's zero points (an asymmetric base grid), else None.
    """

    bits: int
    steps: torch.Tensor
    codes: torch.Tensor
    counts: torch.Tensor
    zero: torch.Tensor | None = None

    def reconstruct(self) -> torch.Tensor:
        """Return w̃ [C, d] = Σ_i steps_i · codes_i."""
        return (self.steps[..., None] * self.codes.to(self.steps.dtype)).sum(1)


def decompose(
    w: torch.Tensor,
    bits: int,
    counts: torch.Tensor | list[int],
    a_search: str = "best",
    first: str = "channel",
    start: Start | None = None,
    step_dtype: torch.dtype | None = None,
) -> Points:
    """Build ``counts[j]`` points for every row ``j`` of ``w`` [C, d] (rows in parallel).

    Row j's points are those of :func:`chain_levels` at level ``counts[j]`` (a row's points do
    not depend on the other rows). ``start``: the first point, given (see :class:`Start`).
    ``step_dtype``: the extra points' steps rounded to it (:func:`to_step_dtype`; None: as ``w``).
    """
    counts = torch.as_tensor(counts, dtype=torch.long)
    if counts.shape != (w.shape[0],):
        raise ValueError(
            f"counts must give one number per output channel ({w.shape[0]}), got shape {tuple(counts.shape)}"
        )
    if counts.numel() and (int(counts.min()) < 1 or int(counts.max()) > MAX_POINTS):
        raise ValueError(f"points per channel must be in 1..{MAX_POINTS}, got {counts.min()}..{counts.max()}")
    n = int(counts.max()) if counts.numel() else 1
    steps = w.new_zeros(w.shape[0], n)
    cdt = code_dtype(start)
    codes = torch.zeros(w.shape[0], n, w.shape[1], dtype=cdt)
    active = [counts >= i + 1 for i in range(n)]
    for i, (rows, s, q) in enumerate(chain_levels(w, bits, n, a_search, first, start, active)):
        done = counts[rows] == i + 1
        s, q = to_step_dtype(w[rows[done]], s[done], q[done], bits, step_dtype)
        steps[rows[done], : i + 1] = s
        codes[rows[done], : i + 1] = q.to(cdt)
    return Points(bits, steps, codes, counts, start.zero if start is not None else None)


def approximate(w: torch.Tensor, bits: int, points: int, a_search: str = "best") -> torch.Tensor:
    """Return w̃, the ``points``-point approximation of ``w`` (one output channel per row of dim 0).

    Args:
        w: weight [C, ...]; each ``w[j]`` is flattened into one vector.
        bits: bits of the symmetric grid (2..8, 2^b − 1 levels).
        points: points per channel (1..MAX_POINTS).
        a_search: "best" (per channel the best of the known choices, see :func:`chain_levels`),
            "greedy" (the plain chain of ℓ2-optimal points) or "absmax" (the plain chain of
            a = ‖r‖∞ points, the bound's choice).

    >>> w = torch.tensor([[0.9, -0.3, 0.05]], dtype=torch.float64)
    >>> approximate(w, 2, 1, "absmax").tolist()       # codes round(w / 0.9) = 1, 0, 0
    [[0.9, 0.0, 0.0]]
    >>> approximate(w, 2, 2, "absmax").tolist()       # + 0.3 * (0, -1, 0)
    [[0.9, -0.3, 0.0]]
    """
    if isinstance(points, bool) or not isinstance(points, int) or not 1 <= points <= MAX_POINTS:
        raise ValueError(f"points must be an integer in 1..{MAX_POINTS}, got {points!r}")
    if w.dim() < 1 or w.shape[0] == 0:
        raise ValueError(f"w needs at least one output channel, got shape {tuple(w.shape)}")
    if not w.is_floating_point() or not torch.isfinite(w).all():
        raise ValueError("w must be a finite floating-point tensor")
    flat = w.detach().reshape(w.shape[0], -1)
    pts = decompose(flat, bits, [points] * w.shape[0], a_search)
    return pts.reconstruct().reshape(w.shape).to(w.dtype)


def channel_error(
    gram: torch.Tensor | None, out_channels: int
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Return ``err(d, rows)``: the output error ``d_j H_g d_jᵀ`` of weight errors ``d`` [R, k].

    ``rows`` [R] are the channels' indices (they pick the conv group g of each). ``gram``
    [G, k, k] is the layer's input Gram matrix H = XᵀX from calibration (so the error is
    ‖X d_jᵀ‖², the squared error of channel j's output over the calibration inputs); None
    falls back to the weight error ‖d_j‖².
    """
    if gram is None:
        return lambda d, rows: d.double().pow(2).sum(1)
    per = out_channels // gram.shape[0]

    def err(d: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        dd = d.double()
        if len(rows) * gram.shape[1] ** 2 <= CHUNK:  # few rows or small k (depthwise): gather H
            return torch.einsum("ri,rij,rj->r", dd, gram[rows // per], dd)
        return _grouped(dd, rows)

    def _grouped(dd: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        out = dd.new_zeros(dd.shape[0])
        g_of = rows // per
        for g in torch.unique(g_of).tolist():
            sel = (g_of == g).nonzero().squeeze(1)
            x = dd[sel]
            out[sel] = ((x @ gram[g]) * x).sum(1)
        return out

    return err


@dataclass(frozen=True)
class Allocation:
    """The outcome of :func:`allocate` on one layer.

    Attributes:
        points: the multipoint form.
        first_errors: [C] output error of each channel with one point.
        errors: [C] output error of each channel at the end.
        extra: points added beyond one per channel.
        stop: why allocation stopped: "budget", "tau" or "exhausted" (no channel can improve).
        order: the channel of each extra point, in the order they were added. The greedy choices
            do not depend on when allocation stops, so the allocation capped at k extra points
            is this one's first k: see :meth:`counts_at`.
    """

    points: Points
    first_errors: torch.Tensor
    errors: torch.Tensor
    extra: int
    stop: str
    order: tuple[int, ...] = ()

    def counts_at(self, extra: int) -> tuple[int, ...]:
        """Points per channel of the same allocation stopped after ``extra`` extra points."""
        counts = torch.ones(len(self.points.counts), dtype=torch.long)
        if extra > 0:
            added = torch.tensor(self.order[:extra], dtype=torch.long)
            counts += torch.bincount(added, minlength=len(counts))
        return tuple(int(n) for n in counts)


@dataclass(frozen=True)
class Search:
    """How :func:`allocate` searches: the step search of the points (``a_search``, see
    :func:`chain_levels`), the first point's scale (``first``: "channel" or "tensor") and the
    channel that gets the next point (``key``: "gain" or "error"), the dtype of the extra points'
    steps (``step_dtype``, see :func:`to_step_dtype`; None: that of ``w``)."""

    a_search: str = "best"
    first: str = "channel"
    key: str = "gain"
    step_dtype: torch.dtype | None = None


def allocate(
    w: torch.Tensor,
    bits: int,
    gram: torch.Tensor | None = None,
    ratio: float | None = 0.05,
    tau: float | None = None,
    n_max: int = 4,
    search: Search = Search(),
    start: Start | None = None,
) -> Allocation:
    """Give every channel of ``w`` [C, d] one point, then add points where the output error falls most.

    Every channel's i-point form (i = 1..``n_max``) is that of :func:`decompose` (so the plan's
    counts alone rebuild it); its output error ``e_j(i) = d_j H d_jᵀ`` with ``H`` = ``gram``
    (docs/methods.md §1.4; without a Gram, the weight error). Extra points go one at a time to
    the channel with the largest ``key``: "gain" (``e_j(n_j) − e_j(n_j + 1)``) or "error" (its
    current output error), among channels whose next point lowers their error; ties go to the
    lower channel index. Allocation stops when ``floor(ratio · C)`` extra points are placed
    (``ratio=None``: no such cap), when ``max_j e_j ≤ tau · mean_j e_j^(1)``, or when no
    channel can improve. Deterministic. ``start``: the first point (see :class:`Start`);
    ``search.step_dtype``: as in :func:`decompose`.
    """
    a_search, first, key = search.a_search, search.first, search.key
    _check_choice("key", key, KEYS)
    if ratio is not None and not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio >= 0):
        raise ValueError(f"ratio must be None or a finite number >= 0, got {ratio!r}")
    if tau is not None and not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau >= 0):
        raise ValueError(f"tau must be None or a finite number >= 0, got {tau!r}")
    if isinstance(n_max, bool) or not isinstance(n_max, int) or not 1 <= n_max <= MAX_POINTS:
        raise ValueError(f"n_max must be an integer in 1..{MAX_POINTS}, got {n_max!r}")
    c, d = w.shape
    if gram is not None and (gram.dim() != 3 or gram.shape[1:] != (d, d) or c % gram.shape[0]):
        raise ValueError(f"gram must be [G, {d}, {d}] with G dividing {c}, got {tuple(gram.shape)}")
    err = channel_error(gram, c)
    all_rows = torch.arange(c)
    budget = None if ratio is None else math.floor(ratio * c + 1e-9)
    levels_n = n_max if (budget is None or budget > 0) else 1
    table_s = w.new_zeros(levels_n, c, levels_n)
    table_q = torch.zeros(levels_n, c, levels_n, d, dtype=code_dtype(start))
    errs = torch.zeros(levels_n, c, dtype=torch.float64)
    for i, (_, s, q) in enumerate(chain_levels(w, bits, levels_n, a_search, first, start)):
        s, q = to_step_dtype(w, s, q, bits, search.step_dtype)
        table_s[i, :, : i + 1], table_q[i, :, : i + 1] = s, q
        errs[i] = err(w - (s[..., None] * q.to(s.dtype)).sum(1), all_rows)
    counts = torch.ones(c, dtype=torch.long)
    e = errs[0].clone()
    target = None if tau is None else tau * float(errs[0].mean())
    heap: list[tuple[float, int]] = []

    def push(j: int) -> None:
        i = int(counts[j])
        if i < levels_n and float(errs[i, j]) < float(e[j]):
            heapq.heappush(heap, (-(float(e[j] - errs[i, j]) if key == "gain" else float(e[j])), j))

    for j in range(c):
        push(j)
    extra, stop, order = 0, "exhausted", []
    while True:
        if target is not None and float(e.max()) <= target:
            stop = "tau"
            break
        if budget is not None and extra >= budget:
            stop = "budget"
            break
        if not heap:
            break
        _, j = heapq.heappop(heap)
        i = int(counts[j])
        e[j] = errs[i, j]
        counts[j] = i + 1
        extra += 1
        order.append(j)
        push(j)
    n = int(counts.max())
    pick = counts - 1
    steps = table_s[pick, all_rows, :n].clone()
    codes = table_q[pick, all_rows, :n].clone()
    pts = Points(bits, steps, codes, counts, start.zero if start is not None else None)
    return Allocation(pts, errs[0].clone(), e, extra, stop, tuple(order))


def base_start(w: torch.Tensor, spec: QSpec, gram: torch.Tensor | None = None) -> Start:
    """The first point of ``w`` [C, d] as the spec's own integer quantizer (points ignored).

    Its range method (``clip``: minmax, mse, omse with ``gram``, percentile) and granularity
    ("channel", or "tensor": one step for the layer) are those of :mod:`mixq.quant.fake`, on
    mixq's symmetric grid [−2^(b−1), 2^(b−1) − 1] or, for an asymmetric spec (per channel), its
    grid [0, 2^b − 1] with a zero point per channel (codes ``q − z``): a channel with one point
    is exactly the spec without points.
    """
    from mixq.quant import fake

    base = replace(spec, points=None)
    rows = fake.to_rows(w, base)
    error = fake.output_error(gram, base, w.shape[0]) if gram is not None and base.clip == "omse" else None
    scale, zero = fake.calibrate_rows(rows.data, base, error)
    step = scale.expand(w.shape[0]).clone() if base.granularity == "tensor" else scale
    zero = zero.expand(w.shape[0]).clone() if base.granularity == "tensor" else zero
    qmin, qmax = fake.int_grid(base.fmt, base.symmetric)
    codes = torch.clamp(torch.round(w / step[:, None]) + zero[:, None], qmin, qmax) - zero[:, None]
    if base.granularity == "channel":  # a zero row: no point (a shared step stays shared)
        step = torch.where(codes.abs().amax(1) > 0, step, torch.zeros_like(step))
    if base.symmetric:
        return Start(step.to(w.dtype), codes.to(torch.int8), qmin)
    return Start(step.to(w.dtype), codes.to(torch.int16), qmin, qmax, zero.to(w.dtype))


def spec_points(w: torch.Tensor, spec: QSpec, gram: torch.Tensor | None = None) -> Points:
    """Return the multipoint form of weight ``w`` [C, ...] under a spec with ``points``.

    The spec fixes everything: ``fmt`` the bits, ``points`` the count per output channel, and
    the first point is the spec's own integer quantizer (``granularity`` "channel" or "tensor",
    ``clip`` its range method; ``gram`` for "omse"), see :func:`base_start`; the extra points
    are the "best" search of :func:`chain_levels`, their steps in ``STEP_DTYPE`` (float16).
    """
    if spec.points is None:
        raise ValueError("spec has no multipoint points; use mixq.quant.fake.quantize_weight")
    if len(spec.points) != w.shape[0]:
        raise ValueError(
            f"spec gives points for {len(spec.points)} output channels, the weight has "
            f"{w.shape[0]} (shape {tuple(w.shape)})"
        )
    with torch.no_grad():
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        flat = w.detach().to(dtype).reshape(w.shape[0], -1)
        start = base_start(flat, spec, gram)
        return decompose(flat, spec.bits, list(spec.points), "best", spec.granularity, start, STEP_DTYPE)


def quantize_weight(w: torch.Tensor, spec: QSpec, gram: torch.Tensor | None = None) -> torch.Tensor:
    """Return the multipoint weight w̃ (shape and dtype of ``w``) of a spec with ``points``."""
    return spec_points(w, spec, gram).reconstruct().reshape(w.shape).to(w.dtype)


class ChannelSplit(nn.Module):
    """A multipoint layer in deployable form: a low-bit layer with n_j copies of channel j, then a merge.

    ``expand`` is a plain Linear or Conv2d (same kernel, stride, padding, dilation and groups as
    the original) whose weights are the integer codes and which has no bias; ``merge`` is a
    Linear or 1x1 Conv2d that sums each channel's copies with their steps and adds the bias:
    ``y_j = b_j + Σ_i s_{j,i} (q_{j,i} · x) = b_j + w̃_j · x``. For grouped convolutions every group
    is padded to the same number of copies with zero codes and zero steps (groups stay intact).
    Both parts are standard modules, so the layer exports like any other.
    """

    def __init__(self, expand: nn.Module, merge: nn.Module) -> None:
        super().__init__()
        self.expand = expand
        self.merge = merge

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(self.expand(x))


def split_layer(layer: nn.Module, pts: Points) -> ChannelSplit:
    """Build the :class:`ChannelSplit` of ``layer`` (an nn.Linear or nn.Conv2d) with points ``pts``."""
    w = layer.weight
    c = w.shape[0]
    if pts.codes.shape[0] != c or pts.codes.shape[2] != w[0].numel():
        raise ValueError(
            f"points of shape {tuple(pts.codes.shape)} do not fit a weight of shape {tuple(w.shape)}"
        )
    groups = getattr(layer, "groups", 1)
    per = c // groups
    owners = [
        [(j, i) for j in range(g * per, (g + 1) * per) for i in range(int(pts.counts[j]))]
        for g in range(groups)
    ]
    width = max(len(o) for o in owners)  # copies per group after padding
    codes = torch.zeros(groups * width, w[0].numel(), dtype=w.dtype)
    merge = torch.zeros(c, groups * width, dtype=w.dtype)
    for g, own in enumerate(owners):
        for t, (j, i) in enumerate(own):
            codes[g * width + t] = pts.codes[j, i].to(w.dtype)
            merge[j, g * width + t] = pts.steps[j, i].to(w.dtype)
    bias = layer.bias.detach().clone() if layer.bias is not None else None
    if isinstance(layer, nn.Conv2d) or hasattr(layer, "kernel_size"):
        expand: nn.Module = nn.Conv2d(
            w.shape[1] * groups,
            groups * width,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            groups,
            bias=False,
            padding_mode=layer.padding_mode,
        )
        expand.weight.data = codes.reshape(groups * width, *w.shape[1:])
        mrg: nn.Module = nn.Conv2d(groups * width, c, 1, bias=bias is not None)
        mrg.weight.data = merge[:, :, None, None]
    else:
        expand = nn.Linear(w.shape[1], groups * width, bias=False)
        expand.weight.data = codes
        mrg = nn.Linear(groups * width, c, bias=bias is not None)
        mrg.weight.data = merge
    if bias is not None:
        mrg.bias.data = bias
    return ChannelSplit(expand, mrg)
