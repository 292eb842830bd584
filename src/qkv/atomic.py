"""Atomic file writes: a crash or a bad download never leaves a half-written file in place."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(file)` on a temporary file beside `path`, fsync it, then rename it over `path`.

    A crash at any moment leaves either the old file or the new one, never half of one. If `write`
    raises, the temporary file is removed and `path` is left as it was. A symbolic link stays: the
    file it names is replaced. A FIFO, a device (/dev/null) or a socket is a stream, not a file to
    replace: `write` writes into it as it is (a rename would put a file in its place).
    """
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file() and not path.is_dir():
        with open(path, "wb") as stream:
            write(stream)
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = tempfile.NamedTemporaryFile(  # noqa: SIM115 (entered just below)
            dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL, delete=False
        )
    except OSError as error:  # named by the file asked for, not by the temporary one
        raise _naming(error, path) from error
    with temporary as f:
        try:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        except BaseException as error:
            f.close()
            os.unlink(f.name)
            # A full disk; not an error of what `write` read (a download's URLError has no errno)
            if isinstance(error, OSError) and error.errno and error.filename in (None, f.name):
                raise _naming(error, path) from error
            raise
    # Temporary files are created private (0600); the finished file gets the usual permissions.
    os.chmod(f.name, 0o666 & ~current_umask())
    os.replace(f.name, path)
    _fsync_directory(path.parent)  # make the rename itself durable


def _naming(error: OSError, path: Path) -> OSError:
    """`error` (a full disk, no permission) as the same error of `path` (OSError gives the subclass
    of its errno: PermissionError, ...)."""
    return OSError(error.errno, error.strerror or str(error), str(path))


PARTIAL = ".partial"
# What a write cut short leaves: `.NAME.RANDOM.partial`, or `.NAME.RANDOM` (before the suffix was
# added) for the files qkv writes into run and data folders; and train's `.last.pt.link.tmp`.
_LEFT_BY_A_CRASH = re.compile(
    r"\..+\.[A-Za-z0-9_]{8}\.partial"
    r"|\.(checkpoint_\d+\.pt|last\.pt|best\.pt|metrics\.jsonl|curves\.png|config\.toml"
    r"|tokenizer\.model|prepare\.json|(train|val|test)\.[^.]+)\.[A-Za-z0-9_]{8}"
    r"|\.last\.pt\.link\.tmp"
)


def remove_partial_writes(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that writes cut short by a crash or a kill left in `folder` (they
    never replaced anything, and nothing reads them); returns them."""
    return _remove_matching(folder, _LEFT_BY_A_CRASH)


def remove_partial_writes_of(folder: str | os.PathLike, names) -> list[Path]:
    """Delete what writes of the files `names` into `folder`, cut short by a crash or a kill, left
    there (`.NAME.RANDOM.partial`); returns them. For folders that may hold others' files too."""
    names = "|".join(re.escape(name) for name in names)
    return _remove_matching(folder, re.compile(rf"\.({names})\.[A-Za-z0-9_]{{8}}\{PARTIAL}"))


def _remove_matching(folder: str | os.PathLike, pattern: re.Pattern) -> list[Path]:
    """Delete the files of `folder` whose whole name `pattern` matches; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = [p for p in folder.iterdir() if p.is_file() and pattern.fullmatch(p.name)]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def link_atomically(source: Path, target: Path) -> None:
    """Make `target` a hard link to `source`, replacing it in one rename (a copy where links fail)."""
    tmp = target.with_name(f".{target.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        atomic_write(target, lambda file: file.write(source.read_bytes()))
        return
    os.replace(tmp, target)


# ---------------------------------------------------------------------------------------------------
# Entry point
