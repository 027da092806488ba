"""SDE family: marginals against Monte-Carlo, coefficients against autodiff, score_sde's closed
forms, log-SNR inverses, discrete tables, pytree behaviour and bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.sde import (
    EDMSDE,
    SDES,
    VESDE,
    VPSDE,
    CosineVPSDE,
    GeneralSDE,
    LinearSDE,
    MarginalsUnavailableError,
    RectifiedFlow,
    SubVPSDE,
    get_sde,
)

ALL = [VESDE(), VPSDE(), SubVPSDE(), EDMSDE(), CosineVPSDE(), RectifiedFlow()]
IDS = [type(s).__name__ for s in ALL]


def _times(s, n=17):
    return jnp.linspace(s.t_min, s.T, n)


@pytest.mark.parametrize("sde", ALL, ids=IDS)
def test_marginals_match_monte_carlo_of_forward_sde(sde, x64):
    """Euler-Maruyama paths of dx = f x dt + g dw started from the marginal at t_min reproduce
    alpha(t) x0 and sigma(t) at later times (tolerance from the standard errors)."""
    sde = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), sde)
    n_paths, n_steps = 20000, 4000
    x0 = 0.7
    t0 = float(sde.t_min)
    t1 = t0 + 0.9 * (float(sde.T) - t0)  # stay clear of the stiff end of cosine / rectified flow
    ts = jnp.linspace(t0, t1, n_steps + 1)
    checkpoints = {n_steps // 3, 2 * n_steps // 3, n_steps}
    key = jax.random.PRNGKey(0)
    k0, kw = jax.random.split(key)
    a0, s0 = sde.marginal(ts[0])
    x = a0 * x0 + s0 * jax.random.normal(k0, (n_paths,), jnp.float64)

    def step(x, inp):
        t, dt, k = inp
        dw = jnp.sqrt(dt) * jax.random.normal(k, x.shape, jnp.float64)
        x = x + sde.drift(x, t) * dt + sde.diffusion(t) * dw
        return x, x

    dts = jnp.diff(ts)
    _, path = jax.lax.scan(step, x, (ts[:-1], dts, jax.random.split(kw, n_steps)))
    for i in sorted(checkpoints):
        xi = path[i - 1]
        a, s = sde.marginal(ts[i])
        mean_se = float(s) / np.sqrt(n_paths)
        std_se = float(s) / np.sqrt(2 * n_paths)
        # 5 standard errors plus the O(dt) Euler-Maruyama bias (< 0.5% here).
        assert abs(float(xi.mean()) - float(a) * x0) < 5 * mean_se + 5e-3 * (abs(float(a) * x0) + float(s))
        assert abs(float(xi.std()) - float(s)) < 5 * std_se + 5e-3 * float(s)


@pytest.mark.parametrize("sde", ALL, ids=IDS)
def test_coefficients_match_autodiff(sde, x64):
    """f = d log alpha/dt and g^2 = d sigma^2/dt - 2 f sigma^2, by autodiff of alpha and sigma,
    agree with each SDE's closed forms."""
    sde = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), sde)
    t = _times(sde)[:-1]
    f_auto = jax.vmap(jax.grad(lambda t: jnp.log(sde.alpha(t))))(t)
    s2_dot = jax.vmap(jax.grad(lambda t: sde.sigma(t) ** 2))(t)
    g2_auto = s2_dot - 2 * f_auto * sde.sigma(t) ** 2
    np.testing.assert_allclose(sde.drift_coef(t), f_auto, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sde.diffusion_sq(t), g2_auto, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sde.diffusion(t) ** 2, g2_auto, rtol=1e-9, atol=1e-12)
    # The generic (autodiff) implementations of the base class agree too.
    np.testing.assert_allclose(LinearSDE.diffusion_sq(sde, t), g2_auto, rtol=1e-9, atol=1e-12)
    da, ds = sde.marginal_derivatives(t)
    np.testing.assert_allclose(da, f_auto * sde.alpha(t), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(2 * sde.sigma(t) * ds, s2_dot, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sde", ALL, ids=IDS)
def test_log_snr_inverse_round_trips(sde, x64):
    sde = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), sde)
    t = _times(sde, 101)
    lam = sde.log_snr(t)
    assert np.all(np.diff(np.asarray(lam)) < 0), "log-SNR must decrease with t"
    np.testing.assert_allclose(sde.t_from_log_snr(lam), t, rtol=1e-9, atol=1e-12)
    # The closed-form inverse agrees with the generic bisection of the base class.
    np.testing.assert_allclose(LinearSDE.t_from_log_snr(sde, lam), t, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(
        sde.log_snr(t), 2 * (jnp.log(sde.alpha(t)) - jnp.log(sde.sigma(t))), rtol=1e-12, atol=1e-12
    )


def test_log_snr_inverse_extreme_values(x64):
    lam = jnp.array([-30.0, -5.0, 0.0, 5.0, 30.0])
    for sde in [VPSDE(), SubVPSDE(), CosineVPSDE(), RectifiedFlow(), EDMSDE(), VESDE()]:
        t = sde.t_from_log_snr(lam)
        assert np.all(np.isfinite(t)), type(sde).__name__
        np.testing.assert_allclose(sde.log_snr(t), lam, rtol=1e-7, atol=1e-7, err_msg=type(sde).__name__)


# score_sde's closed forms, written out independently in numpy (Song et al. 2021, App. B).
def _score_sde_ve(t, smin=0.01, smax=50.0):
    std = smin * (smax / smin) ** t
    g = std * np.sqrt(2 * (np.log(smax) - np.log(smin)))
    return 1.0 + 0 * t, std, 0 * t, g


def _score_sde_vp(t, b0=0.1, b1=20.0):
    lmc = -0.25 * t**2 * (b1 - b0) - 0.5 * t * b0
    beta = b0 + t * (b1 - b0)
    return np.exp(lmc), np.sqrt(1 - np.exp(2 * lmc)), -0.5 * beta, np.sqrt(beta)


def _score_sde_subvp(t, b0=0.1, b1=20.0):
    lmc = -0.25 * t**2 * (b1 - b0) - 0.5 * t * b0
    beta = b0 + t * (b1 - b0)
    g = np.sqrt(beta * (1 - np.exp(-2 * b0 * t - (b1 - b0) * t**2)))
    return np.exp(lmc), 1 - np.exp(2 * lmc), -0.5 * beta, g


@pytest.mark.parametrize(
    "sde,ref",
    [(VESDE(), _score_sde_ve), (VPSDE(), _score_sde_vp), (SubVPSDE(), _score_sde_subvp)],
    ids=["VE", "VP", "subVP"],
)
def test_score_sde_closed_forms(sde, ref, x64):
    t = np.linspace(1e-5, 1.0, 257)
    a, s, f, g = ref(t)
    np.testing.assert_allclose(sde.alpha(t), a, rtol=1e-12)
    np.testing.assert_allclose(sde.sigma(t), s, rtol=1e-10)
    np.testing.assert_allclose(sde.drift_coef(t), f, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(sde.diffusion(t), g, rtol=1e-9)
    x = np.random.default_rng(0).normal(size=(257, 3, 2))
    mean, std = sde.marginal_prob(x, t)
    np.testing.assert_allclose(mean, a[:, None, None] * x, rtol=1e-12)
    np.testing.assert_allclose(std, s, rtol=1e-10)
    np.testing.assert_allclose(sde.drift(x, t), f[:, None, None] * x, rtol=1e-12, atol=1e-14)


def test_score_sde_prior_conventions():
    z = jnp.ones((2, 4, 4, 3))
    assert float(VESDE().prior_std()) == 50.0
    assert float(VPSDE().prior_std()) == 1.0 and float(SubVPSDE().prior_std()) == 1.0
    d = 4 * 4 * 3
    # score_sde: VE prior logp = -N/2 log(2 pi sigma_max^2) - sum z^2 / (2 sigma_max^2).
    expected = -d / 2 * np.log(2 * np.pi * 50.0**2) - d / (2 * 50.0**2)
    np.testing.assert_allclose(VESDE().prior_logp(z), [expected] * 2, rtol=1e-6)
    expected = -d / 2 * np.log(2 * np.pi) - d / 2
    np.testing.assert_allclose(VPSDE().prior_logp(z), [expected] * 2, rtol=1e-6)
    x = VESDE().prior_sample(jax.random.PRNGKey(0), (4000, 3))
    assert abs(float(x.std()) - 50.0) < 2.0


def test_discrete_tables_and_reverse_steps(x64):
    """SMLD and DDPM tables and ancestral / discretised reverse steps follow score_sde."""
    N = 50
    ve = VESDE(N=N)
    sig = np.exp(np.linspace(np.log(0.01), np.log(50.0), N))
    np.testing.assert_allclose(ve.discrete_sigmas(), sig, rtol=1e-12)
    vp = VPSDE(N=N)
    betas = np.linspace(0.1 / N, 20.0 / N, N)
    np.testing.assert_allclose(vp.discrete_betas(), betas, rtol=1e-12)
    np.testing.assert_allclose(vp.alphas_cumprod(), np.cumprod(1 - betas), rtol=1e-12)

    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 5))
    score = rng.normal(size=(3, 5))
    t = np.array([0.0, 0.5, 1.0])
    idx = (t * (N - 1)).astype(int)
    key = jax.random.PRNGKey(3)
    noise = np.asarray(jax.random.normal(key, x.shape, jnp.float64))

    # VE ancestral (score_sde AncestralSamplingPredictor.vesde_update_fn).
    s = sig[idx]
    adj = np.where(idx == 0, 0.0, sig[np.maximum(idx - 1, 0)])
    mean = x + score * (s**2 - adj**2)[:, None]
    std = np.sqrt(adj**2 * (s**2 - adj**2) / s**2)
    x_new, x_mean = ve.ancestral_step(key, jnp.asarray(x), jnp.asarray(t), jnp.asarray(score))
    np.testing.assert_allclose(x_mean, mean, rtol=1e-12)
    np.testing.assert_allclose(x_new, mean + std[:, None] * noise, rtol=1e-12)

    # VP ancestral (vpsde_update_fn).
    b = betas[idx]
    mean = (x + b[:, None] * score) / np.sqrt(1 - b)[:, None]
    x_new, x_mean = vp.ancestral_step(key, jnp.asarray(x), jnp.asarray(t), jnp.asarray(score))
    np.testing.assert_allclose(x_mean, mean, rtol=1e-12)
    np.testing.assert_allclose(x_new, mean + np.sqrt(b)[:, None] * noise, rtol=1e-12)

    # Reverse discretisation (ReverseDiffusionPredictor): rev_f = f - G^2 score (x1/2 for ODE).
    score_fn = lambda x, t: jnp.asarray(score)
    for pf in (False, True):
        rev_f, rev_G = vp.reverse(score_fn, probability_flow=pf).discretize(jnp.asarray(x), jnp.asarray(t))
        f = np.sqrt(1 - b)[:, None] * x - x
        np.testing.assert_allclose(rev_f, f - (0.5 if pf else 1.0) * b[:, None] * score, rtol=1e-12)
        np.testing.assert_allclose(rev_G, 0 * b if pf else np.sqrt(b), rtol=1e-12)
        rev_f, rev_G = ve.reverse(score_fn, probability_flow=pf).discretize(jnp.asarray(x), jnp.asarray(t))
        G2 = sig[idx] ** 2 - adj**2
        np.testing.assert_allclose(rev_f, -(0.5 if pf else 1.0) * G2[:, None] * score, rtol=1e-12)


def test_reverse_sde_and_probability_flow(x64):
    sde = VPSDE()
    x = jnp.linspace(-1, 1, 12).reshape(3, 4)
    t = jnp.array([0.1, 0.5, 0.9])
    score_fn = lambda x, t: -x * (1 + t[:, None])
    f = sde.drift(x, t)
    g2 = sde.diffusion(t)[:, None] ** 2
    s = score_fn(x, t)
    np.testing.assert_allclose(sde.reverse(score_fn).drift(x, t), f - g2 * s, rtol=1e-12)
    np.testing.assert_allclose(sde.reverse(score_fn, probability_flow=True).drift(x, t), f - 0.5 * g2 * s, rtol=1e-12)
    np.testing.assert_allclose(sde.probability_flow(score_fn)(x, t), f - 0.5 * g2 * s, rtol=1e-12)
    assert np.all(sde.reverse(score_fn, probability_flow=True).diffusion(t) == 0)


def test_any_data_shape():
    """Coefficients broadcast over data of any rank: images, 1-D signals, vectors, point sets."""
    sde = VPSDE()
    t = jnp.array([0.2, 0.7])
    for shape in [(2, 8, 8, 3), (2, 1000), (2, 16), (2, 5, 3, 2, 2)]:
        x = jnp.ones(shape)
        mean, std = sde.marginal_prob(x, t)
        assert mean.shape == shape and std.shape == (2,)
        assert sde.drift(x, t).shape == shape
        assert sde.perturb(x, t, x).shape == shape
        assert sde.prior_logp(x).shape == (2,)
    with pytest.raises(ValueError, match="does not match the leading dimensions"):
        sde.drift(jnp.ones((3, 4)), t)


def test_sdes_are_pytrees():
    sde = VPSDE(beta_max=10.0)
    leaves = jax.tree_util.tree_leaves(sde)
    assert len(leaves) == 4  # beta_min, beta_max, T, t_min

    @jax.jit
    def f(sde, t):
        return sde.sigma(t)

    np.testing.assert_allclose(f(sde, 0.5), sde.sigma(0.5), rtol=1e-6)
    # grad with respect to SDE parameters.
    g = jax.grad(lambda s: s.sigma(0.5))(sde)
    assert isinstance(g, VPSDE) and float(g.beta_max) > 0
    # vmap over a batch of SDEs.
    batch = jax.vmap(lambda b: VPSDE(beta_max=b).sigma(0.5))(jnp.array([5.0, 10.0, 20.0]))
    assert batch.shape == (3,) and np.all(np.diff(np.asarray(batch)) > 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sde.beta_max = 3.0


def test_general_sde_and_marginal_errors():
    sde = GeneralSDE(drift_fn=lambda x, t: -(x**3), diffusion_fn=lambda t: jnp.sqrt(2.0) * jnp.ones_like(t))
    x = jnp.ones((2, 3))
    t = jnp.array([0.1, 0.2])
    np.testing.assert_allclose(sde.drift(x, t), -x)
    assert sde.diffusion(t).shape == (2,)
    f, G = sde.discretize(x, t, 0.01)
    np.testing.assert_allclose(f, -0.01 * x)
    rev = sde.reverse(lambda x, t: -x)
    np.testing.assert_allclose(rev.drift(x, t), -x + 2.0 * x, rtol=1e-6)
    for method in ("marginal", "log_snr", "t_from_log_snr"):
        with pytest.raises(MarginalsUnavailableError, match="closed-form marginals"):
            getattr(sde, method)(t)
    assert not sde.has_marginals and VPSDE().has_marginals


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: VESDE(sigma_min=50.0, sigma_max=0.01), "sigma_min < sigma_max"),
        (lambda: VESDE(sigma_min=-1.0), "sigma_min < sigma_max"),
        (lambda: VPSDE(beta_min=-0.1), "beta_min must be >= 0"),
        (lambda: VPSDE(beta_min=2.0, beta_max=1.0), "beta_min <= beta_max"),
        (lambda: SubVPSDE(beta_min=-1.0), "beta_min must be >= 0"),
        (lambda: EDMSDE(sigma_min=1.0, sigma_max=0.5), "sigma_min < sigma_max"),
        (lambda: CosineVPSDE(T=1.0), "T must be < 1"),
        (lambda: RectifiedFlow(T=1.0), "T must be < 1"),
        (lambda: VPSDE(t_min=0.5, T=0.4), "t_min < T"),
        (lambda: VPSDE(N=0), "N must be >= 1"),
        (lambda: VPSDE(beta_max=np.ones(3)), "must be scalars"),
        (lambda: get_sde("vp"), "unknown SDE 'vp'; valid names: cosine, edm, rectified_flow, subvpsde, vesde, vpsde"),
        (lambda: get_sde("vpsde", sigma_max=3.0), r"unknown parameter\(s\) \['sigma_max'\]"),
        (lambda: GeneralSDE(drift_fn=None, diffusion_fn=lambda t: t), "drift_fn must be a callable"),
    ],
)
def test_bad_input_is_reported_at_construction(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_registry_builds_every_sde():
    for name, cls in SDES.items():
        assert isinstance(get_sde(name), cls)
    assert get_sde("VESDE", sigma_max=348.0).sigma_max == 348.0
