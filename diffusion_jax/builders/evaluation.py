"""Sample-quality metrics in the ``eval`` mode, from ``config.eval``: the detector, the reference
statistics of the real data, and FID / KID / Inception score / precision-recall of the samples.

The reference is ``eval.reference_stats`` when given (a file of
:func:`diffusion_jax.evaluation.save_reference_statistics`, refused if another detector or
resize made it), else computed once from the data set's train split and kept in
``<workdir>/eval/`` with the real features (which KID and precision/recall need).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from diffusion_jax import evaluation as ev
from diffusion_jax.builders.config import ConfigError
from diffusion_jax.training.distributed import allgather_rows
from diffusion_jax.training.logging import progress_bar

__all__ = ["build_detector", "Reference", "build_reference", "quality_metrics"]


def build_detector(config) -> ev.Detector:
    """``eval.detector`` with its options; a missing Inception weights file is a ConfigError."""
    e = config.eval
    try:
        if e.detector == "inception":
            return ev.get_detector("inception", weights=e.inception_weights or None, resize_mode=e.resize_mode)
        return ev.get_detector(e.detector)
    except (ev.InceptionWeightsError, ValueError, OSError) as err:
        raise ConfigError(f"eval.detector = {e.detector!r}: {err}") from None


class Reference(NamedTuple):
    """The real data's statistics, and its features when they were computed here (else None)."""

    stats: ev.ReferenceStatistics
    features: np.ndarray | None


def build_reference(config, detector: ev.Detector, images01, workdir: pathlib.Path, *, primary: bool) -> Reference:
    """The reference of ``config.eval.reference_stats``, or of ``images01()`` (an iterable of image
    batches in [0, 1]) cached in ``<workdir>/eval/``."""
    e = config.eval
    if e.reference_stats:
        try:
            stats = ev.load_reference_statistics(
                e.reference_stats, detector=detector.name, preprocessing=detector.preprocessing
            )
        except (ev.ReferenceMismatchError, OSError, ValueError, KeyError) as err:
            raise ConfigError(f"eval.reference_stats = {e.reference_stats!r}: {err}") from None
        return Reference(stats, None)
    stem = workdir / "eval" / f"reference_{detector.name}_{detector.preprocessing}"
    stats_path, features_path = stem.with_suffix(".npz"), stem.with_suffix(".features.npy")
    if stats_path.exists() and features_path.exists():
        stats = ev.load_reference_statistics(stats_path, detector=detector.name, preprocessing=detector.preprocessing)
        return Reference(stats, np.load(features_path))
    # Each process reads its strided shard of the split; the features of every shard go to every
    # process, in the split's order.
    features = _extract(detector, images01(), config.eval.feature_batch_size).features
    features = allgather_rows(features, strided=True)
    stats = ev.ReferenceStatistics(ev.statistics_of(features), detector.name, detector.preprocessing)
    if primary:
        stats_path.parent.mkdir(parents=True, exist_ok=True)
        ev.save_reference_statistics(stats_path, stats)
        np.save(features_path, features)
    return Reference(stats, features)


def _extract(detector: ev.Detector, images, batch_size: int) -> ev.DetectorOutputs:
    """The detector's outputs for ``images`` on this process's devices (empty arrays for none)."""
    parts = list(ev.iter_outputs(detector, images, batch_size=batch_size))
    if not parts:
        k = detector.num_classes
        return ev.DetectorOutputs(
            np.zeros((0, detector.feature_dim), np.float32), np.zeros((0, k), np.float32), np.zeros((0, k), np.float32)
        )
    return ev.DetectorOutputs(*(np.concatenate(p) for p in zip(*parts)))


def quality_metrics(
    config,
    detector: ev.Detector,
    reference: Reference,
    samples01: np.ndarray,
    step: int,
    *,
    gather: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict:
    """FID (at every ``eval.fid_counts`` that fits, and at all samples), KID, Inception score
    (with and without the logit bias) and precision/recall of ``samples01`` (images in [0, 1]).

    ``gather`` turns the detector's outputs for this process's samples into those of all
    samples, in order (see :func:`diffusion_jax.modes.setup.gather_chunks`); the metrics are
    then computed from all of them on every process.
    """
    e = config.eval
    ev.check_reference(detector, reference.stats)
    batches = [samples01[i : i + e.feature_batch_size] for i in range(0, len(samples01), e.feature_batch_size)]
    outputs = _extract(
        detector, progress_bar(batches, len(batches), f"{detector.name} features, step {step}"), e.feature_batch_size
    )
    if gather is not None:
        outputs = ev.DetectorOutputs(*(gather(o) for o in outputs))
    m = ev.metrics_of_outputs(
        outputs,
        reference.stats,
        key=jax.random.PRNGKey(config.seed + step),
        real_features=reference.features,
        counts=tuple(e.fid_counts),
        num_splits=e.is_splits,
        kid_subsets=e.kid_subsets,
        kid_subset_size=e.kid_subset_size,
        pr_k=e.pr_k,
    )
    out: dict[str, Any] = {
        "quality_detector": detector.name,
        "fid": float(m.fid.fid),
        "fid_num_samples": int(m.fid.num_samples),
        "inception_score": float(m.inception_score.mean),
        "inception_score_std": float(m.inception_score.std),
        "inception_score_unbiased": float(m.inception_score_unbiased.mean),
    }
    for n, r in sorted(m.fid_at_counts.items()):
        out[f"fid_{n}"] = float(r.fid)
    if m.kid is not None:
        out.update(kid=float(m.kid.kid), kid_std=float(m.kid.std))
    if m.precision_recall is not None:
        out.update(precision=float(m.precision_recall.precision), recall=float(m.precision_recall.recall))
    return out
