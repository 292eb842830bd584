"""Timing shared by the benchmark scripts (run as `python benchmarks/NAME.py`, which puts this folder on
the import path)."""

from __future__ import annotations

import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

AS_AVX2 = "--as-avx2"
AS_AVX2_HELP = (
    "run every system as on an AVX2 CPU without bf16 (AMD Zen 3): this script again in a new process "
    "with qkv.hardware.AVX2_ENVIRONMENT and CT2_FORCE_CPU_ISA=AVX2 set"
)


def run_as_avx2_if_asked(also: dict | None = None) -> None:
    """With --as-avx2 on the command line: replace this process by the same command with oneDNN, ATen,
    MKL and CTranslate2 held to AVX2 (they read these variables once, when they start, so the
    variables must be there before torch is imported). `also`: more variables this process must
    start with, asked or not. Call it first thing in main."""
    from qkv.hardware import AVX2_ENVIRONMENT

    wanted = dict(also or {})
    if AS_AVX2 in sys.argv[1:]:
        wanted.update(AVX2_ENVIRONMENT, CT2_FORCE_CPU_ISA="AVX2")
    if all(os.environ.get(k) == v for k, v in wanted.items()):
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **wanted})


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


# Runs in different processes take turns. OpenMP's threads (PyTorch's and CTranslate2's libgomp) spin
# 3-6 ms after their last parallel work before they sleep, and would take the next run's cores: both
# systems were 1.6-1.9x slower with 0-3 ms between turns. A longer pause let them sleep, but on this
# virtual machine idle cores came back slow at times: with 20 ms between turns one search in three or
# so took twice as long, whichever system it was (CTranslate2 alone too; steady without pauses). So the
# processes start with a short spin (GOMP_SPINCOUNT 20000: well under a millisecond, longer than any
# gap between parallel regions of one search) and the turns are 2 ms apart: steady, and each system as
# fast as when alone (benchmarks/README.md, "Taking turns").
SHORT_SPIN = {"GOMP_SPINCOUNT": "20000"}
PAUSE_SECONDS = 0.002


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


class WorkerTurns:
    """A system in a process of its own (`command`), called like the runs in this process: the
    worker prints a JSON line when it is ready (`ready`), then, for each line it reads, times one run
    and prints {"seconds": ...}; each call returns those seconds (`Measured`, without the pipe's
    time), so that it takes turns with the others. `what` names it if it fails."""

    def __init__(self, command: list[str], what: str):
        self.what = what
        # Read only if the worker fails; closed by __exit__, as the pipes are.
        self.errors = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors, text=True
        )
        self.ready = self._reply()

    def _reply(self) -> dict:
        for line in self.process.stdout:
            if line.startswith("{"):
                return json.loads(line)
        self.process.wait()
        self.errors.seek(0)
        raise SystemExit(f"{self.what} failed:\n{self.errors.read()[-4000:]}")

    def __call__(self) -> Measured:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return Measured(self._reply()["seconds"])

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.process.stdin.close()  # the worker's loop ends
        self.process.wait(timeout=60)
        self.process.stdout.close()
        self.errors.close()
