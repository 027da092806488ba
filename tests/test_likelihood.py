"""Likelihoods through the probability-flow ODE: exact log-densities of Gaussian mixtures,
unbiased Hutchinson estimates, bits/dim of dequantized grid data, truncation options."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import likelihood as L
from diffusion_jax.analytic import GaussianMixture
from diffusion_jax.sde import (
    EDMSDE,
    VESDE,
    VPSDE,
    CosineVPSDE,
    GeneralSDE,
    MarginalsUnavailableError,
    RectifiedFlow,
    SubVPSDE,
)

ALL = [VESDE(), VPSDE(), SubVPSDE(), EDMSDE(), CosineVPSDE(), RectifiedFlow()]
IDS = [type(s).__name__ for s in ALL]


def _mixture(scale=1.0):
    return GaussianMixture(
        weights=jnp.array([0.3, 0.7], jnp.float64),
        means=scale * jnp.array([[-1.0, 0.5, 0.0], [0.8, -0.3, 0.4]], jnp.float64),
        stds=jnp.array([0.3, 0.5], jnp.float64),
    )


def _true_terminal(mix, sde, n):
    return lambda z: mix.log_prob(z, jnp.full((n,), sde.T, z.dtype), sde)


@pytest.mark.parametrize("sde", ALL, ids=IDS)
def test_exact_log_density_of_a_mixture(sde, x64):
    """With the exact score and exact divergence, log p_{t_min}(x) is reproduced to ODE
    tolerance once the terminal density is the true p_T (this isolates the integration)."""
    mix = _mixture()
    x = mix.sample(jax.random.PRNGKey(0), 6, jnp.float64)
    f = jax.jit(
        lambda k, x: L.log_likelihood(
            k,
            mix.score_fn(sde),
            sde,
            x,
            estimator="exact",
            rtol=1e-9,
            atol=1e-9,
            prior_logp=_true_terminal(mix, sde, 6),
        )
    )
    logp, info = f(jax.random.PRNGKey(1), x)
    exact = mix.log_prob(x, jnp.full((6,), sde.t_min), sde)
    np.testing.assert_allclose(logp, exact, atol=1e-6)
    assert bool(jnp.all(info.success)) and int(info.nfe) > 0 and info.num_steps.shape == (6,)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(), SubVPSDE()], ids=["VP", "VE", "subVP"])
def test_log_likelihood_with_the_sde_prior_within_1e3_nats_per_dim(sde, x64):
    """End to end, with the SDE's own prior: within 1e-3 nats per dimension of the closed form.
    What remains is the prior's mismatch with the true p_T (VP: alpha(1) = 0.0066, so a data mean
    m shifts p_T by 0.0066 m), kept small here by data near the origin."""
    mix = _mixture(scale=0.1)
    x = mix.sample(jax.random.PRNGKey(2), 8, jnp.float64)
    logp, _ = jax.jit(
        lambda k, x: L.log_likelihood(k, mix.score_fn(sde), sde, x, estimator="exact", rtol=1e-8, atol=1e-8)
    )(jax.random.PRNGKey(0), x)
    exact = mix.log_prob(x, jnp.full((8,), sde.t_min), sde)
    assert float(jnp.max(jnp.abs(logp - exact))) / 3 < 1e-3


@pytest.mark.parametrize("estimator", ["hutchinson_rademacher", "hutchinson_gaussian"])
def test_hutchinson_is_unbiased(estimator, x64):
    """The mean over many fixed probes agrees with the exact divergence within its standard error;
    the reported spread is that standard error."""
    sde = VPSDE()
    mix = _mixture()
    x = mix.sample(jax.random.PRNGKey(3), 4, jnp.float64)
    kw = dict(rtol=1e-7, atol=1e-7)
    exact, _ = L.log_likelihood(jax.random.PRNGKey(0), mix.score_fn(sde), sde, x, estimator="exact", **kw)
    est, info = jax.jit(
        lambda k: L.log_likelihood(k, mix.score_fn(sde), sde, x, estimator=estimator, num_probes=256, **kw)
    )(jax.random.PRNGKey(5))
    assert info.logp_probes.shape == (4, 256)
    z = (np.asarray(est) - np.asarray(exact)) / np.asarray(info.stderr)
    assert np.all(np.abs(z) < 4.0), z
    assert np.all(np.asarray(info.stderr) > 0)
    # The spread really is the probes' standard error.
    np.testing.assert_allclose(info.stderr, np.std(info.logp_probes, axis=1, ddof=1) / 16, rtol=1e-10)


def _grid_case(num_levels, value_range):
    lo, hi = value_range
    mu, s = lo + 0.55 * (hi - lo), 0.2 * (hi - lo)
    gauss = GaussianMixture(
        weights=jnp.array([1.0], jnp.float64),
        means=jnp.array([[mu, mu]], jnp.float64),
        stds=jnp.array([s], jnp.float64),
    )
    disc = L.Discretization(num_levels=num_levels, value_range=value_range)
    levels = jnp.array([[3, num_levels // 2], [num_levels - 5, num_levels // 3]], jnp.int32)
    w = disc.bin_width
    centers = lo + w * (np.asarray(levels) + 0.5)
    # E_u[-log N(lo + w (k + u); mu, s^2)] per dimension, in closed form.
    nll = 0.5 * np.log(2 * np.pi * s**2) + ((centers - mu) ** 2 + w**2 / 12) / (2 * s**2)
    analytic_bpd = nll.mean(axis=1) / np.log(2) + disc.offset_bits
    return gauss, disc, levels, analytic_bpd


@pytest.mark.parametrize(
    "num_levels,value_range", [(256, (-1.0, 1.0)), (17, (0.0, 1.0))], ids=["8bit-centred", "17-level"]
)
def test_bits_per_dim_of_dequantized_grid_data(num_levels, value_range, x64):
    """bits/dim of discrete data under a Gaussian model matches its closed form (uniform
    dequantization, offset from the data scaling)."""
    sde = VPSDE()
    gauss, disc, levels, analytic = _grid_case(num_levels, value_range)
    assert disc.offset_bits == pytest.approx({256: 7.0, 17: math.log2(17)}[num_levels])
    n_draws = 200
    # Each draw's estimate per example, to get the Monte-Carlo standard error of the dequantization.
    f = jax.jit(
        lambda k: L.bits_per_dim(
            k,
            gauss.score_fn(sde),
            sde,
            levels,
            discretization=disc,
            num_draws=n_draws,
            estimator="exact",
            rtol=1e-7,
            atol=1e-7,
            prior_logp=_true_terminal(gauss, sde, 2),
        )
    )
    bpd, _ = f(jax.random.PRNGKey(0))
    # Dequantization noise: per-draw spread of -log p / (D ln 2) is at most (w^2 ...) small; bound it by
    # the closed-form std of the quadratic term.
    lo, hi = value_range
    w, s = disc.bin_width, 0.2 * (hi - lo)
    per_draw_std = (w * 1.0 * 2 * 0.5 * (hi - lo) / (2 * s**2)) / np.log(2)  # |d nll / du| * std(u) upper bound
    tol = 5 * per_draw_std / math.sqrt(n_draws) + 1e-5
    np.testing.assert_allclose(bpd, analytic, atol=tol)
    # The dequantized bound is above the true discrete bits of the Gaussian mass in each bin.
    from scipy.stats import norm

    lo_edges = lo + w * np.asarray(levels)
    mass = norm.cdf(lo_edges + w, 0.55 * (hi - lo) + lo, s) - norm.cdf(lo_edges, 0.55 * (hi - lo) + lo, s)
    true_bits = -np.log2(mass).mean(axis=1)
    assert np.all(np.asarray(bpd) >= true_bits - tol)


def test_truncation_perturb_bound(x64):
    """truncation='perturb' gives E[log p_eps(alpha x + sigma e)] + D log alpha, a lower bound on
    the model's log p(x) that is close to the data density for a small t_min."""
    sde = VPSDE(t_min=1e-3)
    mix = _mixture()
    x = mix.sample(jax.random.PRNGKey(7), 3, jnp.float64)
    one = lambda k: L.log_likelihood(
        k,
        mix.score_fn(sde),
        sde,
        x,
        estimator="exact",
        rtol=1e-7,
        atol=1e-7,
        truncation="perturb",
        prior_logp=_true_terminal(mix, sde, 3),
    )[0]
    draws = np.asarray(jax.jit(lambda keys: jax.lax.map(one, keys))(jax.random.split(jax.random.PRNGKey(0), 64)))
    mean, se = draws.mean(0), draws.std(0) / 8
    exact0 = np.asarray(mix.log_prob(x))
    assert np.all(mean <= exact0 + 4 * se)
    assert np.all(np.abs(mean - exact0) < 0.05)


def test_images_and_bad_input():
    sde = VPSDE()
    x = 0.1 * jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 1))
    logp, info = L.log_likelihood(jax.random.PRNGKey(1), lambda x, t: -x, sde, x, rtol=1e-3, atol=1e-3)
    assert logp.shape == (2,) and info.z.shape == x.shape and np.all(np.isfinite(logp))
    general = GeneralSDE(drift_fn=lambda x, t: -x, diffusion_fn=lambda t: jnp.ones_like(t))
    with pytest.raises(MarginalsUnavailableError):
        L.log_likelihood(jax.random.PRNGKey(0), lambda x, t: -x, general, x)
    with pytest.raises(ValueError, match="unknown divergence estimator 'skilling'; valid: hutchinson_rademacher"):
        L.log_likelihood(jax.random.PRNGKey(0), lambda x, t: -x, sde, x, estimator="skilling")
    with pytest.raises(ValueError, match="unknown truncation"):
        L.log_likelihood(jax.random.PRNGKey(0), lambda x, t: -x, sde, x, truncation="soft")
    with pytest.raises(ValueError, match="num_levels must be >= 2"):
        L.Discretization(num_levels=1)


def test_an_unbatched_input_gets_a_clear_message():
    sde = VPSDE()
    with pytest.raises(ValueError, match=r"x must be a batch of shape \(B, \.\.\.\), got shape \(3,\)"):
        L.log_likelihood(jax.random.PRNGKey(0), lambda x, t: -x, sde, jnp.zeros((3,)))
    image_score = lambda x, t: -x * t[:, None, None, None]  # noqa: E731 (an image network's shapes)
    with pytest.raises(ValueError, match=r"returns shape \(8, 8, 8, 1\) for x of shape \(8, 8, 1\); is x batched"):
        L.log_likelihood(jax.random.PRNGKey(0), image_score, sde, jnp.zeros((8, 8, 1)))
