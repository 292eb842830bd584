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


def _add_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model from a TOML config (prepares the data when needed)",
        description="Train a Transformer as CONFIG says. CONFIG is a TOML file with sections "
        "[model], [data], [train], [eval], or the name of a bundled recipe "
        f"({', '.join(recipe_names())}).",
        epilog="examples:\n"
        "  qkv train configs/demo.toml --out runs/demo\n"
        "  qkv train multi30k_de_en --out runs/de_en --set train.max_epochs=20\n"
        "  qkv train configs/multi30k_de_en.toml --out runs/de_en --resume\n"
        "  torchrun --nproc_per_node=2 -m qkv train configs/base.toml --out runs/base",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", metavar="CONFIG", help="TOML file or bundled recipe name")
    parser.add_argument("--out", metavar="RUN_DIR", help="run directory (default runs/CONFIG_NAME)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set train.lr=2.0",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from RUN_DIR/last.pt (or the newest readable checkpoint) exactly",
    )
    parser.set_defaults(run=_run_train)


def recipe_names() -> list[str]:
    from importlib.resources import files

    return sorted(
        p.name.removesuffix(".toml")
        for p in files("qkv").joinpath("configs").iterdir()
        if p.name.endswith(".toml")
    )


def resolve_recipe(name: str):
    """A config path as given, or the bundled recipe of that name."""
    from importlib.resources import files
    from pathlib import Path

    path = Path(name)
    if path.suffix == ".toml" or path.exists():
        return path
    bundled = files("qkv").joinpath("configs", f"{name}.toml")
    if bundled.is_file():
        return Path(str(bundled))
    raise QkvError(f"{name}: no such config file or bundled recipe ({', '.join(recipe_names())})")


def _run_train(args) -> int:
    from pathlib import Path

    from qkv.config import load_config
    from qkv.train import train

    config_path = resolve_recipe(args.config)
    config = load_config(config_path, args.overrides)
    run_dir = Path(args.out) if args.out else Path("runs") / config_path.stem
    summary = train(config, run_dir, resume=args.resume, log=_log)
    _print_summary(summary)
    return 0


def _log(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="qkv train: done", show_header=False)
    table.add_row("steps", f"{summary['steps']:,} ({summary['new_steps']:,} in this run)")
    table.add_row("epochs", str(summary["epochs"]))
    table.add_row("time", f"{summary['seconds']:.0f} s")
    table.add_row("target tokens/s", f"{summary['target_tokens_per_second']:,.0f}")
    table.add_row("best valid BLEU", f"{summary['best_bleu']:.2f}")
    table.add_row("run directory", summary["run_dir"])
    table.add_row("files", "best.pt, last.pt, metrics.jsonl, curves.png, tokenizer.model")
    Console(stderr=True).print(table)


# Subcommands, in the order `qkv --help` lists them.
COMMANDS: list = [_add_train]
