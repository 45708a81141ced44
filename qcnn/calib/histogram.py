"""Histogram range estimators: percentile, MSE and KL (TensorRT entropy calibration).

All three keep a streaming histogram of ``|x|`` with ``num_bins`` (2048) bins over ``[0, amax]``, plus the
running min and max. When a batch exceeds the current ``amax`` the range grows to the new maximum and the
old histogram is re-binned onto the wider bins (mass spread uniformly inside each old bin, i.e. the CDF is
interpolated linearly), so no batch has to be kept. Everything is vectorised with torch.

For a threshold ``t`` the returned range is ``[max(min, -t), min(max, t)]`` (``[0, t]`` for non-negative
data), so symmetric and asymmetric quantizers can both use it; a power-of-two quantizer rounds it up.

* ``percentile``: ``t`` = the ``percentile``-th percentile of ``|x|`` (default 99.99).
* ``mse``: ``t`` minimising ``sum_k h_k (c_k - Q_t(c_k))^2`` over bin centres ``c_k``, where ``Q_t`` is the
  symmetric grid with ``q_max = 2^(B-1) - 1`` steps (signed) or ``2^B - 1`` (unsigned) covering ``[0, t]``;
  candidate edges every 8 bins, then every bin within 8 of the best.
* ``kl_tensorrt``: TensorRT entropy calibration, literally (Migacz, "8-bit inference with TensorRT", GTC
  2017). For every candidate ``i >= 128`` (bins): ``P = h[0:i]`` with the tail ``sum h[i:]`` folded into ``P[i-1]``;
  ``Q`` = ``h[0:i]`` merged into ``n_q`` groups of ``i // n_q`` bins (the last group also takes the
  remainder), each group's mass spread evenly over its non-empty bins (empty bins stay 0);
  ``t = edge[i]`` for ``i = argmin KL(P || Q)`` with ``KL = sum_{P>0} P log(P / Q)`` (``inf`` where
  ``Q = 0 < P``). ``n_q`` is the number of non-negative levels of the target grid: ``2^(B-1)`` signed,
  ``2^B`` unsigned. All candidates are evaluated at once from prefix sums (:func:`kl_divergences`).
* ``kl`` (the default entropy calibration; ``kl_nozero`` is the same estimator under its earlier name): the
  same search with the count of bin 0 replaced by that of bin 1 before it (the variant of NVIDIA's
  pytorch-quantization). After a ReLU the exact zeros hold 40-60 % of the mass and otherwise dominate
  ``P``: the literal algorithm then clips far too much (ResNet-20 W8A8: -26 points, see docs/ptq.md).

Fixed-point (QCode) grids can also be scored directly per fractional length ``fl``
(:meth:`HistogramObserver.fl_scores`): the grid ``step = 2^-fl``, ``t = q_max * step`` is evaluated with
the same MSE or KL criterion (KL with bin 0 flattened, as ``kl``; the histogram is padded with empty
bins when ``t`` lies beyond ``amax``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qcnn.calib.observers import Observer, register_observer

NUM_BINS = 2048
KL_START_BIN = 128
_CHUNK = 128


def _pos_levels(bits: int, signed: bool) -> int:
    """Number of steps of the grid on the non-negative side (``q_max``)."""
    return 2 ** (bits - 1) - 1 if signed else 2**bits - 1


def kl_num_quant_bins(bits: int, signed: bool) -> int:
    """Number of groups Q is merged into: the non-negative levels of the target grid."""
    return 2 ** (bits - 1) if signed else 2**bits


def rebin(hist: Tensor, old_max: float | Tensor, new_max: float | Tensor) -> Tensor:
    """Histogram over ``[0, old_max]`` re-binned onto the same number of bins over ``[0, new_max]``
    (``new_max >= old_max``), assuming mass uniform inside each old bin."""
    n = hist.numel()
    cdf = torch.cat([hist.new_zeros(1), torch.cumsum(hist, 0)])
    pos = torch.arange(n + 1, dtype=hist.dtype, device=hist.device) * (new_max / old_max)  # new edges, old units
    pos = pos.clamp(max=float(n))
    idx = pos.floor().long().clamp(max=n - 1)
    frac = pos - idx.to(hist.dtype)
    cdf_new = cdf[idx] + frac * hist[idx]
    return torch.diff(cdf_new).clamp(min=0)


def kl_divergences(hist: Tensor, stops: Tensor, num_quant_bins: int) -> Tensor:
    """KL(P || Q) of the TensorRT entropy calibration for each candidate stop bin ``i`` in ``stops``
    (see module docstring). ``stops`` may exceed ``len(hist)``: the histogram is padded with empty bins.

    Evaluated in closed form from prefix sums, all candidates at once: with ``T = sum h``,
    ``S``/``C``/``L`` the prefix sums of ``h``, ``[h > 0]`` and ``h log h``, group ``g = [a_g, b_g)``,
    ``avg_g = (S[b_g] - S[a_g]) / (C[b_g] - C[a_g])`` and ``Q_k = avg_g / S[i]`` on non-empty bins,
    ``KL = (L[i-1] - S[i-1] log T) / T - sum_g (mass of g below i-1) / T * log(avg_g / S[i])
    + P_{i-1} log(P_{i-1} / Q_{i-1})``.
    """
    hist = hist.double().clamp(min=0)
    stops = stops.long().to(hist.device).clamp(min=1)
    n = max(int(stops.max()), hist.numel())
    if n > hist.numel():
        hist = torch.cat([hist, hist.new_zeros(n - hist.numel())])
    zero = hist.new_zeros(1)
    S = torch.cat([zero, torch.cumsum(hist, 0)])
    C = torch.cat([zero, torch.cumsum((hist > 0).double(), 0)])
    L = torch.cat([zero, torch.cumsum(torch.where(hist > 0, hist * torch.log(hist.clamp(min=1e-300)), hist), 0)])
    T = S[-1].clamp(min=1e-300)
    i = stops.unsqueeze(1)  # (c, 1)
    nq = num_quant_bins
    m = torch.clamp(i // nq, min=1)
    j = torch.arange(nq, device=hist.device).unsqueeze(0)
    a = torch.clamp(j * m, max=i)
    b = torch.where(j == nq - 1, i, torch.clamp((j + 1) * m, max=i))
    gs = S[b] - S[a]
    gc = C[b] - C[a]
    avg = gs / gc.clamp(min=1)
    last = (i - 1).squeeze(1)
    g_last = torch.clamp(last // m.squeeze(1), max=nq - 1)
    h_last = hist[last]
    gs_ex = gs - torch.nn.functional.one_hot(g_last, nq).double() * h_last.unsqueeze(1)
    sq = S[stops].clamp(min=1e-300).unsqueeze(1)
    ok = gs_ex > 1e-9 * T
    cross = torch.where(ok, gs_ex * torch.log(torch.where(ok, avg, torch.ones_like(avg)) / sq), gs_ex.new_zeros(()))
    head = (L[last] - S[last] * torch.log(T)) / T
    p_last = (h_last + S[-1] - S[stops]) / T
    q_last = torch.gather(avg, 1, g_last.unsqueeze(1)).squeeze(1) / sq.squeeze(1)
    q_last = torch.where(h_last > 0, q_last, torch.zeros_like(q_last))
    tail_term = torch.where(p_last > 0, p_last * torch.log(p_last / q_last), torch.zeros_like(p_last))
    return head - cross.sum(1) / T + tail_term


def quant_mse(hist: Tensor, bin_width: float | Tensor, steps: Tensor, qmax: int) -> Tensor:
    """Mean squared error of quantizing the histogram's bin centres on grids ``k * step, k = 0..qmax`` for
    each step in ``steps`` (values beyond ``qmax * step`` clip)."""
    hist = hist.double()
    n = hist.numel()
    centres = (torch.arange(n, dtype=torch.float64, device=hist.device) + 0.5) * float(bin_width)
    steps = steps.double().to(hist.device)
    total = hist.sum().clamp(min=1e-300)
    out = []
    for s in range(0, steps.numel(), _CHUNK):
        st = steps[s : s + _CHUNK].unsqueeze(1)
        q = torch.clamp(torch.round(centres / st), 0, qmax) * st
        out.append(((centres - q) ** 2 * hist).sum(1) / total)
    return torch.cat(out)


class HistogramObserver(Observer):
    """Streaming histogram of ``|x|`` (see module docstring). Per tensor only."""

    def __init__(self, axis: int | None = None, num_bins: int = NUM_BINS):
        if axis is not None:
            raise ValueError(f"{type(self).__name__} estimates per-tensor ranges only, got axis={axis!r}")
        super().__init__(None)
        if num_bins < 2 * KL_START_BIN:
            raise ValueError(f"num_bins={num_bins!r} must be at least {2 * KL_START_BIN}")
        self.num_bins = num_bins
        self.register_buffer("hist", torch.zeros(num_bins, dtype=torch.float64))
        self.register_buffer("amax", torch.zeros((), dtype=torch.float64))
        self.register_buffer("min_val", torch.zeros(()))
        self.register_buffer("max_val", torch.zeros(()))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x.float())
        a = x.float().abs().flatten()
        bmax = torch.maximum(-lo, hi).double()
        first = self.count == 0
        new_amax = torch.where(first, bmax, torch.maximum(self.amax, bmax)).clamp(min=1e-12)
        if not bool(first) and bool(new_amax > self.amax):
            self.hist = rebin(self.hist, self.amax.clamp(min=1e-12), new_amax)
        self.amax = new_amax
        self.hist = self.hist + torch.histc(a, bins=self.num_bins, min=0.0, max=float(new_amax)).to(self.hist)
        self.min_val = torch.where(first, lo, torch.minimum(self.min_val, lo))
        self.max_val = torch.where(first, hi, torch.maximum(self.max_val, hi))
        self.count += 1

    @property
    def bin_width(self) -> Tensor:
        return self.amax / self.num_bins

    def _require(self) -> None:
        if not self.is_initialized():
            raise RuntimeError(f"{type(self).__name__} has observed no data yet")

    def threshold(self, bits: int, signed: bool) -> Tensor:
        """The clipping threshold on ``|x|`` chosen by this estimator."""
        raise NotImplementedError

    def compute_range(self, bits: int, signed: bool) -> tuple[Tensor, Tensor]:
        self._require()
        t = self.threshold(bits, signed).float().clamp(min=1e-8)
        lo = torch.maximum(self.min_val, -t).clamp(max=0.0)
        hi = torch.minimum(self.max_val, t).clamp(min=0.0)
        return lo, hi

    def fl_scores(self, bits: int, signed: bool, fls: Tensor | list[int], metric: str = "mse") -> Tensor:
        """Error of the fixed-point grid ``step = 2^-fl`` for every ``fl`` in ``fls`` (lower is better):
        ``mse`` (mean squared error of ``|x|``) or ``kl`` (TensorRT KL at the grid's threshold)."""
        self._require()
        fls = torch.as_tensor(fls, dtype=torch.float64)
        steps = torch.exp2(-fls)
        qmax = _pos_levels(bits, signed)
        if metric == "mse":
            return quant_mse(self.hist, self.bin_width, steps, qmax)
        if metric == "kl":
            t = (qmax + 1) * steps  # 2^(B-1-fl) signed, 2^(B-fl) unsigned
            stops = torch.round(t / self.bin_width.cpu()).clamp(min=1, max=64 * self.num_bins).long()
            return kl_divergences(flatten_zero_bin(self.hist), stops, kl_num_quant_bins(bits, signed))
        raise ValueError(f"unknown fl search metric {metric!r}; choose 'mse' or 'kl'")

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}"


@register_observer("percentile")
class PercentileObserver(HistogramObserver):
    """``t`` = the given percentile of ``|x|`` (linear inside a bin)."""

    def __init__(self, axis: int | None = None, percentile: float = 99.99, num_bins: int = NUM_BINS):
        super().__init__(axis, num_bins)
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile={percentile!r} must lie in (0, 100]")
        self.percentile = float(percentile)

    def threshold(self, bits: int, signed: bool) -> Tensor:
        self._require()
        cdf = torch.cumsum(self.hist, 0)
        target = cdf[-1] * (self.percentile / 100.0)
        i = torch.searchsorted(cdf, target.unsqueeze(0)).clamp(max=self.num_bins - 1)[0]
        before = torch.where(i > 0, cdf[(i - 1).clamp(min=0)], torch.zeros_like(target))
        frac = ((target - before) / self.hist[i].clamp(min=1e-300)).clamp(0, 1)
        return (i.double() + frac) * self.bin_width

    def extra_repr(self) -> str:
        return f"percentile={self.percentile}, num_bins={self.num_bins}"


@register_observer("mse")
class MSEObserver(HistogramObserver):
    """``t`` = the bin edge minimising the quantization MSE of the histogram for the target grid."""

    def __init__(self, axis: int | None = None, num_bins: int = NUM_BINS, start_bin: int = KL_START_BIN // 2):
        super().__init__(axis, num_bins)
        self.start_bin = start_bin

    def threshold(self, bits: int, signed: bool) -> Tensor:
        self._require()
        qmax = _pos_levels(bits, signed)
        w = self.bin_width.cpu()

        def best(stops: Tensor) -> int:
            err = quant_mse(self.hist, w, stops * w / qmax, qmax)
            return int(stops[int(torch.argmin(err))])

        # coarse pass every 8 bins, then every bin around the coarse optimum
        i = best(torch.arange(self.start_bin, self.num_bins + 1, 8, dtype=torch.float64))
        i = best(torch.arange(max(self.start_bin, i - 8), min(self.num_bins, i + 8) + 1, dtype=torch.float64))
        return torch.tensor(float(i), dtype=torch.float64, device=self.amax.device) * self.bin_width


def flatten_zero_bin(hist: Tensor) -> Tensor:
    """``hist`` with the count of bin 0 replaced by that of bin 1 (the exact zeros after a ReLU)."""
    return torch.cat([hist[1:2], hist[1:]]) if hist.numel() > 1 else hist


@register_observer("kl_tensorrt")
class KLObserver(HistogramObserver):
    """TensorRT entropy calibration: ``t = edge[argmin_i KL(P_i || Q_i)]`` over ``i >= 128``.

    ``flatten_zero_bin`` (off here: the published algorithm) replaces the count of bin 0 by that of bin 1
    before the search, as NVIDIA's pytorch-quantization does, so that the exact zeros after a ReLU do not
    dominate P; the ``kl`` estimator (:class:`KLNoZeroObserver`) sets it.
    """

    def __init__(self, axis: int | None = None, num_bins: int = NUM_BINS, start_bin: int = KL_START_BIN,
                 flatten_zero_bin: bool = False):
        super().__init__(axis, num_bins)
        self.start_bin = start_bin
        self.flatten_zero_bin = flatten_zero_bin

    def threshold(self, bits: int, signed: bool) -> Tensor:
        self._require()
        stops = torch.arange(self.start_bin, self.num_bins + 1)
        hist = flatten_zero_bin(self.hist) if self.flatten_zero_bin else self.hist
        kl = kl_divergences(hist, stops, kl_num_quant_bins(bits, signed))
        return stops[int(torch.argmin(kl))].to(self.amax) * self.bin_width


@register_observer("kl")
@register_observer("kl_nozero")
class KLNoZeroObserver(KLObserver):
    """The default entropy calibration (``kl``, also ``kl_nozero``): :class:`KLObserver` with
    ``flatten_zero_bin=True`` (bin 0 takes bin 1's count), so that it works after a ReLU."""

    def __init__(self, axis: int | None = None, num_bins: int = NUM_BINS, start_bin: int = KL_START_BIN):
        super().__init__(axis, num_bins, start_bin, flatten_zero_bin=True)


def entropy_threshold(x: Tensor, bits: int = 8, signed: bool = True, num_bins: int = NUM_BINS) -> float:
    """Convenience: the KL threshold of one tensor (the ``kl`` estimator: bin 0 flattened)."""
    obs = KLNoZeroObserver(num_bins=num_bins)
    obs.update(x)
    return float(obs.threshold(bits, signed))


def initial_fl(amax: float | Tensor, bits: int, signed: bool = True) -> int:
    """``B - 1 - ceil(log2 amax)`` (signed) or ``B - ceil(log2 amax)`` (unsigned); ``amax`` floored at 2^-30."""
    amax = max(float(amax), 2.0**-30)
    return (bits - 1 if signed else bits) - math.ceil(math.log2(amax))


__all__ = [
    "HistogramObserver",
    "KLNoZeroObserver",
    "KLObserver",
    "MSEObserver",
    "NUM_BINS",
    "PercentileObserver",
    "entropy_threshold",
    "flatten_zero_bin",
    "initial_fl",
    "kl_divergences",
    "kl_num_quant_bins",
    "quant_mse",
    "rebin",
]
