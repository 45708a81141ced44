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

from qcnn.quant.base import Grid, Quantizer, check_bits

EPS = 1e-12


def check_p(p: float, name: str = "p") -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name}={p!r} is not a valid clipping fraction: expected a number in [0, 1)")
    return float(p)


def clipq_quantize(w: Tensor, p: Tensor | float, bits: int, gapless: bool = False) -> tuple[Tensor, Tensor]:
    """CLIP-Q forward (see module docstring). Returns ``(w_q, levels)`` with ``levels`` of length
    ``2^bits``: ``levels[0] = 0`` then the ``2^bits - 1`` interval values in increasing order."""
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
    return wq.reshape(w.shape).to(w.dtype), levels


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
    """

    def __init__(self, bits: int = 3, p: float = 0.5, gapless: bool = False):
        super().__init__(bits, signed=True)
        self.gapless = bool(gapless)
        self.register_buffer("p", torch.tensor(check_p(p), dtype=torch.float32))
        self.register_buffer("nbits", torch.tensor(self.bits, dtype=torch.int32))
        #: codebook of the last forward pass (zero first), what :meth:`grid` describes
        self.register_buffer("levels", torch.zeros(2**self.bits))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "levels" in state_dict:
            self.levels = torch.empty_like(state_dict[prefix + "levels"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "nbits" in state_dict:
            self.bits = check_bits(int(state_dict[prefix + "nbits"]))

    def set_params(self, p: float, bits: int) -> None:
        """Change ``(p, b)`` (outside the forward pass)."""
        self.bits = check_bits(bits)
        self.p.fill_(check_p(p))
        self.nbits.fill_(self.bits)
        self.levels = torch.zeros(2**self.bits, device=self.p.device)

    def forward(self, w: Tensor) -> Tensor:
        wq, levels = clipq_quantize(w, self.p, self.bits, self.gapless)
        self.levels = levels
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


class FixedCodebook(Quantizer):
    """Nearest-level quantizer on a fixed codebook (what a compressed CLIP-Q / VNQ layer loads back as).

    Forward ``w_q = levels[argmin_j |w - levels_j|]``; backward straight-through. On-grid weights come out
    bit-exact.
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
        lv = self.levels.to(w.dtype)
        idx = torch.argmin((w.detach().unsqueeze(-1) - lv).abs(), dim=-1)
        return w + (lv[idx] - w).detach() if w.requires_grad else lv[idx]

    def grid(self, w: Tensor | None = None) -> Grid:
        return Grid(bits=self.bits, signed=True, levels=self.levels.detach().clone())


__all__ = ["ClipQQuantizer", "FixedCodebook", "clipq_quantize"]
