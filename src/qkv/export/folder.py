"""Where an export is written: a folder of its own, each file whole.

An export is written into a new folder first, and moved into place only once every file is there: a
failed export leaves the destination as it was. A new destination is that folder renamed; an existing
one (empty, or an earlier export that `replace`, `qkv export --force`, allows) gets the new files
moved in, after the earlier export's own files are removed, so that none of them is left to be run
instead (an ONNX export over a CTranslate2 one left model.bin, which `qkv translate DIR` ran), while
files of the user's beside them stay. A folder holding anything but an export of qkv's (a run
directory: model.bin landed beside its checkpoints) is refused, with or without `replace`."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qkv.atomic import current_umask
from qkv.errors import QkvError
from qkv.outputs import check_parents_are_folders

# What each export writes beside its model, to say what it is (qkv.export.ctranslate2, .onnx)
MARKERS = ("qkv_export.json", "qkv_onnx.json")
# Every file either export writes: CTranslate2's model, configuration and vocabulary (named as its
# spec names them), ONNX's two graphs, and both exports' tokenizer and marker
EXPORT_FILES = (
    "model.bin", "config.json", "encoder.onnx", "decoder_step.onnx", "tokenizer.model", *MARKERS,
    *(f"{side}vocabulary.{kind}" for side in ("", "shared_", "source_", "target_")
      for kind in ("json", "txt")),
)  # fmt: skip
STAGING = ".qkv-export-"  # the folder an export is written into first


def check_destination(out_dir: Path, replace: bool) -> None:
    """A QkvError unless `out_dir` is new, empty, or (with `replace`) an earlier export of qkv's."""
    if out_dir.exists() and not out_dir.is_dir():
        raise QkvError(f"{out_dir} is a file, not a directory")
    check_parents_are_folders(out_dir, "-o")
    names = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    names = [name for name in names if not name.startswith(STAGING)]  # one cut short
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
    """A new folder to write an export into (`check_destination` first); when the block ends, its
    files are `out_dir`'s, or, on an error, it is removed and `out_dir` left as it was."""
    out_dir = Path(out_dir)
    check_destination(out_dir, replace)
    existing = out_dir.is_dir()
    # Inside an existing folder (a mount point, or one whose parent is not the user's, cannot be
    # renamed); beside a new one, which it becomes
    where = out_dir if existing else out_dir.resolve().parent
    where.mkdir(parents=True, exist_ok=True)
    try:
        staging = Path(tempfile.mkdtemp(prefix=STAGING, dir=where))
    except OSError as error:
        raise QkvError(f"-o {out_dir}: cannot write there ({error.strerror})") from None
    try:
        yield staging
        if existing:
            for name in EXPORT_FILES:
                (out_dir / name).unlink(missing_ok=True)
            for path in staging.iterdir():
                os.replace(path, out_dir / path.name)
        else:
            # Made private (0700), it becomes the user's folder
            os.chmod(staging, 0o777 & ~current_umask())
            staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already where it became out_dir
