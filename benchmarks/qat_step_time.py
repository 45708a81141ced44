"""QAT training-step time over float step time, ResNet-20, CIFAR-sized batch (default 128), CPU or GPU.

Configurations: float; qcnn uniform 8-bit QAT; each QAT method (DoReFa, DoReFa with 8-bit gradients, PACT,
WRPN, HWGQ W1A2, LSQ, FQN, the non-uniform quantizer and Clip-Q at W4A4 unless stated); torch.ao FX QAT
8-bit (``prepare_qat_fx`` with the default QAT qconfig mapping for x86/fbgemm), all measured in the same run,
in each execution mode asked for (``--modes``):

* ``eager``: the model as it is, quantizers op by op (qcnn's default);
* ``fused``: qcnn's quantizers as compiled fused kernels (:mod:`qcnn.quant.kernels`); float and torch.ao
  have no quantizer kernels of qcnn's and run as in eager;
* ``compiled``: ``torch.compile(model)`` for every configuration, float and torch.ao included.

Each row's ratio is against the float step of the same mode; compiled rows also give the ratio against the
eager float step. A step is forward + cross-entropy + backward + SGD update. The configurations are timed
round-robin (``--rounds`` rounds of ``--steps`` steps each after warm-up, which compiles) so that load changes
on a shared machine hit them alike; the median step of each is reported. Writes
``benchmarks/results/qat_step_time.{json,md}``.

    python benchmarks/qat_step_time.py --batch 128 --threads 2 --modes eager fused compiled
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
from qcnn.quant import kernels  # noqa: E402
from qcnn.recipes import Recipe  # noqa: E402

QCNN_CONFIGS = {
    "qcnn uniform W8A8": dict(method="uniform", w_bits=8, a_bits=8),
    "dorefa W4A4": dict(method="dorefa", w_bits=4, a_bits=4),
    "dorefa W4A4G8": dict(method="dorefa", w_bits=4, a_bits=4, g_bits=8),
    "pact W4A4": dict(method="pact", w_bits=4, a_bits=4),
    "wrpn W4A4": dict(method="wrpn", w_bits=4, a_bits=4, params={"weight_scale": "max"}),
    "hwgq W1A2": dict(method="hwgq", w_bits=1, a_bits=2),
    "lsq W4A4": dict(method="lsq", w_bits=4, a_bits=4, per_channel=False),
    "fqn W4A4": dict(method="fqn", w_bits=4, a_bits=4),
    "nonuniform W4A4": dict(method="nonuniform", w_bits=4, a_bits=4),
    "nonuniform W4A4 refresh 16": dict(method="nonuniform", w_bits=4, a_bits=4, params={"refresh_every": 16}),
    "clipq W4A4": dict(method="clipq", w_bits=4, a_bits=4),
    "clipq W4A4 refresh 16": dict(method="clipq", w_bits=4, a_bits=4, params={"refresh_every": 16}),
}
MODES = ("eager", "fused", "compiled")


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


def _meta(args, device) -> dict:
    where = "CPU" if device.type == "cpu" else torch.cuda.get_device_name(device)
    return {"model": "resnet20", "batch": args.batch, "threads": args.threads, "device": where,
            "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "modes": args.modes,
            "rounds": args.rounds, "steps": args.steps}


def to_markdown(meta: dict) -> str:
    lines = [f"# QAT step time / float step time (ResNet-20, batch {meta['batch']}, {meta['device']}, "
             f"{meta['threads']} threads)", "",
             f"torch {meta['torch']}, {meta['date']}; median of {meta['rounds']} x {meta['steps']} steps, "
             "configurations and modes interleaved. Ratio: against the float step of the same mode; "
             "compiled rows also against the eager float step.", "",
             "| configuration | mode | step (ms) | x float (same mode) | x eager float |", "|---|---|---|---|---|"]
    for r in meta["rows"]:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['mode']} | error: {r['error']} | | |")
            continue
        lines.append(f"| {r['config']} | {r['mode']} | {r['step_ms']} | {r['ratio']:.2f} | "
                     f"{r['ratio_vs_eager_float']:.2f} |")
    if meta.get("kernel_failures"):
        lines += ["", kernels.failures_line(meta["kernel_failures"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration and round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", nargs="*", default=None, help="subset of configurations (float is always run)")
    p.add_argument("--modes", nargs="+", default=["eager", "fused"], choices=MODES, help="execution modes")
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
    if "eager" not in args.modes and "compiled" in args.modes:
        args.modes = ["eager", *args.modes]  # the compiled rows' second ratio needs the eager float step
    steps, errors = {}, {}
    for mode in args.modes:
        for n in names:
            key = (n, mode)
            try:
                model = build(n, x.cpu()).to(device)
                if mode == "compiled":
                    model = torch.compile(model)
                step = make_step(model, x, y)
                kmode = "fused" if mode == "fused" else "eager"
                with kernels.use(kmode):
                    for _ in range(args.warmup):
                        step()
                steps[key] = (step, kmode)
            except Exception as e:  # noqa: BLE001 - a configuration that cannot run is reported, not hidden
                errors[key] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            print(f"built {n} [{mode}]" + (f": {errors[key]}" if key in errors else ""), file=sys.stderr, flush=True)
    times: dict = {k: [] for k in steps}
    for _ in range(args.rounds):
        for key, (step, kmode) in steps.items():
            with kernels.use(kmode):
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    step()
                    times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(t) for k, t in times.items()}
    rows = []
    for mode in args.modes:
        base = med.get(("float", mode))
        for n in names:
            key = (n, mode)
            if key in errors:
                rows.append({"config": n, "mode": mode, "error": errors[key]})
            elif key in med:
                rows.append({"config": n, "mode": mode, "step_ms": round(1000 * med[key], 1),
                             "ratio": round(med[key] / base, 3) if base else None,
                             "ratio_vs_eager_float": round(med[key] / med[("float", "eager")], 3)
                             if ("float", "eager") in med else None, "steps": len(times[key])})
    meta = {**_meta(args, device), "rows": rows, "kernel_failures": kernels.failures()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "qat_step_time" if device.type == "cpu" else f"qat_step_time_{device.type}"
    (out / f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")
    md = to_markdown(meta)
    (out / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
