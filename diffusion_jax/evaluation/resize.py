"""Resizing images to the Inception's 299x299 input, and its input scaling.

FID numbers depend on how images reach 299x299 (Parmar et al. 2022, "On Aliased Resizing and
Surprising Subtleties in GAN Evaluation"). Three conventions are offered, by name:

``"pytorch_fid"`` (the default)
    pytorch-fid's ``F.interpolate(mode="bilinear", align_corners=False)``: half-pixel centres,
    source coordinate ``(i + 0.5) * in / out - 0.5`` clamped at 0, **no antialiasing** (also when
    shrinking), on float images in [0, 1]; then ``2x - 1``.
``"tf"``
    score_sde's numbers: TF-GAN's ``preprocess_image`` (TF2) on uint8-valued images in [0, 255]:
    ``tf.image.resize(method="bilinear")`` (half-pixel centres, no antialiasing: the same sampling
    as ``"pytorch_fid"``), then ``(x - 128) / 128``. For images in [0, 1] that is
    ``(255 x - 128) / 128``: a shift of 0.5/128 and a scale of 255/256 against ``"pytorch_fid"``.
    score_sde also rounds samples to uint8 before this; quantize to 1/255 first to match it.
``"tf_legacy"``
    TF1's ``resize_bilinear(align_corners=False, half_pixel_centers=False)``, the resize inside
    the 2015 graph that the original TTUR FID code feeds: source coordinate ``i * in / out``
    (asymmetric, shifted by up to half a pixel), then ``(255 x - 128) / 128``.

Each resize is the separable product of two small interpolation matrices (rows ``out x in``, two
non-zero weights per row), applied with two matrix products at full float32 precision, so the
result is exact bilinear interpolation and runs on any device in a batch.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["RESIZE_MODES", "ResizeMode", "interpolation_matrix", "resize_bilinear", "preprocess_for_inception"]

ResizeMode = Literal["pytorch_fid", "tf", "tf_legacy"]
# name -> (half-pixel centres?, input scale a, input shift b): x in [0, 1] -> a * x + b.
RESIZE_MODES: dict[str, tuple[bool, float, float]] = {
    "pytorch_fid": (True, 2.0, -1.0),
    "tf": (True, 255.0 / 128.0, -1.0),
    "tf_legacy": (False, 255.0 / 128.0, -1.0),
}


def _check_mode(mode: str) -> tuple[bool, float, float]:
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {sorted(RESIZE_MODES)}")
    return RESIZE_MODES[mode]


def interpolation_matrix(size_in: int, size_out: int, *, half_pixel: bool = True) -> np.ndarray:
    """(size_out, size_in) float64 matrix M with ``out = M @ in`` along one axis: linear
    interpolation, no antialiasing. ``half_pixel=True`` is PyTorch's ``align_corners=False``
    (source ``max((i + 0.5) s - 0.5, 0)``, ``s = in / out``); False is TF1's legacy
    ``i * s``. The upper neighbour is clamped to the last pixel."""
    # The coordinates are computed in float32, as PyTorch's CPU kernel does for float images
    # (scale = float(in) / out, then scale * (i + 0.5) - 0.5): in float64 the weights would differ
    # from F.interpolate's by up to ~1e-5 relative at 512 -> 299.
    f32 = np.float32
    scale = f32(size_in) / f32(size_out)
    i = np.arange(size_out, dtype=f32)
    src = np.maximum(scale * (i + f32(0.5)) - f32(0.5), f32(0.0)) if half_pixel else scale * i
    lo = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = (src - lo.astype(f32)).astype(np.float64)
    m = np.zeros((size_out, size_in))
    np.add.at(m, (np.arange(size_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(size_out), hi), frac)
    return m


def resize_bilinear(images: jax.Array, size: tuple[int, int], *, half_pixel: bool = True) -> jax.Array:
    """Bilinear resize of (B, H, W, C) images to (B, size[0], size[1], C) without antialiasing."""
    _, h, w, _ = images.shape
    if (h, w) == tuple(size):
        return images  # both conventions reproduce the input exactly at equal size
    mh = jnp.asarray(interpolation_matrix(h, size[0], half_pixel=half_pixel), images.dtype)
    mw = jnp.asarray(interpolation_matrix(w, size[1], half_pixel=half_pixel), images.dtype)
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", mh, images, precision=hi)
    return jnp.einsum("pw,bowc->bopc", mw, x, precision=hi)


def preprocess_for_inception(images: jax.Array, *, mode: str = "pytorch_fid", size: int = 299) -> jax.Array:
    """(B, H, W, C) images in [0, 1] (C = 1 is repeated to 3 channels) -> (B, 299, 299, 3) Inception
    inputs in about [-1, 1], resized and scaled as ``mode`` prescribes (see the module docstring)."""
    half_pixel, a, b = _check_mode(mode)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (B, H, W, 1 or 3) in [0, 1], got shape {images.shape}")
    x = jnp.asarray(images, jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    x = resize_bilinear(x, (size, size), half_pixel=half_pixel)
    return a * x + b
