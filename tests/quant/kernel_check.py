"""Shared check of a quantizer's fused kernels against its eager path (used by the quantizer tests)."""

from __future__ import annotations

import copy

import torch

from qcnn.quant import kernels


def run(q, x: torch.Tensor, g: torch.Tensor, mode: str):
    """Forward and backward of quantizer ``q`` on ``x`` (gradient ``g``) in kernel ``mode``: (y, dx, param
    grads by name). Runs on a copy of ``q``, so stateful quantizers (range trackers) start alike in each mode."""
    q = copy.deepcopy(q)
    for p in q.parameters():
        p.grad = None
    xg = x.detach().clone().requires_grad_(True)
    with kernels.use(mode):
        y = q(xg)
        y.backward(g)
    grads = {n: p.grad.detach().clone() for n, p in q.named_parameters() if p.grad is not None}
    return y.detach(), xg.grad.detach().clone(), grads


def assert_fused_matches(q, x: torch.Tensor, g: torch.Tensor | None = None, kernel_names: tuple[str, ...] = (),
                         param_rtol: float = 1e-5) -> None:
    """The fused path of ``q`` gives the eager forward and input gradient bit for bit and the parameter
    gradients to float rounding (reductions in another order), and its kernels really ran compiled
    (each name in ``kernel_names`` counted, none fell back)."""
    g = torch.randn_like(x) if g is None else g
    before = kernels.fused_calls()
    y0, dx0, p0 = run(q, x, g, "eager")
    y1, dx1, p1 = run(q, x, g, "fused")
    assert not kernels.failures(), kernels.failures()
    after = kernels.fused_calls()
    for name in kernel_names:
        assert after.get(name, 0) > before.get(name, 0), f"kernel {name} did not run compiled: {after}"
    assert torch.equal(y0, y1), f"forward differs: max {(y0 - y1).abs().max().item()}"
    assert torch.equal(dx0, dx1), f"input gradient differs: max {(dx0 - dx1).abs().max().item()}"
    assert p0.keys() == p1.keys()
    for n in p0:
        torch.testing.assert_close(p1[n], p0[n], rtol=param_rtol, atol=1e-6 * max(1.0, p0[n].abs().max().item()))
