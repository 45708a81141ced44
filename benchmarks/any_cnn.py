"""Any CNN end to end: torchvision, timm and hand-written networks through PTQ, QAT, ONNX, the integer engine
and save / load, on real CIFAR-10 images.

Each row is one network (random weights unless weights ship here: torchvision MobileNetV2 loads the shared
ImageNet weights), fed CIFAR-10 images from the JPEG copy, bilinearly resized to the row's input size (the
Conv1d row reads each image as 3 sequences of its 1024 pixels). A random-weight network first gets BatchNorm
statistics estimated on 64 training images (with the default statistics its deep layers go constant and every
figure below would be measured on dead activations). Columns:

* ``ptq_cos``: W8A8 post-training quantization (uniform, per-channel weights, first / last layers at 8 bits,
  BatchNorm folded, min-max ranges from 64 training images): cosine of the logits to the float model's on 32
  test images.
* ``noise_cos``: the same cosine for the float network with uniform noise of one 8-bit per-channel weight step
  added to every weight (:func:`weight_noise_cos`): how much this network amplifies an error of that size. A
  random-weight network is far more sensitive than a trained one (EfficientNet-B0: 0.89).
* ``qat_<method>``: 20 QAT steps (W4A4, first / last at 8 bits; QAT calibration, then SGD lr 0.01, momentum
  0.9) on one fixed batch of 16 training images (can the quantized network fit it?): ``ok`` when every loss is
  finite and the mean of the last 5 losses is below that of the first 5; the first -> last means are given.
  The float network's own 20 steps are in ``qat_float`` for reference. ``--freeze-bn`` reruns them with
  ``TrainSpec(freeze_bn=0.5)``: BatchNorm statistics frozen after the first 10 steps (a freeze schedule as
  torch.ao QAT's ``freeze_bn_stats``).
* ``onnx``: :func:`qcnn.integer.onnx_torch.to_onnx_torch` of the W8A8 model (QDQ pairs around float ops,
  dynamic shapes) run by ONNX Runtime: the largest logit difference to the fake-quant model in LSBs of the
  output grid, an 8-bit grid over the fake-quant logits' range (ok when <= 1), and, stricter, in LSBs of the
  last layer's input step carried through its weights (its largest row L1 norm: what one code of every input
  of that layer can move an output); the top-1 agreement of the two. For scale, the same difference between the
  float32 fake-quant model and its own exact float64 simulation (what the integer engine reproduces): a float
  runtime that sums in another order lands on other codes near rounding ties, and the flips propagate.
  The row's verdict (:func:`onnx_verdict`): the integer form exact, or the QDQ form within one output LSB or
  within that float32 distance, whichever is larger.
* ``engine``: the integer engine (:func:`qcnn.integer.to_integer`) against the float64 simulation of the
  fake-quant model, code for code at every quantizer point (``exact``), or the refusal's first line.
* ``int_onnx``: the engine's integer ONNX form run by ONNX Runtime: its logits equal to the engine's.
* ``save_load``: :func:`qcnn.checkpoint.save_model` then ``load_model(path, model=<fresh float instance>)``:
  the loaded model's outputs equal the saved one's, bit for bit.

    python benchmarks/any_cnn.py --data-dir ../shared/data/cifar10-jpeg.zip --out benchmarks/results

Resumable: finished rows are kept in ``<out>/any_cnn.json`` and skipped (``--redo`` recomputes them).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from qcnn.calib import reestimate_bn
from qcnn.checkpoint import load_model, save_model
from qcnn.data import get_data
from qcnn.integer import to_integer
from qcnn.integer.agreement import compare_codes, simulation_codes
from qcnn.integer.onnx_export import OrtModel, to_onnx
from qcnn.integer.onnx_torch import to_onnx_torch
from qcnn.io import write_json, write_text
from qcnn.methods import calibrate, calibrate_for_training, quantize, train_quantized
from qcnn.models import build_model
from qcnn.nn.layers import QConv1d, QConv2d, QConvTranspose2d, QLinear
from qcnn.recipes import Recipe, TrainSpec

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


# -- hand-written networks ------------------------------------------------------------------------------------
class FunctionalNet(nn.Module):
    """Functional ReLU, a concatenation, a residual add and a ``view`` before the classifier."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.bn3 = nn.BatchNorm2d(32)
        self.c4 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, num_classes)

    def forward(self, x):
        a = F.relu(self.c1(x))
        b = F.relu(self.c2(a))
        y = F.relu(self.bn3(self.c3(torch.cat([a, b], 1))))
        y = F.relu(self.c4(y) + y)
        y = F.adaptive_avg_pool2d(y, 4)
        return self.fc(y.view(y.size(0), -1))


class Conv1dNet(nn.Module):
    """A 1-D CNN over a (channels, length) sequence: conv-BN-ReLU stages, max pooling, global pooling."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        layers, c = [], 3
        for out in (16, 32, 64):
            layers += [nn.Conv1d(c, out, 5, padding=2, bias=False), nn.BatchNorm1d(out), nn.ReLU(), nn.MaxPool1d(4)]
            c = out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool1d(self.features(x), 1), 1))


class DecoderNet(nn.Module):
    """An encoder-decoder: two stride-2 convolutions down, two ConvTranspose2d up, a 1x1 head, 4x4 pooling and a
    linear classifier."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.dec = nn.Sequential(nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.head(self.dec(self.enc(x)))), 4), 1))


# -- the rows -------------------------------------------------------------------------------------------------
def _tv(name: str, **kw):
    return lambda: getattr(torchvision.models, name)(weights=None, num_classes=10, **kw)


def _timm(name: str):
    def build():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10)

    return build


def _mobilenet_v2():
    path = SHARED / "weights" / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the shared ImageNet weights of MobileNetV2 are not there")
    from qcnn.models import load_weights

    net = build_model("tv:mobilenet_v2", num_classes=1000)
    load_weights(net, path)
    return net


#: name -> (builder, input size, pretrained); the Conv1d row's "size" is its sequence length
ROWS = {
    "tv:resnet18": (_tv("resnet18"), 64, False),
    "tv:resnet50": (_tv("resnet50"), 64, False),
    "tv:mobilenet_v2 (ImageNet weights)": (_mobilenet_v2, 96, True),
    "tv:mobilenet_v3_small": (_tv("mobilenet_v3_small"), 64, False),
    "tv:efficientnet_b0": (_tv("efficientnet_b0"), 64, False),
    "tv:shufflenet_v2_x0_5": (_tv("shufflenet_v2_x0_5"), 64, False),
    "tv:regnet_x_400mf": (_tv("regnet_x_400mf"), 64, False),
    "tv:convnext_tiny": (_tv("convnext_tiny"), 64, False),
    "tv:densenet121": (_tv("densenet121"), 64, False),
    "tv:squeezenet1_0": (_tv("squeezenet1_0"), 64, False),
    "timm:resnet18": (_timm("resnet18"), 64, False),
    "timm:mobilenetv3_small_100": (_timm("mobilenetv3_small_100"), 64, False),
    "timm:efficientnet_b0": (_timm("efficientnet_b0"), 64, False),
    "hand: relu/cat/view/add": (FunctionalNet, 32, False),
    "hand: Conv1d": (Conv1dNet, 1024, False),
    "hand: ConvTranspose2d decoder": (DecoderNet, 32, False),
}


class _Bundle:
    """What ``train_quantized`` reads: ``train`` (here one fixed batch, 20 times) and ``test``."""

    def __init__(self, train, test):
        self.train, self.test, self.calib = train, test, None


def _shape(x: torch.Tensor, name: str, size: int) -> torch.Tensor:
    if name == "hand: Conv1d":
        return x.flatten(2)
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _images(data_dir: str, name: str, size: int):
    bundle = get_data("cifar10", data_dir=data_dir, batch_size=16, augment=False, calib_size=64, test_limit=32)
    calib = [_shape(x, name, size) for x, _ in bundle.calib]
    x_test = torch.cat([_shape(x, name, size) for x, _ in bundle.test])
    x_train, y_train = next(iter(bundle.train))
    return calib, x_test, _shape(x_train, name, size), y_train


def _estimate_bn(net: nn.Module, calib) -> None:
    reestimate_bn(net, calib, sum(len(x) for x in calib))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _last_layer(q: nn.Module) -> nn.Module:
    layers = [m for m in q.modules() if isinstance(m, (QConv1d, QConv2d, QConvTranspose2d, QLinear))]
    return layers[-1]


def lsb_bound(q: nn.Module) -> float:
    """One LSB of the last quantized layer's input grid, carried through its weights (its largest L1 norm over
    one output's weights); the output grid's step if that layer quantizes its output and the step is larger."""
    last = _last_layer(q)
    w = last.quantized_weight().detach().abs()
    per_out = w.sum((0, *range(2, w.ndim))) if isinstance(last, QConvTranspose2d) else w.flatten(1).sum(1)
    step = float(last.input_quant.grid().scale.max()) if last.input_quant is not None else 0.0
    bound = step * float(per_out.max())
    if getattr(last, "out_quant", None) is not None:
        bound = max(bound, float(last.out_quant.grid().scale.max()))
    return bound


@torch.no_grad()
def weight_noise_cos(net: nn.Module, x: torch.Tensor, ref: torch.Tensor, seed: int = 0) -> float:
    """Cosine to ``ref`` of the BN-folded float network whose every conv / linear weight got uniform noise of one
    8-bit per-channel step (``U(-s/2, s/2)``, ``s = max|w_c| / 127``): the error round-to-nearest amounts to,
    without rounding. A random-weight network amplifies it as much as the quantized one does; a low ``ptq_cos``
    with an equally low ``noise_cos`` is the network's sensitivity, not the quantizer's."""
    from qcnn.transform import fold_bn

    g = fold_bn(copy.deepcopy(net)).eval()
    gen = torch.Generator().manual_seed(seed)
    for m in g.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            w = m.weight
            s = w.abs().flatten(1).amax(1).view(-1, *[1] * (w.ndim - 1)) / 127
            w.add_((torch.rand(w.shape, generator=gen) - 0.5) * s)
    return _cos(ref, g(x))


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:240]


def qat_steps(net: nn.Module, method: str | None, x: torch.Tensor, y: torch.Tensor, calib, freeze_bn: bool,
              steps: int = 20) -> dict:
    """``steps`` SGD steps on the fixed batch (x, y): quantized with ``method`` at W4A4 (None: the float net)."""
    torch.manual_seed(0)
    spec = TrainSpec(epochs=1, lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="constant", batch_size=len(x),
                     freeze_bn=0.5 if freeze_bn else None)
    recipe = Recipe(method=method or "uniform", w_bits=4, a_bits=4, first_last="8bit", train=spec)
    model = copy.deepcopy(net)
    if method is not None:
        model = quantize(model, recipe)
        calibrate_for_training(model, calib, sum(len(b) for b in calib))
    losses = []

    def loss_fn(m, xb, yb):
        logits = m(xb)
        loss = F.cross_entropy(logits, yb)
        losses.append(float(loss.detach()))
        return loss, logits

    bundle = _Bundle([(x, y)] * steps, [(x, y)])
    t0 = time.time()
    try:
        if method is None:
            from qcnn.train import fit

            fit(model, bundle, spec, loss_fn=loss_fn)
        else:
            train_quantized(model, bundle, recipe, loss_fn=loss_fn)
    except FloatingPointError as e:
        return {"ok": False, "why": _first_line(e), "losses": losses}
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    finite = all(math.isfinite(v) for v in losses)
    return {"ok": bool(finite and last < first), "first5": first, "last5": last, "losses": losses,
            "seconds": round(time.time() - t0, 1)}


def onnx_column(q: nn.Module, x: torch.Tensor, got: torch.Tensor) -> dict:
    """ONNX through torch's exporter (dynamic shapes) run by ONNX Runtime against the fake-quant logits ``got``."""
    try:
        mp = to_onnx_torch(q, x[:2])
        out = OrtModel(mp, threads=2)(x)
    except Exception as e:  # a refusal is a result of its own
        return {"ok": False, "refused": True, "why": _first_line(e)}
    lsb = lsb_bound(q)
    out_lsb = float(got.max() - got.min()) / 255  # an 8-bit grid over the logits' range
    diff = float((out - got).abs().max())
    ref64, _ = simulation_codes(q, x, dtype=torch.float64)  # the fake-quant model's exact (float64) simulation
    return {"ok": diff <= out_lsb, "max_diff_out_lsb": round(diff / out_lsb, 3),
            "fq32_vs_sim64_out_lsb": round(float((got.double() - ref64).abs().max()) / out_lsb, 3),
            "max_diff_lsb": round(diff / lsb, 3) if lsb else None,
            "top1_equal": int((out.argmax(1) == got.argmax(1)).sum()), "images": len(x),
            "dynamic": {p.key: p.value for p in mp.metadata_props}.get("qcnn_dynamic")}


def _ptq_model(net: nn.Module, calib) -> tuple[nn.Module, Recipe]:
    recipe = Recipe(method="uniform", w_bits=8, a_bits=8, first_last="8bit", fold_bn=True, per_channel=True)
    q = quantize(net, recipe).eval()
    calibrate(q, calib)
    return q, recipe


def _setup(name: str, data_dir: str):
    builder, size, pretrained = ROWS[name]
    torch.manual_seed(0)
    net = builder().eval()
    calib, x_test, x_train, y_train = _images(data_dir, name, size)
    if not pretrained:
        _estimate_bn(net, calib)
    return net, calib, x_test, x_train, y_train


def redo_onnx(row: dict, data_dir: str) -> dict:
    """Recompute only the ONNX column of ``row`` (same network, data and calibration as :func:`run_row`)."""
    net, calib, x_test, _, _ = _setup(row["model"], data_dir)
    q, _ = _ptq_model(net, calib)
    with torch.no_grad():
        got = q(x_test)
    t0 = time.time()
    row["onnx"] = onnx_column(q, x_test, got)
    row["onnx_seconds"] = round(time.time() - t0, 1)
    return row


def run_row(name: str, data_dir: str, freeze_bn: bool) -> dict:
    builder, size, pretrained = ROWS[name]
    net, calib, x_test, x_train, y_train = _setup(name, data_dir)
    row: dict = {"model": name, "input": list(x_test.shape[1:]), "pretrained": pretrained,
                 "params_M": round(sum(p.numel() for p in net.parameters()) / 1e6, 2)}
    t0 = time.time()
    q, recipe = _ptq_model(net, calib)
    with torch.no_grad():
        ref, got = net(x_test), q(x_test)
    row["ptq_cos"] = round(_cos(ref, got), 5)
    row["ptq_seconds"] = round(time.time() - t0, 1)
    row["ptq_top1_agree"] = round(float((ref.argmax(1) == got.argmax(1)).double().mean()), 4)
    row["noise_cos"] = round(weight_noise_cos(net, x_test, ref), 5)

    t0 = time.time()
    row["onnx"] = onnx_column(q, x_test, got)
    row["onnx_seconds"] = round(time.time() - t0, 1)

    t0 = time.time()  # the integer engine, code for code against the float64 simulation
    x_int = x_test[:4]
    try:
        im = to_integer(q, x_int)
        logits, codes = im.run(x_int, record=True)
        _, sim = simulation_codes(q, x_int, dtype=torch.float64)
        cmp = compare_codes(codes, sim)
        row["engine"] = {"ok": cmp["equal"] == 1.0 and cmp["max_diff"] == 0 and cmp["points"] == len(sim),
                         "points": cmp["points"], "equal": cmp["equal"], "max_diff": cmp["max_diff"]}
        try:
            int_out = OrtModel(to_onnx(im, form="integer"), threads=2)(x_int)
            row["int_onnx"] = {"ok": bool(torch.equal(int_out, logits))}
        except Exception as e:
            row["int_onnx"] = {"ok": False, "why": _first_line(e)}
    except Exception as e:
        row["engine"] = {"ok": False, "refused": True, "why": _first_line(e)}
        row["int_onnx"] = {"ok": False, "refused": True, "why": "no integer model"}
    row["engine_seconds"] = round(time.time() - t0, 1)

    with tempfile.TemporaryDirectory() as tmp:  # save, then load onto a fresh float instance
        try:
            path = save_model(Path(tmp) / "q.pt", q, recipe=recipe)
            torch.manual_seed(123)
            fresh = builder()
            loaded, _ = load_model(path, model=fresh)
            with torch.no_grad():
                row["save_load"] = {"ok": bool(torch.equal(loaded(x_test), got))}
        except Exception as e:
            row["save_load"] = {"ok": False, "why": _first_line(e)}

    for method in (None, "pact", "lsq"):
        key = f"qat_{method or 'float'}"
        try:
            row[key] = qat_steps(net, method, x_train, y_train, calib, False)
            if freeze_bn:
                row[key + "_freeze_bn"] = qat_steps(net, method, x_train, y_train, calib, True)
        except Exception as e:
            row[key] = {"ok": False, "why": _first_line(e)}
            traceback.print_exc()
    return row


# -- output ---------------------------------------------------------------------------------------------------
def _cell(d: dict | None, text: str) -> str:
    if d is None:
        return "-"
    if d.get("ok"):
        return text
    if d.get("refused"):
        return "refused: " + d.get("why", "").replace("|", "/")[:110]
    return "FAIL: " + (d.get("why") or text).replace("|", "/")[:110]


def _qat(d: dict | None) -> str:
    if d is None:
        return "-"
    if "first5" not in d:
        return _cell(d, "")
    return ("ok " if d["ok"] else "FAIL ") + f"{d['first5']:.2f} -> {d['last5']:.2f}"


def _onnx(o: dict) -> str:
    if "max_diff_out_lsb" not in o:
        return _cell(o, "")
    text = (f"{o['max_diff_out_lsb']:.2f} out-LSB ({o['max_diff_lsb']:.2f} last-layer LSB; torch fp32 vs fp64 "
            f"simulation {o.get('fq32_vs_sim64_out_lsb', float('nan')):.2f}), top-1 {o['top1_equal']}/{o['images']}, "
            f"dynamic {o.get('dynamic')}")
    return ("ok " if o["ok"] else "> 1 LSB: ") + text


def onnx_verdict(r: dict) -> str:
    """Whether ONNX Runtime runs the row's model as the model computes: the integer form code for code with the
    exact (float64) evaluation, or the QDQ form within one output LSB or within the float32 fake-quant model's own
    distance to that exact evaluation, whichever is larger (no float runtime can be held closer than that)."""
    if r.get("int_onnx", {}).get("ok") and r.get("engine", {}).get("ok"):
        return "ok: integer form exact"
    o = r.get("onnx", {})
    if "max_diff_out_lsb" in o and o["max_diff_out_lsb"] <= max(1.0, o.get("fq32_vs_sim64_out_lsb", 0.0)):
        return "ok: QDQ form"
    return "FAIL"


def _table(head: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(c) + " |" for c in body]


def markdown(rows: list[dict], meta: dict) -> str:
    head = ["model", "input", "PTQ W8A8 cos", "top-1 agree", "8-bit weight-noise cos", "QAT float", "QAT PACT W4A4",
            "QAT LSQ W4A4", "ONNX Runtime (torch exporter) vs fake-quant", "integer engine vs float64 sim",
            "integer ONNX = engine", "ONNX Runtime verdict", "save/load"]
    body = []
    for r in rows:
        e = r.get("engine", {})
        body.append([r["model"], "x".join(map(str, r["input"])), f"{r['ptq_cos']:.5f}", f"{r['ptq_top1_agree']:.2f}",
                     f"{r['noise_cos']:.5f}", _qat(r.get("qat_float")), _qat(r.get("qat_pact")),
                     _qat(r.get("qat_lsq")), _onnx(r.get("onnx", {})), _cell(e, f"exact ({e.get('points')} points)"),
                     _cell(r.get("int_onnx"), "equal"), onnx_verdict(r), _cell(r.get("save_load"), "equal")])
    lines = [f"# Any CNN end to end ({meta['date']}, {meta['machine']}, torch {meta['torch']})", "",
             "Command: `" + meta["command"] + "`"
             + (f"; ONNX column: `{meta['onnx_command']}` ({meta['onnx_date']})" if "onnx_command" in meta else ""),
             "", *_table(head, body)]
    frozen = [r for r in rows if "qat_pact_freeze_bn" in r]
    if frozen:
        lines += ["", "QAT with BatchNorm statistics frozen after 10 of the 20 steps (`TrainSpec(freeze_bn=0.5)`):", ""]
        lines += _table(["model", "float", "PACT W4A4", "LSQ W4A4"],
                        [[r["model"], _qat(r.get("qat_float_freeze_bn")), _qat(r.get("qat_pact_freeze_bn")),
                          _qat(r.get("qat_lsq_freeze_bn"))] for r in frozen])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(SHARED / "cifar10-jpeg.zip"), help="CIFAR-10 (the JPEG copy)")
    p.add_argument("--out", default="benchmarks/results", help="folder of any_cnn.json / any_cnn.md")
    p.add_argument("--models", nargs="*", default=None, help=f"rows to run (default: all): {list(ROWS)}")
    p.add_argument("--freeze-bn", action="store_true", help="also run the QAT steps with BatchNorm frozen after 10")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--redo", action="store_true", help="recompute rows already in any_cnn.json")
    p.add_argument("--redo-onnx", action="store_true", help="recompute only the ONNX column of the stored rows")
    args = p.parse_args(argv)
    unknown = [m for m in args.models or [] if m not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("QCNN_PROGRESS", "0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "any_cnn.json"
    stored = json.loads(path.read_text()) if path.is_file() else {"rows": [], "meta": {}}
    done = {r["model"]: r for r in stored["rows"]}
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "threads": args.threads,
            "command": "python benchmarks/any_cnn.py " + " ".join(argv if argv is not None else os.sys.argv[1:])}
    if args.redo_onnx:
        meta = {**(stored["meta"] or meta), "onnx_command": meta["command"], "onnx_date": meta["date"]}
        for name in args.models or list(done):
            done[name] = redo_onnx(done[name], args.data_dir)
            print(json.dumps({"model": name, **done[name]["onnx"]}), flush=True)
            rows = [done[n] for n in ROWS if n in done]
            write_json(path, {"meta": meta, "rows": rows})
            write_text(out / "any_cnn.md", markdown(rows, meta))
        return 0
    for name in args.models or list(ROWS):
        if name in done and not args.redo:
            continue
        t0 = time.time()
        done[name] = run_row(name, args.data_dir, args.freeze_bn)
        done[name]["seconds"] = round(time.time() - t0, 1)
        print(json.dumps({k: v for k, v in done[name].items() if not k.startswith("qat")}), flush=True)
        rows = [done[n] for n in ROWS if n in done]
        write_json(path, {"meta": meta, "rows": rows})
        write_text(out / "any_cnn.md", markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
