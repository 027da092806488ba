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


def print_result(result: dict) -> None:
    """How a measurement child hands its result to :func:`run_child`: one ``RESULT <json>`` line."""
    import json

    print("RESULT " + json.dumps(result), flush=True)


def run_child(script: str, argv: list[str], *, timeout: int, cwd, env: dict | None = None) -> dict:
    """Run ``python script *argv`` in a fresh process (so its peak RSS is its own) and return the
    object it passed to :func:`print_result`; a failed child raises with the end of its stderr."""
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, script, *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark child {' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])
