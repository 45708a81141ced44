"""8-bit post-training quantization of torchvision MobileNetV2 on a few ImageNet images.

The 20 ImageNet sample images (``imagenet_<i>_<label>.jpg``) that ship inside the ``foolbox`` wheel on PyPI
serve as data; get them with::

    pip download --no-deps foolbox -d /tmp/fb
    mkdir -p .data/imagenet_samples
    unzip -j /tmp/fb/foolbox-*.whl 'foolbox/data/imagenet_*' -d .data/imagenet_samples

Images are resized to 256, centre-cropped to 224 and normalised with the ImageNet mean/std. Two folds:
the quantized model calibrated on the even-numbered images is evaluated on the odd ones and vice versa,
so no image is scored by a model calibrated on it. Reported per configuration: logit SQNR against the
float model (dB, over all 20 images), top-1 agreement with float, and top-1 against the file labels.
All layers, first and last included, are quantized; BN folded.

    python benchmarks/mobilenet_ptq.py --images .data/imagenet_samples --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qcnn.methods.ptq import post_training_quantize
from qcnn.models import build_model, load_weights
from qcnn.recipes import Recipe
from qcnn.report.layers import sqnr_db

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
CONFIGS = {
    "qcode-8/8-minmax": dict(method="qcode", per_channel=False, calib="minmax"),
    "qcode-8/8-percentile": dict(method="qcode", per_channel=False, calib="percentile"),
    "qcode-8/8-minmax-greedy-mse": dict(method="qcode", per_channel=False, calib="minmax", search="greedy"),
    "qcode-pc-8/8-minmax-greedy-mse": dict(method="qcode", per_channel=True, calib="minmax", search="greedy"),
    "uniform-pc-8/8-minmax": dict(method="uniform", per_channel=True, calib="minmax"),
    "uniform-pc-8/8-percentile": dict(method="uniform", per_channel=True, calib="percentile"),
}


def load_images(folder: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    files = sorted(Path(folder).glob("imagenet_*"))
    if not files:
        raise FileNotFoundError(f"no imagenet_*.jpg/png in {str(folder)!r}; see this script's docstring")
    xs, ys = [], []
    for f in files:
        im = Image.open(f).convert("RGB")
        w, h = im.size
        s = 256 / min(w, h)
        im = im.resize((round(w * s), round(h * s)), Image.BILINEAR)
        w, h = im.size
        left, top = (w - 224) // 2, (h - 224) // 2
        im = im.crop((left, top, left + 224, top + 224))
        xs.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
        ys.append(int(re.match(r"imagenet_\d+_(\d+)", f.stem).group(1)))
    x = (torch.stack(xs).float() / 255 - MEAN) / STD
    return x, torch.tensor(ys)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default=".data/imagenet_samples")
    p.add_argument("--weights", default="../shared/data/weights/mobilenet_v2-b0353104.pth")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    t0 = time.time()
    x, y = load_images(args.images)
    model = load_weights(build_model("tv:mobilenet_v2", num_classes=1000), args.weights).eval()
    with torch.no_grad():
        ref = model(x)
    rows = []
    for name, kw in CONFIGS.items():
        logits = torch.empty_like(ref)
        for fold in (0, 1):
            calib_idx = torch.arange(fold, len(x), 2)
            eval_idx = torch.arange(1 - fold, len(x), 2)
            kw = dict(kw)
            search = kw.pop("search", "none")
            recipe = Recipe(**kw, w_bits=8, a_bits=8, first_last="same", calib_images=len(calib_idx))
            res = post_training_quantize(model, recipe, [(x[calib_idx], y[calib_idx])], search=search)
            with torch.no_grad():
                logits[eval_idx] = res.model(x[eval_idx])
        cfg = {**CONFIGS[name], "first_last": "same", "w_bits": 8, "a_bits": 8}
        rows.append({"config": name, "recipe": cfg, "logit_sqnr_db": sqnr_db(ref, logits),
                     "top1_agreement": 100.0 * float((logits.argmax(1) == ref.argmax(1)).float().mean()),
                     "top1": 100.0 * float((logits.argmax(1) == y).float().mean())})
        print(json.dumps(rows[-1]), flush=True)
    float_top1 = 100.0 * float((ref.argmax(1) == y).float().mean())
    result = {"model": "tv:mobilenet_v2", "images": len(x), "float_top1": float_top1,
              "rows": rows, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"CPU, {torch.get_num_threads()} threads", "seconds": round(time.time() - t0, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mobilenet_ptq.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [f"# MobileNetV2 8-bit PTQ on the {len(x)} foolbox ImageNet samples", "",
          f"Float top-1 against the file labels: {result['float_top1']:.1f}%. Two folds (calibrate on even, "
          f"evaluate odd and vice versa); all layers quantized; {result['date']}, {result['machine']}.", "",
          "| config | logit SQNR dB | top-1 agreement % | top-1 % |", "|---|---|---|---|"]
    md += [f"| {r['config']} | {r['logit_sqnr_db']:.2f} | {r['top1_agreement']:.0f} | {r['top1']:.0f} |" for r in rows]
    (out / "mobilenet_ptq.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
