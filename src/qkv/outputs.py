"""Where qkv writes: never over a file it did not create, and never over its own inputs.

Every command that writes a file (`translate -o`, `evaluate -o`, `average -o`) or a folder
(`prepare --out`) checks here first, before it reads or computes anything, so a refusal costs
nothing and loses nothing. A file that exists is replaced only with `--force`; a file the command reads
is never replaced, `--force` or not.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

from qkv.errors import QkvError


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (through links and relative paths too)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def check_output_file(
    path: str | os.PathLike,
    inputs: Iterable[str | os.PathLike] = (),
    force: bool = False,
    option: str = "-o",
) -> None:
    """Refuse to write `path` where it is one of `inputs`, or where it is a file that exists and
    `force` is off."""
    path = Path(path)
    for source in inputs:
        if same_file(path, source):
            raise QkvError(
                f"{option} {path} is also an input ({source}): writing it would destroy it; "
                "choose another output file"
            )
    if path.is_dir():
        raise QkvError(f"{option} {path} is a folder; give a file name")
    check_parents_are_folders(path, option)
    # A FIFO or a device (/dev/null) is written into, not replaced: no --force needed
    if path.is_file() and not force:
        raise QkvError(
            f"{option} {path} exists: pass --force to replace it, or choose another file"
        )


def check_parents_are_folders(path: str | os.PathLike, option: str) -> None:
    """Refuse `path` where a folder above it is a file (`-o notes.txt/out.txt`): writing it would fail
    with an OSError after the work was done."""
    for parent in Path(path).parents:
        if parent.exists():
            if not parent.is_dir():
                raise QkvError(f"{option} {path}: {parent} is a file, not a folder")
            return


def check_output_folder(
    out: Path,
    names: Iterable[str],
    inputs: Iterable[str | os.PathLike],
    earlier: set[str],
    force: bool = False,
) -> None:
    """Refuse a folder (`qkv prepare --out`) where writing the files `names` would replace an input,
    a file that an earlier run of the command did not write (`earlier`: the names it wrote), or,
    without `force`, one that it did."""
    existing = [out / name for name in names if (out / name).exists()]
    inputs = list(inputs)
    for path in existing:
        for source in inputs:
            if same_file(path, source):
                raise QkvError(
                    f"--out {out} holds the input {source}: preparing there would overwrite it "
                    f"with the filtered copy ({path.name}); choose another --out"
                )
    for path in existing:
        if path.name not in earlier:
            raise QkvError(
                f"--out {out} holds {path.name}, which qkv prepare did not write: it would be "
                "replaced; choose another --out"
            )
    if existing and not force:
        raise QkvError(
            f"--out {out} already holds prepared data (prepare.json): pass --force to replace "
            "it, or choose another --out"
        )


@contextlib.contextmanager
def made_folder(path: Path):
    """`path` made (with its parents) where it is not there, and removed again if what runs inside
    fails while it is still empty: a command that fails on its inputs leaves no empty folder."""
    made = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if made:
            with contextlib.suppress(OSError):  # not empty, or another process removed it
                path.rmdir()
        raise
