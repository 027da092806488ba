"""Multi-host start-up: ``jax.distributed.initialize`` from explicit settings or the environment.

TPU pods, SLURM and other clusters describe the job in environment variables that
``jax.distributed.initialize()`` reads itself; a plain single process needs nothing. Explicit
settings (config or flags) win: ``coordinator_address`` ("host:port"), ``num_processes`` and
``process_id``. This must run before anything touches a JAX backend.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

__all__ = ["initialize", "cluster_from_environment", "compilation_cache", "allgather_rows"]

log = logging.getLogger(__name__)
_initialized = False

# Environment variables through which clusters describe a multi-process job to JAX.
_CLUSTER_ENV = (
    "JAX_COORDINATOR_ADDRESS",  # generic
    "TPU_WORKER_HOSTNAMES",  # Cloud TPU pods
    "MEGASCALE_COORDINATOR_ADDRESS",  # multi-slice TPU
    "OMPI_MCA_orte_hnp_uri",  # Open MPI
)


def cluster_from_environment() -> bool:
    """Whether the environment describes a multi-process job JAX can join on its own."""
    if any(os.environ.get(v) for v in _CLUSTER_ENV):
        return True
    # SLURM with more than one task.
    try:
        return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ
    except ValueError:
        return False


def initialize(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout: int = 300,
) -> bool:
    """Join a multi-process job if one is configured; returns whether JAX runs distributed.

    Idempotent. With no explicit coordinator and no cluster environment this does nothing.
    """
    global _initialized
    if _initialized:
        return True
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError(
                "a coordinator_address needs num_processes and process_id too "
                f"(got num_processes={num_processes}, process_id={process_id})"
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout,
        )
    elif cluster_from_environment():
        jax.distributed.initialize(initialization_timeout=timeout)
    else:
        return False
    _initialized = True
    log.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def compilation_cache(directory: str | None = None) -> str:
    """Turn on JAX's persistent compilation cache (``$DIFFUSION_JAX_CACHE`` or
    ``~/.cache/diffusion_jax/jax``): repeated compiles of a U-Net drop from seconds to a
    fraction of that."""
    directory = (
        directory
        or os.environ.get("DIFFUSION_JAX_CACHE")
        or os.path.join(os.path.expanduser("~"), ".cache", "diffusion_jax", "jax")
    )
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return directory


def _allgather_padded(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(every, counts)``: every process's rows of ``x`` padded to the longest, shape
    ``(processes, max rows, ...)``, and each process's row count."""
    counts = np.asarray(multihost_utils.process_allgather(np.int64(len(x)))).reshape(-1)
    padded = np.zeros((int(counts.max()), *x.shape[1:]), x.dtype)
    padded[: len(x)] = x
    return np.asarray(multihost_utils.process_allgather(padded)), counts


def allgather_rows(x: np.ndarray, *, strided: bool = False) -> np.ndarray:
    """Every process's rows of ``x`` on every process: concatenated in process order, or with
    ``strided`` interleaved (process ``p`` holds rows ``p, p + P, ...`` of the whole, as a data
    shard does), which restores the whole's order.

    The arrays may have different numbers of rows on different processes (the rest of the shape
    and the dtype must agree); on one process ``x`` is returned as it is.
    """
    x = np.asarray(x)
    procs = jax.process_count()
    if procs == 1:
        return x
    every, counts = _allgather_padded(x)
    if not strided:
        return np.concatenate([every[p, :n] for p, n in enumerate(counts)])
    total = int(counts.sum())
    if any(n != len(range(p, total, procs)) for p, n in enumerate(counts)):
        raise ValueError(f"row counts {counts.tolist()} are not those of strided shards of {total} rows")
    out = np.empty((total, *x.shape[1:]), x.dtype)
    for p, n in enumerate(counts):
        out[p::procs] = every[p, :n]
    return out
