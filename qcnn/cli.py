"""The ``qcnn`` command. Each subcommand lives in ``qcnn.commands.<name>`` and exposes
``add_parser(subparsers)``, which registers its parser and sets ``func(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("train", "eval", "models", "datasets", "ptq", "qat", "compress", "export", "bench", "report")


def build_parser() -> argparse.ArgumentParser:
    from qcnn import __version__

    p = argparse.ArgumentParser(prog="qcnn", description="Quantize convolutional neural networks.")
    p.add_argument("--version", action="version", version=f"qcnn {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"qcnn.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"qcnn.commands.{name}":
                raise
            continue
        mod.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError, FloatingPointError) as e:
        print(f"qcnn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
