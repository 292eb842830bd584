"""The `qkv` command line: argument handling only; the work lives in the modules it calls.

One module per command (or pair of commands that share their options): each has `_add_<name>(subparsers)`,
which builds its parser and sets `run=_run_<name>`. Heavy modules (torch, sentencepiece) are imported
inside the `_run_*` functions, so that `qkv --help` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

from qkv import __version__
from qkv.cli.average import _add_average
from qkv.cli.demo import _add_demo
from qkv.cli.export import _add_export
from qkv.cli.look import _add_attention, _add_explain
from qkv.cli.prepare import _add_prepare
from qkv.cli.serve import _add_serve
from qkv.cli.train import _add_train
from qkv.cli.translate import _add_evaluate, _add_translate
from qkv.errors import QkvError, QkvWarning
from qkv.recipes import recipe_names, resolve_recipe  # noqa: F401  (qkv.cli.resolve_recipe, as before)

# Subcommands, in the order `qkv --help` lists them.
COMMANDS: list = [
    _add_demo,
    _add_prepare,
    _add_train,
    _add_translate,
    _add_evaluate,
    _add_average,
    _add_export,
    _add_attention,
    _add_explain,
    _add_serve,
]


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
        # A usage error, as argparse's own: a script must not take it for work done
        parser.print_help(sys.stderr)
        return 2
    try:
        with _warnings_as_lines(), _progress_bars_ended_on_error():
            return args.run(args) or 0
    except QkvError as error:
        print(f"qkv: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qkv: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader (e.g. `qkv translate ... | head`) stopped reading: not an error of ours. Point
        # stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as error:  # the machine's answer (a full disk, no permission): one line
        print(f"qkv: error: {os_error_line(error)}", file=sys.stderr)
        try:
            sys.stdout.flush()
        except OSError:  # stdout is the full disk: the interpreter's last flush must not fail too
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 2


def os_error_line(error: OSError) -> str:
    """'FILE: what went wrong' (or what went wrong, writing to stdout)."""
    what = error.strerror or str(error)
    return what if error.filename is None else f"{error.filename}: {what}"


@contextlib.contextmanager
def _progress_bars_ended_on_error():
    """Where the command fails, its progress bars end first: the error line came after the bar on
    the same line ("translating: 100%|...| 3/3 [...]qkv: error: ...")."""
    try:
        yield
    except BaseException:
        tqdm = sys.modules.get("tqdm.std")
        for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
            with contextlib.suppress(Exception):
                bar.close()
        raise


@contextlib.contextmanager
def _warnings_as_lines():
    """While it lasts, qkv's own warnings (`QkvWarning`, from the library's default `warn`) print as
    one `qkv: warning: ...` line, as the commands' own do, not with Python's file and source line."""
    show = warnings.showwarning

    def show_warning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, QkvWarning):
            print(f"qkv: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = show_warning
    try:
        yield
    finally:
        warnings.showwarning = show
