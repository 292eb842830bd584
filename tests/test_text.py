"""Reading lines in chunks (`qkv.text`): a file `size` lines at a time, read as needed; standard
input as it arrives."""

import contextlib
import gzip
import os
import queue
import signal
import threading
import time
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


class Interrupted(Exception):
    """What this test's SIGINT handler raises (the worker's own handler may ignore the signal)."""


def interrupted(number, frame):
    raise Interrupted


def test_ctrl_c_given_to_another_thread_ends_the_wait_for_input(monkeypatch):
    """The kernel may give a signal sent to the process to any thread; Python runs its handler in
    the main thread only. Here the signal goes to another thread while the main thread waits for a
    line that never comes: the handler must run before the safety line, written long after."""
    monkeypatch.setattr(text, "ARRIVAL_WAIT", 0.05)
    before = signal.signal(signal.SIGINT, interrupted)
    safety_written, finished = threading.Event(), threading.Event()
    try:
        with chunks_of_a_pipe(max_lines=4) as (chunks, pipe):

            def signal_then_safety() -> None:
                time.sleep(0.3)  # the main thread is waiting by then
                signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # to this thread
                if finished.wait(timeout=30):  # the test ended: the pipe is closed
                    return
                safety_written.set()
                pipe.write(b"safety\n")  # wakes a main thread that never ran the handler
                pipe.flush()

            threading.Thread(target=signal_then_safety, daemon=True).start()
            with pytest.raises(Interrupted):
                next(chunks)
            assert not safety_written.is_set()
    finally:
        finished.set()
        signal.signal(signal.SIGINT, before)
