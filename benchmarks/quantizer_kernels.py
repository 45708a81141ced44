"""Throughput of every method's weight and activation quantizer, forward and forward+backward.

Baselines measured in the same run on the same tensor: a plain tensor copy (``x.clone()``: the memory
bandwidth ceiling of an elementwise op) and torch's fused ``torch.fake_quantize_per_tensor_affine``.
Each quantizer's figure is reported as effective bandwidth (bytes read + written per second) and as a
fraction of the copy's bandwidth, the way the fused kernels are usually compared.

    python benchmarks/quantizer_kernels.py --out benchmarks/results [--device cpu|cuda] [--numel 4194304]
        [--kernels eager fused] [--only pact lsq]

Each quantizer is timed in every kernel mode given (``eager``: its ops one by one; ``fused``: its forward and
backward compiled by :mod:`qcnn.quant.kernels`, after a warm-up call that compiles them).

Writes ``quantizer_kernels_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qcnn.calib import calibrating  # noqa: E402
from qcnn.methods.base import METHODS, LayerContext, available_methods, get_method  # noqa: E402
from qcnn.quant import kernels  # noqa: E402


def _time(fn, min_run: float) -> float:
    """Median seconds per call of ``fn`` (torch.utils.benchmark handles CUDA sync and warm-up)."""
    t = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return t.blocked_autorange(min_run_time=min_run).median


def _bytes(x: torch.Tensor) -> int:
    return 2 * x.numel() * x.element_size()  # one read + one write


def _quantizers(device: str, out_channels: int = 64, only=None):
    conv = nn.Conv2d(64, out_channels, 3).to(device)  # the layer whose weight tensor is timed
    for name in available_methods():
        if only and name not in only:
            continue
        method = get_method(name)
        bits = 4
        if METHODS[name].weight_bits is not None:
            bits = METHODS[name].weight_bits[-1]
        ctx = LayerContext(name="bench", module=conv, role="hidden", w_bits=bits, a_bits=bits if bits > 1 else 2,
                           input_signed=False, per_channel=True, calib="minmax", g_bits=8, e_bits=8,
                           options=method.options)
        for kind, factory in (("weight", method.weight_quantizer), ("act", method.act_quantizer)):
            try:
                q = factory(ctx)
            except Exception as e:  # noqa: BLE001 - report, do not hide, methods that cannot build here
                yield name, kind, None, f"{type(e).__name__}: {e}"
                continue
            if q is not None:
                yield name, kind, q.to(device), None


def _time_quantizer(q, x, min_run: float) -> tuple[float, float]:
    with torch.no_grad():
        q(x)  # warm-up (compiles fused kernels)
        t_f = _time(lambda: q(x), min_run)
    xg = x.detach().clone().requires_grad_(True)
    g = torch.ones_like(x)

    def fb():
        q(xg).backward(g)
    fb()
    return t_f, _time(fb, min_run)


def run(device: str, numel: int, min_run: float, modes=("eager", "fused"), only=None,
        refresh_every: int | None = None) -> dict:
    torch.manual_seed(0)
    act = torch.randn(numel // (64 * 32 * 32), 64, 32, 32, device=device).relu_()
    weight = torch.randn(numel // (64 * 9), 64, 3, 3, device=device) * 0.05
    one = torch.ones(1, device=device)
    zp = torch.zeros(1, dtype=torch.int32, device=device)

    def fq(x):
        return torch.fake_quantize_per_tensor_affine(x, one * 0.05, zp, -8, 7)

    rows = []
    base = {}
    for label, fn, x in (("copy", lambda x: x.clone(), act), ("torch.fake_quantize_per_tensor_affine", fq, act)):
        t_f = _time(lambda fn=fn, x=x: fn(x), min_run)
        xg = x.detach().clone().requires_grad_(True)
        g = torch.ones_like(x)

        def fb(fn=fn, xg=xg, g=g):
            y = fn(xg)
            if y.requires_grad:
                y.backward(g)
        t_fb = _time(fb, min_run)
        base[label] = (t_f, t_fb)
        rows.append({"quantizer": label, "input": "activation", "mode": "-", "fwd_s": t_f, "fwdbwd_s": t_fb})
    copy_f, copy_fb = base["copy"]
    for name, kind, q, err in _quantizers(device, weight.shape[0], only):
        if err is not None:
            rows.append({"quantizer": name, "input": kind, "error": err})
            continue
        x = weight if kind == "weight" else act
        label = f"{name} ({type(q).__name__})"
        if refresh_every and hasattr(q, "refresh_every"):  # codebook quantizers: partition / fit every N calls
            q.refresh_every = refresh_every
            label += f" refresh {refresh_every}"
        try:
            if kind == "weight" and hasattr(q, "init_scale"):  # quantizers that a training procedure initialises
                q.init_scale(x)
            with calibrating(q):
                q(x)
            q.train()
        except Exception as e:  # noqa: BLE001
            rows.append({"quantizer": label, "input": kind, "error": f"{type(e).__name__}: {e}"})
            continue
        for mode in modes:
            try:
                with kernels.use(mode):
                    t_f, t_fb = _time_quantizer(q, x, min_run)
            except Exception as e:  # noqa: BLE001
                rows.append({"quantizer": label, "input": kind, "mode": mode, "error": f"{type(e).__name__}: {e}"})
                continue
            rows.append({"quantizer": label, "input": kind, "mode": mode, "fwd_s": t_f, "fwdbwd_s": t_fb,
                         "numel": x.numel()})
    for r in rows:
        if "fwd_s" not in r:
            continue
        n = r.get("numel", act.numel())
        scale = n / act.numel()  # copy time scaled to this tensor's size
        r["fwd_GBps"] = 2 * n * 4 / r["fwd_s"] / 1e9
        r["fwd_vs_copy"] = copy_f * scale / r["fwd_s"]
        r["fwdbwd_vs_copy"] = copy_fb * scale / r["fwdbwd_s"]
        r["fwd_vs_torch_fq"] = base["torch.fake_quantize_per_tensor_affine"][0] * scale / r["fwd_s"]
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numel": act.numel(),
        "date": time.strftime("%Y-%m-%d"),
        "kernel_failures": kernels.failures(),
        "rows": rows,
    }


def to_markdown(res: dict) -> str:
    lines = [f"# Quantizer kernel throughput ({res['device']}: {res['device_name']}, {res['threads']} threads, "
             f"torch {res['torch']}, {res['numel']} fp32 elements, {res['date']})", "",
             "Fractions are bandwidth relative to a plain tensor copy of the same tensor (1.00 = as fast as a "
             "copy) and speed relative to torch's fused fake-quant kernel, measured in the same run.", "",
             "Kernel mode ``eager``: the quantizer's ops one by one; ``fused``: compiled by qcnn.quant.kernels. "
             "Forward+backward is one forward, one backward and the accumulation into ``x.grad``, against the "
             "same for a copy.", "",
             "| quantizer | input | kernels | fwd GB/s | fwd vs copy | fwd+bwd vs copy | fwd vs torch fake-quant |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['quantizer']} | {r['input']} | {r.get('mode', '')} | error: {r['error']} | | | |")
        else:
            lines.append(f"| {r['quantizer']} | {r['input']} | {r['mode']} | {r['fwd_GBps']:.1f} | "
                         f"{r['fwd_vs_copy']:.2f} | {r['fwdbwd_vs_copy']:.2f} | {r['fwd_vs_torch_fq']:.2f} |")
    if res.get("kernel_failures"):
        lines += ["", kernels.failures_line(res["kernel_failures"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--numel", type=int, default=4 * 1024 * 1024)
    p.add_argument("--min-run", type=float, default=0.5)
    p.add_argument("--kernels", nargs="+", default=["eager", "fused"], choices=kernels.MODES,
                   help="kernel modes to time each quantizer in")
    p.add_argument("--only", nargs="*", default=None, help="methods to time (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--refresh-every", type=int, default=None,
                   help="refresh_every of the codebook quantizers (non-uniform weights, Clip-Q; default theirs, 1)")
    p.add_argument("--suffix", default="", help="appended to the output file names")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    res = run(a.device, a.numel, a.min_run, tuple(a.kernels), a.only, a.refresh_every)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quantizer_kernels_{a.device}{a.suffix}.json").write_text(json.dumps(res, indent=1))
    md = to_markdown(res)
    (out / f"quantizer_kernels_{a.device}{a.suffix}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
