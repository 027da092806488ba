"""Feature extraction over a device mesh, streaming statistics and reference statistics.

Data parallelism is a sharding of the batch: the detector's ``apply`` is jitted with the
parameters replicated and the batch split over the mesh axis ``"data"``, so the same code runs
on one CPU, eight simulated devices or a GPU host. Images arrive as an array or an iterable of
batches of any size; they are regrouped into batches of ``batch_size`` (a multiple of the
number of devices), the last one padded with zeros and the padding dropped from the outputs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_jax.evaluation import metrics as metrics_lib
from diffusion_jax.evaluation import stats as stats_lib
from diffusion_jax.evaluation.detectors import Detector, DetectorOutputs

__all__ = [
    "make_mesh",
    "iter_outputs",
    "extract_features",
    "feature_statistics",
    "compute_reference_statistics",
    "SampleMetrics",
    "evaluate_samples",
    "check_reference",
    "metrics_of_outputs",
]


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-d mesh with axis ``"data"`` over ``devices`` (default: this process's devices, so that
    with several processes each extracts the features of its own images)."""
    devs = np.asarray(list(devices) if devices is not None else jax.local_devices())
    return Mesh(devs, ("data",))


@functools.lru_cache(maxsize=16)
def _jitted(apply, mesh: Mesh):
    batch = NamedSharding(mesh, P("data"))
    return jax.jit(apply, in_shardings=(NamedSharding(mesh, P()), batch), out_shardings=batch)


def _rebatch(images: np.ndarray | Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    chunks = [images] if isinstance(images, np.ndarray | jax.Array) else images
    buffer: list[np.ndarray] = []
    held = 0
    for chunk in chunks:
        chunk = np.asarray(chunk)
        start = 0
        while start < len(chunk):
            take = min(batch_size - held, len(chunk) - start)
            buffer.append(chunk[start : start + take])
            held += take
            start += take
            if held == batch_size:
                yield np.concatenate(buffer)
                buffer, held = [], 0
    if held:
        yield np.concatenate(buffer)


def iter_outputs(
    detector: Detector,
    images: np.ndarray | Iterable[np.ndarray],
    *,
    batch_size: int = 200,
    mesh: Mesh | None = None,
) -> Iterator[DetectorOutputs]:
    """Detector outputs (host numpy, float32) per batch of ``batch_size`` images (B, H, W, C)
    in [0, 1]; ``batch_size`` must divide over the mesh's devices."""
    mesh = mesh if mesh is not None else make_mesh()
    n_dev = mesh.devices.size
    if batch_size % n_dev:
        raise ValueError(f"batch_size {batch_size} does not divide over the {n_dev} devices of the mesh")
    fn = _jitted(detector.apply, mesh)
    params = jax.device_put(detector.params, NamedSharding(mesh, P()))
    batch_sharding = NamedSharding(mesh, P("data"))
    for batch in _rebatch(images, batch_size):
        n = len(batch)
        if n < batch_size:  # one compiled shape: pad the last batch, drop the padding below
            batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)])
        out = fn(params, jax.device_put(np.asarray(batch, np.float32), batch_sharding))
        yield DetectorOutputs(*(np.asarray(o)[:n] for o in out))


def extract_features(
    detector: Detector,
    images: np.ndarray | Iterable[np.ndarray],
    *,
    batch_size: int = 200,
    mesh: Mesh | None = None,
) -> DetectorOutputs:
    """All outputs, concatenated: features (N, D), logits and logits_unbiased (N, classes)."""
    parts = list(iter_outputs(detector, images, batch_size=batch_size, mesh=mesh))
    if not parts:
        raise ValueError("no images to extract features from")
    return DetectorOutputs(*(np.concatenate(p) for p in zip(*parts)))


def feature_statistics(
    detector: Detector,
    images: np.ndarray | Iterable[np.ndarray],
    *,
    batch_size: int = 200,
    mesh: Mesh | None = None,
) -> stats_lib.Statistics:
    """Mean and covariance of the features, accumulated batch by batch in float64 (memory
    independent of the number of images)."""
    state = stats_lib.init_moments(detector.feature_dim)
    for out in iter_outputs(detector, images, batch_size=batch_size, mesh=mesh):
        state = stats_lib.update_moments(state, out.features)
    return stats_lib.finalize_moments(state)


def compute_reference_statistics(
    detector: Detector,
    images: np.ndarray | Iterable[np.ndarray],
    path: str | os.PathLike | None = None,
    *,
    batch_size: int = 200,
    mesh: Mesh | None = None,
) -> stats_lib.ReferenceStatistics:
    """A data set's statistics, computed once and written to ``path`` (``.npz``) if given."""
    ref = stats_lib.ReferenceStatistics(
        feature_statistics(detector, images, batch_size=batch_size, mesh=mesh), detector.name, detector.preprocessing
    )
    if path is not None:
        stats_lib.save_reference_statistics(path, ref)
    return ref


class SampleMetrics(NamedTuple):
    """fid: at all samples; fid_at_counts: at the standard counts that fit; inception_score and
    inception_score_unbiased: with and without the logit bias; kid and precision_recall: only
    when real features were given (else None)."""

    fid: metrics_lib.FIDResult
    fid_at_counts: dict[int, metrics_lib.FIDResult]
    inception_score: metrics_lib.InceptionScore
    inception_score_unbiased: metrics_lib.InceptionScore
    kid: metrics_lib.KIDResult | None
    precision_recall: metrics_lib.PrecisionRecall | None


def evaluate_samples(
    detector: Detector,
    samples: np.ndarray | Iterable[np.ndarray],
    reference: stats_lib.ReferenceStatistics,
    *,
    key: jax.Array,
    batch_size: int = 200,
    mesh: Mesh | None = None,
    **options: Any,
) -> SampleMetrics:
    """Every metric of ``samples`` (images in [0, 1]) against ``reference`` (refused if made with
    another detector or preprocessing). ``options`` are those of :func:`metrics_of_outputs`
    (``real_features``, ``counts``, ...); ``key`` draws KID's subsets."""
    check_reference(detector, reference)
    out = extract_features(detector, samples, batch_size=batch_size, mesh=mesh)
    return metrics_of_outputs(out, reference, key=key, **options)


def check_reference(detector: Detector, reference: stats_lib.ReferenceStatistics) -> None:
    """Raises :class:`ReferenceMismatchError` unless ``detector`` made ``reference``."""
    if (reference.detector, reference.preprocessing) != (detector.name, detector.preprocessing):
        raise stats_lib.ReferenceMismatchError(
            f"reference statistics were computed with detector {reference.detector!r} and preprocessing "
            f"{reference.preprocessing!r}, the samples use {detector.name!r} and {detector.preprocessing!r}"
        )


def metrics_of_outputs(
    out: DetectorOutputs,
    reference: stats_lib.ReferenceStatistics,
    *,
    key: jax.Array,
    real_features: np.ndarray | None = None,
    counts: Sequence[int] = (1000, 5000, 10000, 50000),
    num_splits: int = 10,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
) -> SampleMetrics:
    """The metrics of samples from their detector outputs (e.g. the outputs that several
    processes extracted from their shares, gathered in sample order): FID, FID at each of
    ``counts`` that is at most the sample count, the Inception score over ``num_splits``, and,
    given the real data's features ``real_features`` (N, D), KID (``kid_subsets`` subsets of
    ``kid_subset_size``, drawn with ``key``) and precision/recall with ``pr_k`` neighbours."""
    fid = metrics_lib.fid_from_features(out.features, reference.stats)
    usable = [n for n in counts if n <= len(out.features)]
    at_counts = metrics_lib.fid_at_counts(out.features, reference.stats, usable) if usable else {}
    splits = min(num_splits, len(out.logits))
    kid = pr = None
    if real_features is not None:
        kid = metrics_lib.kernel_inception_distance(
            out.features, real_features, key=key, num_subsets=kid_subsets, subset_size=kid_subset_size
        )
        pr = metrics_lib.precision_recall(real_features, out.features, k=pr_k)
    return SampleMetrics(
        fid,
        at_counts,
        metrics_lib.inception_score(out.logits, num_splits=splits),
        metrics_lib.inception_score(out.logits_unbiased, num_splits=splits),
        kid,
        pr,
    )
