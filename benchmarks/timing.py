"""Timing shared by the benchmark scripts (run as `python benchmarks/NAME.py`, which puts this folder on
the import path)."""

from __future__ import annotations

import ctypes
import os
import statistics
import sys
import time

AS_AVX2 = "--as-avx2"
AS_AVX2_HELP = (
    "run every system as on an AVX2 CPU without bf16 (AMD Zen 3): this script again in a new process "
    "with qkv.hardware.AVX2_ENVIRONMENT and CT2_FORCE_CPU_ISA=AVX2 set"
)


def run_as_avx2_if_asked() -> None:
    """With --as-avx2 on the command line: replace this process by the same command with oneDNN, ATen,
    MKL and CTranslate2 held to AVX2 (they read these variables once, when they start, so the
    variables must be there before torch is imported). Call it first thing in main."""
    from qkv.hardware import AVX2_ENVIRONMENT

    limits = {**AVX2_ENVIRONMENT, "CT2_FORCE_CPU_ISA": "AVX2"}
    if AS_AVX2 not in sys.argv[1:] or all(os.environ.get(k) == v for k, v in limits.items()):
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **limits})


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def settle_allocator() -> bool:
    """Fix glibc's allocator in the state it drifts to anyway: blocks up to 32 MB (glibc's largest mmap
    threshold) come from the heap, and freed memory is kept rather than handed back to the system.

    By default glibc starts by mapping every block over 128 KB afresh (new pages, page faults) and raises
    that threshold as large blocks are freed, so a system that allocates large tensors at every step
    speeds up as the process ages: Hugging Face's beam search ran at 64-86 sentences/s when timed first
    in a process, and at 86-96 after other work or with the allocator settled. Settled from the start,
    every system is timed in the same, fastest state, whatever ran before it. Returns False where there
    is no glibc (nothing is changed then)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    return bool(mmap_ok and trim_ok)


# Between two turns of runs in different processes: OpenMP's threads (PyTorch's and CTranslate2's
# libgomp) spin a few milliseconds after their last parallel work before they sleep, and would take the
# next run's cores meanwhile.
PAUSE_SECONDS = 0.02


class Measured(float):
    """Seconds a run measured itself (a run in another process, timed there): what
    `interleaved_median_seconds` takes instead of its own clock, which would add the pipe's time."""


def interleaved_median_seconds(runs: dict, repeats: int, pause: float = 0.0) -> dict:
    """Median seconds of each run, the runs taking turns `repeats` times after one warm-up call each: on
    a machine whose speed drifts (a shared host), each run sees the same drift, so ratios hold still.
    A run that returns `Measured` seconds is timed by that figure; `pause` seconds pass before each."""
    for run in runs.values():
        run()
    times: dict = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            time.sleep(pause)
            start = time.perf_counter()
            result = run()
            elapsed = time.perf_counter() - start
            times[name].append(result if isinstance(result, Measured) else elapsed)
    return {name: statistics.median(values) for name, values in times.items()}
