"""Feature detectors: what turns images into features and logits, and a registry of them.

A :class:`Detector` is the contract every metric relies on: a pure, jittable ``apply(params,
images)`` from images (B, H, W, C) in [0, 1] to :class:`DetectorOutputs`, its parameters, and
the two names that reference statistics record (``name``, ``preprocessing``), so that statistics
made with another detector or resize are refused. :data:`DETECTORS` is the one table of names to
constructors; :func:`get_detector` raises an error listing the valid names for an unknown one.

* ``inception``: pytorch-fid's FID Inception-v3 (2048-d pool3 features, 1008 logits), with the
  resize mode as its preprocessing; weights from a file the user supplies.
* ``digits``: a small classifier of the embedded 8x8 digits (64-d features, 10 logits), trained
  deterministically on first use (:mod:`diffusion_jax.evaluation.digits`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp

from diffusion_jax.evaluation import digits as digits_lib
from diffusion_jax.evaluation import inception as inception_lib
from diffusion_jax.evaluation.resize import RESIZE_MODES, preprocess_for_inception

__all__ = ["DetectorOutputs", "Detector", "DETECTORS", "get_detector", "inception_detector", "digits_detector"]


class DetectorOutputs(NamedTuple):
    """features: (B, D); logits: (B, classes); logits_unbiased: (B, classes), the logits without
    the last layer's bias (equal to ``logits`` for detectors that report no separate form).
    jax arrays from ``apply``, numpy arrays from the extraction functions."""

    features: Any
    logits: Any
    logits_unbiased: Any


@dataclasses.dataclass(frozen=True)
class Detector:
    """name: registry name; preprocessing: how images are prepared (e.g. the resize mode);
    feature_dim, num_classes: output sizes; params: a pytree; apply: ``(params, images) ->
    DetectorOutputs``, pure and jittable, images (B, H, W, C) in [0, 1]."""

    name: str
    preprocessing: str
    feature_dim: int
    num_classes: int
    params: Any
    apply: Callable[[Any, jax.Array], DetectorOutputs]

    def __call__(self, images: jax.Array) -> DetectorOutputs:
        return self.apply(self.params, images)


def _inception_apply(variables, images, *, mode: str, precision: Any) -> DetectorOutputs:
    x = preprocess_for_inception(images, mode=mode)
    out = cast(inception_lib.InceptionOutputs, inception_lib.FIDInceptionV3(precision=precision).apply(variables, x))
    return DetectorOutputs(out.pool3, out.logits, out.logits_unbiased)


def inception_detector(
    *,
    weights: str | os.PathLike | None = None,
    variables: Any = None,
    resize_mode: str = "pytorch_fid",
    precision: Any = None,
) -> Detector:
    """pytorch-fid's Inception. ``variables`` (Flax variables, e.g. from
    :func:`~diffusion_jax.evaluation.inception.load_inception_weights`) or ``weights`` (a ``.pth``
    or ``.npz`` path; default ``$DIFFUSION_JAX_INCEPTION_WEIGHTS``). ``resize_mode``: see
    :mod:`~diffusion_jax.evaluation.resize`. ``precision``: of the convolutions (``None`` is
    XLA's default; on GPUs that may be TF32, pass ``"highest"`` for float32 parity)."""
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize_mode!r}; choose one of {sorted(RESIZE_MODES)}")
    if variables is None:
        variables = inception_lib.load_inception_weights(inception_lib.resolve_inception_weights(weights))
    apply = functools.partial(_inception_apply, mode=resize_mode, precision=precision)
    return Detector("inception", resize_mode, 2048, inception_lib.NUM_CLASSES, variables, apply)


def _digits_apply(variables, images) -> DetectorOutputs:
    if images.shape[1:] != (8, 8, 1):
        raise ValueError(f"the digits detector takes (B, 8, 8, 1) images in [0, 1], got shape {images.shape}")
    model = digits_lib.DigitsClassifier(int(digits_lib.RECIPE["hidden"]), int(digits_lib.RECIPE["features"]))
    features, logits = cast(tuple[jax.Array, jax.Array], model.apply(variables, jnp.asarray(images, jnp.float32)))
    return DetectorOutputs(features, logits, logits)


def digits_detector(*, variables: Any = None) -> Detector:
    """The digits classifier; ``variables`` default to the cached (or freshly trained) ones."""
    if variables is None:
        variables = digits_lib.digits_classifier_params()
    return Detector("digits", "digits8x8", int(digits_lib.RECIPE["features"]), 10, variables, _digits_apply)


DETECTORS: dict[str, Callable[..., Detector]] = {"inception": inception_detector, "digits": digits_detector}


def get_detector(name: str, **kwargs: Any) -> Detector:
    """The detector ``name`` built with ``kwargs`` (see :data:`DETECTORS`)."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose one of {sorted(DETECTORS)}")
    return DETECTORS[name](**kwargs)
