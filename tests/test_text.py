"""Reading lines in chunks (`qkv.text`): a file `size` lines at a time, read as needed; standard
input as it arrives."""

import contextlib
import gzip
import os
import queue
import threading
from types import SimpleNamespace

import pytest

from qkv import text
from qkv.text import NotUtf8, arriving_chunks, line_chunks


def test_a_file_comes_in_chunks_of_its_size_read_only_as_they_are_asked_for(tmp_path, monkeypatch):
    path = tmp_path / "in.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as file:
        file.write("".join(f"line {number}\n" for number in range(1, 11)))
    read = []  # the raw lines taken from the file so far

    def counted(path):
        for line in raw_lines(path):
            read.append(line)
            yield line

    raw_lines = text._raw_lines
    monkeypatch.setattr(text, "_raw_lines", counted)
    chunks = line_chunks(path, 4)
    assert next(chunks) == ["line 1", "line 2", "line 3", "line 4"]
    assert len(read) == 4  # nothing of the next chunk yet: memory holds one chunk
    assert next(chunks) == [f"line {number}" for number in range(5, 9)]
    assert len(read) == 8
    assert list(chunks) == [["line 9", "line 10"]]


def test_a_line_that_is_not_utf8_comes_after_the_lines_before_it_in_their_chunk(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(b"a\nb\nc\n\xff\nd\n")
    chunks = line_chunks(path, 2)
    assert next(chunks) == ["a", "b"]
    assert next(chunks) == ["c"]
    with pytest.raises(NotUtf8, match=r"in\.txt:4: not valid UTF-8"):
        next(chunks)


class CountedQueue(queue.Queue):
    """The reader's queue, which says how many lines (and ends) the reading thread has put in it."""

    def __init__(self, maxsize: int = 0):
        super().__init__(maxsize)
        self.puts = 0
        self.changed = threading.Condition()

    def put(self, item, block=True, timeout=None):
        super().put(item, block, timeout)
        with self.changed:
            self.puts += 1
            self.changed.notify_all()

    def wait_for(self, puts: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.puts >= puts, timeout=30), self.puts


@contextlib.contextmanager
def chunks_of_a_pipe(max_lines: int):
    """`arriving_chunks` of a pipe's reading end, and its writing end: standard input, piped."""
    read_end, write_end = os.pipe()
    stream, pipe = os.fdopen(read_end, "rb"), os.fdopen(write_end, "wb")
    try:
        yield arriving_chunks(stream, max_lines=max_lines), pipe
    finally:
        pipe.close()
        stream.close()


def test_standard_input_comes_as_it_arrives_at_most_max_lines_at_a_time(monkeypatch):
    queues: list[CountedQueue] = []

    def counted_queue(maxsize: int = 0) -> CountedQueue:
        queues.append(CountedQueue(maxsize))
        return queues[-1]

    # qkv.text's own name only: other threads of the process keep the queue module as it is
    monkeypatch.setattr(text, "queue", SimpleNamespace(Queue=counted_queue, Empty=queue.Empty))
    with chunks_of_a_pipe(max_lines=4) as (chunks, pipe):
        pipe.write(b"one\n")
        pipe.flush()
        # The pipe stays open: the first line comes out before the next is written.
        assert next(chunks) == ["one"]
        pipe.write(b"".join(f"{number}\n".encode() for number in range(2, 9)))
        pipe.flush()
        queues[0].wait_for(8)  # all seven have arrived: they come 4, then the other 3
        assert next(chunks) == ["2", "3", "4", "5"]
        assert next(chunks) == ["6", "7", "8"]
        pipe.write(b"last\n")
        pipe.close()  # the end of the input: the reading thread reads to it
        assert list(chunks) == [["last"]]
