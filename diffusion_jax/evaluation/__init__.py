"""Sample-quality evaluation: detectors, streaming statistics and metrics.

* :mod:`~diffusion_jax.evaluation.inception`: pytorch-fid's FID Inception-v3 in Flax and its
  weights (a user-supplied ``.pth`` or ``.npz``, every tensor checked).
* :mod:`~diffusion_jax.evaluation.resize`: the 299x299 resize conventions.
* :mod:`~diffusion_jax.evaluation.detectors`: the :class:`Detector` contract and the registry
  (``inception``, ``digits``).
* :mod:`~diffusion_jax.evaluation.stats`: mergeable float64 mean/covariance accumulators and
  reference-statistics files.
* :mod:`~diffusion_jax.evaluation.metrics`: FID, KID, Inception score, precision/recall as pure
  functions of features.
* :mod:`~diffusion_jax.evaluation.extract`: feature extraction sharded over a device mesh.

See docs/evaluation.md.
"""

from diffusion_jax.evaluation.detectors import DETECTORS, Detector, DetectorOutputs, get_detector
from diffusion_jax.evaluation.extract import (
    SampleMetrics,
    check_reference,
    compute_reference_statistics,
    evaluate_samples,
    extract_features,
    feature_statistics,
    iter_outputs,
    make_mesh,
    metrics_of_outputs,
)
from diffusion_jax.evaluation.inception import (
    FIDInceptionV3,
    InceptionWeightsError,
    load_inception_weights,
    resolve_inception_weights,
    save_inception_npz,
)
from diffusion_jax.evaluation.metrics import (
    FIDResult,
    InceptionScore,
    KIDResult,
    PrecisionRecall,
    fid_at_counts,
    fid_from_features,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
    trace_sqrt_product,
)
from diffusion_jax.evaluation.resize import RESIZE_MODES, preprocess_for_inception, resize_bilinear
from diffusion_jax.evaluation.stats import (
    MomentState,
    ReferenceMismatchError,
    ReferenceStatistics,
    Statistics,
    finalize_moments,
    init_moments,
    load_reference_statistics,
    merge_moments,
    save_reference_statistics,
    statistics_of,
    update_moments,
)

__all__ = [
    "DETECTORS",
    "Detector",
    "DetectorOutputs",
    "get_detector",
    "SampleMetrics",
    "compute_reference_statistics",
    "evaluate_samples",
    "check_reference",
    "metrics_of_outputs",
    "extract_features",
    "feature_statistics",
    "iter_outputs",
    "make_mesh",
    "FIDInceptionV3",
    "InceptionWeightsError",
    "load_inception_weights",
    "resolve_inception_weights",
    "save_inception_npz",
    "FIDResult",
    "InceptionScore",
    "KIDResult",
    "PrecisionRecall",
    "fid_at_counts",
    "fid_from_features",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
    "precision_recall",
    "trace_sqrt_product",
    "RESIZE_MODES",
    "preprocess_for_inception",
    "resize_bilinear",
    "MomentState",
    "ReferenceMismatchError",
    "ReferenceStatistics",
    "Statistics",
    "finalize_moments",
    "init_moments",
    "load_reference_statistics",
    "merge_moments",
    "save_reference_statistics",
    "statistics_of",
    "update_moments",
]
