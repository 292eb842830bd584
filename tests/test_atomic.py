"""Atomic writes (qkv.atomic) and where qkv refuses to write (qkv.outputs): a file is replaced in one
rename; a link keeps pointing where it did; a FIFO or a device is written into, never replaced."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from qkv.atomic import atomic_write
from qkv.errors import QkvError
from qkv.outputs import check_output_file


def test_a_file_is_replaced_whole_and_a_failed_write_leaves_it_as_it_was(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old\n")
    atomic_write(path, lambda file: file.write(b"new\n"))
    assert path.read_text() == "new\n"

    def half_then_fail(file):
        file.write(b"half")
        raise RuntimeError("cut short")

    with pytest.raises(RuntimeError):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]  # no temporary file left


def test_a_symbolic_link_stays_and_the_file_it_names_is_replaced(tmp_path):
    target, link = tmp_path / "target.txt", tmp_path / "link.txt"
    target.write_text("old\n")
    link.symlink_to(target.name)
    atomic_write(link, lambda file: file.write(b"new\n"))
    assert link.is_symlink() and os.readlink(link) == target.name
    assert target.read_text() == "new\n"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_written_into_not_replaced(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    atomic_write(fifo, lambda file: file.write(b"translated\n"))
    reader.join(timeout=30)
    assert received == [b"translated\n"]
    assert stat.S_ISFIFO(fifo.lstat().st_mode)  # still a FIFO, not a file renamed over it


def test_only_a_file_that_exists_needs_force(tmp_path):
    existing = tmp_path / "out.txt"
    existing.write_text("kept\n")
    with pytest.raises(QkvError, match="exists: pass --force"):
        check_output_file(existing)
    check_output_file(existing, force=True)
    check_output_file(tmp_path / "new.txt")
    check_output_file(os.devnull)  # a device: written into, nothing replaced
    with pytest.raises(QkvError, match="is also an input"):
        check_output_file(existing, inputs=[existing], force=True)
