"""What `qkv train --out` may be: a new folder, or with `--resume` a run to go on with; never a file,
a prepared data folder, or a folder whose files training would replace. Checked before anything is
read or computed, so a refusal costs nothing."""

from __future__ import annotations

from pathlib import Path

from qkv.checkpoint import LAST, TOKENIZER
from qkv.errors import QkvError
from qkv.outputs import check_parents_are_folders
from qkv.prepared import INFO

# What training writes into its run directory, besides the checkpoints.
RUN_FILES = ("config.toml", TOKENIZER, "metrics.jsonl", "curves.png", "best.pt", "data")


def check_run_folder(run_dir: Path, resume: bool) -> None:
    """Raise `QkvError` (what to do instead) where training into `run_dir` would lose something."""
    if run_dir.exists() and not run_dir.is_dir():
        raise QkvError(f"--out {run_dir} is a file, not a folder")
    check_parents_are_folders(run_dir, "--out")
    if (run_dir / INFO).exists():  # `--resume`, as the message below said, trained into it
        raise QkvError(
            f"--out {run_dir} is a prepared data folder ({INFO}): train from it with --set "
            f"data.prepared={run_dir}, into another --out"
        )
    if (run_dir / LAST).exists() and not resume:
        raise QkvError(
            f"{run_dir} already holds a run ({LAST}): pass --resume to continue it, "
            "or choose another --out"
        )
    written = [name for name in RUN_FILES if (run_dir / name).exists()]
    if written and not resume:
        raise QkvError(
            f"{run_dir} holds {written[0]}, which training would replace (a run that saved no "
            "checkpoint, or not a run): pass --resume to start that run again, or choose another "
            "--out"
        )
