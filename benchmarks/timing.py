"""Timing shared by the benchmark scripts (run as `python benchmarks/NAME.py`, which puts this folder on
the import path)."""

from __future__ import annotations

import statistics
import time


def interleaved_median_seconds(runs: dict, repeats: int) -> dict:
    """Median seconds of each run, the runs taking turns `repeats` times after one warm-up call each: on
    a machine whose speed drifts (a shared host), each run sees the same drift, so ratios hold still."""
    for run in runs.values():
        run()
    times: dict = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
