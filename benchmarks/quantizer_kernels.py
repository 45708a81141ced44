"""Throughput of every method's weight and activation quantizer, forward and forward+backward.

Baselines measured in the same run on the same tensor: a plain tensor copy (``x.clone()``: the memory
bandwidth ceiling of an elementwise op) and torch's fused ``torch.fake_quantize_per_tensor_affine``.
Each quantizer's figure is reported as effective bandwidth (bytes read + written per second) and as a
fraction of the copy's bandwidth, the way the fused kernels are usually compared.

    python benchmarks/quantizer_kernels.py --out benchmarks/results [--device cpu|cuda] [--numel 4194304]

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


def _time(fn, min_run: float) -> float:
    """Median seconds per call of ``fn`` (torch.utils.benchmark handles CUDA sync and warm-up)."""
    t = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return t.blocked_autorange(min_run_time=min_run).median


def _bytes(x: torch.Tensor) -> int:
    return 2 * x.numel() * x.element_size()  # one read + one write


def _quantizers(device: str, out_channels: int = 64):
    conv = nn.Conv2d(64, out_channels, 3).to(device)  # the layer whose weight tensor is timed
    for name in available_methods():
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


def run(device: str, numel: int, min_run: float) -> dict:
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
        rows.append({"quantizer": label, "input": "activation", "fwd_s": t_f, "fwdbwd_s": t_fb})
    copy_f, copy_fb = base["copy"]
    for name, kind, q, err in _quantizers(device, weight.shape[0]):
        if err is not None:
            rows.append({"quantizer": name, "input": kind, "error": err})
            continue
        x = weight if kind == "weight" else act
        try:
            if kind == "weight" and hasattr(q, "init_scale"):  # quantizers that a training procedure initialises
                q.init_scale(x)
            with calibrating(q):
                q(x)
            q.train()
            with torch.no_grad():
                t_f = _time(lambda q=q, x=x: q(x), min_run)
            xg = x.detach().clone().requires_grad_(True)
            g = torch.ones_like(x)

            def fb(q=q, xg=xg, g=g):
                q(xg).backward(g)
            t_fb = _time(fb, min_run)
        except Exception as e:  # noqa: BLE001
            rows.append({"quantizer": name, "input": kind, "error": f"{type(e).__name__}: {e}"})
            continue
        rows.append({"quantizer": f"{name} ({type(q).__name__})", "input": kind, "fwd_s": t_f, "fwdbwd_s": t_fb,
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
        "rows": rows,
    }


def to_markdown(res: dict) -> str:
    lines = [f"# Quantizer kernel throughput ({res['device']}: {res['device_name']}, {res['threads']} threads, "
             f"torch {res['torch']}, {res['numel']} fp32 elements, {res['date']})", "",
             "Fractions are bandwidth relative to a plain tensor copy of the same tensor (1.00 = as fast as a "
             "copy) and speed relative to torch's fused fake-quant kernel, measured in the same run.", "",
             "| quantizer | input | fwd GB/s | fwd vs copy | fwd+bwd vs copy | fwd vs torch fake-quant |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['quantizer']} | {r['input']} | error: {r['error']} | | | |")
        else:
            lines.append(f"| {r['quantizer']} | {r['input']} | {r['fwd_GBps']:.1f} | {r['fwd_vs_copy']:.2f} | "
                         f"{r['fwdbwd_vs_copy']:.2f} | {r['fwd_vs_torch_fq']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--numel", type=int, default=4 * 1024 * 1024)
    p.add_argument("--min-run", type=float, default=0.5)
    a = p.parse_args(argv)
    res = run(a.device, a.numel, a.min_run)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quantizer_kernels_{a.device}.json").write_text(json.dumps(res, indent=1))
    md = to_markdown(res)
    (out / f"quantizer_kernels_{a.device}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
