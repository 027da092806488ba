"""Shared small problems for the sampler tests: a 2-D Gaussian mixture with its exact noised
score, the exact probability-flow ODE solution from given noise, and a sliced Wasserstein
distance."""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import samplers as S
from diffusion_jax.analytic import GaussianMixture

MIXTURE = GaussianMixture(
    weights=np.array([0.3, 0.4, 0.3]),
    means=np.array([[-1.5, 0.5], [1.0, 1.0], [0.5, -1.5]]),
    stds=np.array([0.3, 0.5, 0.4]),
)


def prior_noise(sde, n, seed=0, dtype=jnp.float64):
    return sde.prior_sample(jax.random.PRNGKey(seed), (n, 2), dtype)


def reference_solution(sde, x_T, tol=1e-12):
    """The probability-flow ODE solution at t_min from x_T: Dopri5 at rtol = atol = tol."""
    sampler = S.ProbabilityFlowSampler(rtol=tol, atol=tol, max_steps=200_000)
    x, info = S.sample(
        jax.random.PRNGKey(0), MIXTURE.score_fn(sde), sde, x_T.shape, sampler, x_init=x_T, dtype=x_T.dtype
    )
    assert bool(info.success)
    return x


def rms(a, b):
    return float(jnp.sqrt(jnp.mean((a - b) ** 2)))


def sliced_wasserstein(a, b, num_projections=256, seed=0):
    """Sliced 2-Wasserstein distance between two equal-size point clouds (n, d)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(num_projections, a.shape[1]))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    pa = np.sort(a @ dirs.T, axis=0)
    pb = np.sort(b @ dirs.T, axis=0)
    return float(np.sqrt(np.mean((pa - pb) ** 2)))


def empirical_order(ns, errors):
    """Least-squares slope of -log(error) against log(N)."""
    slope, _ = np.polyfit(np.log(np.asarray(ns, float)), -np.log(np.asarray(errors, float)), 1)
    return float(slope)
