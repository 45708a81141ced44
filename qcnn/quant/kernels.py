"""Fused quantizer kernels: each quantizer's forward and backward math compiled into one elementwise pass.

Every quantizer writes its forward and backward as pure tensor functions (``x, params -> y`` and
``g, x, params -> dx, dparams``) and runs them through :func:`call`. In eager mode (the default) the
function runs op by op, as written. With fused kernels on (:func:`use`, ``QCNN_KERNELS=fused``,
``Recipe(kernels="fused")``, ``--kernels fused``) :func:`call` runs the same function through
``torch.compile`` (inductor: vectorised, multi-threaded C++ on the CPU, Triton on CUDA), so that each
quantizer costs one read and one write of its input forward, and one pass over ``(g, x)`` backward,
with parameter gradients (PACT's alpha, LSQ's step) reduced in that same pass. One function is both the
eager and the fused path, so the two agree to the bit where the math is elementwise (same float32
operations in the same order; tests check it per quantizer) and to float rounding where it holds a float
reduction (parameter gradients, 1-bit means), which the compiled kernel sums in another order.

Why not torch's own fused fake-quant: ``torch.fake_quantize_per_tensor_affine`` runs at about a tenth of a
plain copy on the CPU (it writes a byte mask beside the output, and its loop is not vectorised); the
quantizers here save their input instead (already kept alive by the ReLU before them in most CNNs) and
recompute the mask in the backward pass.

What fusing costs: the first call of each kernel compiles it (seconds; the first of a process also starts
the compiler, ~10-50 s on a 2-core CPU); compiled kernels are cached on disk by torch for later runs.
Tensors below :data:`MIN_NUMEL` elements stay eager (a compiled call's fixed overhead would dominate),
and so does everything while torch.compile / torch.export traces a model (the traced graph is fused as a
whole). If compiling fails (no C++ compiler, an unsupported platform) the kernel falls back to eager with
one warning naming the reason.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable

import torch

MODES = ("eager", "fused")
#: tensors with fewer elements run eagerly even with fused kernels on
MIN_NUMEL = 1 << 14
#: dynamo recompilations allowed per kernel (bit widths, signedness, tensor ranks each specialise one)
RECOMPILE_LIMIT = 64

_ENV = "QCNN_KERNELS"
_mode: str | None = None
_compiled: dict[Callable, Callable] = {}
_failed: dict[Callable, str] = {}
_calls: dict[Callable, int] = {}


def _tracing() -> bool:
    """Whether torch.compile / torch.export is tracing the current call."""
    compiler = getattr(torch, "compiler", None)
    if compiler is None:
        return False
    exporting = getattr(compiler, "is_exporting", None)
    return bool(compiler.is_compiling() or (exporting is not None and exporting()))


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"kernels={mode!r}: choose one of {', '.join(MODES)}")
    return mode


def mode() -> str:
    """The current kernel mode: set by :func:`use` / :func:`set_mode`, else ``$QCNN_KERNELS``, else eager."""
    if _mode is not None:
        return _mode
    env = os.environ.get(_ENV, "eager") or "eager"
    try:
        return check_mode(env)
    except ValueError as e:
        raise ValueError(f"${_ENV}: {e}") from None


def set_mode(new: str | None) -> None:
    """Set the kernel mode for this process (``None``: back to ``$QCNN_KERNELS`` / eager)."""
    global _mode
    _mode = None if new is None else check_mode(new)


@contextlib.contextmanager
def use(new: str | None = "fused"):
    """Run the enclosed code with kernel mode ``new`` (``"fused"`` or ``"eager"``; None: the current mode)."""
    global _mode
    old = _mode
    if new is not None:
        set_mode(new)
    try:
        yield
    finally:
        _mode = old


def fused_for(x: torch.Tensor) -> bool:
    """Whether :func:`call` compiles for this input: fused mode, a floating tensor of at least
    :data:`MIN_NUMEL` elements on the CPU or a CUDA device, and no torch.compile / export tracing."""
    return (
        mode() == "fused"
        and x.numel() >= MIN_NUMEL
        and x.is_floating_point()
        and x.device.type in ("cpu", "cuda")
        and not _tracing()
    )


def _compile(fn: Callable) -> Callable:
    import torch._dynamo.config as dcfg

    for name in ("recompile_limit", "cache_size_limit"):
        if getattr(dcfg, name, RECOMPILE_LIMIT) < RECOMPILE_LIMIT:
            setattr(dcfg, name, RECOMPILE_LIMIT)
    return torch.compile(fn, dynamic=True, fullgraph=True)


def call(fn: Callable, x: torch.Tensor, *args):
    """``fn(x, *args)``, compiled into fused kernels when :func:`fused_for` ``(x)``, else op by op.

    ``fn`` must be a pure function of tensors and Python scalars (no side effects, no host reads)."""
    if not fused_for(x) or fn in _failed:
        return fn(x, *args)
    kernel = _compiled.get(fn)
    if kernel is None:
        kernel = _compiled[fn] = _compile(fn)
    try:
        out = kernel(x, *args)
        _calls[fn] = _calls.get(fn, 0) + 1
        return out
    except Exception as e:  # noqa: BLE001 - any compiler failure: run eagerly, say so once
        _failed[fn] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        warnings.warn(f"qcnn fused kernel {fn.__qualname__} could not be compiled ({_failed[fn]}); "
                      "running it eagerly", RuntimeWarning, stacklevel=2)
        return fn(x, *args)


def fused_calls() -> dict[str, int]:
    """How many times each kernel ran compiled in this process (by qualified name)."""
    return {fn.__qualname__: n for fn, n in _calls.items()}


def failures() -> dict[str, str]:
    """Kernels that fell back to eager, with the reason (empty when all compiled)."""
    return {fn.__qualname__: why for fn, why in _failed.items()}


def failures_line(failed: dict[str, str] | None = None) -> str:
    """One Markdown line naming the kernels that fell back to eager (``failed``: a saved :func:`failures`), or
    an empty string when none did."""
    failed = failures() if failed is None else failed
    if not failed:
        return ""
    return "Kernels that fell back to eager: " + "; ".join(f"{k}: {v}" for k, v in failed.items())


def bcast(t: torch.Tensor, ndim: int, axis: int | None) -> torch.Tensor:
    """A per-channel parameter (1-d along ``axis``) reshaped to broadcast against an ``ndim``-d input; a 0-d or
    single-element parameter as a 0-d tensor."""
    if t.dim() == 0 or axis is None or t.numel() == 1:
        return t.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def reduce_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` summed down to ``like``'s (broadcast) shape: the gradient of a parameter that was broadcast."""
    if like.dim() == 0:
        return t.sum()
    return t.sum_to_size(like.shape)
