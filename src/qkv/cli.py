"""The `qkv` command line: argument handling only; the work lives in the modules it calls."""

from __future__ import annotations

import argparse
import sys

from qkv import __version__
from qkv.errors import QkvError

# Each subcommand has an `_add_<name>(subparsers)` that builds its parser and sets `run=_run_<name>`.
# Heavy modules (torch, sentencepiece) are imported inside the `_run_*` functions so `--help` is instant.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkv",
        description="The Transformer of 'Attention Is All You Need': train, translate, look inside.",
    )
    parser.add_argument("--version", action="version", version=f"qkv {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args) or 0
    except QkvError as error:
        print(f"qkv: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qkv: interrupted", file=sys.stderr)
        return 130


# Subcommands, in the order `qkv --help` lists them.
COMMANDS: list = []
