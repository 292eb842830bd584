"""`qkv average`."""

from __future__ import annotations

import argparse
import sys

from qkv.errors import QkvError

AVERAGE_EXAMPLES = """\
examples:
  qkv average runs/de_en --last 5 -o runs/de_en/averaged.pt
  qkv average runs/de_en/checkpoint_9000.pt runs/de_en/checkpoint_10000.pt -o averaged.pt
  qkv translate runs/de_en/averaged.pt -i test.de

The paper's base models average the last 5 checkpoints (written every 10 minutes), its big models
the last 20. The tokenizer.model of the run is copied beside OUT when none is there, so OUT
translates on its own.
"""


def _add_average(subparsers) -> None:
    parser = subparsers.add_parser(
        "average",
        help="average the parameters of several checkpoints into one",
        description="Average the parameters of checkpoints (the paper's final models).",
        epilog=AVERAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "paths", nargs="+", metavar="CHECKPOINT", help="checkpoint files, or one run directory"
    )
    parser.add_argument(
        "--last", type=int, metavar="N", help="average the run directory's N newest checkpoints"
    )
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="checkpoint to write")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace OUT if it exists (never an averaged checkpoint)",
    )
    parser.set_defaults(run=_run_average)


def _run_average(args) -> int:
    from pathlib import Path

    from qkv.checkpoint import last_step_checkpoints, save_average
    from qkv.outputs import check_output_file

    if args.last is not None:
        if len(args.paths) != 1:
            raise QkvError("--last N takes one run directory")
        paths = last_step_checkpoints(args.paths[0], args.last)
    else:
        paths = [Path(p) for p in args.paths]
        for path in paths:
            if path.is_dir():
                raise QkvError(f"{path}: is a run directory; pass --last N to average its newest")
    check_output_file(args.output, paths, args.force)
    tokenizer = save_average(paths, args.output)
    names = ", ".join(p.name for p in paths)
    checkpoints = "checkpoint" if len(paths) == 1 else "checkpoints"
    print(f"averaged {len(paths)} {checkpoints} ({names}) into {args.output}", file=sys.stderr)
    if tokenizer is not None:
        print(f"copied {tokenizer} beside it", file=sys.stderr)
    return 0
