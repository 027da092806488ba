"""Streaming feature statistics (mean and covariance) and reference-statistics files.

FID needs the mean and covariance of a detector's features over tens of thousands of images,
which arrive in batches, possibly on several hosts. :class:`MomentState` holds the count, the
mean and the scatter matrix ``M2 = sum_i (x_i - mean)(x_i - mean)^T`` in float64, and
:func:`merge_moments` combines two states with the pairwise update of Chan, Golub & LeVeque
(1979, "Updating formulae and a pairwise algorithm for computing sample variances"):

    n = n_a + n_b,  delta = mean_b - mean_a,
    mean = mean_a + delta * n_b / n,
    M2 = M2_a + M2_b + delta delta^T * n_a n_b / n.

The merge is exact in exact arithmetic, so the statistics do not depend on how the data were cut
into batches or hosts (in float64 they agree to rounding), and it is stable (no ``E[x x^T] -
mean mean^T`` cancellation). ``update`` is ``merge`` with the statistics of one batch. This is
optax's init/update pattern: pure functions over a NamedTuple state.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

__all__ = [
    "MomentState",
    "Statistics",
    "init_moments",
    "update_moments",
    "merge_moments",
    "finalize_moments",
    "statistics_of",
    "ReferenceStatistics",
    "save_reference_statistics",
    "load_reference_statistics",
    "ReferenceMismatchError",
]


class MomentState(NamedTuple):
    """n: number of rows seen; mean: (D,) float64; m2: (D, D) float64 scatter matrix."""

    n: int
    mean: np.ndarray
    m2: np.ndarray


class Statistics(NamedTuple):
    """mu: (D,) mean; sigma: (D, D) unbiased covariance (``np.cov``, ddof 1); num_samples: rows."""

    mu: np.ndarray
    sigma: np.ndarray
    num_samples: int


def init_moments(dim: int) -> MomentState:
    return MomentState(0, np.zeros(dim), np.zeros((dim, dim)))


def _batch_moments(features: np.ndarray) -> MomentState:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    mean = x.mean(axis=0)
    centred = x - mean
    return MomentState(len(x), mean, centred.T @ centred)


def merge_moments(a: MomentState, b: MomentState) -> MomentState:
    """The state of the union of the rows of ``a`` and ``b`` (Chan et al. 1979, eq. 2.1b)."""
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"cannot merge statistics of dimension {a.mean.shape[0]} and {b.mean.shape[0]}")
    if a.n == 0:
        return b
    if b.n == 0:
        return a
    n = a.n + b.n
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.n / n)
    m2 = a.m2 + b.m2 + np.outer(delta, delta) * (a.n * b.n / n)
    return MomentState(n, mean, m2)


def update_moments(state: MomentState, features: np.ndarray) -> MomentState:
    """Adds a batch ``features`` (N, D) to ``state``."""
    if len(features) == 0:
        return state
    return merge_moments(state, _batch_moments(features))


def finalize_moments(state: MomentState) -> Statistics:
    if state.n < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {state.n}")
    return Statistics(state.mean.copy(), state.m2 / (state.n - 1), int(state.n))


def statistics_of(features: np.ndarray) -> Statistics:
    """Mean and covariance of all rows of ``features`` (N, D) in float64."""
    return finalize_moments(_batch_moments(features))


class ReferenceMismatchError(ValueError):
    """Reference statistics made with another detector or preprocessing."""


class ReferenceStatistics(NamedTuple):
    """Statistics of a data set plus how they were made (``detector``, ``preprocessing``: e.g.
    ``"inception"`` and ``"pytorch_fid"``)."""

    stats: Statistics
    detector: str
    preprocessing: str


def save_reference_statistics(path: str | os.PathLike, ref: ReferenceStatistics) -> None:
    """Writes ``.npz`` with ``mu``, ``sigma``, ``count``, ``detector``, ``preprocessing``."""
    np.savez(
        path,
        mu=ref.stats.mu,
        sigma=ref.stats.sigma,
        count=np.int64(ref.stats.num_samples),
        detector=np.str_(ref.detector),
        preprocessing=np.str_(ref.preprocessing),
    )


def load_reference_statistics(
    path: str | os.PathLike, *, detector: str | None = None, preprocessing: str | None = None
) -> ReferenceStatistics:
    """Reads a file of :func:`save_reference_statistics`. With ``detector`` / ``preprocessing``
    given, a file made otherwise is refused: FIDs across detectors or resize modes are not
    comparable."""
    with np.load(path) as data:
        missing = [k for k in ("mu", "sigma", "count", "detector", "preprocessing") if k not in data.files]
        if missing:
            raise ValueError(f"{os.fspath(path)!r} is not a reference-statistics file: it lacks {missing}")
        ref = ReferenceStatistics(
            Statistics(data["mu"].astype(np.float64), data["sigma"].astype(np.float64), int(data["count"])),
            str(data["detector"]),
            str(data["preprocessing"]),
        )
    for what, want, have in (("detector", detector, ref.detector), ("preprocessing", preprocessing, ref.preprocessing)):
        if want is not None and want != have:
            raise ReferenceMismatchError(
                f"reference statistics {os.fspath(path)!r} were computed with {what} {have!r}, but the samples use "
                f"{want!r}; FIDs across detectors or resize modes are not comparable. Recompute the reference "
                f"statistics with {what} {want!r}."
            )
    return ref
