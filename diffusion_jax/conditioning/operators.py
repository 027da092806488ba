"""Measurement operators ``y = A(x) + sigma_y n``, ``n ~ N(0, I)``, for data of any shape ``(B, ...)``.

Capabilities are types:

* :class:`Operator` -- a forward function ``A`` and a measurement-noise level ``sigma_y``; enough
  for the methods that only need gradients (DPS, TDS). :class:`FunctionOperator` wraps any
  differentiable (possibly non-linear) ``fn(x) -> y``.
* :class:`LinearOperator` -- adds the transpose ``A^T``.
* :class:`SVDOperator` -- adds a singular value decomposition ``A = U S V^T`` with orthogonal
  ``U`` and ``V``, as DDRM (Kawar et al. 2022, Sec. 3.1) uses it: spectral coordinates live in
  the shape of ``x`` (``vt``, ``v``), ``ut`` maps a measurement into them (zero-padded where
  ``A`` has no singular value) and ``singular_values`` is zero for the unobserved directions.
  The pseudo-inverse, projections and the exact Gaussian updates of DDRM, PiGDM, DiffPIR, DAPS
  and the replacement methods follow from these four maps.

Two concrete families cover every operator of the issue:

* :class:`Mask` (diagonal, ``y`` has the shape of ``x`` and is zero where unobserved):
  boxes, random pixels, outpainting borders (:func:`box_mask`, :func:`random_mask`,
  :func:`border_mask`).
* :class:`Separable` -- one matrix per axis, ``A = A_1 (x) A_2 (x) ...`` (Kronecker product), with
  the SVD computed once per axis: colorization (a channel-mixing matrix on the last axis, as in
  score_sde), average-pool super-resolution, Gaussian and uniform blur (zero boundary, as DDRM),
  and plain denoising (no matrix: ``A = I``).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = [
    "Operator",
    "LinearOperator",
    "SVDOperator",
    "FunctionOperator",
    "Mask",
    "Separable",
    "box_mask",
    "random_mask",
    "border_mask",
    "inpainting",
    "colorization",
    "super_resolution",
    "gaussian_blur",
    "uniform_blur",
    "denoising",
    "dense_matrix",
]


def _sum_per_sample(v: Array) -> Array:
    return jnp.sum(v.reshape(v.shape[0], -1), axis=1)


class Operator(flax.struct.PyTreeNode, abc.ABC):
    """A measurement ``y = A(x) + sigma_y n``. ``forward`` maps ``(B, ...)`` to ``(B, ...)``."""

    sigma_y: float = 0.0

    @abc.abstractmethod
    def forward(self, x: Array) -> Array:
        """``A(x)`` for a batch ``x`` of shape ``(B, ...)``."""

    def __call__(self, x: Array) -> Array:
        return self.forward(x)

    def measure(self, key: Array, x: Array) -> Array:
        """A noisy measurement ``A(x) + sigma_y n`` of a batch ``x``."""
        y = self.forward(x)
        return y + self.sigma_y * self._noise_mask(y) * jax.random.normal(key, y.shape, y.dtype)

    def _noise_mask(self, y: Array) -> Array | float:
        return 1.0

    def log_likelihood(self, y: Array, x: Array) -> Array:
        """``log p(y | x)`` up to a constant that does not depend on ``x``: ``-||y - A(x)||^2 /
        (2 sigma_y^2)``, shape ``(B,)``. Needs ``sigma_y > 0``."""
        r = y - self.forward(x)
        return -0.5 * _sum_per_sample(r**2) / jnp.asarray(self.sigma_y, r.dtype) ** 2


class FunctionOperator(Operator):
    """A (possibly non-linear) differentiable forward function ``fn(x) -> y`` on batches; only
    the gradient-based methods (DPS, TDS, DAPS with Langevin steps) accept it."""

    fn: Callable[[Array], Array] = flax.struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        if not callable(self.fn):
            raise ValueError("FunctionOperator needs fn=, a callable fn(x) -> y on batches (B, ...)")

    def forward(self, x):
        return self.fn(x)


class LinearOperator(Operator):
    """A linear operator: ``forward`` and its ``transpose`` (``A^T``, measurement -> data shape)."""

    @abc.abstractmethod
    def transpose(self, y: Array) -> Array:
        """``A^T y``."""


class SVDOperator(LinearOperator):
    """A linear operator with ``A = U S V^T``. Spectral coordinates have the shape of ``x``.

    Subclasses implement ``vt`` (``V^T x``), ``v`` (its inverse), ``ut`` (``U^T y``, zero-padded
    into the shape of ``x``), ``u`` (its inverse on the padded coordinates) and
    ``singular_values(x)`` (broadcastable against ``x``, zero where ``A`` sees nothing).
    """

    @abc.abstractmethod
    def vt(self, x: Array) -> Array: ...

    @abc.abstractmethod
    def v(self, z: Array) -> Array: ...

    @abc.abstractmethod
    def ut(self, y: Array) -> Array: ...

    @abc.abstractmethod
    def u(self, z: Array) -> Array: ...

    @abc.abstractmethod
    def singular_values(self, x: Array) -> Array: ...

    def forward(self, x):
        return self.u(self.singular_values(x) * self.vt(x))

    def transpose(self, y):
        z = self.ut(y)
        return self.v(self.singular_values(z) * z)

    def spectral_measurement(self, y: Array, like: Array) -> tuple[Array, Array]:
        """``(ybar, s)``: the measurement in spectral coordinates, ``ybar = S^+ U^T y`` (zero where
        unobserved), and the singular values broadcast to the shape of ``like``."""
        s = jnp.broadcast_to(self.singular_values(like), like.shape).astype(like.dtype)
        obs = s > 0
        ybar = jnp.where(obs, self.ut(y) / jnp.where(obs, s, 1.0), 0.0)
        return ybar, s

    def pinv(self, y: Array, like: Array) -> Array:
        """The pseudo-inverse ``A^+ y`` (``like``: any array of the data shape)."""
        return self.v(self.spectral_measurement(y, like)[0])


class Mask(SVDOperator):
    """Inpainting: ``A x = mask * x`` (``y`` has the shape of ``x``, zero where unobserved).

    ``mask`` (0 / 1) broadcasts against the data's event shape, e.g. ``(H, W, 1)`` for pixels of
    an image ``(B, H, W, C)``. ``U = V = I`` and the singular values are the mask.
    """

    mask: Any = None

    def forward(self, x):
        return self.mask * x

    def transpose(self, y):
        return self.mask * y

    def _noise_mask(self, y):
        return self.mask

    def vt(self, x):
        return x

    def v(self, z):
        return z

    def ut(self, y):
        return self.mask * y

    def u(self, z):
        return z

    def singular_values(self, x):
        return jnp.asarray(self.mask, x.dtype)


def _along(matrix: Array, x: Array, axis: int) -> Array:
    """Apply ``matrix`` (m, n) along ``axis`` of ``x`` (size n there)."""
    return jnp.moveaxis(jnp.tensordot(matrix, x, axes=([1], [axis])), 0, axis)


def _pad_to(z: Array, axis: int, n: int) -> Array:
    pad = [(0, 0)] * z.ndim
    pad[axis] = (0, n - z.shape[axis])
    return jnp.pad(z, pad)


class Separable(SVDOperator):
    """``A = A_1 (x) ... (x) A_k``: matrix ``matrices[j]`` (m_j, n_j) acts along data axis
    ``axes[j]`` (an axis of the batched array, e.g. ``-1`` for channels, ``1`` and ``2`` for the
    rows and columns of ``(B, H, W, C)``). Build it with :meth:`create`, which computes each
    factor's full SVD; the singular values of the Kronecker product are the outer product of the
    factors' (zero-padded to n_j). No factors: the identity (denoising)."""

    matrices: tuple = ()
    us: tuple = ()
    ss: tuple = ()
    vs: tuple = ()
    axes: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())

    @classmethod
    def create(cls, factors: dict[int, np.ndarray] | Sequence[tuple[int, np.ndarray]], *, sigma_y: float = 0.0):
        items = list(factors.items()) if isinstance(factors, dict) else list(factors)
        axes, mats, us, ss, vs = [], [], [], [], []
        for axis, m in items:
            m = np.asarray(m, np.float64)
            if m.ndim != 2 or m.shape[0] > m.shape[1]:
                raise ValueError(f"factor for axis {axis} must be a (m, n) matrix with m <= n, got shape {m.shape}")
            u, s, vh = np.linalg.svd(m, full_matrices=True)
            axes.append(int(axis))
            mats.append(jnp.asarray(m, jnp.float32))
            us.append(jnp.asarray(u, jnp.float32))
            ss.append(jnp.asarray(np.pad(s, (0, m.shape[1] - s.shape[0])), jnp.float32))
            vs.append(jnp.asarray(vh.T, jnp.float32))
        if len(set(axes)) != len(axes):
            raise ValueError(f"one factor per axis; got axes {axes}")
        return cls(sigma_y=sigma_y, matrices=tuple(mats), us=tuple(us), ss=tuple(ss), vs=tuple(vs), axes=tuple(axes))

    def _apply(self, mats, x, transpose=False):
        for m, ax in zip(mats, self.axes):
            m = m.astype(x.dtype)
            x = _along(m.T if transpose else m, x, ax)
        return x

    def forward(self, x):
        return self._apply(self.matrices, x)

    def transpose(self, y):
        return self._apply(self.matrices, y, transpose=True)

    def vt(self, x):
        return self._apply(self.vs, x, transpose=True)

    def v(self, z):
        return self._apply(self.vs, z)

    def ut(self, y):
        z = self._apply(self.us, y, transpose=True)
        for v, ax in zip(self.vs, self.axes):
            z = _pad_to(z, ax, v.shape[0])
        return z

    def u(self, z):
        for m, ax in zip(self.matrices, self.axes):
            z = jax.lax.slice_in_dim(z, 0, m.shape[0], axis=ax)
        return self._apply(self.us, z)

    def singular_values(self, x):
        out = jnp.ones((1,) * x.ndim, x.dtype)
        for s, ax in zip(self.ss, self.axes):
            shape = [1] * x.ndim
            shape[ax] = s.shape[0]
            out = out * s.astype(x.dtype).reshape(shape)
        return out


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def box_mask(event_shape: Sequence[int], start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """A mask of ``event_shape`` that hides the box ``[start, start + size)`` of the leading
    (spatial) axes: 1 observed, 0 hidden. Channel axes not named in ``start`` are hidden whole."""
    m = np.ones(tuple(event_shape), np.float32)
    idx = tuple(slice(a, a + b) for a, b in zip(start, size))
    m[idx] = 0.0
    return m


def random_mask(seed: int, event_shape: Sequence[int], fraction_observed: float, *, channel_axis: bool = True):
    """Random pixels: each pixel (all channels together when ``channel_axis``) is observed with
    probability ``fraction_observed``. Shape ``event_shape`` (channels broadcast as size 1)."""
    shape = tuple(event_shape)
    draw = shape[:-1] + (1,) if channel_axis and len(shape) > 1 else shape
    rng = np.random.default_rng(seed)
    return (rng.uniform(size=draw) < fraction_observed).astype(np.float32)


def border_mask(event_shape: Sequence[int], border: int) -> np.ndarray:
    """Outpainting: observe the centre, hide a border of ``border`` pixels on every spatial side
    (the leading ``len(event_shape) - 1`` axes of an image, the only axis of a vector)."""
    shape = tuple(event_shape)
    spatial = len(shape) - 1 if len(shape) > 1 else 1
    m = np.zeros(shape, np.float32)
    idx = tuple(slice(border, n - border) for n in shape[:spatial])
    m[idx] = 1.0
    return m


def inpainting(mask, *, sigma_y: float = 0.0) -> Mask:
    """Inpainting / outpainting with a 0 / 1 ``mask`` (see :func:`box_mask`, :func:`random_mask`,
    :func:`border_mask`)."""
    return Mask(sigma_y=sigma_y, mask=jnp.asarray(mask, jnp.float32))


# --------------------------------------------------------------------------------------------
# Separable operators
# --------------------------------------------------------------------------------------------


def colorization(num_channels: int = 3, *, weights: Sequence[float] | None = None, sigma_y: float = 0.0) -> Separable:
    """Grey-scale measurement ``y = sum_c w_c x_c`` on the last axis (``y`` keeps a channel axis
    of size 1). The default weights ``1/C`` (the channel mean) make the SVD's first right
    singular vector ``(1, ..., 1)/sqrt(C)``, the decoupled grey channel of score_sde's
    colorization matrix, so the projection methods match score_sde's colorizer."""
    w = np.full((1, num_channels), 1.0 / num_channels) if weights is None else np.asarray(weights, float)[None]
    if w.shape != (1, num_channels):
        raise ValueError(f"colorization weights must have {num_channels} entries, got {w.shape[1]}")
    return Separable.create({-1: w}, sigma_y=sigma_y)


def _check_axes(event_shape, axes):
    nd = len(event_shape) + 1
    for ax in axes:
        if not 1 <= ax < nd:
            raise ValueError(f"axis {ax} is not a data axis of batches of shape (B,) + {tuple(event_shape)}")


def _default_spatial_axes(event_shape) -> tuple[int, ...]:
    return (1,) if len(event_shape) == 1 else tuple(range(1, len(event_shape)))


def super_resolution(
    event_shape: Sequence[int], factor: int, *, axes: Sequence[int] | None = None, sigma_y: float = 0.0
) -> Separable:
    """Average pooling by ``factor`` along ``axes`` (default: every axis but the last (channel)
    one of an image; the only axis of a vector). ``y`` has those axes divided by ``factor``."""
    axes = tuple(axes) if axes is not None else _default_spatial_axes(event_shape)
    _check_axes(event_shape, axes)
    factors = {}
    for ax in axes:
        n = event_shape[ax - 1]
        if n % factor:
            raise ValueError(f"axis {ax} has size {n}, not divisible by the pooling factor {factor}")
        factors[ax] = np.kron(np.eye(n // factor), np.full((1, factor), 1.0 / factor))
    return Separable.create(factors, sigma_y=sigma_y)


def _toeplitz(n: int, kernel: np.ndarray) -> np.ndarray:
    """Convolution with ``kernel`` (odd length, centred) as an (n, n) matrix, zero boundary."""
    half = len(kernel) // 2
    m = np.zeros((n, n))
    for i in range(n):
        for k, w in enumerate(kernel):
            j = i + k - half
            if 0 <= j < n:
                m[i, j] = w
    return m


def _blur(event_shape, kernel, axes, sigma_y):
    axes = tuple(axes) if axes is not None else _default_spatial_axes(event_shape)
    _check_axes(event_shape, axes)
    return Separable.create({ax: _toeplitz(event_shape[ax - 1], kernel) for ax in axes}, sigma_y=sigma_y)


def gaussian_blur(
    event_shape: Sequence[int],
    std: float,
    *,
    size: int | None = None,
    axes: Sequence[int] | None = None,
    sigma_y: float = 0.0,
) -> Separable:
    """Separable Gaussian blur with kernel std ``std`` (pixels) and odd ``size`` (default
    ``2 ceil(3 std) + 1``), zero boundary, along ``axes`` (as :func:`super_resolution`)."""
    size = int(size) if size is not None else 2 * math.ceil(3 * std) + 1
    if size % 2 == 0:
        raise ValueError(f"blur kernel size must be odd, got {size}")
    r = np.arange(size) - size // 2
    k = np.exp(-0.5 * (r / std) ** 2)
    return _blur(event_shape, k / k.sum(), axes, sigma_y)


def uniform_blur(
    event_shape: Sequence[int], size: int, *, axes: Sequence[int] | None = None, sigma_y: float = 0.0
) -> Separable:
    """Separable box blur with odd kernel ``size``, zero boundary (DDRM's uniform deblurring)."""
    if int(size) % 2 == 0:
        raise ValueError(f"blur kernel size must be odd, got {size}")
    return _blur(event_shape, np.full(int(size), 1.0 / int(size)), axes, sigma_y)


def denoising(*, sigma_y: float) -> Separable:
    """Plain denoising: ``A = I``."""
    return Separable.create({}, sigma_y=sigma_y)


def dense_matrix(operator: Operator, event_shape: Sequence[int]) -> np.ndarray:
    """The matrix ``(m, d)`` of a linear operator on flattened data (for small problems and
    tests)."""
    d = int(np.prod(event_shape))

    def f(v):
        return operator.forward(v.reshape((1,) + tuple(event_shape))).reshape(-1)

    return np.asarray(jax.jacfwd(f)(jnp.zeros((d,), jnp.float32)), np.float64)
