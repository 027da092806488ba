"""Shared pieces of the conditional samplers: running a given sampler over part of the time range,
noise streams of wrapped samplers, and the spectral projection onto a measurement.

The conditional samplers wrap :class:`~diffusion_jax.samplers.Sampler` objects rather than copy
their loops: :func:`run_between` runs any fixed-grid sampler from ``t_start`` to ``t_end`` with
its own grid family (:class:`WindowGrid`), or one step at a time (an explicit two-point grid).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from diffusion_jax.conditioning.operators import Operator, SVDOperator
from diffusion_jax.samplers.base import FixedGridSampler, Model, NoiseSource
from diffusion_jax.samplers.grids import ExplicitGrid
from diffusion_jax.sde import SDE, broadcast_to_data

Array = jax.Array

__all__ = ["WindowGrid", "SubNoise", "run_between", "step_once", "project", "require_svd", "marginal_b"]


class _Window:
    """An SDE seen on ``[t_end, t_start]``: what grids read (T, t_min, log-SNR and its inverse)."""

    def __init__(self, sde: SDE, t_start, t_end):
        self._sde = sde
        self.T = t_start
        self.t_min = t_end

    def log_snr(self, t):
        return self._sde.log_snr(t)

    def t_from_log_snr(self, lam):
        return self._sde.t_from_log_snr(lam)


class WindowGrid(flax.struct.PyTreeNode):
    """The grid family ``base`` laid over ``[t_end, t_start]`` instead of ``[t_min, T]`` (SDEdit
    starts at ``t_start = t0``; DAPS solves the probability-flow ODE from each annealing time)."""

    base: Any
    t_start: Array
    t_end: Array

    def __call__(self, sde: SDE, num_steps: int) -> Array:
        return self.base(_Window(sde, self.t_start, self.t_end), num_steps)


def _as_tuple(j) -> tuple:
    return j if isinstance(j, tuple) else (j,)


class SubNoise(NoiseSource):
    """The noise of a wrapped sampler: draw ``j`` of the inner sampler is draw ``prefix + j`` of
    the outer source, so every inner run (each step, each resampling round) sees fresh noise and
    per-sample keys keep working."""

    def __init__(self, base: NoiseSource, prefix: tuple):
        self.base = base
        self.prefix = prefix
        self.per_sample = base.per_sample
        self.batch = base.batch

    def normal(self, j, shape, dtype):
        return self.base.normal(self.prefix + _as_tuple(j), shape, dtype)

    def keyed(self, fn, j, *batched):
        return self.base.keyed(fn, self.prefix + _as_tuple(j), *batched)  # type: ignore[arg-type]

    def prior(self, sde, shape, dtype):
        raise NotImplementedError("a wrapped sampler receives its starting state; it draws no prior sample")


def run_between(
    sampler: FixedGridSampler, model: Model, x: Array, t_start, t_end, noise: NoiseSource, *, denoise: bool
) -> tuple[Array, Any]:
    """Run ``sampler`` (its grid family and number of steps) from ``t_start`` to ``t_end``."""
    grid = WindowGrid(base=sampler.grid, t_start=jnp.asarray(t_start, x.dtype), t_end=jnp.asarray(t_end, x.dtype))
    return sampler.replace(grid=grid, denoise=denoise).run(model, x, noise)


def step_once(sampler: FixedGridSampler, model: Model, x: Array, t, t_next, noise: NoiseSource) -> tuple[Array, Any]:
    """One step of ``sampler`` from ``t`` to ``t_next`` (a two-point explicit grid). Multistep
    methods take their first-order first step."""
    grid = ExplicitGrid(times=jnp.stack([jnp.asarray(t, x.dtype), jnp.asarray(t_next, x.dtype)]))
    return sampler.replace(grid=grid, num_steps=1, denoise=False).run(model, x, noise)


def marginal_b(sde: SDE, t, x: Array) -> tuple[Array, Array]:
    """``(alpha(t), sigma(t))`` broadcast against ``x`` (``t`` scalar or ``(B,)``)."""
    a, s = sde.marginal(jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1]))
    return broadcast_to_data(a.astype(x.dtype), x), broadcast_to_data(s.astype(x.dtype), x)


def require_svd(operator: Operator, method: str) -> SVDOperator:
    if not isinstance(operator, SVDOperator):
        raise TypeError(
            f"{method} needs a linear operator with an SVD (an SVDOperator: Mask, Separable and the "
            f"factories of diffusion_jax.conditioning.operators); got {type(operator).__name__}. "
            f"For a non-linear forward function use 'dps' or 'smc'."
        )
    return operator


def require_noisy(operator: Operator | None, method: str, why: str) -> None:
    """Refuses a noise-free measurement (a concrete ``sigma_y <= 0``) for a method that divides
    by ``sigma_y``; a traced ``sigma_y`` passes."""
    sy = operator.sigma_y if operator is not None else None
    if isinstance(sy, (int, float)) and float(sy) <= 0:
        raise ValueError(f"{method} {why}, which needs a noisy measurement: sigma_y > 0")


def project(operator: SVDOperator, y: Array, x: Array, alpha, sigma, z: Array, level=None) -> Array:
    """Replace the observed spectral coordinates of ``x`` by the measurement noised to the level
    of ``x``: ``V^T x -> alpha ybar + sqrt(sigma^2 - (alpha sigma_y / s)^2) z`` (``ybar = S^+ U^T y``
    already carries noise ``sigma_y / s``; ``z`` a standard normal draw in spectral coordinates).
    Only the coordinates whose measurement is less noisy than ``x`` are replaced,
    ``alpha sigma_y / s <= level`` (``level`` defaults to ``sigma``; the others, and the
    directions ``A`` does not see, keep the model's values): the rule of DDRM's eq. 8 with
    ``eta_b = 1``. Noise-free, this is score_sde's projection: for a mask its inpainting, for the
    channel mean its colorization."""
    ybar, s = operator.spectral_measurement(y, x)
    xbar = operator.vt(x)
    sigma = jnp.asarray(sigma, x.dtype)
    level = sigma if level is None else jnp.asarray(level, x.dtype)
    eff = alpha * jnp.asarray(operator.sigma_y, x.dtype) / jnp.where(s > 0, s, 1.0)
    use = (s > 0) & (eff <= level)
    std = jnp.sqrt(jnp.maximum(sigma**2 - eff**2, 0.0))
    return operator.v(jnp.where(use, alpha * ybar + std * z, xbar))
