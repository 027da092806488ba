"""Time grids: where a fixed-step sampler evaluates the model.

A grid is a small frozen pytree; ``grid(sde, num_steps)`` returns ``num_steps + 1`` times,
decreasing from ``sde.T`` to ``sde.t_min`` (both endpoints exact). Grids defined on the noise
level use the SDE's ``log_snr`` / ``t_from_log_snr``, so they apply to every member of the linear
family; :class:`UniformGrid` and :class:`QuadraticGrid` also work for a general SDE.

================  ===========================================================================
``uniform``       uniform in t (score_sde's samplers)
``karras``        EDM's rho-spaced noise levels (Karras et al. 2022, eq. 5), on
                  sigma~ = sigma / alpha, mapped to t through the log-SNR = -2 log sigma~
``log_snr``       uniform in log-SNR (DPM-Solver's "logSNR" steps, Lu et al. 2022, Sec. 3.3)
``quadratic``     DDIM's quadratic selection (Song et al. 2021a, App. D.2): t - t_min grows
                  quadratically with the step index, denser near the data
``explicit``      a given array of times
``score_sde``     score_sde's PC grid: the N evaluation times ``linspace(T, t_min, N)`` plus
                  one step of the same size below t_min (clipped at 0) as the end point; with
                  ``N == sde.N`` the discrete VE / VP tables are then visited once each
================  ===========================================================================
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.sde import SDE

Array = jax.Array

__all__ = [
    "UniformGrid",
    "KarrasGrid",
    "LogSNRGrid",
    "QuadraticGrid",
    "ExplicitGrid",
    "ScoreSDEGrid",
    "GRIDS",
    "get_grid",
]


def _check_steps(num_steps: int) -> int:
    n = int(num_steps)
    if n < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return n


def _endpoints(sde: SDE, dtype=None):
    T = jnp.asarray(sde.T, dtype)
    t_min = jnp.asarray(sde.t_min, dtype)
    return T, t_min


def _pin(ts: Array, T: Array, t_min: Array) -> Array:
    """Make the first and last times exactly T and t_min (round trips through the log-SNR are
    not bit-exact)."""
    return ts.at[0].set(T).at[-1].set(t_min)


class UniformGrid(flax.struct.PyTreeNode):
    """``t_i = T + i (t_min - T) / N``."""

    def __call__(self, sde: SDE, num_steps: int) -> Array:
        n = _check_steps(num_steps)
        T, t_min = _endpoints(sde)
        return _pin(T + (t_min - T) * jnp.arange(n + 1) / n, T, t_min)


class QuadraticGrid(flax.struct.PyTreeNode):
    """``t_i = t_min + (T - t_min) (1 - i/N)^2`` (DDIM's "quadratic" time-step selection)."""

    def __call__(self, sde: SDE, num_steps: int) -> Array:
        n = _check_steps(num_steps)
        T, t_min = _endpoints(sde)
        u = 1.0 - jnp.arange(n + 1) / n
        return _pin(t_min + (T - t_min) * u**2, T, t_min)


class KarrasGrid(flax.struct.PyTreeNode):
    """EDM's schedule (Karras et al. 2022, eq. 5):
    ``sigma~_i = (sigma~_max^(1/rho) + i/N (sigma~_min^(1/rho) - sigma~_max^(1/rho)))^rho`` on the
    noise level of ``x / alpha``, ``sigma~ = sigma / alpha``; ``t_i = t(log-SNR = -2 log sigma~_i)``.
    ``rho = 1`` is uniform in sigma~; large ``rho`` approaches uniform in log-SNR."""

    rho: float = 7.0

    def __call__(self, sde: SDE, num_steps: int) -> Array:
        n = _check_steps(num_steps)
        T, t_min = _endpoints(sde)
        lam = sde.log_snr(jnp.stack([T, t_min]))
        # log sigma~ = -lambda / 2; work with sigma~^(1/rho) = exp(-lambda / (2 rho)).
        inv_rho = 1.0 / self.rho
        s_max = jnp.exp(-0.5 * lam[0] * inv_rho)
        s_min = jnp.exp(-0.5 * lam[1] * inv_rho)
        i = jnp.arange(n + 1) / n
        log_sigma = self.rho * jnp.log(s_max + i * (s_min - s_max))
        return _pin(sde.t_from_log_snr(-2.0 * log_sigma), T, t_min)


class LogSNRGrid(flax.struct.PyTreeNode):
    """Uniform in log-SNR ``lambda(t) = log(alpha^2 / sigma^2)``."""

    def __call__(self, sde: SDE, num_steps: int) -> Array:
        n = _check_steps(num_steps)
        T, t_min = _endpoints(sde)
        lam = sde.log_snr(jnp.stack([T, t_min]))
        lams = lam[0] + (lam[1] - lam[0]) * jnp.arange(n + 1) / n
        return _pin(sde.t_from_log_snr(lams), T, t_min)


class ScoreSDEGrid(flax.struct.PyTreeNode):
    """score_sde's time points for predictor-corrector sampling: evaluations at
    ``linspace(T, t_min, N)`` (so the last step starts *at* t_min), then an end point one step
    below t_min (at least 0). For a VE / VP SDE with ``N == sde.N``, ``sde.timestep`` maps the N
    evaluation times to the table indices N-1, ..., 0 exactly once each, which the ancestral and
    reverse-diffusion predictors rely on. It is the default grid of the PC samplers."""

    def __call__(self, sde: SDE, num_steps: int) -> Array:
        n = _check_steps(num_steps)
        T, t_min = _endpoints(sde)
        if n == 1:
            return jnp.stack([T, t_min])
        evals = T + (t_min - T) * jnp.arange(n) / (n - 1)
        end = jnp.maximum(t_min - (T - t_min) / (n - 1), 0.0)
        return jnp.concatenate([evals.at[0].set(T).at[-1].set(t_min), end[None]])


class ExplicitGrid(flax.struct.PyTreeNode):
    """A given decreasing array of ``N + 1`` times (its length fixes the number of steps)."""

    times: Array | None = None

    def __post_init__(self):
        if self.times is None:
            raise ValueError("ExplicitGrid needs times=, a decreasing 1-D array of N + 1 times")
        if isinstance(self.times, jax.core.Tracer) or type(self.times) is object:
            return
        try:
            t = np.asarray(self.times, dtype=np.float64)
        except (TypeError, ValueError):
            return  # placeholders that jax puts in pytrees while transforming them
        if t.ndim != 1 or t.shape[0] < 2:
            raise ValueError(f"ExplicitGrid.times must be 1-D with at least 2 times, got shape {t.shape}")
        if not np.all(np.diff(t) < 0):
            raise ValueError("ExplicitGrid.times must be strictly decreasing (from T towards t_min)")

    def __call__(self, sde: SDE, num_steps: int) -> Array:
        n = _check_steps(num_steps)
        ts = jnp.asarray(self.times)
        if ts.shape[0] != n + 1:
            raise ValueError(
                f"ExplicitGrid has {ts.shape[0]} times, i.e. {ts.shape[0] - 1} steps, but the sampler "
                f"asks for num_steps={n}; give num_steps={ts.shape[0] - 1}"
            )
        return ts


GRIDS = {
    "uniform": UniformGrid,
    "karras": KarrasGrid,
    "log_snr": LogSNRGrid,
    "quadratic": QuadraticGrid,
    "explicit": ExplicitGrid,
    "score_sde": ScoreSDEGrid,
}


def get_grid(name: str, **kwargs):
    """A time grid by name (``GRIDS``); unknown names raise listing the valid ones."""
    if name not in GRIDS:
        raise ValueError(f"unknown time grid {name!r}; valid names: {', '.join(GRIDS)}")
    return GRIDS[name](**kwargs)
