"""Where an export is written: a folder of its own, whole or not at all.

An export is written into a new folder beside its destination and takes the destination's place only
once every file is there: a failed export leaves the destination as it was, and an earlier export
replaced there (`replace`, `qkv export --force`) leaves none of its files behind. Before, an ONNX
export over a CTranslate2 one left model.bin beside encoder.onnx, and `qkv translate DIR` went on
running the old model; an export into a run directory wrote model.bin beside its checkpoints (then
failed), and the run translated by CTranslate2 from then on. So a folder holding anything but an
export of qkv's is refused, with or without `replace`."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qkv.errors import QkvError
from qkv.outputs import check_parents_are_folders

# What each export writes beside its model, to say what it is (qkv.export.ctranslate2, .onnx)
MARKERS = ("qkv_export.json", "qkv_onnx.json")


def check_destination(out_dir: Path, replace: bool) -> None:
    """A QkvError unless `out_dir` is new, empty, or (with `replace`) an earlier export of qkv's."""
    if out_dir.exists() and not out_dir.is_dir():
        raise QkvError(f"{out_dir} is a file, not a directory")
    check_parents_are_folders(out_dir, "-o")
    names = sorted(path.name for path in out_dir.iterdir()) if out_dir.is_dir() else []
    if not names:
        return
    if not any(marker in names for marker in MARKERS):
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise QkvError(
            f"{out_dir} holds files that no export of qkv's wrote ({shown}): "
            "export into a new or empty directory"
        )
    if not replace:
        raise QkvError(f"{out_dir} holds a model already: --force replaces it")


@contextlib.contextmanager
def written_whole(out_dir: str | Path, replace: bool = False) -> Iterator[Path]:
    """A new folder beside `out_dir` to write an export into (`check_destination` first); when the
    block ends, it becomes `out_dir`, or, on an error, is removed and `out_dir` left as it was."""
    out_dir = Path(out_dir)
    check_destination(out_dir, replace)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield staging
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            staging.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already where it became out_dir
