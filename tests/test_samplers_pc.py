"""score_sde's predictor-corrector machinery: each single-step update against score_sde's
formulas, the probability-flow predictor's order, and per-example time steps in the SDE's
Euler-Maruyama discretisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _sampler_problems import MIXTURE, empirical_order, prior_noise, reference_solution, rms

from diffusion_jax import samplers as S
from diffusion_jax.samplers.base import Model, NoiseSource
from diffusion_jax.sde import VESDE, VPSDE, SubVPSDE

KEY = jax.random.PRNGKey(0)


def _setup(sde, batch=5):
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, 2)) * 2.0
    t = jnp.full((batch,), 0.4)
    return Model(MIXTURE.score_fn(sde), sde), x, t, NoiseSource(jax.random.PRNGKey(2), batch, False)


def test_sde_discretize_accepts_per_example_dt():
    """``SDE.discretize`` with t and dt of shape (B,) (as the reverse-diffusion predictor passes
    them for SDEs without a discrete table) equals the per-example scalar computation."""
    sde = SubVPSDE()
    x = jnp.arange(6.0).reshape(3, 2)
    t = jnp.array([0.2, 0.5, 0.9])
    dt = jnp.array([0.01, 0.02, 0.03])
    f, g = sde.discretize(x, t, dt)
    for i in range(3):
        fi, gi = sde.discretize(x[i : i + 1], t[i : i + 1], dt[i])
        np.testing.assert_allclose(f[i], fi[0], rtol=1e-6)
        np.testing.assert_allclose(g[i], gi[0], rtol=1e-6)


@pytest.mark.parametrize("sde", [VESDE(), VPSDE()], ids=["VE", "VP"])
@pytest.mark.parametrize("norm", ["batch", "per_sample"])
def test_langevin_step_size_is_score_sdes(sde, norm):
    """eps = 2 alpha (snr ||z|| / ||grad||)^2 with batch-mean norms (score_sde
    ``LangevinCorrector``), or per-sample norms; alpha = 1 - beta_i for VP, 1 for VE."""
    model, x, t, noise = _setup(sde)
    corr = S.LangevinCorrector(snr=0.16, n_steps=1, norm=norm)
    x_new, x_mean = corr.update(model, x, t, noise, (0, 3))
    grad = np.asarray(MIXTURE.score(x, t, sde))
    z = np.asarray(noise.normal((0, 3, 0), x.shape, x.dtype))
    gn, zn = np.linalg.norm(grad, axis=1), np.linalg.norm(z, axis=1)
    if norm == "batch":
        gn, zn = gn.mean(), zn.mean()
    alpha = 1.0 - float(sde.discrete_betas()[sde.timestep(0.4)]) if isinstance(sde, VPSDE) else 1.0
    step = np.broadcast_to(2 * alpha * (0.16 * zn / gn) ** 2, (5,))[:, None]
    np.testing.assert_allclose(x_mean, np.asarray(x) + step * grad, rtol=1e-5)
    np.testing.assert_allclose(x_new, np.asarray(x_mean) + np.sqrt(2 * step) * z, rtol=1e-5)


def test_annealed_langevin_step_size():
    sde = VESDE()
    model, x, t, noise = _setup(sde)
    x_new, x_mean = S.AnnealedLangevinCorrector(snr=0.2, n_steps=1).update(model, x, t, noise, (0, 0))
    step = 2 * (0.2 * float(sde.sigma(0.4))) ** 2
    grad = MIXTURE.score(x, t, sde)
    np.testing.assert_allclose(x_mean, x + step * grad, rtol=1e-5)


def test_reverse_diffusion_and_ancestral_on_the_ddpm_table():
    sde = VPSDE()
    model, x, t, noise = _setup(sde)
    beta = float(sde.discrete_betas()[sde.timestep(0.4)])
    s = MIXTURE.score(x, t, sde)
    # Reverse diffusion (Song et al. 2021, eq. 45): x - [(sqrt(1-b) - 1) x - b s].
    _, x_mean = S.ReverseDiffusionPredictor().update(model, x, t, t - 0.001, noise, (1, 0))
    np.testing.assert_allclose(x_mean, x - ((np.sqrt(1 - beta) - 1) * x - beta * s), rtol=1e-5)
    # Ancestral (DDPM, Ho et al. 2020 Alg. 2 in score form): (x + b s) / sqrt(1 - b).
    _, x_mean = S.AncestralPredictor().update(model, x, t, t - 0.001, noise, (1, 0))
    np.testing.assert_allclose(x_mean, (x + beta * s) / np.sqrt(1 - beta), rtol=1e-5)
    # Probability flow: reverse diffusion with half the score term and no noise.
    x_pf, x_mean_pf = S.ReverseDiffusionPredictor().update(model, x, t, t - 0.001, noise, (1, 0), probability_flow=True)
    np.testing.assert_allclose(x_pf, x - ((np.sqrt(1 - beta) - 1) * x - 0.5 * beta * s), rtol=1e-5)


def test_euler_maruyama_predictor():
    sde = SubVPSDE()
    model, x, t, noise = _setup(sde)
    dt = -0.01
    x_new, x_mean = S.EulerMaruyamaPredictor().update(model, x, t, t + dt, noise, (1, 7))
    g2 = float(sde.diffusion_sq(0.4))
    expected = x + (sde.drift(x, t) - g2 * MIXTURE.score(x, t, sde)) * dt
    np.testing.assert_allclose(x_mean, expected, rtol=1e-5)
    z = noise.normal((1, 7), x.shape, x.dtype)
    np.testing.assert_allclose(x_new, expected + np.sqrt(g2 * 0.01) * z, rtol=1e-5)


def test_pc_step_is_corrector_then_predictor():
    sde = VESDE(N=10)
    model, x, t, noise = _setup(sde)
    pred, corr = S.ReverseDiffusionPredictor(), S.LangevinCorrector()
    out, out_mean = S.pc_step(pred, corr, model, x, t, t - 0.1, noise, 4)
    xc, _ = corr.update(model, x, t, noise, (0, 4))
    xp, xp_mean = pred.update(model, xc, t, t - 0.1, noise, (1, 4))
    np.testing.assert_allclose(out, xp, rtol=1e-6)
    np.testing.assert_allclose(out_mean, xp_mean, rtol=1e-6)


def test_denoise_returns_the_last_predictor_mean():
    sde = VESDE(N=30)
    score = MIXTURE.score_fn(sde)
    a, _ = S.sample(
        KEY, score, sde, (4, 2), S.get_sampler("reverse_diffusion", num_steps=30, denoise=True), return_trajectory=True
    )
    b, info = S.sample(
        KEY, score, sde, (4, 2), S.get_sampler("reverse_diffusion", num_steps=30, denoise=False), return_trajectory=True
    )
    np.testing.assert_array_equal(info.trajectory[-1], b)
    # The runs share everything but the last step's noise G_0 z, G_0 = sqrt(s_1^2 - s_0^2) of the
    # SMLD table (about 0.009 here).
    diff = np.abs(np.asarray(a - b))
    assert 0 < diff.max() < 0.05


def test_probability_flow_predictor_converges_at_order_one(x64):
    """Euler on the probability-flow ODE (score_sde's EM predictor with probability_flow=True)
    converges to the exact ODE solution at first order (uniform grid in t, VE SDE)."""
    sde = VESDE()
    x_T = prior_noise(sde, 16)
    ref = reference_solution(sde, x_T)
    ns, errs = [200, 400, 800], []
    for n in ns:
        smp = S.PCSampler(
            predictor=S.EulerMaruyamaPredictor(),
            corrector=S.NoneCorrector(),
            num_steps=n,
            grid=S.UniformGrid(),
            probability_flow=True,
            denoise=False,
        )
        x, _ = S.sample(KEY, MIXTURE.score_fn(sde), sde, x_T.shape, smp, x_init=x_T)
        errs.append(rms(x, ref))
    assert abs(empirical_order(ns, errs) - 1.0) < 0.3, errs
