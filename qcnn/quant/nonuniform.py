"""Non-uniform k-quantile quantizer with a single-scale integer representation.

Method of Liss, Baskin, Mendelson, Bronstein, Zheltonozhskii, Yehudai et al., "Efficient non-uniform
quantizer for quantized neural network targeting reconfigurable hardware" (arXiv 1811.10869), with the
k-quantile levels of UNIQ (Baskin et al., arXiv 1804.10969).

Levels. For ``k = 2^b`` bins of a distribution with CDF ``F``, the bins hold equal probability mass:
edges ``e_i = F^-1(i / k)`` (i = 1..k-1) and each bin is represented by the quantile of its centre,
``l_i = F^-1((i + 1/2) / k)`` (i = 0..k-1). Forward ``y = l_j`` for ``e_j <= x < e_(j+1)``.

* Weights (:class:`QuantileWeightQuantizer`): a Gaussian ``N(mu, s^2)`` is fitted to the layer's weights
  (``mu``, ``s`` = mean and standard deviation), so ``l_i = mu + s Phi^-1((i + 1/2)/k)``; refitted at every
  eval-mode call and every ``refresh_every``-th training-mode call (default 1 = every call).
  Backward: straight-through, ``dy/dx = 1``.
* Activations (:class:`QuantileActQuantizer`): the *empirical* distribution of the calibration data (a
  random sample of at most ``max_samples`` values). After a ReLU (unsigned) the spike at 0 would swallow
  several quantiles, so 0 is one level and the other ``k - 1`` levels are the k-quantile levels of the
  positive values (edges: half the first positive level, then the positive quantile edges). Signed inputs
  use the quantiles of all values. Backward: clipped straight-through, ``dy/dx = 1`` for
  ``l_0 <= x <= l_(k-1)``, else 0.

  The levels are the k-quantiles of the distribution the layer *currently* sees, so they follow it in
  training: calibration sets them, then every training-mode forward pass moves the unsnapped levels and
  edges by an EMA towards the batch's k-quantile levels (``track_momentum``, default 0.9; eval mode never
  changes them; ``track_momentum: null`` freezes them at the calibration values). Levels frozen at
  calibration made a network trained from scratch barely learn (LeNet-5 / Fashion-MNIST W4A4, 2 epochs:
  60.97 %): its activation ranges grow during training (fc3's input: 99th percentile 0.60 at calibration,
  1.51 after 300 steps), the stale top level then has 13-22 % of a layer's inputs above it (up to 50 %
  with an eval-mode calibration of an untrained network), all on one level and, through the clipped STE,
  without gradient. Tracked, about 2 % of the inputs lie above the top level throughout.

Integer representation (the hardware side of Liss et al.). The levels are written as one scale times small
integers: ``l_i ~= scale * n_i`` with ``n_i`` integers of ``int_bits`` bits (signed for weights and signed
inputs, unsigned after ReLU) and ``scale = max|l| / n_max``. With ``snap=True`` (default) the forward pass
uses the snapped levels ``scale * n_i``, so training sees exactly what integer hardware computes
(``sum_j n_w,j n_a,j`` then one multiply by ``scale_w scale_a``). :meth:`grid` reports ``levels``,
``int_levels`` and ``scale``; :func:`level_report` writes them as a Markdown table and a PNG.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qcnn.calib.observers import check_finite
from qcnn.quant import kernels
from qcnn.quant.base import Grid, Quantizer, _tracing, check_bits, qrange

EPS = 1e-12


def gaussian_quantile_levels(bits: int, mu: Tensor | float = 0.0, std: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """(levels, edges) of the k-quantile quantizer of ``N(mu, std^2)``, ``k = 2^bits``."""
    k = 2**bits
    mu = torch.as_tensor(mu, dtype=torch.float32)
    std = torch.as_tensor(std, dtype=torch.float32)
    p_lv = (torch.arange(k, dtype=torch.float64, device=mu.device) + 0.5) / k
    p_ed = torch.arange(1, k, dtype=torch.float64, device=mu.device) / k
    z_lv = torch.special.ndtri(p_lv).to(mu.dtype)
    z_ed = torch.special.ndtri(p_ed).to(mu.dtype)
    return mu + std * z_lv, mu + std * z_ed


def empirical_quantile_levels(x: Tensor, bits: int, signed: bool) -> tuple[Tensor, Tensor]:
    """(levels, edges) of the k-quantile quantizer of the samples ``x`` (see module docstring)."""
    x = x.detach().flatten().float()
    k = 2**bits
    if x.numel() == 0:
        raise ValueError("the quantile quantizer saw no calibration data")
    if signed:
        n = k
        vals = x
    else:
        n = k - 1
        vals = x[x > 0]
    if vals.numel() == 0:
        vals = torch.zeros(1, device=x.device)
    q_lv = (torch.arange(n, dtype=torch.float32, device=x.device) + 0.5) / n
    q_ed = torch.arange(1, n, dtype=torch.float32, device=x.device) / n
    lv = torch.quantile(vals, q_lv)
    ed = torch.quantile(vals, q_ed) if n > 1 else torch.zeros(0, device=x.device)
    if signed:
        return lv, ed
    if k == 2:
        return torch.cat([torch.zeros(1, device=x.device), lv]), lv[:1] / 2
    return torch.cat([torch.zeros(1, device=x.device), lv]), torch.cat([lv[:1] / 2, ed])


def integer_representation(levels: Tensor, int_bits: int, signed: bool) -> tuple[Tensor, Tensor]:
    """(scale, int_levels): ``levels ~= scale * int_levels``, integers in the ``int_bits`` code range."""
    qmin, qmax = qrange(int_bits, signed, narrow=signed)
    amax = levels.abs().max() if levels.numel() else torch.zeros(())
    scale = torch.clamp(amax / qmax, min=EPS)
    ints = torch.clamp(torch.round(levels / scale), qmin, qmax)
    return scale, ints.to(torch.int32)


def _level_lookup(x: Tensor, levels: Tensor, edges: Tensor) -> Tensor:
    """``y = l_j`` for ``e_j <= x < e_(j+1)``, ``j`` = the number of (sorted) edges ``<= x``: the level kernel.
    Eagerly ``levels[bucketize(x, edges, right=True)]`` (a binary search and a gather); compiled, the same ``j``
    as a chain of ``k - 1`` compare-and-selects ``y = where(x >= e_i, l_(i+1), y)`` on scalar edges, which
    vectorises into one pass (inductor's bucketize and gathers do not: ~50x slower than a copy). For sorted
    edges the two give the same level for every non-NaN ``x``."""
    if not torch.compiler.is_compiling():
        return levels[torch.bucketize(x, edges, right=True)]
    y = torch.where(x >= edges[0], levels[1], levels[0])
    for i in range(1, edges.shape[0]):
        y = torch.where(x >= edges[i], levels[i + 1], y)
    return y


def _level_backward(g: Tensor, x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """The clipped STE ``g [l_0 <= x <= l_(k-1)]``, mask recomputed from ``x``."""
    return g * ((x >= lo) & (x <= hi)).to(g.dtype)


class _LevelFn(torch.autograd.Function):
    """Level look-up through :mod:`qcnn.quant.kernels`; saves ``x`` (not a mask) when the STE is clipped."""

    @staticmethod
    def forward(ctx, x, levels, edges, clip):
        ctx.clip = clip
        if clip:
            ctx.save_for_backward(x, levels[0], levels[-1])
        return kernels.call(_level_lookup, x, levels, edges)

    @staticmethod
    def backward(ctx, g):
        if not ctx.clip:
            return g, None, None, None
        x, lo, hi = ctx.saved_tensors
        return kernels.call(_level_backward, g.contiguous(), x, lo, hi), None, None, None


class _QuantileBase(Quantizer):
    def __init__(self, bits: int, signed: bool, int_bits: int = 8, snap: bool = True):
        super().__init__(check_bits(bits, "bits", 1, 8), signed)
        self.int_bits = check_bits(int_bits, "int_bits", 2, 16)
        if self.int_bits < bits:
            raise ValueError(f"int_bits={int_bits} must be >= bits={bits}")
        self.snap = bool(snap)
        k = 2**bits
        self.register_buffer("levels", torch.zeros(k))
        self.register_buffer("edges", torch.zeros(k - 1))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("int_levels", torch.zeros(k, dtype=torch.int32))

    @torch.no_grad()
    def _set_levels(self, levels: Tensor, edges: Tensor) -> None:
        scale, ints = integer_representation(levels, self.int_bits, self.signed)
        self.scale = scale.detach().reshape(())
        self.int_levels = ints
        self.levels = (scale * ints.to(scale.dtype)) if self.snap else levels.detach().clone()
        self.edges = edges.detach().clone().to(self.levels.dtype)

    def grid(self) -> Grid:
        return Grid(bits=self.bits, signed=self.signed, levels=self.levels.detach().clone(),
                    int_levels=self.int_levels.detach().clone(), scale=self.scale.detach().clone())

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, int_bits={self.int_bits}, snap={self.snap}"


def check_refresh_every(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"refresh_every={n!r} must be a positive integer (1: refit at every call)")
    return n


class QuantileWeightQuantizer(_QuantileBase):
    """Weights: Gaussian-fit k-quantile levels of the weight; plain STE.

    ``refresh_every`` ``N`` (default 1: every call; the method option ``refresh_every``): in training mode
    the Gaussian fit (mean, standard deviation, levels,
    integer representation) is recomputed at the first training-mode call and then at every ``N``-th
    training-mode call after the last fit (calls 1, N+1, 2N+1, ...); the calls in between look the weight up
    in the levels of the last fit (one fused pass, no reduction over the weight). The levels used at a refit
    call are exactly those of fitting at every call. Eval mode (and any call while torch.compile / torch.export
    traces the model) refits at every call, so an eval forward, and :meth:`grid` / an integer export after it,
    are exactly the grid of the current weights; :meth:`grid` always describes the levels the last forward
    pass used. ``refresh_every=1`` refits at every call (the behaviour before the option existed).
    :meth:`refresh` (and loading a state_dict) makes the next call refit, as does a weight of another shape or
    device. With ``N > 1`` a resumed run is not exact (the last fit is not saved: the first call after loading
    refits the current weights).
    """

    def __init__(self, bits: int = 4, int_bits: int = 8, snap: bool = True, refresh_every: int = 1):
        super().__init__(bits, True, int_bits, snap)
        self.refresh_every = check_refresh_every(refresh_every)
        self._since: int | None = None  # training calls since the last fit (None: refit at the next call)
        self._key = None  # (shape, device) of the weight last fitted (another weight: refit)

    def refresh(self) -> None:
        """Refit the levels at the next call."""
        self._since = None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._since = None

    @torch.no_grad()
    def _fit(self, w: Tensor) -> None:
        lv, ed = gaussian_quantile_levels(self.bits, w.mean(), w.std(unbiased=False) if w.numel() > 1 else 0.0)
        self._set_levels(lv, ed)

    def forward(self, w: Tensor) -> Tensor:
        if _tracing() or not self.training:
            self._fit(w)
        else:
            key = (w.shape, w.device)
            if self._since is None or self._since >= self.refresh_every or self._key != key:
                self._fit(w)
                self._since, self._key = 0, key
            self._since += 1
        return _LevelFn.apply(w, self.levels, self.edges, False)


class QuantileActQuantizer(_QuantileBase):
    """Activations: empirical k-quantile levels, calibrated, then tracked in training; clipped STE.

    ``track_momentum`` ``m`` (0 < m < 1): in training mode every forward pass moves the (unsnapped) levels
    and edges towards the k-quantile levels and edges of the batch, ``l <- m l + (1 - m) l_batch`` (from a
    random sample of ``track_samples`` of the batch's values), then snaps them to the integer grid again.
    ``track_momentum=None`` keeps the calibrated levels fixed. Eval mode never changes the levels.
    """

    def __init__(self, bits: int = 4, signed: bool = False, int_bits: int = 8, snap: bool = True,
                 max_samples: int = 1 << 18, samples_per_batch: int = 1 << 14, track_momentum: float | None = 0.9,
                 track_samples: int = 1 << 12):
        super().__init__(bits, signed, int_bits, snap)
        if track_momentum is not None and not 0.0 < float(track_momentum) < 1.0:
            raise ValueError(f"track_momentum={track_momentum!r} must be in (0, 1) or None (fixed levels)")
        self.max_samples = int(max_samples)
        self.samples_per_batch = int(samples_per_batch)
        self.track_samples = int(track_samples)
        self.track_momentum = None if track_momentum is None else float(track_momentum)
        self.register_buffer("initialized", torch.tensor(False))
        # unsnapped levels / edges the training-time EMA runs on (not saved: rebuilt from levels / edges)
        self.register_buffer("raw_levels", torch.zeros(0), persistent=False)
        self.register_buffer("raw_edges", torch.zeros(0), persistent=False)
        self._samples: list[Tensor] = []
        self._seen = 0
        self._ready = False

    def is_initialized(self) -> bool:
        return bool(self.initialized)

    @torch.no_grad()
    def _set_levels(self, levels: Tensor, edges: Tensor) -> None:
        self.raw_levels = levels.detach().clone().float()
        self.raw_edges = edges.detach().clone().float()
        super()._set_levels(levels, edges)

    def _sample(self, x: Tensor, m: int) -> Tensor:
        flat = x.detach().flatten()
        if flat.numel() <= m:
            return flat.float()
        return flat[torch.randint(flat.numel(), (m,), device=flat.device)].float()

    @torch.no_grad()
    def _observe(self, x: Tensor) -> None:

        check_finite(x)
        if self._seen >= self.max_samples:
            return
        m = min(self.samples_per_batch, self.max_samples - self._seen)
        sample = self._sample(x, m)
        self._samples.append(sample)
        self._seen += sample.numel()

    def finish_calibration(self) -> None:
        if not self._samples:
            return
        lv, ed = empirical_quantile_levels(torch.cat(self._samples), self.bits, self.signed)
        self._set_levels(lv, ed)
        self.initialized.fill_(True)
        self._samples, self._seen = [], 0

    @torch.no_grad()
    def _track(self, x: Tensor) -> None:
        """One EMA step of the levels towards the batch's k-quantile levels (class docstring)."""
        lv, ed = empirical_quantile_levels(self._sample(x, self.track_samples), self.bits, self.signed)
        if self.raw_levels.numel() != lv.numel():  # loaded from a state_dict: start from the saved levels
            self.raw_levels, self.raw_edges = self.levels.float().clone(), self.edges.float().clone()
        m = self.track_momentum
        raw_lv = self.raw_levels.to(lv.device)
        raw_ed = self.raw_edges.to(ed.device)
        self._set_levels(m * raw_lv + (1 - m) * lv, m * raw_ed + (1 - m) * ed)

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            self._observe(x)
            return x
        if not self._ready:
            self._ready = self._require_initialized()
        if self.training and self.track_momentum is not None:
            self._track(x)
        return _LevelFn.apply(x, self.levels.to(x.dtype), self.edges.to(x.dtype), True)


__all__ = ["QuantileActQuantizer", "check_refresh_every",
           "QuantileWeightQuantizer", "empirical_quantile_levels", "gaussian_quantile_levels",
           "integer_representation"]
