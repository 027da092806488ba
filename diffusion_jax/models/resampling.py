"""Up- and down-sampling of NHWC images, with and without FIR filters.

The FIR ("finite impulse response") resamplers follow the ``upfirdn2d`` semantics of StyleGAN2
(Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN"), which
NCSN++ uses for its anti-aliased resampling (Song et al. 2021, App. H, "FIR"):

    upfirdn2d(x, k, up, down, pad) = downsample_by(down)( conv_full( pad( zero_stuff_by(up)(x) ), k ) )

* ``zero_stuff_by(up)`` inserts ``up - 1`` zeros *after* every sample (so a length-n signal
  becomes length ``n * up``);
* ``pad = (p0, p1)`` pads both spatial axes with ``p0`` zeros before and ``p1`` after
  (negative values crop);
* the filter is applied as a true convolution (kernel flipped), in "valid" mode;
* ``downsample_by(down)`` keeps every ``down``-th sample, starting at the first.

Only separable filters are supported: a 1-D kernel ``k`` means the 2-D filter ``outer(k, k)``,
normalised to unit sum, which is how score_sde's ``fir_kernel`` (default ``(1, 3, 3, 1)``) is
defined. Separable filtering is done as two 1-D passes made of shifted slices, which XLA fuses
into a few elementwise loops (much cheaper on CPU than a depthwise convolution).

All functions take and return ``(B, H, W, C)`` arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

__all__ = [
    "setup_kernel",
    "upfirdn2d",
    "upsample_2d",
    "downsample_2d",
    "upsample_conv_2d",
    "conv_downsample_2d",
    "naive_upsample_2d",
    "naive_downsample_2d",
]


def setup_kernel(k: Sequence[float]) -> np.ndarray:
    """A separable FIR kernel given by its 1-D taps, normalised so that ``outer(k, k)`` sums to 1.

    Returns the normalised 1-D taps (float64 numpy): the 2-D filter is their outer product.
    """
    taps = np.asarray(k, dtype=np.float64)
    if taps.ndim != 1 or taps.size == 0:
        raise ValueError(
            f"FIR kernels must be given as 1-D taps (the 2-D filter is their outer product); "
            f"got an array of shape {taps.shape}"
        )
    total = taps.sum()
    if total == 0:
        raise ValueError(f"FIR kernel taps must not sum to zero, got {tuple(taps)}")
    # sum(outer(k, k)) = sum(k)^2, so dividing the taps by sum(k) normalises the 2-D filter.
    return taps / total


def _upfirdn_1d(x: Array, taps: np.ndarray, *, axis: int, up: int, down: int, pad: tuple[int, int]) -> Array:
    """upfirdn along one axis with 1-D taps (already scaled)."""
    n = x.shape[axis]
    if up > 1:
        # Zero-stuffing: interleave every sample with (up - 1) zeros along `axis`.
        zeros = jnp.zeros_like(x)
        x = jnp.stack([x] + [zeros] * (up - 1), axis=axis + 1)
        shape = list(x.shape)
        shape[axis : axis + 2] = [n * up]
        x = x.reshape(shape)
    config = [(0, 0, 0)] * x.ndim
    config[axis] = (pad[0], pad[1], 0)
    x = lax.pad(x, jnp.zeros((), x.dtype), config)
    length = x.shape[axis]
    K = len(taps)
    n_full = length - K + 1
    if n_full <= 0:
        raise ValueError(f"upfirdn: the padded signal (length {length}) is shorter than the kernel ({K})")
    n_out = (n_full - 1) // down + 1
    flipped = taps[::-1]  # true convolution, as upfirdn2d
    out: Array | None = None
    for j, c in enumerate(flipped):
        if c == 0:
            continue
        piece = lax.slice_in_dim(x, j, j + (n_out - 1) * down + 1, stride=down, axis=axis)
        term = piece * jnp.asarray(c, x.dtype)
        out = term if out is None else out + term
    assert out is not None  # setup_kernel rejects taps that are all zero
    return out


def upfirdn2d(
    x: Array, k: Sequence[float], *, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0), gain: float = 1.0
) -> Array:
    """StyleGAN2's ``upfirdn2d`` on ``(B, H, W, C)`` with the separable filter ``outer(k, k)``.

    ``k`` are raw 1-D taps; they are normalised (2-D sum 1) and the 2-D filter is multiplied by
    ``gain``. Output spatial size per axis: ``(n * up + p0 + p1 - len(k)) // down + 1``.
    """
    taps = setup_kernel(k) * np.sqrt(gain)  # gain split between the two separable passes
    x = _upfirdn_1d(x, taps, axis=1, up=up, down=down, pad=pad)
    return _upfirdn_1d(x, taps, axis=2, up=up, down=down, pad=pad)


def upsample_2d(x: Array, k: Sequence[float] = (1, 3, 3, 1), factor: int = 2) -> Array:
    """FIR upsampling by ``factor``: ``(B, H, W, C) -> (B, factor H, factor W, C)``.

    The filter gain is ``factor**2`` so that a constant image keeps its value (zero-stuffing
    leaves one sample in ``factor**2``).
    """
    K = len(k)
    p = K - factor
    return upfirdn2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2), gain=factor**2)


def downsample_2d(x: Array, k: Sequence[float] = (1, 3, 3, 1), factor: int = 2) -> Array:
    """FIR downsampling by ``factor``: ``(B, H, W, C) -> (B, H // factor, W // factor, C)``."""
    K = len(k)
    p = K - factor
    return upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(x: Array, w: Array, k: Sequence[float] = (1, 3, 3, 1), factor: int = 2) -> Array:
    """Fused FIR upsampling followed by a convolution with ``w`` of shape ``(kh, kw, C_in, C_out)``.

    StyleGAN2's fused form: a stride-``factor`` transposed convolution (equivalently, a
    correlation of the zero-stuffed input with ``w``, padded ``kw - 1`` on both sides), then one
    FIR pass with gain ``factor**2``. Output: ``(B, factor H, factor W, C_out)``.
    """
    kh, kw = w.shape[0], w.shape[1]
    if kh != kw or kh % 2 != 1:
        raise ValueError(f"upsample_conv_2d needs an odd square kernel, got {w.shape[:2]}")
    y = lax.conv_general_dilated(
        x,
        w,
        window_strides=(1, 1),
        padding=[(kw - 1, kw - 1), (kw - 1, kw - 1)],
        lhs_dilation=(factor, factor),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    p = (len(k) - factor) - (kw - 1)
    return upfirdn2d(y, k, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), gain=factor**2)


def conv_downsample_2d(x: Array, w: Array, k: Sequence[float] = (1, 3, 3, 1), factor: int = 2) -> Array:
    """Fused FIR filtering followed by a stride-``factor`` convolution with ``w`` (HWIO).

    ``(B, H, W, C_in) -> (B, H // factor, W // factor, C_out)``.
    """
    kh, kw = w.shape[0], w.shape[1]
    if kh != kw or kh % 2 != 1:
        raise ValueError(f"conv_downsample_2d needs an odd square kernel, got {w.shape[:2]}")
    p = (len(k) - factor) + (kw - 1)
    x = upfirdn2d(x, k, pad=((p + 1) // 2, p // 2))
    return lax.conv_general_dilated(
        x, w, window_strides=(factor, factor), padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def naive_upsample_2d(x: Array, factor: int = 2) -> Array:
    """Nearest-neighbour upsampling: every pixel repeated ``factor x factor`` times."""
    B, H, W, C = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (B, H, factor, W, factor, C))
    return x.reshape(B, H * factor, W * factor, C)


def naive_downsample_2d(x: Array, factor: int = 2) -> Array:
    """Average pooling over non-overlapping ``factor x factor`` windows."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // factor, factor, W // factor, factor, C)
    return jnp.mean(x, axis=(2, 4))
