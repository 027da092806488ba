"""Image transforms in NumPy and Pillow (no TensorFlow).

Two kinds:

* per-example geometry on integer levels (``uint8``, shape ``(H, W, C)``): centre crops and
  resizes. Their outputs are rounded back to integers in ``0..L-1`` so that the pixels stay on
  the grid of ``L`` levels that dequantization and bits per dimension assume (score_sde resized in
  float and dequantized values that were no longer on the grid);
* per-batch value maps (``(B, H, W, C)``): random horizontal flip, requantisation, the map from
  levels to floats (plain or uniformly dequantized) and centring. They are vectorised so the
  pipeline pays the Python overhead once per batch, not once per example.

Resizes use Pillow's filters, which widen their support when shrinking, i.e. they antialias like
``tf.image.resize(..., antialias=True)`` that score_sde used.
"""

from __future__ import annotations

import numpy as np
import PIL.Image

__all__ = [
    "center_crop",
    "resize",
    "resize_small",
    "crop_resize",
    "random_flip_left_right",
    "requantize",
    "levels_to_unit",
    "dequantize",
    "center",
]

_FILTERS = {
    "bilinear": PIL.Image.Resampling.BILINEAR,
    "bicubic": PIL.Image.Resampling.BICUBIC,
    "nearest": PIL.Image.Resampling.NEAREST,
}


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected an image of shape (H, W, 1 or 3), got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected an image of integer levels with dtype uint8, got {image.dtype}")


def center_crop(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Central ``size`` crop of ``image`` (H, W, C); offsets round down like
    ``tf.image.crop_to_bounding_box`` with ``(H - h) // 2``."""
    h, w = (size, size) if isinstance(size, int) else size
    height, width = image.shape[:2]
    if h > height or w > width:
        raise ValueError(f"cannot crop {h}x{w} out of an image of {height}x{width}")
    top, left = (height - h) // 2, (width - w) // 2
    return image[top : top + h, left : left + w]


def resize(
    image: np.ndarray, size: int | tuple[int, int], *, method: str = "bilinear", max_level: int = 255
) -> np.ndarray:
    """Resize ``image`` (H, W, C) of uint8 levels ``0..max_level`` to ``size`` (h, w).

    Returns uint8 of shape (h, w, C), rounded and clipped to ``0..max_level`` (bicubic
    overshoots). A no-op when the size already matches.
    """
    _check_image(image)
    h, w = (size, size) if isinstance(size, int) else size
    if image.shape[:2] == (h, w):
        return image
    if method not in _FILTERS:
        raise ValueError(f"unknown resize method {method!r}; valid: {sorted(_FILTERS)}")
    channels = image.shape[-1]
    if channels == 1:
        # Mode 'F' keeps full precision through the filter; rounding happens once, below.
        pil = PIL.Image.fromarray(image[..., 0].astype(np.float32), mode="F")
        out = np.asarray(pil.resize((w, h), _FILTERS[method]))[..., None]
    else:
        # RGB resizes in Pillow's 8-bit pipeline, which rounds internally.
        out = np.asarray(PIL.Image.fromarray(image, mode="RGB").resize((w, h), _FILTERS[method]))
    return np.clip(np.rint(out), 0, max_level).astype(np.uint8)


def resize_small(image: np.ndarray, size: int, *, method: str = "bilinear", max_level: int = 255):
    """Resize so that the shorter side is ``size``, keeping the aspect ratio (score_sde's
    ``resize_small``, used for CelebA and LSUN 128)."""
    height, width = image.shape[:2]
    ratio = size / min(height, width)
    return resize(image, (round(height * ratio), round(width * ratio)), method=method, max_level=max_level)


def crop_resize(image: np.ndarray, size: int, *, method: str = "bicubic", max_level: int = 255):
    """Centre-crop to a square of the shorter side, then resize to ``size`` x ``size``
    (score_sde's ``crop_resize`` for LSUN: bicubic with antialiasing)."""
    side = min(image.shape[:2])
    return resize(center_crop(image, side), size, method=method, max_level=max_level)


# --------------------------------------------------------------------------------------------
# Batch value maps
# --------------------------------------------------------------------------------------------


def random_flip_left_right(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirror each image of ``images`` (B, H, W, C) with probability 1/2, independently."""
    flip = rng.random(len(images)) < 0.5
    return np.where(flip[:, None, None, None], images[:, :, ::-1], images)


def requantize(levels: np.ndarray, *, from_levels: int, to_levels: int) -> np.ndarray:
    """Reduce integer levels ``0..from_levels-1`` to ``0..to_levels-1`` by
    ``floor(k * to_levels / from_levels)``: equal-width bins, i.e. Glow's n-bit reduction
    ``k // 2^(8 - n)`` for 8-bit data and ``to_levels = 2^n``."""
    if not 2 <= to_levels <= from_levels:
        raise ValueError(f"num_levels must be between 2 and the data's own {from_levels} levels, got {to_levels}")
    if to_levels == from_levels:
        return levels
    k = levels.astype(np.int32)
    return (k * to_levels // from_levels).astype(levels.dtype)


def levels_to_unit(levels: np.ndarray, *, num_levels: int) -> np.ndarray:
    """``k / (L - 1)`` in [0, 1], float32: the first level maps to 0 and the last to 1
    (for the 17-level digits that is ``k / 16``, not ``k / 255``)."""
    return levels.astype(np.float32) / np.float32(num_levels - 1)


def dequantize(levels: np.ndarray, rng: np.random.Generator, *, num_levels: int) -> np.ndarray:
    """Uniform dequantization ``(k + u) / L``, ``u ~ U[0, 1)``: float32 in [0, 1), shape of
    ``levels``.

    Level ``k`` fills the bin ``[k / L, (k + 1) / L)`` uniformly. In score_sde's notation, with
    ``x = k / (L - 1)``, this is ``(x (L - 1) + u) / L``.
    """
    # In float32, k + u rounds up to k + 1 for u within 2^-24 (k + 1) of 1 (1.5e-5 of the draws
    # for k = 255). Compute in float64, then round down any value that float32 lifted onto the
    # upper edge, so every value stays strictly inside its level's bin.
    k = levels.astype(np.float64)
    x = (k + rng.random(levels.shape)) / num_levels
    x32 = x.astype(np.float32)
    lifted = x32.astype(np.float64) >= (k + 1) / num_levels
    return np.where(lifted, np.nextafter(x32, np.float32(0)), x32)


def center(x: np.ndarray) -> np.ndarray:
    """Map [0, 1] to [-1, 1] (score_sde's ``data.centered`` scaler ``2 x - 1``)."""
    return x * np.float32(2.0) - np.float32(1.0)
