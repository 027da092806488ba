"""Data distributions whose noised densities and scores are known exactly.

A Gaussian mixture with diagonal covariances stays a Gaussian mixture under every linear SDE:
``p_t = sum_k w_k N(alpha mu_k, diag(alpha^2 s_k^2 + sigma^2))``. Its exact score, log-density
and samples are what the tests and benchmarks use to check samplers, likelihoods and losses
without a trained network.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.sde import SDE, broadcast_to_data

Array = jax.Array

__all__ = ["GaussianMixture"]


class GaussianMixture(flax.struct.PyTreeNode):
    """``sum_k weights[k] N(means[k], diag(stds[k]^2))`` over data of shape ``event_shape``.

    ``means`` and ``stds`` have shape ``(K,) + event_shape`` (``stds`` may also be ``(K,)`` for
    isotropic components); ``weights`` has shape ``(K,)`` and sums to one.
    """

    weights: Array
    means: Array
    stds: Array

    def __post_init__(self):
        w = np.asarray(self.weights) if not isinstance(self.weights, jax.core.Tracer) else None
        if w is None or w.dtype == object:
            return
        if w.ndim != 1:
            raise ValueError(f"weights must have shape (K,), got {w.shape}")
        k = w.shape[0]
        if np.shape(self.means)[0] != k or np.shape(self.stds)[0] != k:
            raise ValueError(
                f"weights, means and stds need the same number of components K={k}; got means "
                f"{np.shape(self.means)} and stds {np.shape(self.stds)}"
            )
        if abs(float(w.sum()) - 1.0) > 1e-6 or (w < 0).any():
            raise ValueError(f"weights must be non-negative and sum to 1, got {w}")

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(jnp.shape(self.means)[1:])

    def _stds_full(self):
        s = jnp.asarray(self.stds)
        return s.reshape(s.shape + (1,) * (jnp.ndim(self.means) - s.ndim)) * jnp.ones_like(self.means)

    def _noised(self, sde: SDE | None, t, x):
        """Component means and variances at time t, broadcast to (B, K) + event_shape."""
        mu = jnp.asarray(self.means, x.dtype)[None]
        var = self._stds_full().astype(x.dtype)[None] ** 2
        if sde is None:
            return mu, var
        a, s = sde.marginal(jnp.asarray(t, x.dtype))
        a = broadcast_to_data(jnp.broadcast_to(a, x.shape[:1]), x)[:, None]
        s = broadcast_to_data(jnp.broadcast_to(s, x.shape[:1]), x)[:, None]
        return a * mu, a**2 * var + s**2

    def _component_logp(self, x, mu, var):
        axes = tuple(range(2, x.ndim + 1))
        diff = x[:, None] - mu
        return -0.5 * jnp.sum(diff**2 / var + jnp.log(2 * jnp.pi * var), axis=axes)

    def log_prob(self, x: Array, t: Array | None = None, sde: SDE | None = None) -> Array:
        """log p_t(x) (``(B,)``); with ``sde=None`` the data density p_0."""
        mu, var = self._noised(sde, t, x)
        logw = jnp.log(jnp.asarray(self.weights, x.dtype))
        return jax.nn.logsumexp(logw + self._component_logp(x, mu, var), axis=1)

    def score(self, x: Array, t: Array | None = None, sde: SDE | None = None) -> Array:
        """grad_x log p_t(x), shape of x: the exact score of the noised mixture."""
        mu, var = self._noised(sde, t, x)
        logw = jnp.log(jnp.asarray(self.weights, x.dtype))
        resp = jax.nn.softmax(logw + self._component_logp(x, mu, var), axis=1)  # (B, K)
        comp_scores = -(x[:, None] - mu) / var
        return jnp.sum(broadcast_to_data(resp, comp_scores) * comp_scores, axis=1)

    def score_fn(self, sde: SDE):
        """``score_fn(x, t)`` for samplers and likelihoods."""
        return lambda x, t: self.score(x, t, sde)

    def sample(self, key: Array, n: int, dtype=jnp.float32) -> Array:
        k_c, k_n = jax.random.split(key)
        comp = jax.random.choice(k_c, len(self.weights), (n,), p=jnp.asarray(self.weights))
        noise = jax.random.normal(k_n, (n,) + self.event_shape, dtype)
        return jnp.asarray(self.means, dtype)[comp] + self._stds_full().astype(dtype)[comp] * noise

    def mean(self) -> Array:
        w = jnp.asarray(self.weights)
        return jnp.tensordot(w, jnp.asarray(self.means), axes=1)

    def variance(self) -> Array:
        """Per-dimension variance of the mixture."""
        w = jnp.asarray(self.weights)
        m = self.mean()
        second = jnp.tensordot(w, self._stds_full() ** 2 + jnp.asarray(self.means) ** 2, axes=1)
        return second - m**2
