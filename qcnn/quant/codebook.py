"""CLIP-Q: clipping + partitioning + quantization of weights (Tung & Mori, CVPR 2018).

Every training step quantizes a copy of the full-precision weights ``w`` of a layer with its own
``(p, b)``; the full-precision weights keep learning.

Forward (one layer, ``w`` flattened, ``K = 2^b - 1``):

1. **Clip.** Separate thresholds per side: ``c+`` such that a fraction ``p`` of the positive weights are
   ``<= c+`` and ``c-`` such that a fraction ``p`` of the negative weights are ``>= c-``: exactly
   ``floor(p * n+)`` positive and ``floor(p * n-)`` negative weights, those nearest zero on each side (ties
   broken by sort order), become 0, as do exact zeros. So a layer's sparsity is ``p`` (up to rounding).
2. **Partition.** The remaining weights span ``[lo, hi]`` (their min and max). That range is cut into
   ``K`` equal intervals; with ``gapless=True`` the clipped gap ``(c-, c+)`` is removed from the axis first,
   so that no interval straddles zero (an option, not the paper's wording, which partitions the range).
3. **Quantize.** Each remaining weight becomes the mean of the weights in its interval. Zero is one more
   level, so the codebook has ``2^b`` entries: ``{0} U {interval means}`` and every weight index fits in
   ``b`` bits. An interval holding no weight gets its centre as (unused) level.

Backward: straight-through to the full-precision weights, ``dL/dw = dL/dw_q`` for every weight, clipped
ones included, so a pruned weight can grow back (the paper's scheme).

The forward has no host synchronisation: the thresholds are gathered from a sorted copy at indices that
stay tensors, the means come from ``scatter_add``. Weights only: activations stay float, or, with the
method option ``act_bits``, go through the uniform quantizer of :mod:`qcnn.quant.uniform`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qcnn.quant import kernels
from qcnn.quant.base import Grid, Quantizer, _tracing, check_bits
from qcnn.quant.nonuniform import check_refresh_every

EPS = 1e-12


def check_p(p: float, name: str = "p") -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name}={p!r} is not a valid clipping fraction: expected a number in [0, 1)")
    return float(p)


def clipq_quantize(w: Tensor, p: Tensor | float, bits: int, gapless: bool = False) -> tuple[Tensor, Tensor]:
    """CLIP-Q forward (see module docstring). Returns ``(w_q, levels)`` with ``levels`` of length
    ``2^bits``: ``levels[0] = 0`` then the ``2^bits - 1`` interval values in increasing order."""
    wq, levels, _ = _clipq_full(w, p, bits, gapless)
    return wq, levels


def _clipq_full(w: Tensor, p: Tensor | float, bits: int, gapless: bool) -> tuple[Tensor, Tensor, tuple]:
    """:func:`clipq_quantize` plus the partition it used, ``(c-, c+, lo, width, shift, means)``, from which
    :func:`_clipq_lookup` quantizes other weights without a sort."""
    k = 2**bits - 1
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    p = torch.as_tensor(p, dtype=torch.float32, device=flat.device)
    s, order = torch.sort(flat)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=flat.device))
    n_pos = (flat > 0).sum()
    n_neg = (flat < 0).sum()
    k_pos = torch.floor(p * n_pos).long()
    k_neg = torch.floor(p * n_neg).long()
    # positives are the last n_pos entries of s: clip the k_pos smallest of them
    clip_pos = (flat > 0) & (rank < n - n_pos + k_pos)
    # negatives are the first n_neg entries of s: clip the k_neg largest (nearest zero) of them
    clip_neg = (flat < 0) & (rank >= n_neg - k_neg)
    kept = (flat != 0) & ~clip_pos & ~clip_neg
    # thresholds c+ (largest clipped positive) and c- (smallest clipped negative), 0 if none
    c_pos = torch.where(k_pos > 0, s[(n - n_pos + k_pos - 1).clamp(0, n - 1)], s.new_zeros(()))
    c_neg = torch.where(k_neg > 0, s[(n_neg - k_neg).clamp(0, n - 1)], s.new_zeros(()))
    inf = torch.full((), float("inf"), device=flat.device)
    lo = torch.where(kept, flat, inf).amin()
    hi = torch.where(kept, flat, -inf).amax()
    lo = torch.where(torch.isfinite(lo), lo, s.new_zeros(()))
    hi = torch.where(torch.isfinite(hi), hi, s.new_zeros(()))
    if gapless:  # collapse the clipped gap (c-, c+) so that the axis is the kept values only
        shift = torch.where(lo < 0, c_pos - c_neg, c_pos.new_zeros(()))
        u = torch.where(flat > 0, flat - shift, flat)
        hi_u = torch.where(hi > 0, hi - shift, hi)
    else:
        shift = s.new_zeros(())
        u, hi_u = flat, hi
    width = (hi_u - lo).clamp_min(EPS) / k
    idx = torch.floor((u - lo) / width).long().clamp(0, k - 1)
    idx = torch.where(kept, idx, torch.zeros_like(idx))
    keptf = kept.float()
    sums = torch.zeros(k, device=flat.device).scatter_add(0, idx, flat * keptf)
    counts = torch.zeros(k, device=flat.device).scatter_add(0, idx, keptf)
    centres = lo + (torch.arange(k, device=flat.device, dtype=torch.float32) + 0.5) * width
    centres = torch.where(centres > 0, centres + shift, centres)
    means = torch.where(counts > 0, sums / counts.clamp_min(1.0), centres)
    wq = torch.where(kept, means[idx], torch.zeros_like(flat))
    levels = torch.cat([means.new_zeros(1), means])
    return wq.reshape(w.shape).to(w.dtype), levels, (c_neg, c_pos, lo, width, shift, means)


def _clipq_lookup(w: Tensor, c_neg: Tensor, c_pos: Tensor, lo: Tensor, width: Tensor, shift: Tensor, means: Tensor,
                  k: int, gapless: bool) -> Tensor:
    """Clip-Q with a fixed partition (the kernel between refreshes): ``0`` for ``c- <= w <= c+`` (zero
    included), else the mean of the interval ``floor((u - lo) / width)`` (clamped to ``0..K-1``) that ``w`` falls
    in (``u = w``, or ``w - shift`` for positive ``w`` when gapless), one elementwise pass."""
    flat = w.float()
    kept = (flat > c_pos) | (flat < c_neg)
    u = torch.where(flat > 0, flat - shift, flat) if gapless else flat
    f = torch.floor((u - lo) / width).clamp(0, k - 1)
    if torch.compiler.is_compiling():  # the gather as compare-and-selects on the K scalar means: vectorises
        y = means[0].expand_as(flat)
        for j in range(1, k):
            y = torch.where(f >= j, means[j], y)
    else:
        y = means[f.long()]
    return torch.where(kept, y, torch.zeros_like(flat)).to(w.dtype)


class _STEFn(torch.autograd.Function):
    """Forward: the given quantized values exactly; backward: identity to the full-precision weights."""

    @staticmethod
    def forward(ctx, w, wq):
        return wq

    @staticmethod
    def backward(ctx, g):
        return g, None


class ClipQQuantizer(Quantizer):
    """CLIP-Q weight quantizer of one layer, with its clipping fraction ``p`` and ``bits`` (``b``).

    ``p`` and ``bits`` are also kept as buffers so that a searched per-layer ``(p, b)`` travels with the
    ``state_dict`` (loading a state dict resets ``self.bits`` from it).

    ``refresh_every`` ``N`` (default 1: every call; the method option ``refresh_every``): the partition (the
    sort that finds the thresholds ``c-``, ``c+``, the
    range ``[lo, hi]``, the interval means) is recomputed only at the first training-mode call and then at
    every ``N``-th training-mode call after the last one (calls 1, N+1, 2N+1, ...); those calls give exactly
    the every-call result. The calls in between quantize the current weights with the last partition in one
    fused pass (:func:`_clipq_lookup`): weights in ``[c-, c+]`` become 0, the others the stored mean of the
    interval they fall in (the codebook stays that of the last refresh; a weight that crossed a threshold
    since then is clipped or kept by value, not by rank). Eval mode (with or without gradients) and any call
    traced by torch.compile / torch.export recompute at every call, so an eval forward, and
    :meth:`grid` / :meth:`codebook` / an export after it, are exactly the grid of the current weights;
    :meth:`grid` describes the codebook the last forward pass used. ``refresh_every=1`` recomputes at every
    call; :meth:`refresh`, :meth:`set_params` and loading a state_dict make the next call recompute, as does a
    weight of another shape or device. With ``N > 1`` a resumed run is not exact: the last partition is not
    saved, so the first call after loading recomputes it from the current weights.
    """

    def __init__(self, bits: int = 3, p: float = 0.5, gapless: bool = False, refresh_every: int = 1):
        super().__init__(bits, signed=True)
        self.gapless = bool(gapless)
        self.refresh_every = check_refresh_every(refresh_every)
        self.register_buffer("p", torch.tensor(check_p(p), dtype=torch.float32))
        self.register_buffer("nbits", torch.tensor(self.bits, dtype=torch.int32))
        #: codebook of the last forward pass (zero first), what :meth:`grid` describes
        self.register_buffer("levels", torch.zeros(2**self.bits))
        self._part: tuple | None = None  # partition of the last refresh (see _clipq_full)
        self._since = 0  # training-mode calls since it
        self._key = None  # (shape, device) of the weight it was computed from (another weight: recompute)

    def refresh(self) -> None:
        """Recompute the partition at the next call."""
        self._part = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "levels" in state_dict:
            self.levels = torch.empty_like(state_dict[prefix + "levels"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "nbits" in state_dict:
            self.bits = check_bits(int(state_dict[prefix + "nbits"]))
        self._part = None

    def set_params(self, p: float, bits: int) -> None:
        """Change ``(p, b)`` (outside the forward pass)."""
        self.bits = check_bits(bits)
        self.p.fill_(check_p(p))
        self.nbits.fill_(self.bits)
        self.levels = torch.zeros(2**self.bits, device=self.p.device)
        self._part = None

    def forward(self, w: Tensor) -> Tensor:
        cached = self.training and not _tracing()
        key = (w.shape, w.device)
        if not cached or self._part is None or self._since >= self.refresh_every or self._key != key:
            wq, levels, part = _clipq_full(w, self.p, self.bits, self.gapless)
            self.levels = levels
            self._part, self._since, self._key = (part if cached else None), 0, key
        else:
            wq = kernels.call(_clipq_lookup, w.detach(), *self._part, 2**self.bits - 1, self.gapless)
        self._since += 1
        return _STEFn.apply(w, wq)

    @torch.no_grad()
    def codebook(self, w: Tensor) -> Tensor:
        """The ``2^b`` levels this quantizer gives ``w`` (zero first)."""
        return clipq_quantize(w, self.p, self.bits, self.gapless)[1]

    def grid(self, w: Tensor | None = None) -> Grid:
        """Codebook grid (sorted levels) of ``w``, or of the weight seen by the last forward pass."""
        levels = self.codebook(w) if w is not None else self.levels
        return Grid(bits=self.bits, signed=True, levels=torch.sort(levels.detach().clone())[0])

    def extra_repr(self) -> str:
        return f"bits={self.bits}, p={float(self.p):.3f}, gapless={self.gapless}"


def _nearest_level(w: Tensor, levels: Tensor) -> Tensor:
    """``levels[argmin_j |w - levels_j|]`` (the first of two equally near levels): the look-up kernel (compiled:
    a running minimum over the levels, one vectorised pass, same level for every non-NaN ``w``)."""
    if not torch.compiler.is_compiling():
        return levels[torch.argmin((w.unsqueeze(-1) - levels).abs(), dim=-1)]
    # compiled: a running minimum over the few levels (strictly smaller wins: argmin's first index on ties)
    best, y = (w - levels[0]).abs(), levels[0].expand_as(w)
    for j in range(1, levels.shape[0]):
        d = (w - levels[j]).abs()
        y = torch.where(d < best, levels[j], y)
        best = torch.minimum(d, best)
    return y


class FixedCodebook(Quantizer):
    """Nearest-level quantizer on a fixed codebook (what a compressed CLIP-Q / VNQ layer loads back as).

    Forward ``w_q = levels[argmin_j |w - levels_j|]`` (exactly a level, with or without gradients); backward
    straight-through. On-grid weights come out bit-exact.
    """

    def __init__(self, levels: Tensor, bits: int | None = None):
        levels = torch.as_tensor(levels, dtype=torch.float32).reshape(-1)
        if levels.numel() == 0:
            raise ValueError("FixedCodebook needs at least one level")
        if bits is None:
            bits = max(1, int(levels.numel() - 1).bit_length())
        super().__init__(bits, signed=True)
        self.register_buffer("levels", torch.sort(levels)[0])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "levels" in state_dict:
            self.levels = torch.empty_like(state_dict[prefix + "levels"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, w: Tensor) -> Tensor:
        wq = kernels.call(_nearest_level, w.detach(), self.levels.to(w.dtype))
        return _STEFn.apply(w, wq) if w.requires_grad else wq

    def grid(self, w: Tensor | None = None) -> Grid:
        return Grid(bits=self.bits, signed=True, levels=self.levels.detach().clone())


__all__ = ["ClipQQuantizer", "FixedCodebook", "clipq_quantize"]
