"""Reading text files: UTF-8 lines, plain or gzipped, with errors that name the file and the line.

Its own module so that the tokenizer and the data pipeline both read text without importing each
other."""

from __future__ import annotations

import gzip
import sys
import zlib
from pathlib import Path

from qkv.errors import QkvError


def read_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file (plain or `.gz`), without line endings."""
    path = Path(path)
    lines, error = decode_lines(_read_bytes(path), str(path))
    if error is not None:
        raise error
    return lines


def decode_lines(data: bytes, name: str) -> tuple[list[str], QkvError | None]:
    """The lines of UTF-8 text, without line endings, up to the first line that is not valid UTF-8,
    and then an error naming it (`name:line: not valid UTF-8`), else None."""
    error = None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as bad:
        line_start = data.rfind(b"\n", 0, bad.start) + 1
        text = data[:line_start].decode("utf-8")
        line = data.count(b"\n", 0, bad.start) + 1
        error = QkvError(f"{name}:{line}: not valid UTF-8")
    # Split on "\n" only: str.splitlines() would also break at \x1c, \u2028 and friends, which
    # appear inside real sentences and would shift one side of a parallel corpus against the other.
    lines = text.removeprefix("\ufeff").split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines], error


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise QkvError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise QkvError(f"{path}: is a directory, not a text file") from None
    except OSError as error:
        raise QkvError(f"{path}: cannot read ({error.strerror})") from None
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise QkvError(f"{path}: not a valid gzip file ({error})") from None


def read_stdin() -> tuple[list[str], QkvError | None]:
    """The lines of stdin up to the first that is not UTF-8, and the error naming it (or None): the
    lines before a bad one still count, as a file's do in `decode_lines`."""
    return decode_lines(sys.stdin.buffer.read(), "stdin")
