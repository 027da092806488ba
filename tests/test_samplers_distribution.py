"""Stochastic samplers driven by the exact score reproduce the data distribution.

Data: the 2-D three-component Gaussian mixture of ``_sampler_problems``. For each sampler,
16000 samples are compared with 16000 exact draws by the sliced 2-Wasserstein distance (256
projections) and by their first two moments. The Monte-Carlo noise floor is measured, not
assumed: the SWD between pairs of independent exact samples of the same size (mean and standard
deviation over 6 pairs); a sampler passes when its SWD is below mean + 3 std of the floor and its
moments are within 4 standard errors. Step counts are large enough that the discretisation bias
is below the floor; a 5-step DDPM run shows that the criterion does detect a biased sampler.
"""

import functools

import jax
import numpy as np
import pytest
from _sampler_problems import MIXTURE, sliced_wasserstein

from diffusion_jax import samplers as S
from diffusion_jax.sde import EDMSDE, VESDE, VPSDE, CosineVPSDE, RectifiedFlow, SubVPSDE

N = 16000


@functools.cache
def _floor():
    swds = [
        sliced_wasserstein(
            MIXTURE.sample(jax.random.PRNGKey(100 + 2 * i), N), MIXTURE.sample(jax.random.PRNGKey(101 + 2 * i), N)
        )
        for i in range(6)
    ]
    return float(np.mean(swds)), float(np.std(swds))


@functools.cache
def _exact():
    return np.asarray(MIXTURE.sample(jax.random.PRNGKey(7), N))


def _check(x):
    x = np.asarray(x, np.float64)
    assert np.all(np.isfinite(x))
    mean_floor, std_floor = _floor()
    swd = sliced_wasserstein(x, _exact())
    mean, var = np.asarray(MIXTURE.mean()), np.asarray(MIXTURE.variance())
    # Standard errors of the sample mean and variance (the fourth central moment from the exact
    # draws).
    se_mean = np.sqrt(var / N)
    ex = _exact()
    m4 = np.mean((ex - ex.mean(0)) ** 4, axis=0)
    se_var = np.sqrt((m4 - var**2) / N)
    return swd, mean_floor + 3 * std_floor, np.abs(x.mean(0) - mean) / se_mean, np.abs(x.var(0) - var) / se_var


CASES = [
    ("ddpm", VPSDE(), dict(num_steps=500)),
    ("ddim", RectifiedFlow(), dict(num_steps=200, eta=0.5, grid="log_snr")),
    ("sde_dpmpp_2m", VPSDE(), dict(num_steps=100)),
    ("edm", EDMSDE(), dict(num_steps=100, s_noise=1.0)),
    ("euler_maruyama", VPSDE(), dict(num_steps=1000)),
    ("pc", VESDE(N=1000), dict(num_steps=1000)),  # reverse diffusion + Langevin, snr 0.16
    ("ancestral", VPSDE(N=1000), dict(num_steps=1000)),
    ("pc", SubVPSDE(), dict(num_steps=500, predictor="euler_maruyama", corrector="annealed_langevin")),
    ("ode", CosineVPSDE(), dict()),
]


@pytest.mark.parametrize("name,sde,kw", CASES, ids=[f"{c[0]}-{type(c[1]).__name__}" for c in CASES])
def test_sampler_reproduces_the_mixture(name, sde, kw):
    x, info = S.sample(jax.random.PRNGKey(3), MIXTURE.score_fn(sde), sde, (N, 2), S.get_sampler(name, **kw))
    swd, threshold, z_mean, z_var = _check(x)
    assert swd < threshold, f"SWD {swd:.4f} above the noise floor bound {threshold:.4f}"
    assert np.all(z_mean < 4) and np.all(z_var < 4), (z_mean, z_var)


def test_the_criterion_detects_a_biased_sampler():
    sde = VPSDE()
    x, _ = S.sample(jax.random.PRNGKey(3), MIXTURE.score_fn(sde), sde, (N, 2), S.get_sampler("ddpm", num_steps=5))
    swd, threshold, _, z_var = _check(x)
    assert swd > 3 * threshold and np.all(z_var > 4)
