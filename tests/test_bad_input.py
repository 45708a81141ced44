"""Bad input, one row per case: every refusal is an exit status (CLI: code 2, a one-line ``qcnn <cmd>: error:``
and no traceback; API: the exception type) and a message that names the bad value or file.

The CLI runs in-process through :func:`qcnn.cli.main`. Cases are cheap: a randomly initialised LeNet-5
(no training), 64-image slices of Fashion-MNIST, tiny synthetic zips and folders under a module tmp dir.
Arguments and expected messages are templates: ``{fm}`` is the Fashion-MNIST folder, ``{t}`` the module's
tmp dir holding the files made by :func:`files` (checkpoints, archives, image folders).
"""

from __future__ import annotations

import argparse
import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import qcnn
from qcnn.checkpoint import load_model, save_model
from qcnn.cli import main
from qcnn.data import get_data, subset
from qcnn.io import load_torch
from qcnn.models import build_model
from qcnn.recipes import Recipe, TrainSpec

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
LENET = {"name": "lenet5", "num_classes": 10, "in_channels": 1, "kwargs": {"image_size": 28}}


# ------------------------------------------------------------------------------------------- fixtures
def _jpeg(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _cifar_zip(path: Path, rng, n_train: int = 2, bad: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for split, n in (("train", n_train), ("test", 1)):
            for cls in CIFAR_CLASSES:
                for k in range(n):
                    name = f"{split}/{cls}/{k}.jpg"
                    z.writestr(name, b"\xff\xd8\xff not a JPEG" * 4 if name == bad else _jpeg(rng))
    return path


def _image_folder(root: Path, rng, bad: str | None = None) -> Path:
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for k in range(n):
                (root / split / cls / f"{k}.jpg").write_bytes(_jpeg(rng))
    if bad:
        (root / bad).write_bytes(b"\xff\xd8\xff not a JPEG" * 4)
    return root


def _flip_a_data_byte(src: Path, dst: Path) -> None:
    """Copy ``src`` (a torch.save zip) with one byte of its largest tensor inverted: only the CRC can tell."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    h = info.header_offset
    start = h + 30 + int.from_bytes(data[h + 26:h + 28], "little") + int.from_bytes(data[h + 28:h + 30], "little")
    data[start + info.file_size // 2] ^= 0xFF
    dst.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def files(tmp_path_factory, fashion_dir) -> dict[str, str]:
    t = tmp_path_factory.mktemp("bad_input")
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    lenet = build_model("lenet5", in_channels=1, image_size=28)
    save_model(t / "float.pt", lenet, LENET)
    recipe = Recipe(w_bits=4, a_bits=4)
    q = qcnn.quantize(lenet, recipe).eval()
    with qcnn.calibrating(q):
        q(torch.randn(8, 1, 28, 28))
    save_model(t / "quant.pt", q, LENET, recipe=recipe)
    _flip_a_data_byte(t / "float.pt", t / "flipped.pt")
    broken = build_model("lenet5", in_channels=1, image_size=28)
    with torch.no_grad():
        broken.conv2.weight[0, 0, 0, 0] = float("nan")
    save_model(t / "nan_weight.pt", broken, LENET)
    torch.save(build_model("resnet20").state_dict(), t / "resnet20_sd.pt")
    save_model(t / "bogus_kwargs.pt", lenet, {**LENET, "kwargs": {"image_size": 28, "bogus": 1}})
    torch.save({"format": "qcnn-model/9"}, t / "future.pt")
    torch.save({"args": argparse.Namespace(lr=0.1)}, t / "pickled_object.pt")
    (t / "text.pt").write_text("not a checkpoint\n")
    (t / "empty.pt").write_bytes(b"")
    (t / "truncated.pt").write_bytes((t / "float.pt").read_bytes()[:5000])
    (t / "random.zip").write_bytes(np.random.default_rng(1).bytes(4096))
    good = _cifar_zip(t / "c10.zip", rng).read_bytes()
    (t / "truncated.zip").write_bytes(good[: len(good) * 2 // 3])
    _cifar_zip(t / "bad_jpeg.zip", rng, bad="train/cat/1.jpg")
    _image_folder(t / "folder", rng)
    _image_folder(t / "bad_folder", rng, bad="test/b/1.jpg")
    (t / "run").mkdir()
    shutil.copy(t / "float.pt", t / "run" / "model.pt")
    (t / "recipe_dir").mkdir()
    return {"t": str(t), "fm": str(fashion_dir)}


@pytest.fixture(autouse=True)
def _private_cache(files, monkeypatch):
    """Decoded synthetic archives go to the module's tmp dir, not the user's cache."""
    monkeypatch.setenv("QCNN_CACHE", str(Path(files["t"]) / "cache"))


def _fill(template: str, files: dict[str, str]) -> str:
    return template.format(**files)


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of ``qcnn ARGV`` (argparse errors exit through SystemExit)."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _expect_refusal(argv: list[str], expected: list[str], capsys) -> None:
    code, err = _cli(argv, capsys)
    assert code == 2, f"exit {code}, stderr: {err}"
    assert "Traceback" not in err, err
    assert "error:" in err, err
    for e in expected:
        assert e in err, f"{e!r} not in stderr: {err}"


FM = "--dataset fashion-mnist --data-dir {fm}"
LE = "--model lenet5 " + FM
QAT = "qat " + LE + " --limit-train 64 --limit-test 64 --batch-size 32"
TRAIN = "train " + LE + " --train-images 64 --batch-size 32"
EVAL = "eval " + FM + " --test-images 64"
PTQ = "ptq " + LE + " --limit-test 64"
BENCH = "bench --out {t}/bench"


# ------------------------------------------------------------------------- CLI: argparse refusals
ARGPARSE_CASES = [
    (QAT + " --limit-train 0", ["--limit-train: 0 must be >= 1"]),
    (QAT + " --limit-test -5", ["--limit-test: -5 must be >= 1"]),
    (QAT + " --limit-test x", ["'x' is not an integer"]),
    (TRAIN + " --batch-size 0", ["--batch-size: 0 must be >= 1"]),
    (TRAIN + " --train-images 0", ["--train-images: 0 must be >= 1"]),
    (TRAIN + " --num-classes 0", ["--num-classes: 0 must be >= 1"]),
    (EVAL + " --model lenet5 --test-images 0", ["--test-images: 0 must be >= 1"]),
    (PTQ + " --calib-images 0", ["--calib-images: 0 must be >= 1"]),
    (PTQ + " --search accuracy --eval-images 0", ["--eval-images: 0 must be >= 1"]),
    (TRAIN + " --optimizer rmsprop", ["--optimizer", "'rmsprop'"]),
    (TRAIN + " --schedule linear", ["--schedule", "'linear'"]),
    (QAT + " --optimizer rmsprop", ["--optimizer", "'rmsprop'"]),
    (QAT + " --schedule linear", ["--schedule", "'linear'"]),
    (TRAIN + " --device tpu", ["--device", "'tpu'"]),
    (TRAIN + " --epochs two", ["--epochs", "'two'"]),
    (TRAIN + " --lr fast", ["--lr", "'fast'"]),
    (EVAL + " --model lenet5 --engine tpu", ["--engine", "'tpu'"]),
    (PTQ + " --search exhaustive", ["--search", "'exhaustive'"]),
    (PTQ + " --first-last int4", ["--first-last", "'int4'"]),
    (BENCH + " --suite nosuch", ["--suite", "'nosuch'"]),
    (BENCH + " --workers 0", ["--workers: 0 must be >= 1"]),
    ("export --checkpoint {t}/quant.pt --out {t}/x --format tflite", ["--format", "'tflite'"]),
    ("report {t}/run --dataset fashion-mnist --images 0", ["--images: 0 must be >= 1"]),
    ("datasets --bench --batch-size 0", ["--batch-size: 0 must be >= 1"]),
    ("train --model lenet5", ["required", "--dataset"]),
    ("nosuchcmd", ["'nosuchcmd'"]),
    ("models --bogus", ["--bogus"]),
]


@pytest.mark.parametrize("argv, expected", ARGPARSE_CASES, ids=[a for a, _ in ARGPARSE_CASES])
def test_cli_flag_refused_by_argparse(argv, expected, files, capsys):
    with pytest.raises(SystemExit) as e:
        main(_fill(argv, files).split())
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for x in expected:
        assert _fill(x, files) in err, err


# ---------------------------------------------------------------------- CLI: refusals when running
RUN_CASES = [
    # training and its counts
    (TRAIN + " --epochs 0", ["--epochs 0 trains nothing"]),
    (TRAIN + " --epochs -1", ["--epochs -1"]),
    (QAT + " --epochs -2", ["epochs=-2"]),
    (TRAIN + " --epochs 1 --lr -1", ["lr=-1.0"]),
    (TRAIN + " --epochs 1 --lr nan", ["lr=nan"]),
    (TRAIN + " --epochs 1 --wd -1", ["weight_decay=-1.0"]),
    (TRAIN + " --epochs 1 --momentum -1", ["momentum=-1.0"]),
    (TRAIN + " --epochs 1 --schedule step --gamma 0", ["gamma=0.0"]),
    (TRAIN + " --epochs 1 --schedule step --step-size 0", ["step_size=0"]),
    (TRAIN + " --epochs 1 --width 0", ["width", "0.0"]),
    (TRAIN + " --epochs 1 --resume", ["--resume needs --out"]),
    (QAT + " --epochs 1 --resume", ["--resume needs --out"]),
    (TRAIN + " --epochs 1 --out {t}/run", ["--out '{t}/run' already holds a run"]),
    (TRAIN + " --epochs 1 --init {t}/quant.pt", ["'{t}/quant.pt' is a quantized checkpoint"]),
    # models and datasets
    ("train --model lenet6 " + FM + " --epochs 1", ["unknown model 'lenet6'"]),
    ("train --model tv:nosuch " + FM + " --epochs 1", ["'nosuch'"]),
    ("train --model lenet5 --dataset nosuch --epochs 1", ["unknown dataset 'nosuch'"]),
    ("train --model lenet5 --dataset fashion-mnist --data-dir {t}/missing --epochs 1",
     ["--data-dir {t}/missing: does not exist"]),
    ("eval --model resnet20 --dataset cifar10 --data-dir {t}/random.zip", ["'{t}/random.zip' is not a readable zip"]),
    ("eval --model resnet20 --dataset cifar10 --data-dir {t}/truncated.zip",
     ["'{t}/truncated.zip' is not a readable zip"]),
    ("eval --model resnet20 --dataset cifar10 --data-dir {t}/bad_jpeg.zip", ["'train/cat/1.jpg' cannot be decoded"]),
    ("eval --model resnet20 --dataset imagefolder --data-dir {t}/bad_folder --device cpu",
     ["{t}/bad_folder", "'test/b/1.jpg' cannot be decoded"]),
    ("datasets --dataset nosuch", ["unknown dataset 'nosuch'"]),
    ("datasets --dataset cifar10 --data-dir {t}/random.zip", ["'{t}/random.zip' is not a readable zip"]),
    # checkpoints
    (EVAL + " --checkpoint {t}", ["checkpoint '{t}' is a directory"]),
    (EVAL + " --checkpoint {t}/missing.pt", ["'{t}/missing.pt' does not exist"]),
    (EVAL + " --checkpoint {t}/flipped.pt", ["'{t}/flipped.pt' is corrupted", "CRC-32"]),
    (EVAL + " --model lenet5 --checkpoint {t}/resnet20_sd.pt",
     ["'{t}/resnet20_sd.pt' does not fit LeNet5", "missing keys [conv2.weight", "unexpected keys [layer1.0"]),
    (EVAL + " --checkpoint {t}/resnet20_sd.pt", ["--model is required"]),
    (EVAL + " --checkpoint {t}/float.pt --width 0.5", ["--width 0.5 does not apply", "{t}/float.pt"]),
    (EVAL + " --checkpoint {t}/float.pt --model resnet20", ["holds a 'lenet5' model, not --model 'resnet20'"]),
    (EVAL + " --checkpoint {t}/bogus_kwargs.pt", ["'bogus'"]),
    (EVAL + " --model lenet5 --checkpoint {t}/text.pt", ["'{t}/text.pt' was refused"]),
    (EVAL + " --model lenet5 --checkpoint {t}/pickled_object.pt", ["'{t}/pickled_object.pt' was refused"]),
    (EVAL + " --checkpoint {t}/future.pt", ["'{t}/future.pt' has format 'qcnn-model/9'"]),
    (EVAL + " --checkpoint {t}/quant.pt --engine float", ["'{t}/quant.pt' is quantized"]),
    (EVAL + " --checkpoint {t}/float.pt --engine fakequant", ["--engine fakequant needs a quantized checkpoint"]),
    (PTQ + " --checkpoint {t}/quant.pt --calib-images 64", ["'{t}/quant.pt' is already quantized"]),
    ("compress --checkpoint {t}/float.pt --out {t}/x.qcz", ["'{t}/float.pt' holds a float model"]),
    ("compress --checkpoint {t} --out {t}/x.qcz", ["'{t}' is a directory"]),
    ("compress --checkpoint {t}/flipped.pt --out {t}/x.qcz", ["'{t}/flipped.pt' is corrupted"]),
    ("export --checkpoint {t}/float.pt --out {t}/x.onnx", ["'{t}/float.pt' is not quantized"]),
    ("export --checkpoint {t}/missing.pt --out {t}/x.onnx", ["'{t}/missing.pt' does not exist"]),
    ("export --checkpoint {t}/quant.pt --out {t}/x.onnx --input-shape 1,28", ["--input-shape '1,28'"]),
    ("report {t}/nowhere --dataset fashion-mnist --data-dir {fm}", ["no checkpoint at '{t}/nowhere'"]),
    ("report {t}/flipped.pt --dataset fashion-mnist --data-dir {fm}", ["'{t}/flipped.pt' is corrupted"]),
    # quantization flags
    (PTQ + " --w-bits 0", ["w_bits=0"]),
    (PTQ + " --a-bits 17", ["a_bits=17"]),
    (PTQ + " --method qkode", ["'qkode'"]),
    (PTQ + " --calib entropy9", ["'entropy9'"]),
    (PTQ + " --window -1 --search greedy", ["--window -1"]),
    (PTQ + " --max-drop -1 --search accuracy", ["--max-drop -1"]),
    (PTQ + " --bit-candidates 8,x --search accuracy", ["--bit-candidates '8,x'"]),
    ("ptq --model resnet20 --dataset cifar10 --data-dir {t}/c10.zip --device cpu --calib-images 21",
     ["--calib-images 21", "20 training images"]),
    (QAT + " --w-bits 17", ["w_bits=17"]),
    (QAT + " --calib nosuch", ["unknown calibration method 'nosuch'"]),
    (QAT + " --method elq --w-bits 2", ["elq quantizes weights only", "a_bits: null"]),
    (QAT + " --procedure nosuch", ["unknown training procedure 'nosuch'"]),
    # a broken model: its weight is named, the calibration data is not blamed
    (PTQ + " --checkpoint {t}/nan_weight.pt --calib-images 64", ["NaN or Inf in conv2.weight", "model itself"]),
    (QAT + " --checkpoint {t}/nan_weight.pt --epochs 1", ["NaN or Inf in conv2.weight", "model itself"]),
    # bench cells and methods
    (BENCH + " --bits 0/8", ["'0/8'"]),
    (BENCH + " --bits 8/0", ["'8/0'"]),
    (BENCH + " --bits 4", ["'4'", "W/A"]),
    (BENCH + " --bits 17/4", ["'17/4'"]),
    (BENCH + " --bits 4/x", ["'4/x'"]),
    (BENCH + " --methods nosuch", ["['nosuch']"]),
    (BENCH + " --methods uniform,nosuch2", ["['nosuch2']"]),
    (BENCH + " --epochs -1", ["--epochs -1"]),
]


@pytest.mark.parametrize("argv, expected", RUN_CASES, ids=[a for a, _ in RUN_CASES])
def test_cli_refuses_bad_input(argv, expected, files, capsys):
    _expect_refusal(_fill(argv, files).split(), [_fill(e, files) for e in expected], capsys)


# --------------------------------------------------------------------------------- recipe files
RECIPE_CASES = [
    ('method: uniform\ntrain: {lr: "fast"}\n', ["lr='fast'", "r.yaml"]),
    ("method: uniform\ntrain: {epochs: 1.5}\n", ["epochs=1.5", "r.yaml"]),
    ('method: uniform\ntrain: {epochs: "2"}\n', ["epochs='2'", "r.yaml"]),
    ('method: uniform\nper_channel: "no"\n', ["per_channel='no'", "r.yaml"]),
    ("method: uniform\nwbits: 4\n", ["unknown key(s) ['wbits']", "r.yaml"]),
    ('lr: "fast"\n', ["unknown key(s) ['lr']", "r.yaml"]),
    ("method: uniform\ntrain: {lrate: 0.1}\n", ["['lrate']", "r.yaml"]),
    ("method: pact\nparams: {alpha: 3}\n", ["unknown option(s) for method 'pact'", "['alpha']"]),
    ("method: pact\nparams: {alpha_init: big}\n", ["alpha_init='big'"]),
    ("method: uniform\nprocedure: two_step\nprocedure_params: {foo: 1}\n", ["unknown procedure_params ['foo']"]),
    ("method: [uniform\n", ["r.yaml' is not valid YAML"]),
    ("method: uniform\n\tw_bits: 4\n", ["r.yaml' is not valid YAML", "'\\t'"]),
    ("method: uniform\nw_bits: 4\nw_bits: 2\n", ["r.yaml' is not valid YAML", "duplicate key 'w_bits'"]),
    ("", ["r.yaml' is empty"]),
    ("# nothing but a comment\n", ["r.yaml' is empty"]),
    ("- method: uniform\n", ["r.yaml' must be a mapping, got list"]),
    ("uniform\n", ["r.yaml' must be a mapping, got str"]),
    ("method: uniform\nw_bits: 0\n", ["w_bits=0"]),
    ("method: uniform\nw_bits: 17\n", ["w_bits=17"]),
    ("method: uniform\nw_bits: true\n", ["w_bits=True"]),
    ("method: uniform\na_bits: 0\n", ["a_bits=0"]),
    ("method: qcode\nw_bits: 1\n", ["W1/A8", "qcode defines weights of 2-16 bits"]),
    ("method: elq\nw_bits: 2\na_bits: 8\n", ["elq quantizes weights only", "a_bits: null"]),
    ("method: vnq\nw_bits: 2\na_bits: 4\n", ["vnq quantizes weights only", "a_bits: null"]),
    ("method: lsq\nw_bits: 1\na_bits: 4\n", ["W1/A4", "lsq defines weights of 2-16 bits"]),
    ("method: bireal\nw_bits: 2\na_bits: 1\n", ["W2/A1", "bireal defines weights of 1 bits"]),
    ("method: nosuch\n", ["unknown quantization method 'nosuch'"]),
    ("method: uniform\ncalib: nosuch\n", ["unknown calibration method 'nosuch'"]),
    ("method: uniform\nprocedure: nosuch\n", ["unknown training procedure 'nosuch'"]),
    ("method: uniform\nfirst_last: int8\n", ["first_last='int8'"]),
    ("method: uniform\ncalib_images: -3\n", ["calib_images=-3"]),
    ("method: uniform\ntrain: [1, 2]\n", ["train must be a mapping", "[1, 2]"]),
    ("method: uniform\nparams: 3\n", ["params=3"]),
    ("method: uniform\noverrides: [{pattern: conv1, wbits: 3}]\n", ["override 0", "['wbits']"]),
    ("method: uniform\noverrides: conv1\n", ["overrides='conv1' must be a list"]),
    ("method: uniform\ntrain: {epochs: -1}\n", ["epochs=-1"]),
    ("method: uniform\ntrain: {optimizer: rmsprop}\n", ["unknown optimizer 'rmsprop'"]),
]


@pytest.mark.parametrize("text, expected", RECIPE_CASES, ids=[t for t, _ in RECIPE_CASES])
def test_recipe_file_refused(text, expected, files, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(text)
    argv = _fill(QAT, files).split() + ["--recipe", str(tmp_path / "r.yaml")]
    _expect_refusal(argv, expected, capsys)


@pytest.mark.parametrize("name, content, expected", [
    ("missing.yaml", None, "recipe file '{p}' does not exist"),
    ("recipe_dir", None, "recipe '{p}' is a directory"),
    ("latin1.yaml", b"method: unif\xf6rm\n", "recipe '{p}' is not UTF-8 text"),
])
def test_recipe_path_refused(name, content, expected, files, tmp_path, capsys):
    p = Path(files["t"]) / name if content is None else tmp_path / name
    if content is not None:
        p.write_bytes(content)
    argv = _fill(PTQ, files).split() + ["--recipe", str(p)]
    _expect_refusal(argv, [expected.format(p=p)], capsys)


# ---------------------------------------------------------------------------------------- the API
def _lenet():
    torch.manual_seed(0)
    return build_model("lenet5", in_channels=1, image_size=28).eval()


API_CASES = [
    # recipes
    ("Recipe w_bits=0", lambda t: Recipe(w_bits=0), ValueError, "w_bits=0"),
    ("Recipe w_bits=17", lambda t: Recipe(w_bits=17), ValueError, "w_bits=17"),
    ("Recipe w_bits=True", lambda t: Recipe(w_bits=True), ValueError, "w_bits=True"),
    ("Recipe a_bits=0", lambda t: Recipe(a_bits=0), ValueError, "a_bits=0"),
    ("Recipe g_bits=33", lambda t: Recipe(g_bits=33), ValueError, "g_bits=33"),
    ("Recipe per_channel='no'", lambda t: Recipe(per_channel="no"), ValueError, "per_channel='no'"),
    ("Recipe method=3", lambda t: Recipe(method=3), ValueError, "method=3"),
    ("Recipe calib_images=0", lambda t: Recipe(calib_images=0), ValueError, "calib_images=0"),
    ("Recipe first_last", lambda t: Recipe(first_last="int8"), ValueError, "first_last='int8'"),
    ("Recipe override bits", lambda t: Recipe(overrides=[{"pattern": "conv1", "w_bits": 0}]), ValueError,
     "w_bits of override 'conv1'=0"),
    ("Recipe overrides str", lambda t: Recipe(overrides="conv1"), ValueError, "overrides='conv1'"),
    ("Recipe params list", lambda t: Recipe(params=[1]), ValueError, "params=[1]"),
    ("TrainSpec lr='fast'", lambda t: TrainSpec(lr="fast"), ValueError, "lr='fast'"),
    ("TrainSpec epochs=1.5", lambda t: TrainSpec(epochs=1.5), ValueError, "epochs=1.5"),
    ("replace train epochs='2'", lambda t: Recipe().replace(train={"epochs": "2"}), ValueError, "epochs='2'"),
    ("from_dict list", lambda t: Recipe.from_dict([{"method": "uniform"}]), ValueError, "got list"),
    ("from_dict None", lambda t: Recipe.from_dict(None), ValueError, "got NoneType"),
    ("from_dict lr", lambda t: Recipe.from_dict({"lr": "fast"}), ValueError, "['lr']"),
    ("from_dict train epochs", lambda t: Recipe.from_dict({"train": {"epochs": "2"}}), ValueError, "epochs='2'"),
    ("from_dict per_channel", lambda t: Recipe.from_dict({"per_channel": "no"}), ValueError, "per_channel='no'"),
    ("from_yaml missing", lambda t: Recipe.from_yaml(t / "missing.yaml"), FileNotFoundError, "missing.yaml"),
    ("from_yaml dir", lambda t: Recipe.from_yaml(t / "recipe_dir"), ValueError, "recipe_dir"),
    # quantize
    ("quantize elq a_bits", lambda t: qcnn.quantize(_lenet(), Recipe(method="elq", w_bits=2, a_bits=8)), ValueError,
     "a_bits: null"),
    ("quantize vnq a_bits", lambda t: qcnn.quantize(_lenet(), Recipe(method="vnq", w_bits=2, a_bits=4)), ValueError,
     "a_bits: null"),
    ("quantize lsq w1", lambda t: qcnn.quantize(_lenet(), Recipe(method="lsq", w_bits=1, a_bits=4)), ValueError,
     "lsq defines weights of 2-16 bits"),
    ("quantize bireal w2", lambda t: qcnn.quantize(_lenet(), Recipe(method="bireal", w_bits=2, a_bits=1)),
     ValueError, "bireal defines weights of 1 bits"),
    ("quantize qcode w1", lambda t: qcnn.quantize(_lenet(), Recipe(method="qcode", w_bits=1)), ValueError,
     "qcode defines weights of 2-16 bits"),
    ("quantize dict key", lambda t: qcnn.quantize(_lenet(), {"method": "uniform", "wbits": 4}), ValueError,
     "['wbits']"),
    ("quantize params", lambda t: qcnn.quantize(_lenet(), Recipe(method="pact", params={"alpha": 1})), ValueError,
     "['alpha']"),
    ("quantize unknown method", lambda t: qcnn.quantize(_lenet(), Recipe(method="qkode")), ValueError, "'qkode'"),
    ("quantize str model", lambda t: qcnn.quantize("lenet5", Recipe()), TypeError, "got str 'lenet5'"),
    ("quantize str recipe", lambda t: qcnn.quantize(_lenet(), "uniform"), TypeError, "got str 'uniform'"),
    ("quantize no layers", lambda t: qcnn.quantize(torch.nn.Sequential(torch.nn.ReLU()), Recipe()), ValueError,
     "no Conv2d or Linear"),
    # models
    ("build_model nosuch", lambda t: build_model("lenet6"), ValueError, "'lenet6'"),
    ("build_model None", lambda t: build_model(None), ValueError, "got None"),
    ("build_model num_classes=0", lambda t: build_model("lenet5", num_classes=0), ValueError, "num_classes"),
    ("build_model num_classes=True", lambda t: build_model("lenet5", num_classes=True), ValueError, "got True"),
    ("build_model width=0", lambda t: build_model("lenet5", width=0), ValueError, "width"),
    ("build_model width='2'", lambda t: build_model("lenet5", width="2"), ValueError, "got '2'"),
    ("build_model bogus kwarg", lambda t: build_model("lenet5", bogus=1), ValueError, "['bogus']"),
    ("build_model weights missing", lambda t: build_model("lenet5", weights=t / "missing.pt"), FileNotFoundError,
     "missing.pt"),
    ("build_model weights of resnet20", lambda t: build_model("lenet5", in_channels=1, weights=t / "resnet20_sd.pt"),
     ValueError, "unexpected keys [layer1.0"),
    # checkpoints
    ("load_model missing", lambda t: load_model(t / "missing.pt"), FileNotFoundError, "missing.pt"),
    ("load_model dir", lambda t: load_model(t), ValueError, "is a directory"),
    ("load_model flipped", lambda t: load_model(t / "flipped.pt"), ValueError, "flipped.pt' is corrupted"),
    ("load_model state_dict", lambda t: load_model(t / "resnet20_sd.pt"), ValueError, "without architecture"),
    ("load_model other arch", lambda t: load_model(t / "resnet20_sd.pt", arch={"name": "lenet5"}), ValueError,
     "missing keys [conv2.weight"),
    ("load_model arch key", lambda t: load_model(t / "float.pt", arch={"name": "lenet5", "depth": 3}), ValueError,
     "['depth']"),
    ("load_model arch name", lambda t: load_model(t / "float.pt", arch={"name": "resnet20"}), ValueError,
     "not 'resnet20'"),
    ("load_model arch kwargs", lambda t: load_model(t / "bogus_kwargs.pt"), ValueError, "['bogus']"),
    ("load_torch random", lambda t: load_torch(t / "random.zip"), ValueError, "random.zip"),
    ("load_torch truncated", lambda t: load_torch(t / "truncated.pt"), ValueError, "truncated.pt"),
    ("load_torch empty", lambda t: load_torch(t / "empty.pt"), ValueError, "empty.pt"),
    ("load_torch object", lambda t: load_torch(t / "pickled_object.pt"), ValueError, "pickled_object.pt"),
    # data
    ("get_data nosuch", lambda t: get_data("nosuch"), ValueError, "'nosuch'"),
    ("get_data missing dir", lambda t: get_data("fashion-mnist", data_dir=t / "missing"), FileNotFoundError,
     "missing: does not exist"),
    ("get_data random zip", lambda t: get_data("cifar10", data_dir=t / "random.zip"), ValueError, "random.zip"),
    ("get_data bad jpeg", lambda t: get_data("cifar10", data_dir=t / "bad_jpeg.zip", calib_size=0), ValueError,
     "'train/cat/1.jpg'"),
    ("get_data batch_size=0", lambda t: get_data("fashion-mnist", batch_size=0), ValueError, "batch_size=0"),
    ("get_data eval_batch_size=0", lambda t: get_data("fashion-mnist", eval_batch_size=0), ValueError,
     "eval_batch_size=0"),
    ("get_data train_limit=0", lambda t: get_data("fashion-mnist", train_limit=0), ValueError, "train_limit=0"),
    ("get_data test_limit=-1", lambda t: get_data("fashion-mnist", test_limit=-1), ValueError, "test_limit=-1"),
    ("get_data calib_size=-1", lambda t: get_data("fashion-mnist", calib_size=-1), ValueError, "calib_size=-1"),
    ("get_data calib_size too big", lambda t: get_data("fashion-mnist", calib_size=60001), ValueError,
     "calib_size=60001"),
    ("get_data calib_size=all, excluded", lambda t: get_data("fashion-mnist", calib_size=60000, exclude_calib=True),
     ValueError, "exclude_calib=True keeps at least one"),
    ("get_data world_size=0", lambda t: get_data("fashion-mnist", world_size=0), ValueError, "world_size=0"),
    ("get_data rank=2", lambda t: get_data("fashion-mnist", rank=2, world_size=2), ValueError, "rank=2"),
    ("get_data pad=-1", lambda t: get_data("fashion-mnist", pad=-1), ValueError, "pad=-1"),
    ("subset 0", lambda t: subset(get_data("fashion-mnist").test, 0), ValueError, "n=0"),
]


@pytest.mark.parametrize("call, exc, expected", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_refuses_bad_input(call, exc, expected, files):
    with pytest.raises(exc) as e:
        call(Path(files["t"]))
    assert expected in str(e.value)


# --------------------------------------------------------------------------------- calibration
CALIB_RECIPES = [
    Recipe(method="uniform", w_bits=4, a_bits=4),
    Recipe(method="lsq", w_bits=4, a_bits=4),
    Recipe(method="lsq", w_bits=4, a_bits=None),
    Recipe(method="pact", w_bits=4, a_bits=4),
    Recipe(method="qcode", w_bits=8, a_bits=8),
    Recipe(method="dorefa", w_bits=4, a_bits=4),
    Recipe(method="bireal", w_bits=1, a_bits=1),
]


def _rid(r: Recipe) -> str:
    return f"{r.method}-W{r.w_bits}A{r.a_bits}"


@pytest.mark.parametrize("recipe", CALIB_RECIPES, ids=_rid)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_calibration_names_a_broken_weight(recipe, value):
    model = _lenet()
    with torch.no_grad():
        model.conv2.weight[3, 1, 2, 2] = value
    q = qcnn.quantize(model, recipe).eval()
    with pytest.raises(ValueError) as e, qcnn.calibrating(q):
        q(torch.randn(4, 1, 28, 28))
    msg = str(e.value)
    assert "conv2.weight" in msg and "the model itself is broken" in msg
    assert not msg.startswith("calibration data")


@pytest.mark.parametrize("recipe", [r for r in CALIB_RECIPES if r.a_bits is not None], ids=_rid)
def test_calibration_refuses_a_nan_batch(recipe):
    q = qcnn.quantize(_lenet(), recipe).eval()
    x = torch.randn(4, 1, 28, 28)
    x[1, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="1 NaN"), qcnn.calibrating(q):
        q(x)


def test_lsq_calibrated_on_a_nan_batch_does_not_leave_nan_steps():
    q = qcnn.quantize(_lenet(), Recipe(method="lsq", w_bits=4, a_bits=4)).eval()
    x = torch.randn(4, 1, 28, 28)
    with pytest.raises(ValueError), qcnn.calibrating(q):
        q(torch.full_like(x, float("nan")))
    with qcnn.calibrating(q):  # calibrating again on good data gives a working model
        q(x)
    assert torch.isfinite(q(x)).all()


# ------------------------------------------------------------------------------- zero-scale grids
def test_bireal_grid_of_an_all_zero_channel_gives_code_zero():
    from qcnn.quant.binary import MagnitudeAwareBinaryWeight

    w = torch.randn(4, 3, 3, 3)
    w[2] = 0.0
    q = MagnitudeAwareBinaryWeight()
    v = q(w)
    grid = q.grid()
    assert float(grid.scale[2]) == 0.0
    codes = grid.to_codes(v)
    assert (codes[2] == 0).all() and set(codes[[0, 1, 3]].unique().tolist()) == {-1, 1}
    assert torch.equal(grid.from_codes(codes), v)


@pytest.mark.parametrize("bits", [1, 2])
def test_elq_grid_of_an_all_zero_layer_gives_code_zero(bits):
    from qcnn.quant.elq import ELQWeightQuantizer

    w = torch.zeros(4, 3, 3, 3)
    q = ELQWeightQuantizer(bits)
    q.init_scale(w)
    grid = q.grid()
    assert float(grid.scale) == 0.0
    codes = grid.to_codes(q.quantized(w))
    assert codes.dtype == torch.int32 and (codes == 0).all()
    assert torch.equal(grid.from_codes(codes), q.quantized(w))


def test_grid_codes_of_zero_scale_channels_in_a_uniform_grid():
    from qcnn.quant.base import Grid

    grid = Grid(bits=4, signed=True, scale=torch.tensor([0.5, 0.0]), zero_point=torch.zeros(2, dtype=torch.int32),
                axis=0)
    codes = grid.to_codes(torch.tensor([[1.0, -0.5], [0.0, 0.0]]))
    assert codes.tolist() == [[2, -1], [0, 0]]


# --------------------------------------------------------------------- small datasets that are fine
def test_eval_on_a_small_image_folder_needs_no_calibration_split(files, capsys):
    code, err = _cli(["eval", "--model", "resnet20", "--dataset", "imagefolder", "--data-dir",
                      f"{files['t']}/folder", "--device", "cpu", "--json"], capsys)
    assert code == 0, err


def test_eval_on_a_small_cifar_zip(files, capsys):
    code, err = _cli(["eval", "--model", "resnet20", "--dataset", "cifar10", "--data-dir", f"{files['t']}/c10.zip",
                      "--device", "cpu"], capsys)
    assert code == 0, err


def test_ptq_calibrates_on_every_training_image(files, tmp_path, capsys):
    """``--calib-images N`` with exactly N training images uses all of them (20 here)."""
    import json

    code, err = _cli(["ptq", "--model", "resnet20", "--dataset", "cifar10", "--data-dir", f"{files['t']}/c10.zip",
                      "--device", "cpu", "--calib-images", "20", "--out", str(tmp_path / "ptq"), "--json"], capsys)
    assert code == 0, err
    recipe = json.loads((tmp_path / "ptq" / "recipe.json").read_text())
    assert recipe["calib_images"] == 20
