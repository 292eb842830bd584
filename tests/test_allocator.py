"""CPU training's allocator setting (qkv.allocator): blocks of any size from glibc's heap, kept there.

Each check runs in a fresh process: the setting is for a whole process, and the test process itself
trains in other tests."""

import ctypes
import json
import platform
import subprocess
import sys

import pytest

from conftest import qkv_env
from qkv.allocator import DEFAULT_MALLOC_ENV

PROBE = """
import ctypes, json
import torch
from qkv.allocator import keep_large_blocks_on_the_heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
kept = keep_large_blocks_on_the_heap()
mapped_before = libc.mallinfo2().hblkhd
block = torch.ones(64 << 18)  # 64 MB: over glibc's largest mmap threshold (32 MB)
mapped = libc.mallinfo2().hblkhd - mapped_before
print(json.dumps({"kept": kept, "mapped": mapped, "sum": float(block.sum())}))
"""


def _has_mallinfo2() -> bool:
    if platform.libc_ver()[0] != "glibc":
        return False
    return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")  # glibc 2.33 and later


pytestmark = pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc 2.33+ (mallinfo2)")


def probe(**env: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env=qkv_env(**env), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_large_tensor_comes_from_the_heap_once_set():
    found = probe(**{DEFAULT_MALLOC_ENV: ""})
    assert found["kept"] is True
    assert found["mapped"] == 0  # no block of its own mapped for it
    assert found["sum"] == 64 << 18  # and it is memory like any other


def test_the_environment_variable_leaves_glibc_as_it_starts():
    found = probe(**{DEFAULT_MALLOC_ENV: "1"})
    assert found["kept"] is False
    assert found["mapped"] >= 64 << 20  # glibc mapped the block afresh, as it does by default
