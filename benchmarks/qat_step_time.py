"""QAT training-step time over float step time, ResNet-20, CIFAR-sized batch (default 128), CPU or GPU.

Configurations: float; qcnn uniform 8-bit QAT; each QAT-I method (DoReFa, DoReFa with 8-bit gradients,
PACT, WRPN, HWGQ W1A2, LSQ at W4A4 unless stated); torch.ao FX QAT 8-bit (``prepare_qat_fx`` with the
default QAT qconfig mapping for x86/fbgemm), all measured in the same run. A step is forward +
cross-entropy + backward + SGD update. The configurations are timed round-robin (``--rounds`` rounds of
``--steps`` steps each after warm-up) so that load changes on a shared machine hit them alike; the median
step of each is reported. Writes ``benchmarks/results/qat_step_time.{json,md}``.

    python benchmarks/qat_step_time.py --batch 128 --threads 2
    python benchmarks/qat_step_time.py --device cuda --steps 20 --rounds 5 --out DIR

On CUDA every timed step ends with ``torch.cuda.synchronize()`` (the step's kernels included in its time).
Writes ``qat_step_time.json``/``.md`` (CPU) or ``qat_step_time_cuda.json``/``.md`` (GPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qcnn.methods import calibrate, quantize  # noqa: E402
from qcnn.models import build_model  # noqa: E402
from qcnn.recipes import Recipe  # noqa: E402

QCNN_CONFIGS = {
    "qcnn uniform W8A8": dict(method="uniform", w_bits=8, a_bits=8),
    "dorefa W4A4": dict(method="dorefa", w_bits=4, a_bits=4),
    "dorefa W4A4G8": dict(method="dorefa", w_bits=4, a_bits=4, g_bits=8),
    "pact W4A4": dict(method="pact", w_bits=4, a_bits=4),
    "wrpn W4A4": dict(method="wrpn", w_bits=4, a_bits=4, params={"weight_scale": "max"}),
    "hwgq W1A2": dict(method="hwgq", w_bits=1, a_bits=2),
    "lsq W4A4": dict(method="lsq", w_bits=4, a_bits=4, per_channel=False),
}


def build(name: str, x: torch.Tensor):
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=3)
    if name == "float":
        return model.train()
    if name == "torch.ao FX QAT 8-bit":
        from torch.ao.quantization import get_default_qat_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_qat_fx

        return prepare_qat_fx(model.train(), get_default_qat_qconfig_mapping("x86"), (x,)).train()
    q = quantize(model, Recipe(first_last="8bit", **QCNN_CONFIGS[name]))
    calibrate(q, [(x, None)])
    return q.train()


def make_step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sync()

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration and round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", nargs="*", default=None, help="subset of configurations (float is always run)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here")
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    names = ["float", "torch.ao FX QAT 8-bit", *QCNN_CONFIGS]
    if args.only:
        names = ["float"] + [n for n in names[1:] if n in args.only]
    steps = {}
    for n in names:
        steps[n] = make_step(build(n, x.cpu()).to(device), x, y)
        for _ in range(args.warmup):
            steps[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for n in names:
            for _ in range(args.steps):
                t0 = time.perf_counter()
                steps[n]()
                times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    rows = [{"config": n, "step_ms": round(1000 * med[n], 1), "ratio": round(med[n] / med["float"], 3),
             "steps": len(times[n])} for n in names]
    where = "CPU" if device.type == "cpu" else torch.cuda.get_device_name(device)
    meta = {"model": "resnet20", "batch": args.batch, "threads": args.threads, "device": where,
            "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "qat_step_time" if device.type == "cpu" else f"qat_step_time_{device.type}"
    (out / f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = [f"# QAT step time / float step time (ResNet-20, batch {args.batch}, {where}, {args.threads} threads)", "",
             f"torch {torch.__version__}, {meta['date']}; median of {args.rounds} x {args.steps} steps, "
             "configurations interleaved.", "", "| configuration | step (ms) | x float |", "|---|---|---|"]
    lines += [f"| {r['config']} | {r['step_ms']} | {r['ratio']:.2f} |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
