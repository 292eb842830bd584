"""`qkv demo`."""

from __future__ import annotations

import argparse

from qkv.cli.common import check_at_least, log
from qkv.errors import QkvError


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train a tiny model on the built-in task (under a minute on a CPU) and show it working",
        description="Train a tiny Transformer, offline, on the built-in task (dates written in "
        "words -> ISO dates), then translate test sentences it never saw and report its accuracy.",
        epilog="examples:\n  qkv demo\n  qkv demo --steps 300 --out runs/quick-demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out",
        metavar="RUN_DIR",
        help="run directory (default runs/demo, which the README's examples use; runs/demo-2, -3, "
        "... once it exists)",
    )
    parser.add_argument("--steps", type=int, help="training steps (default: the demo recipe's)")
    parser.add_argument(
        "--seed",
        type=int,
        help="random seed for data and training (default 1, configs/demo.toml's)",
    )
    parser.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from qkv.checkpoint import LAST
    from qkv.demo import default_demo_dir, run_demo
    from qkv.run_folder import RUN_FILES

    check_at_least({"--steps": args.steps}, 1)  # else a message about train.max_steps
    run_dir = Path(args.out) if args.out else default_demo_dir(Path("runs"))
    if args.out and any((run_dir / name).exists() for name in (LAST, *RUN_FILES)):
        # train's own message says "pass --resume", which the demo does not have
        raise QkvError(
            f"--out {run_dir} already holds a run: choose another --out (without --out, the demo "
            "takes runs/demo, then runs/demo-2, -3, ...)"
        )
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
    result = run_demo(run_dir, overrides, log=log)
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
    console.print(
        f"attention picture: {result.attention_png}  "
        "(where the decoder looks in the words while writing each character of the date)"
    )
    console.print(f"run directory: {result.run_dir}  (try: qkv translate {result.run_dir})")
    return 0
