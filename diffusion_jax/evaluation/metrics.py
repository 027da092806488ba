"""Sample-quality metrics as pure functions of detector features.

* FID (Heusel et al. 2017): the Frechet distance between Gaussians fitted to two feature sets,
  ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^(1/2) S2 S1^(1/2))^(1/2))``.
* KID (Binkowski et al. 2018, "Demystifying MMD GANs"): the unbiased estimate of the squared MMD
  with the polynomial kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets.
* Inception score (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` per split.
* Improved precision and recall (Kynkaanniemi et al. 2019): the fraction of generated samples
  inside the real k-nearest-neighbour manifold, and of real samples inside the generated one.

Everything is computed in float64 on the host except the pairwise distances of precision and
recall, which run on device in blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.evaluation.stats import Statistics, statistics_of

__all__ = [
    "trace_sqrt_product",
    "frechet_distance",
    "fid_from_features",
    "FIDResult",
    "fid_at_counts",
    "KIDResult",
    "kernel_inception_distance",
    "InceptionScore",
    "inception_score",
    "PrecisionRecall",
    "precision_recall",
]


def _sym_sqrt(s: np.ndarray) -> np.ndarray:
    """S^(1/2) of a symmetric positive semi-definite matrix through eigh; negative eigenvalues
    (rounding of a singular covariance) are clipped to 0, so the result is real."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)) for covariances S1, S2.

    S1 S2 is similar to the symmetric PSD matrix M = S1^(1/2) S2 S1^(1/2), so its square root has
    the eigenvalues sqrt(eig(M)) >= 0: two symmetric eigendecompositions, no SciPy, never complex
    (unlike ``scipy.linalg.sqrtm(S1 @ S2)``, which can return tiny imaginary parts).
    """
    r = _sym_sqrt(np.asarray(sigma1, np.float64))
    m = r @ np.asarray(sigma2, np.float64) @ r
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID on pool3 features)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


class FIDResult(NamedTuple):
    """FID with the number of generated samples it used (FID is biased upward at small counts, so
    numbers are comparable only at equal ``num_samples``) and the reference's number."""

    fid: float
    num_samples: int
    reference_num_samples: int


def fid_from_features(features: np.ndarray, reference: Statistics) -> FIDResult:
    """FID of features (N, D) against reference statistics."""
    s = statistics_of(features)
    return FIDResult(
        frechet_distance(s.mu, s.sigma, reference.mu, reference.sigma), s.num_samples, reference.num_samples
    )


def fid_at_counts(
    features: np.ndarray, reference: Statistics, counts: Sequence[int] = (1000, 5000, 10000, 50000)
) -> dict[int, FIDResult]:
    """FID of the first ``n`` feature rows for each ``n`` in ``counts`` (those not above N), from
    one set of features: shows the small-sample bias next to the headline number. The first rows
    are used, so shuffle the samples beforehand if their order is not random."""
    n_total = len(features)
    usable = sorted({int(n) for n in counts if 2 <= int(n) <= n_total})
    if not usable:
        raise ValueError(f"none of the counts {list(counts)} fits the {n_total} feature rows")
    return {n: fid_from_features(features[:n], reference) for n in usable}


class KIDResult(NamedTuple):
    """Mean and standard deviation of the unbiased MMD^2 over ``num_subsets`` subsets."""

    kid: float
    std: float
    num_subsets: int
    subset_size: int


def _polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3) with k(a, b) = (a.b / d + 1)^3: the diagonals of
    K_xx and K_yy are left out, K_xy is averaged over all m^2 pairs."""
    m, d = x.shape
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))
    return float(off(kxx) + off(kyy) - 2.0 * kxy.mean())


def kernel_inception_distance(
    features_a: np.ndarray,
    features_b: np.ndarray,
    *,
    key: jax.Array,
    num_subsets: int = 100,
    subset_size: int = 1000,
) -> KIDResult:
    """KID: the unbiased polynomial-kernel MMD^2 between random subsets of ``subset_size`` rows of
    each set (drawn without replacement from ``key``), mean and std over ``num_subsets``.
    ``subset_size`` is capped at the smaller set's size."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D, got {a.shape} and {b.shape}")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 rows per set, got {len(a)} and {len(b)}")
    values = []
    for k in jax.random.split(key, num_subsets):
        ka, kb = jax.random.split(k)
        ia = np.asarray(jax.random.permutation(ka, len(a))[:m])
        ib = np.asarray(jax.random.permutation(kb, len(b))[:m])
        values.append(_polynomial_mmd2_unbiased(a[ia], b[ib]))
    v = np.asarray(values)
    return KIDResult(float(v.mean()), float(v.std()), num_subsets, m)


class InceptionScore(NamedTuple):
    """Mean and standard deviation of the score over ``num_splits`` contiguous splits."""

    mean: float
    std: float
    num_splits: int


def inception_score(logits: np.ndarray, *, num_splits: int = 10) -> InceptionScore:
    """Inception score from logits (N, C): for each of ``num_splits`` contiguous splits
    (``numpy.array_split`` order), ``exp(mean_x KL(p(y|x) || p(y)))`` with p(y) the split's mean
    of p(y|x) = softmax(logits). Pass the detector's ``logits`` (with the fc bias, as pytorch-style
    code does) or ``logits_unbiased`` (the original TF code's ``pool3 @ W``). std is numpy's
    (ddof 0), as in Salimans et al.'s code."""
    z = np.asarray(logits, np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits must be (N, classes), got shape {z.shape}")
    if not 1 <= num_splits <= len(z):
        raise ValueError(f"num_splits must be in [1, {len(z)}], got {num_splits}")
    log_p = z - z.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    scores = []
    for part in np.array_split(log_p, num_splits):
        p = np.exp(part)
        with np.errstate(divide="ignore"):
            log_py = np.log(p.mean(axis=0))
        # 0 log 0 = 0: a class no example of the split gives any probability adds nothing.
        kl = np.where(p > 0, p * (part - np.where(np.isfinite(log_py), log_py, 0.0)), 0.0)
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    s = np.asarray(scores)
    return InceptionScore(float(s.mean()), float(s.std()), num_splits)


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float
    k: int


@jax.jit
def _sq_dists(a: jax.Array, b: jax.Array) -> jax.Array:
    hi = jax.lax.Precision.HIGHEST
    d = jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2.0 * jnp.matmul(a, b.T, precision=hi)
    return jnp.maximum(d, 0.0)


def _blocks(n: int, size: int):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _knn_radii(x: jax.Array, k: int, block: int) -> np.ndarray:
    """Squared distance from each row to its k-th nearest other row (the row itself is 0th)."""
    out = []
    for lo, hi in _blocks(len(x), block):
        d = _sq_dists(x[lo:hi], x)
        out.append(np.asarray(-jax.lax.top_k(-d, k + 1)[0][:, k]))
    return np.concatenate(out)


def _coverage(queries: jax.Array, centres: jax.Array, radii: np.ndarray, block: int) -> float:
    """Fraction of ``queries`` within the radius of at least one centre."""
    r = jnp.asarray(radii)
    inside = 0
    for lo, hi in _blocks(len(queries), block):
        inside += int(jnp.sum(jnp.any(_sq_dists(queries[lo:hi], centres) <= r[None, :], axis=1)))
    return inside / len(queries)


def precision_recall(real: np.ndarray, fake: np.ndarray, *, k: int = 3, block_size: int = 1024) -> PrecisionRecall:
    """Improved precision and recall (Kynkaanniemi et al. 2019, eqs. 1-3): each set's manifold is
    the union of balls around its points with radius the distance to the k-th nearest neighbour
    in the same set (k = 3 in the paper); precision = fraction of ``fake`` inside the real
    manifold, recall = fraction of ``real`` inside the fake manifold. Distances are computed in
    float32 on device, ``block_size`` rows at a time."""
    r = jnp.asarray(real, jnp.float32)
    f = jnp.asarray(fake, jnp.float32)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D, got {r.shape} and {f.shape}")
    if min(len(r), len(f)) <= k:
        raise ValueError(f"each set needs more than k = {k} rows, got {len(r)} and {len(f)}")
    precision = _coverage(f, r, _knn_radii(r, k, block_size), block_size)
    recall = _coverage(r, f, _knn_radii(f, k, block_size), block_size)
    return PrecisionRecall(precision, recall, k)
