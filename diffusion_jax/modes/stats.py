"""``diffusion-jax stats``: a data set's reference statistics for the sample-quality metrics,
computed once with ``eval.detector`` and stored as ``.npz`` (mean, covariance, count, detector,
resize); ``eval.reference_stats`` points ``eval`` to the file."""

from __future__ import annotations

import pathlib
import time

import numpy as np

from diffusion_jax import evaluation as ev
from diffusion_jax.builders import config as config_lib
from diffusion_jax.builders import evaluation as quality
from diffusion_jax.builders.config import ConfigError
from diffusion_jax.modes import setup

__all__ = ["stats"]


def stats(config, out: str | pathlib.Path, *, split: str = "train") -> pathlib.Path:
    """Write the reference statistics of ``split`` (``'train'`` or ``'eval'``) of the config's data
    set to ``out`` (``.npz``); returns the path."""
    if split not in ("train", "eval"):
        raise ConfigError(f"split must be 'train' or 'eval', got {split!r}")
    config_lib.validate_config(config, build=False)
    detector = quality.build_detector(config)
    info = setup.data_info(config)
    t0 = time.perf_counter()

    def images():
        with setup.build_data(config, split=split, evaluation=True, uniform_dequantization=False) as it:
            for batch in it:
                x = batch["image"][batch["mask"]] if "mask" in batch else batch["image"]
                yield np.clip((x + 1.0) / 2.0 if info.centered else x, 0.0, 1.0)

    path = pathlib.Path(out).with_suffix(".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    ref = ev.compute_reference_statistics(detector, images(), path, batch_size=config.eval.feature_batch_size)
    print(
        f"wrote the {detector.name} ({detector.preprocessing}) statistics of {ref.stats.num_samples} {split} "
        f"images of {info.name} to {path} ({time.perf_counter() - t0:.1f} s)",
        flush=True,
    )
    return path
