"""Shared pieces of every sampler: the sampler contract, the model wrapper, noise sources, run
information.

Every sampler is a frozen pytree that subclasses :class:`Sampler` (fixed-grid samplers subclass
:class:`FixedGridSampler`): it declares its ``name``, whether it is ``stochastic`` and whether it
``needs_marginals``, and implements :meth:`Sampler.run`. :func:`diffusion_jax.sample` accepts any
subclass, including one defined outside the package.

Samplers see the score network only through :class:`Model`, which turns the user's
``fn(x, t)`` (a score, or any other prediction kind) into whatever a sampler integrates -- score,
eps, or the denoiser x0 -- with :func:`diffusion_jax.parametrization.convert`, and applies
clipping / dynamic thresholding of the data prediction where a sampler asks for it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from diffusion_jax import parametrization as param_lib
from diffusion_jax import sde as sde_lib
from diffusion_jax.samplers.grids import KarrasGrid
from diffusion_jax.sde import SDE, broadcast_to_data

Array = jax.Array

__all__ = [
    "Sampler",
    "FixedGridSampler",
    "SampleInfo",
    "Model",
    "NoiseSource",
    "StaticClip",
    "DynamicThreshold",
    "THRESHOLDINGS",
    "require_marginals",
]


class SampleInfo(NamedTuple):
    """What a sampler did.

    nfe: number of calls of the score function (each on the whole batch), int32 scalar.
    num_steps: accepted steps (adaptive samplers: ``(B,)`` with per-sample step sizes).
    num_rejected: rejected steps of adaptive samplers (0 for fixed grids).
    success: False only when an adaptive sampler hit ``max_steps`` before ``t_min``.
    trajectory: with ``return_trajectory=True`` on a fixed grid, the state after every step,
      shape ``(num_steps,) + x.shape``; otherwise None.
    """

    nfe: Array
    num_steps: Array
    num_rejected: Array
    success: Array
    trajectory: Array | None = None


def fixed_info(nfe: int, num_steps: int, trajectory=None) -> SampleInfo:
    return SampleInfo(
        nfe=jnp.asarray(nfe, jnp.int32),
        num_steps=jnp.asarray(num_steps, jnp.int32),
        num_rejected=jnp.asarray(0, jnp.int32),
        success=jnp.asarray(True),
        trajectory=trajectory,
    )


def require_marginals(sde: SDE, sampler_name: str) -> None:
    """Raise the SDE's MarginalsUnavailableError, naming the sampler, for a general SDE."""
    sde_lib.require_marginals(sde, f"the {sampler_name!r} sampler")


# --------------------------------------------------------------------------------------------
# The sampler contract
# --------------------------------------------------------------------------------------------


class Sampler(flax.struct.PyTreeNode, abc.ABC):
    """What every sampler is: a frozen pytree with a :meth:`run` method.

    Class attributes a subclass sets: ``name`` (for messages and the registry), ``stochastic``
    (whether it draws noise after the prior sample) and ``needs_marginals`` (whether it needs a
    :class:`~diffusion_jax.sde.LinearSDE`; :meth:`validate` then refuses a general SDE).

    Field shared by all: ``denoise``, a final denoising step (its meaning per sampler is in the
    sampler's docstring).
    """

    denoise: bool = flax.struct.field(pytree_node=False, default=False)

    name: ClassVar[str] = ""
    stochastic: ClassVar[bool] = False
    needs_marginals: ClassVar[bool] = True

    def validate(self, sde: SDE) -> None:
        """Raise a ValueError (or MarginalsUnavailableError) if this sampler cannot run on ``sde``."""
        if self.needs_marginals:
            require_marginals(sde, self.name or type(self).__name__)

    def is_stochastic(self) -> bool:
        """Whether :meth:`run` draws noise after the prior sample, with these settings."""
        return self.stochastic

    def prediction_transform(self) -> Callable[[Array], Array] | None:
        """Clipping applied to the data prediction (None: none)."""
        return None

    @abc.abstractmethod
    def run(
        self, model: Model, x: Array, noise: NoiseSource, *, return_trajectory: bool = False
    ) -> tuple[Array, SampleInfo]:
        """Samples from ``x`` = x_T (shape ``(B, ...)``), traced under ``jit``: ``(x_0, info)``."""


class FixedGridSampler(Sampler):
    """A sampler that steps along a fixed time grid of ``num_steps`` steps (``grid`` gives the
    times from T to t_min, see :mod:`diffusion_jax.samplers.grids`)."""

    num_steps: int = flax.struct.field(pytree_node=False, default=50)
    grid: Any = KarrasGrid()

    def __post_init__(self):
        if int(self.num_steps) < 1:
            raise ValueError(f"{self.name or type(self).__name__}: num_steps={self.num_steps} is too small; need >= 1")


# --------------------------------------------------------------------------------------------
# Clipping of the data prediction
# --------------------------------------------------------------------------------------------


class StaticClip(flax.struct.PyTreeNode):
    """Clip the data prediction to ``[-limit, limit]`` (Ho et al. 2020's ``clip_denoised``)."""

    limit: float = 1.0

    def __call__(self, x0: Array) -> Array:
        return jnp.clip(x0, -self.limit, self.limit)


class DynamicThreshold(flax.struct.PyTreeNode):
    """Dynamic thresholding (Saharia et al. 2022, "Imagen", Sec. 2.3): per sample, ``s`` is the
    ``percentile`` quantile of ``|x0|``, floored at ``threshold``; ``x0`` is clipped to
    ``[-s, s]`` and rescaled by ``threshold / s`` (Imagen: ``threshold = 1``, ``x0 / s``)."""

    percentile: float = 0.995
    threshold: float = 1.0

    def __call__(self, x0: Array) -> Array:
        flat = jnp.abs(x0.reshape(x0.shape[0], -1))
        s = jnp.quantile(flat, self.percentile, axis=1)
        s = jnp.maximum(s, self.threshold)
        s = broadcast_to_data(s, x0)
        return jnp.clip(x0, -s, s) * (self.threshold / s)


THRESHOLDINGS = {"static": StaticClip, "dynamic": DynamicThreshold}


# --------------------------------------------------------------------------------------------
# Model wrapper
# --------------------------------------------------------------------------------------------


class Model:
    """The prediction function as samplers see it (built inside the traced sampler).

    ``fn(x, t)`` returns a ``kind`` prediction (``"score"`` by default) for ``x`` of shape
    ``(B, ...)`` and ``t`` of shape ``(B,)``; scalar times passed to the methods below are
    broadcast to ``(B,)``. ``thresholding`` (a :class:`StaticClip` / :class:`DynamicThreshold` or
    None) is applied to the data prediction; eps is then derived from the clipped x0 so that
    every sampler that asks for x0 or eps sees the same clipped prediction.
    """

    def __init__(self, fn: Callable[[Array, Array], Array], sde: SDE, kind: str = "score", thresholding: Any = None):
        self.fn = fn
        self.sde = sde
        self.kind = kind
        self.thresholding = thresholding

    @staticmethod
    def _t(x: Array, t: Array | float) -> Array:
        return jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])

    def raw(self, x: Array, t: Array | float) -> Array:
        t = self._t(x, t)
        out = self.fn(x, t)
        if out.shape != x.shape:
            raise ValueError(f"the score function returned shape {out.shape} for x of shape {x.shape}")
        return out.astype(x.dtype)

    def _convert(self, value, to_kind, x, t):
        return param_lib.convert(value, from_kind=self.kind, to_kind=to_kind, sde=self.sde, x=x, t=t)

    def score(self, x: Array, t: Array | float) -> Array:
        """The score; thresholding (if any) is not applied to score-based samplers."""
        t = self._t(x, t)
        return self._convert(self.raw(x, t), "score", x, t)

    def x0(self, x: Array, t: Array | float) -> Array:
        """The data prediction D(x, t) (a denoiser), clipped / thresholded if requested."""
        t = self._t(x, t)
        d = self._convert(self.raw(x, t), "x0", x, t)
        return d if self.thresholding is None else self.thresholding(d)

    def x0_eps(self, x: Array, t: Array | float) -> tuple[Array, Array]:
        """``(x0, eps)`` from one evaluation (eps derived from the clipped x0 when thresholding)."""
        t = self._t(x, t)
        raw = self.raw(x, t)
        x0 = self._convert(raw, "x0", x, t)
        if self.thresholding is None:
            return x0, self._convert(raw, "eps", x, t)
        x0 = self.thresholding(x0)
        return x0, param_lib.convert(x0, from_kind="x0", to_kind="eps", sde=self.sde, x=x, t=t)

    def eps(self, x: Array, t: Array | float) -> Array:
        """The noise prediction, consistent with :meth:`x0` (derived from it when thresholding)."""
        t = self._t(x, t)
        if self.thresholding is None:
            return self._convert(self.raw(x, t), "eps", x, t)
        return param_lib.convert(self.x0(x, t), from_kind="x0", to_kind="eps", sde=self.sde, x=x, t=t)


# --------------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------------


def _fold(key: Array, j) -> Array:
    for part in j if isinstance(j, tuple) else (j,):
        key = jax.random.fold_in(key, part)
    return key


class NoiseSource:
    """Gaussian noise for step ``j`` of a sampler.

    With ``per_sample=False`` one key drives the whole batch. With ``per_sample=True`` sample
    ``i`` uses only ``fold_in(key, i)`` (``i`` the index in the batch), so a sample does not
    change with the batch size or the number of devices the batch is split over.
    """

    def __init__(self, key: Array, batch: int, per_sample: bool):
        self.per_sample = per_sample
        self.batch = batch
        if per_sample:
            self.keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))
        else:
            self.key = key

    def _stream(self, stream: int):
        if self.per_sample:
            return jax.vmap(lambda k: jax.random.fold_in(k, stream))(self.keys)
        return jax.random.fold_in(self.key, stream)

    def prior(self, sde: SDE, shape: tuple[int, ...], dtype) -> Array:
        """x_T from the SDE's prior (stream 0)."""
        keys = self._stream(0)
        if self.per_sample:
            return jax.vmap(lambda k: sde.prior_sample(k, (1,) + tuple(shape[1:]), dtype)[0])(keys)
        return sde.prior_sample(keys, tuple(shape), dtype)

    def normal(self, j, shape: tuple[int, ...], dtype) -> Array:
        """Standard normal noise of ``shape`` (batch first) for draw ``j``: an integer or a tuple
        of integers (e.g. ``(stream, step, substep)``); distinct ``j`` give independent noise."""
        keys = self._stream(1)
        if self.per_sample:
            return jax.vmap(lambda k: jax.random.normal(_fold(k, j), tuple(shape[1:]), dtype))(keys)
        return jax.random.normal(_fold(keys, j), tuple(shape), dtype)

    def keyed(self, fn: Callable, j: Array | int, *batched: Array):
        """Call ``fn(key, *batched)`` -- a function that draws its own noise from ``key`` for a
        whole batch, such as an SDE's ``ancestral_step`` -- with the key of draw ``j``. With
        per-sample keys, ``fn`` is mapped over the batch, each sample with its own key."""
        keys = self._stream(2)
        if self.per_sample:

            def one(k, *args):
                out = fn(_fold(k, j), *[a[None] for a in args])
                return jax.tree_util.tree_map(lambda o: o[0], out)

            return jax.vmap(one)(keys, *batched)
        return fn(_fold(keys, j), *batched)
