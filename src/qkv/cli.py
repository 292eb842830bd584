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


# ---------------------------------------------------------------------------------------------
# qkv prepare

PREPARE_EXAMPLES = """\
examples:
  qkv prepare --dataset multi30k --src-lang de --tgt-lang en --out prepared/multi30k.de-en
  qkv prepare --dataset synthetic --out prepared/dates
  qkv prepare --trainpref corpus/train --validpref corpus/valid --src-lang de --tgt-lang en \\
      --out prepared/mine          (reads corpus/train.de and corpus/train.en, or .de.gz/.en.gz)
  qkv prepare --trainpref pairs.tsv --src-lang de --tgt-lang en --out prepared/tsv

Multi30k files are looked up as $QKV_DATA_DIR/multi30k/{split}.{lang}.gz (default data folder:
~/.cache/qkv) and downloaded from github.com/multi30k/dataset when missing.
Without --validpref, a seeded slice of train is held out for validation (the summary says so).
Only train is filtered: empty pairs, pairs over --max-len subwords, length ratios over --max-ratio.
"""


def _add_prepare(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="validate parallel text, train the tokenizer, encode: a folder training reads",
        description="Validate and filter parallel text, train a joint SentencePiece tokenizer, "
        "and write the encoded splits, raw val/test text and a summary to --out.",
        epilog=PREPARE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("what to prepare (a dataset, or your own files)")
    source.add_argument("--dataset", choices=["multi30k", "synthetic"], help="a named dataset")
    source.add_argument(
        "--trainpref", metavar="PATH", help="training files PATH.{src,tgt}[.gz] or PATH.tsv"
    )
    source.add_argument(
        "--validpref", metavar="PATH", help="validation files, named as --trainpref"
    )
    source.add_argument("--testpref", metavar="PATH", help="test files, named as --trainpref")
    source.add_argument("--src-lang", metavar="LANG", help="source language suffix, e.g. de")
    source.add_argument("--tgt-lang", metavar="LANG", help="target language suffix, e.g. en")
    source.add_argument(
        "--data-dir", metavar="DIR", help="data folder (default $QKV_DATA_DIR, else ~/.cache/qkv)"
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="folder to write (created if needed)"
    )
    options = parser.add_argument_group("tokenizer and filtering")
    options.add_argument(
        "--vocab-size", type=int, metavar="N", help="subwords (default 8000; synthetic 200)"
    )
    options.add_argument(
        "--tokenizer-type", choices=["bpe", "unigram"], default="bpe", help="default: bpe"
    )
    options.add_argument(
        "--max-len",
        type=int,
        default=256,
        metavar="N",
        help="drop training pairs longer than N subwords (default 256)",
    )
    options.add_argument(
        "--max-ratio",
        type=float,
        default=9.0,
        metavar="R",
        help="drop training pairs whose length ratio exceeds R (default 9)",
    )
    options.add_argument(
        "--valid-size",
        type=int,
        metavar="N",
        help="pairs held out of train without --validpref (default min(1000, 10%%)); synthetic: val size (500)",
    )
    options.add_argument(
        "--train-size", type=int, metavar="N", help="synthetic: training pairs (default 20000)"
    )
    options.add_argument(
        "--test-size", type=int, metavar="N", help="synthetic: test pairs (default 500)"
    )
    options.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for the held-out slice and the synthetic task (default 0)",
    )
    options.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    parser.set_defaults(run=_run_prepare)


def _run_prepare(args) -> int:
    from qkv.prepare import prepare, print_summary

    summary = prepare(
        args.out,
        dataset=args.dataset,
        src_lang=args.src_lang,
        tgt_lang=args.tgt_lang,
        trainpref=args.trainpref,
        validpref=args.validpref,
        testpref=args.testpref,
        data_dir=args.data_dir,
        vocab_size=args.vocab_size,
        model_type=args.tokenizer_type,
        max_len=args.max_len,
        max_ratio=args.max_ratio,
        valid_size=args.valid_size,
        train_size=args.train_size,
        test_size=args.test_size,
        seed=args.seed,
        progress=not args.quiet,
    )
    print_summary(summary)
    return 0


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train a tiny model on the built-in task (about a minute on a CPU) and show it working",
        description="Train a tiny Transformer, offline, on the built-in task (dates written in "
        "words -> ISO dates), then translate test sentences it never saw and report its accuracy.",
        epilog="examples:\n  qkv demo\n  qkv demo --steps 300 --out runs/quick-demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", metavar="RUN_DIR", help="run directory (default runs/demo-TIME)")
    parser.add_argument("--steps", type=int, help="training steps (default: the demo recipe's)")
    parser.add_argument("--seed", type=int, help="random seed for data and training")
    parser.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    import time
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from qkv.demo import run_demo

    run_dir = Path(args.out or time.strftime("runs/demo-%Y%m%d-%H%M%S"))
    overrides = []
    if args.steps is not None:
        overrides.append(f"train.max_steps={args.steps}")
    if args.seed is not None:
        overrides += [f"train.seed={args.seed}", f"data.seed={args.seed}"]
    console = Console(soft_wrap=True)  # paths and sentences stay on one line, whatever the width
    console.print(
        "[bold]qkv demo[/]: teaching a tiny Transformer to read dates written in words "
        "and write them as ISO dates."
    )
    result = run_demo(run_dir, overrides, log=_log)
    table = Table(title="Test sentences the model never saw")
    table.add_column("input (words)")
    table.add_column("model output")
    table.add_column("reference")
    table.add_column("", justify="center")
    for source, output, reference in result.examples:
        mark = "[green]✓[/]" if output == reference else "[red]✗[/]"
        table.add_row(source, output, reference, mark)
    console.print(table)
    console.print(
        f"exact-match accuracy on {result.n_test} test sentences: "
        f"[bold]{result.accuracy:.1%}[/] after {result.seconds:.0f} s"
    )
    console.print(f"run directory: {result.run_dir}  (try: qkv translate {result.run_dir})")
    return 0


# Subcommands, in the order `qkv --help` lists them.
COMMANDS: list = [_add_demo, _add_prepare, _add_train]
