"""`qkv train`."""

from __future__ import annotations

import argparse

from qkv.cli.common import log
from qkv.recipes import recipe_names, resolve_recipe


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


def _run_train(args) -> int:
    from pathlib import Path

    from qkv.config import load_config
    from qkv.train import train

    config_path = resolve_recipe(args.config)
    config = load_config(config_path, args.overrides)
    run_dir = Path(args.out) if args.out else Path("runs") / config_path.stem
    summary = train(config, run_dir, resume=args.resume, log=log)
    _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="qkv train: done", show_header=False)
    table.add_row("steps", f"{summary['steps']:,} ({summary['new_steps']:,} in this run)")
    table.add_row("epochs completed", str(summary["epochs"]))
    table.add_row("time", f"{summary['seconds']:.0f} s")
    table.add_row("target tokens/s", f"{summary['target_tokens_per_second']:,.0f}")
    table.add_row("best valid BLEU", f"{summary['best_bleu']:.2f}")
    table.add_row("run directory", summary["run_dir"])
    table.add_row("files", "best.pt, last.pt, metrics.jsonl, curves.png, tokenizer.model")
    Console(stderr=True).print(table)
