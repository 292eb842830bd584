"""Reading text files: UTF-8 lines, plain or gzipped, with errors that name the file and the line;
whole (`read_lines`), a chunk at a time (`line_chunks`), or as they arrive on stdin (`arriving_chunks`).

Its own module so that the tokenizer and the data pipeline both read text without importing each
other."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import queue
import threading
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

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
    with _reading(path) as file:
        return file.read()


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[BinaryIO]:
    """`path` open for reading bytes, gunzipped if it ends in .gz, its errors said as QkvErrors
    naming it (missing, a folder, unreadable, not gzip)."""
    try:
        file = gzip.open(path) if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise QkvError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise QkvError(f"{path}: is a directory, not a text file") from None
    except OSError as error:
        raise QkvError(f"{path}: cannot read ({error.strerror})") from None
    with file:
        try:
            yield file
        except (OSError, EOFError, zlib.error) as error:
            if path.suffix == ".gz":
                raise QkvError(f"{path}: not a valid gzip file ({error})") from None
            raise QkvError(f"{path}: cannot read ({error})") from None


# --- Reading as the lines come: `qkv translate` on a large file, a pipe or a person typing -------------


class NotUtf8(QkvError):
    """A line that is not UTF-8: `name:line: not valid UTF-8`. The lines before it are good."""


def _decoded(raw_lines: Iterable[bytes], name: str) -> Iterator[str]:
    """UTF-8 lines as `decode_lines` makes them (split on "\n" only, "\r" and a first BOM removed),
    one at a time; a line that is not UTF-8 raises an error naming it."""
    for number, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise NotUtf8(f"{name}:{number}: not valid UTF-8") from None
        if number == 1:
            line = line.removeprefix("\ufeff")
        yield line.removesuffix("\n").removesuffix("\r")


def _chunked(lines: Iterator[str], size: int) -> Iterator[list[str]]:
    """Lists of `size` lines (the last may be shorter). An error while reading comes after the chunk
    of the lines before it, so that those are translated."""
    chunk: list[str] = []
    try:
        for line in lines:
            chunk.append(line)
            if len(chunk) == size:
                yield chunk
                chunk = []
    except NotUtf8:
        if chunk:
            yield chunk
        raise
    if chunk:
        yield chunk


def _raw_lines(path: Path) -> Iterator[bytes]:
    with _reading(path) as file:
        yield from file


def count_lines(path: str | Path) -> int:
    """The number of lines of a text file (plain or .gz), read once without decoding: a progress
    bar's total."""
    return sum(1 for _ in _raw_lines(Path(path)))


def line_chunks(path: str | Path, size: int) -> Iterator[list[str]]:
    """The lines of a UTF-8 text file (plain or .gz), `size` at a time, read as they are needed, so
    that memory holds one chunk whatever the file's size. A line that is not UTF-8 raises an error
    naming the file and line, after the chunk of the lines before it."""
    path = Path(path)
    return _chunked(_decoded(_raw_lines(path), str(path)), size)


_END = object()


def _lines_of(stream: BinaryIO) -> Iterator[bytes]:
    """The lines of `stream`, each with its "\n", read from its file descriptor where it has one. A
    thread waiting in the buffered reader's `readline` holds that reader's lock, and an interpreter
    that exits meanwhile (an error in the main thread) aborted on it, 3 times in 30 ("could not
    acquire lock for <_io.BufferedReader name='<stdin>'> at interpreter shutdown"); a thread waiting
    in `os.read` holds nothing of Python's. Nothing else may have read from the stream before."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        yield from iter(stream.readline, b"")
        return
    pending: list[
        bytes
    ] = []  # the start of a line still arriving, in pieces (a long line: no copies)
    while data := os.read(fd, 1 << 16):
        *lines, rest = data.split(b"\n")
        if lines:
            lines[0] = b"".join([*pending, lines[0]])
            pending = []
            for line in lines:
                yield line + b"\n"
        pending.append(rest)
    if tail := b"".join(pending):
        yield tail


def arriving_chunks(stream: BinaryIO, max_lines: int, name: str = "stdin") -> Iterator[list[str]]:
    """The lines of `stream` (stdin) as they arrive: each chunk is every line that has arrived by the
    time the caller asks (at least one, at most `max_lines`). A person typing gets each line back as
    soon as it is translated; a fast pipe still fills whole batches. A line that is not UTF-8 raises
    an error naming it, after the lines before it."""
    arrived: queue.Queue = queue.Queue(
        maxsize=4 * max_lines
    )  # a fast pipe waits for the translator

    def read() -> None:
        try:
            for line in _decoded(_lines_of(stream), name):
                arrived.put(line)
            arrived.put(_END)
        except NotUtf8 as error:
            arrived.put(error)

    threading.Thread(target=read, name="qkv-read-stdin", daemon=True).start()
    finished = False
    while not finished:
        chunk: list[str] = []
        item = arrived.get()  # wait for the first line
        while True:
            if item is _END:
                finished = True
                break
            if isinstance(item, NotUtf8):
                if chunk:
                    yield chunk
                raise item
            chunk.append(item)
            if len(chunk) == max_lines:
                break
            try:
                item = arrived.get_nowait()  # and take what else is there already
            except queue.Empty:
                break
        if chunk:
            yield chunk
