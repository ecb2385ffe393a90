"""`yolc-kd` command line: one sub-command per module in yolc_kd.commands."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from yolc_kd.diskio import describe_os_error
from yolc_kd.errors import UserError

# each module defines register(subparsers) which adds a parser with set_defaults(func=run)
COMMANDS = ("demo", "synth", "convert_visdrone", "make_crops", "train", "infer", "eval", "precompute", "verify",
            "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="yolc-kd", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"yolc_kd.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"yolc_kd.commands.{name}":
                continue  # command not shipped in this build
            raise
        module.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"yolc-kd {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the environment failed where no writer named it (a full disk, a lost mount)
        print(f"yolc-kd {args.command}: error: {describe_os_error(exc, action=None)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"yolc-kd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
