"""Timing and memory helpers shared by the benchmark scripts in this folder."""

from __future__ import annotations

import statistics
import time


def max_rss_mb() -> float:
    """Peak resident memory of this process so far, MB (``getrusage`` reports kB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def median_seconds(fn, repeats: int, warmup: int = 0):
    """``(median wall seconds of `repeats` calls of fn() after `warmup` untimed calls, last output)``.
    ``fn`` must block until its result is ready (``jax.block_until_ready`` for jitted calls)."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out
