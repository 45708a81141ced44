"""One flag vocabulary across the subcommands: every flag documented, one spelling per meaning (the former ones
hidden but working), the per-channel pair with the Python API's default, and recipes by name from any
directory."""

from __future__ import annotations

import argparse

import pytest

from qcnn.cli import build_parser, main
from qcnn.recipes import Recipe


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    p = build_parser()
    (sub,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _visible(parser):
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS]


def test_every_flag_of_every_subcommand_has_a_help_string():
    subs = _subparsers()
    assert {"train", "eval", "ptq", "qat", "bench", "export", "compress", "report", "models", "datasets"} <= set(subs)
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, sp in subs.items() for a in _visible(sp)
               if not (a.help or "").strip()]
    assert missing == []


@pytest.mark.parametrize("command, canonical, old", [
    ("train", "--limit-train", "--train-images"),
    ("bench", "--limit-train", "--train-images"),
    ("eval", "--limit-test", "--test-images"),
])
def test_former_spellings_are_hidden_and_still_work(command, canonical, old, capsys):
    sp = _subparsers()[command]
    text = sp.format_help()
    assert canonical in text and old not in text
    base = {"train": ["--model", "lenet5", "--dataset", "fashion-mnist"], "bench": ["--out", "x"],
            "eval": ["--model", "lenet5", "--dataset", "fashion-mnist"]}[command]
    dest = canonical[2:].replace("-", "_")
    new = build_parser().parse_args([command, *base, canonical, "7"])
    capsys.readouterr()
    former = build_parser().parse_args([command, *base, old, "7"])
    assert getattr(new, dest) == getattr(former, dest) == 7
    assert f"{old} is deprecated, use {canonical}" in capsys.readouterr().err
    assert getattr(build_parser().parse_args([command, *base]), dest) is None


@pytest.mark.parametrize("flag, commands", [
    ("--limit-train", ("train", "qat", "bench")),
    ("--limit-test", ("eval", "ptq", "qat")),
    ("--per-channel", ("ptq", "qat")),
    ("--per-tensor", ("ptq", "qat")),
])
def test_one_spelling_across_commands(flag, commands):
    subs = _subparsers()
    for c in commands:
        assert flag in subs[c]._option_string_actions, (c, flag)


def _recipe(command: str, *flags: str) -> Recipe:
    from qcnn.commands import ptq, qat

    args = build_parser().parse_args([command, "--model", "lenet5", "--dataset", "fashion-mnist", *flags])
    return {"ptq": ptq, "qat": qat}[command].recipe_from_args(args)


@pytest.mark.parametrize("command", ["ptq", "qat"])
def test_per_channel_pair_defaults_to_the_python_api(command, capsys):
    assert _recipe(command).per_channel is Recipe().per_channel is True
    assert _recipe(command, "--per-tensor").per_channel is False
    assert _recipe(command, "--per-channel").per_channel is True
    assert _recipe(command, "--recipe", "qcode").per_channel is False  # the recipe's own value
    assert _recipe(command, "--recipe", "qcode", "--per-channel").per_channel is True
    with pytest.raises(SystemExit) as e:
        _recipe(command, "--per-channel", "--per-tensor")
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_ptq_without_a_recipe_is_qcode_and_says_so():
    r = _recipe("ptq")
    assert (r.method, r.w_bits, r.a_bits, r.calib, r.calib_images, r.first_last) == \
        ("qcode", *(getattr(Recipe(), k) for k in ("w_bits", "a_bits", "calib", "calib_images", "first_last")))
    text = " ".join(_subparsers()["ptq"].format_help().split())
    assert "qcode" in text and "survey" in text and "1024 without --recipe" in text


@pytest.mark.parametrize("spelling", ["pact", "pact.yaml", "recipes/pact.yaml"])
def test_recipe_flag_takes_a_name_from_any_directory(spelling, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = _recipe("qat", "--recipe", spelling, "--w-bits", "3")
    assert (r.method, r.w_bits, r.a_bits, r.params["alpha_decay"]) == ("pact", 3, 4, 0.0002)


def test_recipe_flag_takes_an_absolute_path(tmp_path, monkeypatch):
    f = tmp_path / "mine.yaml"
    f.write_text("method: lsq\nw_bits: 2\na_bits: 2\n")
    monkeypatch.chdir(tmp_path.parent)
    assert _recipe("qat", "--recipe", str(f)).method == "lsq"
    assert _recipe("ptq", "--recipe", str(f)).fold_bn is True


def test_unknown_recipe_name_lists_the_recipes(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["ptq", "--model", "lenet5", "--dataset", "fashion-mnist", "--recipe", "qcod"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'qcod'; did you mean 'qcode'?" in err and "uniform_qat" in err


def test_freeze_bn_and_grad_clip_flags_reach_the_training_spec():
    from qcnn.commands.qat import recipe_from_args
    from qcnn.commands.train import spec_from_args

    args = build_parser().parse_args(["qat", "--recipe", "pact", "--model", "lenet5", "--dataset", "fashion-mnist",
                                      "--freeze-bn", "0.5", "--grad-clip", "2"])
    train = recipe_from_args(args).train
    assert (train.freeze_bn, train.grad_clip) == (0.5, 2.0)
    assert recipe_from_args(build_parser().parse_args(["qat", "--recipe", "pact", "--model", "lenet5", "--dataset",
                                                       "fashion-mnist"])).train.freeze_bn is None
    spec = spec_from_args(build_parser().parse_args(["train", "--model", "lenet5", "--dataset", "fashion-mnist",
                                                     "--freeze-bn", "0"]))
    assert spec.freeze_bn == 0.0 and spec.grad_clip is None
    with pytest.raises(ValueError, match="freeze_bn=-1.0"):
        recipe_from_args(build_parser().parse_args(["qat", "--model", "lenet5", "--dataset", "fashion-mnist",
                                                    "--freeze-bn", "-1"]))


@pytest.mark.parametrize("value", ["-1", "0", "inf", "soon"])
def test_bench_time_limit_must_be_a_positive_number(value, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["bench", "--out", "x", "--time-limit", value])
    assert e.value.code == 2 and "--time-limit" in capsys.readouterr().err
    assert build_parser().parse_args(["bench", "--out", "x", "--time-limit", "2.5"]).time_limit == 2.5


def test_bench_lr_sets_the_qat_learning_rate_of_the_suite(monkeypatch, tmp_path, capsys):
    import qcnn.bench

    seen = []

    class Stop(Exception):
        pass

    def fake_bench(suite, *a, **kw):
        seen.append(suite)
        raise Stop

    monkeypatch.setattr(qcnn.bench, "Bench", fake_bench)
    for extra in ([], ["--lr", "0.001"]):
        with pytest.raises(Stop):
            main(["bench", "--suite", "detection", "--out", str(tmp_path), *extra])
    assert seen[0].qat_train["lr"] == 0.0005 and seen[1].qat_train == {**seen[0].qat_train, "lr": 0.001}
    assert qcnn.bench.SUITES["detection"].qat_train["lr"] == 0.0005  # the suite itself is unchanged
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--out", "x", "--lr", "0"])
    assert "--lr" in capsys.readouterr().err
