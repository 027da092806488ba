"""Exact references for conditional sampling with a Gaussian-mixture prior.

* :func:`mixture_posterior` -- with the prior ``sum_k w_k N(mu_k, Sigma_k)`` and a linear Gaussian
  measurement ``y = A x + sigma_y n``, the posterior is again a Gaussian mixture (Bishop 2006,
  eq. 2.113-2.117, per component): with ``S_k = A Sigma_k A^T + sigma_y^2 I`` and
  ``K_k = Sigma_k A^T S_k^{-1}``,

  ``p(x | y) = sum_k w'_k N(x; mu_k + K_k (y - A mu_k), Sigma_k - K_k A Sigma_k)``,
  ``w'_k ∝ w_k N(y; A mu_k, S_k)``.

  Computed in float64 on the host: it is the reference the tests and the benchmark compare with.
* :func:`mixture_classifier` -- the exact noise-conditional classifier
  ``log p(c = k | x_t) = log w_k + log N_k,t(x_t) - log p_t(x_t)`` of a mixture whose classes are
  its components.
* :func:`mixture_conditional_score` -- the exact class-conditional score ``score(x, t, label)``
  (a component's noised score; ``label == null_label`` gives the whole mixture's score), the
  model that classifier-free guidance wraps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.analytic import GaussianMixture
from diffusion_jax.conditioning.operators import Operator, dense_matrix
from diffusion_jax.sde import SDE

Array = jax.Array

__all__ = ["MixturePosterior", "mixture_posterior", "mixture_classifier", "mixture_conditional_score", "component"]


class MixturePosterior(flax.struct.PyTreeNode):
    """``sum_k weights[k] N(means[k], covs[k])`` with full covariances, over ``event_shape``."""

    weights: Any  # (K,)
    means: Any  # (K, d)
    covs: Any  # (K, d, d)
    event_shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())

    def sample(self, key: Array, n: int, dtype=jnp.float32) -> Array:
        """``n`` exact draws, shape ``(n,) + event_shape``."""
        k_c, k_n = jax.random.split(key)
        w = np.asarray(self.weights, np.float64)
        comp = np.asarray(jax.random.choice(k_c, len(w), (n,), p=jnp.asarray(w / w.sum())))
        chol = np.stack([np.linalg.cholesky(c + 1e-12 * np.eye(c.shape[0])) for c in np.asarray(self.covs)])
        z = np.asarray(jax.random.normal(k_n, (n, chol.shape[1]), jnp.float32), np.float64)
        x = np.asarray(self.means)[comp] + np.einsum("nij,nj->ni", chol[comp], z)
        return jnp.asarray(x.reshape((n,) + tuple(self.event_shape)), dtype)

    def mean(self) -> np.ndarray:
        return np.tensordot(np.asarray(self.weights), np.asarray(self.means), axes=1).reshape(self.event_shape)


def _diag_covs(prior: GaussianMixture) -> np.ndarray:
    k = np.shape(prior.means)[0]
    stds = np.asarray(prior._stds_full(), np.float64).reshape(k, -1)
    return stds**2


def mixture_posterior(prior: GaussianMixture, operator: Operator, y: Array) -> MixturePosterior:
    """The exact posterior ``p(x | y)`` of ``prior`` under the linear ``operator`` (its matrix is
    read off with :func:`~diffusion_jax.conditioning.operators.dense_matrix`) with noise
    ``operator.sigma_y > 0``; ``y`` is one measurement (no batch axis)."""
    event_shape = tuple(prior.event_shape)
    a = dense_matrix(operator, event_shape)
    sy2 = float(operator.sigma_y) ** 2
    if sy2 <= 0:
        raise ValueError("mixture_posterior needs a noisy measurement, sigma_y > 0")
    yv = np.asarray(y, np.float64).reshape(-1)
    k = np.shape(prior.means)[0]
    mus = np.asarray(prior.means, np.float64).reshape(k, -1)
    variances = _diag_covs(prior)
    logw = np.log(np.asarray(prior.weights, np.float64))
    means, covs, logl = [], [], []
    for j in range(k):
        cov = np.diag(variances[j])
        s = a @ cov @ a.T + sy2 * np.eye(a.shape[0])
        gain = np.linalg.solve(s, a @ cov).T  # Sigma A^T S^{-1} (S symmetric)
        r = yv - a @ mus[j]
        means.append(mus[j] + gain @ r)
        c = cov - gain @ a @ cov
        covs.append(0.5 * (c + c.T))
        _, logdet = np.linalg.slogdet(s)
        logl.append(-0.5 * (r @ np.linalg.solve(s, r) + logdet))
    lw = logw + np.array(logl)
    w = np.exp(lw - lw.max())
    return MixturePosterior(weights=w / w.sum(), means=np.stack(means), covs=np.stack(covs), event_shape=event_shape)


def component(prior: GaussianMixture, k: int) -> GaussianMixture:
    """Component ``k`` of ``prior`` as a one-component mixture."""
    return GaussianMixture(
        weights=jnp.ones(1), means=jnp.asarray(prior.means)[k : k + 1], stds=jnp.asarray(prior.stds)[k : k + 1]
    )


def _component_logp(prior: GaussianMixture, x: Array, t: Array, sde: SDE | None) -> Array:
    mu, var = prior._noised(sde, t, x)
    return prior._component_logp(x, mu, var)  # (B, K)


def mixture_classifier(prior: GaussianMixture, sde: SDE):
    """The exact classifier ``classifier_fn(x, t) -> log p(c | x_t)``, shape ``(B, K)``."""

    def classifier_fn(x, t):
        logw = jnp.log(jnp.asarray(prior.weights, x.dtype))
        return jax.nn.log_softmax(logw + _component_logp(prior, x, t, sde), axis=1)

    return classifier_fn


def mixture_conditional_score(prior: GaussianMixture, sde: SDE, *, null_label: int | None = None):
    """``score(x, t, label)``: the exact score of component ``label`` of the noised mixture, or of
    the whole mixture where ``label == null_label`` (default ``K``). ``label``: ``(B,)`` ints."""
    k = np.shape(prior.means)[0]
    null = k if null_label is None else int(null_label)

    def score(x, t, label):
        mu, var = prior._noised(sde, t, x)
        logw = jnp.log(jnp.asarray(prior.weights, x.dtype))
        resp = jax.nn.softmax(logw + prior._component_logp(x, mu, var), axis=1)  # (B, K)
        onehot = jax.nn.one_hot(label, k, dtype=x.dtype)
        weights = jnp.where((label == null)[:, None], resp, onehot)
        comp_scores = -(x[:, None] - mu) / var
        w = weights.reshape(weights.shape + (1,) * (x.ndim - 1))
        return jnp.sum(w * comp_scores, axis=1)

    return score


def mixture_class_counts(prior: GaussianMixture, x: Array, labels: Sequence[int] | None = None) -> np.ndarray:
    """Fraction of samples ``x`` whose most likely component (under the clean prior) is each
    component: ``(K,)``."""
    lp = np.asarray(_component_logp(prior, jnp.asarray(x), jnp.zeros(x.shape[0]), None) + jnp.log(prior.weights))
    k = lp.shape[1]
    return np.bincount(lp.argmax(1), minlength=k) / x.shape[0]
