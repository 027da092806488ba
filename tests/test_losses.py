"""Losses: the DSM objectives are minimised by the true score, the likelihood-weighted loss
bounds the exact NLL, the weightings equal their textbook forms, time samplers are unbiased."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import losses as L
from diffusion_jax import parametrization as P
from diffusion_jax.analytic import GaussianMixture
from diffusion_jax.sde import EDMSDE, VESDE, VPSDE, CosineVPSDE, GeneralSDE, RectifiedFlow, SubVPSDE


def _mixture(dtype=jnp.float64):
    return GaussianMixture(
        weights=jnp.array([0.3, 0.7], dtype),
        means=jnp.array([[-1.0, 0.5, 0.0], [0.8, -0.3, 0.4]], dtype),
        stds=jnp.array([0.3, 0.5], dtype),
    )


def _exact_model(mix, sde, param, delta_fn=None):
    """A 'network' whose raw output is the exact prediction of ``param.kind`` (EDM: the ideal F),
    optionally plus ``delta * h(x, t)``. Parameters are the scalar delta."""

    def model_fn(delta, x_in, c_noise, cond, key):
        # Recover (x, t) from what the parametrization passed to the network.
        x, t = cond["_x"], cond["_t"]
        score = mix.score(x, t, sde)
        pred = P.convert(score, from_kind="score", to_kind=param.kind, sde=sde, x=x, t=t)
        if param.output == "edm":
            coefs = param._edm_coefs(sde, t)
            a = sde.alpha(t)[:, None]
            pred = (pred - coefs.c_skip[:, None] / a * x) / coefs.c_out[:, None]
        return pred + delta * jnp.tanh(x) * (1 + t[:, None])

    return model_fn


def _loss_with_xt(sde, param, mix, weighting, n=4096, key=0, **kw):
    """DSM loss whose model sees (x_t, t) through ``cond``, so an exact model can be built."""
    x0 = mix.sample(jax.random.PRNGKey(100 + key), n, jnp.float64)
    key = jax.random.PRNGKey(key)
    k_t, k_eps, _ = jax.random.split(key, 3)
    t, _ = kw.get("time_sampler", L.UniformTime())(k_t, n, sde, jnp.float64)
    eps = jax.random.normal(k_eps, x0.shape, jnp.float64)
    x_t = sde.perturb(x0, t, eps)
    batch = {"image": x0, "_x": x_t, "_t": t}
    loss_fn = L.dsm_loss_fn(_exact_model(mix, sde, param), sde, param, weighting=weighting, **kw)
    return loss_fn, batch, key


CASES = [
    (VPSDE(), P.score_sde_parametrization("vpsde", continuous=True), "sigma2"),
    (VPSDE(), P.Parametrization(output="v"), "v"),
    (SubVPSDE(), P.Parametrization(output="eps"), "likelihood"),
    (VESDE(sigma_max=5.0), P.score_sde_parametrization("vesde", continuous=True), "likelihood"),
    (EDMSDE(sigma_max=10.0), P.edm_parametrization(), "edm"),
    (CosineVPSDE(), P.Parametrization(output="x0"), "min_snr"),
    (RectifiedFlow(), P.Parametrization(output="flow"), "x0"),
]


@pytest.mark.parametrize(
    "sde,param,weighting", CASES, ids=[f"{type(c[0]).__name__}-{c[1].output}-{c[2]}" for c in CASES]
)
def test_dsm_minimised_by_true_score(sde, param, weighting, x64):
    """On a Gaussian mixture the DSM loss, as a function of a perturbation delta of the exact
    prediction, has zero slope at delta = 0 (within its Monte-Carlo error) and grows away from it."""
    mix = _mixture()
    loss_fn, batch, key = _loss_with_xt(sde, param, mix, weighting)
    # The loss draws its own (t, eps) from the same key as _loss_with_xt: check they agree.
    _, aux = loss_fn(0.0, batch, key)
    np.testing.assert_allclose(aux["t"], batch["_t"], rtol=1e-12)

    per_example_grad = jax.jacfwd(lambda d: loss_fn(d, batch, key)[1]["loss_per_example"])(0.0)
    grad, se = float(per_example_grad.mean()), float(per_example_grad.std() / math.sqrt(per_example_grad.size))
    assert abs(grad) < 4 * se, (grad, se)
    l0 = float(loss_fn(0.0, batch, key)[0])
    for delta in (-0.3, 0.3):
        assert float(loss_fn(delta, batch, key)[0]) > l0


def test_weightings_equal_textbook_forms(x64):
    """Each weighting equals its textbook loss written out by hand for the same (t, eps)."""
    mix = _mixture()
    n = 64

    def setup(sde, param, weighting):
        loss_fn, batch, key = _loss_with_xt(sde, param, mix, weighting, n=n)
        x0, x_t, t = batch["image"], batch["_x"], batch["_t"]
        eps = (x_t - sde.alpha(t)[:, None] * x0) / sde.sigma(t)[:, None]
        model = _exact_model(mix, sde, param)
        out = model(0.2, *param.network_inputs(sde, x_t, t), batch, None)
        pred = param.prediction(sde, x_t, t, out)
        return float(loss_fn(0.2, batch, key)[0]), x0, x_t, t, eps, pred

    sde = VESDE()
    got, x0, x, t, eps, score = setup(sde, P.score_sde_parametrization("vesde", continuous=True), "sigma2")
    s = sde.sigma(t)[:, None]
    np.testing.assert_allclose(got, np.mean(np.sum((score * s + eps) ** 2, 1)), rtol=1e-8)
    got, x0, x, t, eps, score = setup(sde, P.score_sde_parametrization("vesde", continuous=True), "likelihood")
    g2 = sde.diffusion(t)[:, None] ** 2
    np.testing.assert_allclose(got, np.mean(np.sum(g2 * (score + eps / s) ** 2, 1)), rtol=1e-8)

    sde = VPSDE()
    got, x0, x, t, eps, v = setup(sde, P.Parametrization(output="v"), "v")
    a, s = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    np.testing.assert_allclose(got, np.mean(np.sum((v - (a * eps - s * x0)) ** 2, 1)), rtol=1e-8)
    got, x0, x, t, eps, e_hat = setup(sde, P.Parametrization(output="eps"), "min_snr")
    snr = (a / s) ** 2
    np.testing.assert_allclose(got, np.mean(np.sum(np.minimum(snr, 5.0) / snr * (e_hat - eps) ** 2, 1)), rtol=1e-8)
    got2, *_ = setup(sde, P.Parametrization(output="eps"), "eps")
    got3, *_ = setup(sde, P.Parametrization(output="eps"), "sigma2")
    np.testing.assert_allclose(got2, got3, rtol=1e-12)

    sde = EDMSDE()
    got, x0, x, t, eps, D = setup(sde, P.edm_parametrization(), "edm")
    lam = (t**2 + 0.25) / (t * 0.5) ** 2
    np.testing.assert_allclose(got, np.mean(lam * np.sum((D - x0) ** 2, 1)), rtol=1e-6)

    # reduce_mean averages over data dimensions.
    loss_fn, batch, key = _loss_with_xt(VPSDE(), P.Parametrization(output="eps"), mix, "eps", n=n)
    loss_mean_fn = L.dsm_loss_fn(
        _exact_model(mix, VPSDE(), P.Parametrization(output="eps")),
        VPSDE(),
        P.Parametrization(output="eps"),
        reduce_mean=True,
    )
    np.testing.assert_allclose(loss_mean_fn(0.2, batch, key)[0] * 3, loss_fn(0.2, batch, key)[0], rtol=1e-12)


def _gaussian_case():
    mean = jnp.array([0.5, -0.25], jnp.float64)
    std = 0.6
    mix = GaussianMixture(weights=jnp.array([1.0], jnp.float64), means=mean[None], stds=jnp.array([std], jnp.float64))
    return mix, mean, std


@pytest.mark.parametrize("sde", [VPSDE(t_min=1e-5), SubVPSDE(t_min=1e-5)], ids=["VP", "subVP"])
def test_likelihood_weighted_loss_bounds_the_exact_nll(sde, x64):
    """For Gaussian data: prior term + (T - t_min)/2 * (likelihood-weighted DSM loss) minus the
    entropy constant is an upper bound on -log p(x0) (Song et al. 2021b, Thm. 1), tight for the
    exact score and strictly looser for a wrong one; likelihood_bound() estimates the same number."""
    mix, mean, std = _gaussian_case()
    x0 = jnp.array([[0.9, 0.1], [-0.4, -0.9]], jnp.float64)
    exact_nll = -mix.log_prob(x0)
    d = 2
    wrong = GaussianMixture(weights=mix.weights, means=mix.means + 0.5, stds=mix.stds * 1.6)
    n = 100_000
    t_min, T = sde.t_min, sde.T
    const = -d * (math.log(sde.sigma(T)) - math.log(sde.sigma(t_min)))
    results = {}
    for name, m in (("exact", mix), ("wrong", wrong)):
        bounds, ses = [], []
        for i in range(2):
            xb = jnp.broadcast_to(x0[i], (n, d))
            model = lambda p, x_in, c, cond, k, m=m: m.score(x_in, cond["_t"], sde)
            param = P.Parametrization(output="score", noise_cond="time")
            # Pass t to the model through the batch (the time sampler uses the same key).
            key = jax.random.PRNGKey(i)
            ts = L.LikelihoodImportanceTime(stratified=True)
            t, _ = ts(jax.random.split(key, 3)[0], n, sde, jnp.float64)
            loss_fn = L.dsm_loss_fn(model, sde, param, weighting="likelihood", time_sampler=ts)
            loss, aux = loss_fn(None, {"image": xb, "_t": t}, key)
            x_T = sde.perturb(xb, jnp.full((n,), T), jax.random.normal(jax.random.PRNGKey(9), xb.shape, jnp.float64))
            prior = -sde.prior_logp(x_T)
            bound = float(prior.mean()) + 0.5 * (T - t_min) * float(loss) + const
            se = math.sqrt((float(prior.var()) + (0.5 * (T - t_min)) ** 2 * float(aux["loss_per_example"].var())) / n)
            bounds.append(bound)
            ses.append(se)
        results[name] = (np.array(bounds), np.array(ses))
        # The low-variance estimator of losses.likelihood_bound agrees.
        lb, lb_se = L.likelihood_bound(jax.random.PRNGKey(5), m.score_fn(sde), sde, x0, num_samples=20000)
        tol = 4 * np.sqrt(np.array(ses) ** 2 + np.asarray(lb_se) ** 2) + 1e-3
        assert np.all(np.abs(np.asarray(lb) - bounds) < tol), (lb, bounds, tol)
        if name == "exact":
            np.testing.assert_allclose(lb, exact_nll, atol=4 * float(lb_se.max()) + 2e-3)
    b, se = results["exact"]
    np.testing.assert_allclose(b, exact_nll, atol=4 * se.max() + 2e-3)
    b, se = results["wrong"]
    assert np.all(b - exact_nll > 0.05 + 4 * se), (b, exact_nll)


def test_time_samplers(x64):
    sde = VPSDE()
    n = 20000
    key = jax.random.PRNGKey(0)
    t, w = L.UniformTime()(key, n, sde, jnp.float64)
    assert float(t.min()) >= sde.t_min and float(t.max()) <= sde.T and np.all(w == 1)
    # Stratified: exactly one point per stratum of [t_min, T].
    t, _ = L.UniformTime(stratified=True)(key, 16, sde, jnp.float64)
    strata = np.sort(np.floor((np.asarray(t) - sde.t_min) / (sde.T - sde.t_min) * 16))
    np.testing.assert_array_equal(strata, np.arange(16))
    # Importance sampler: uniform in log-SNR, weight * g^2/sigma^2 is the constant Z / (T - t_min).
    t, w = L.LikelihoodImportanceTime()(key, n, sde, jnp.float64)
    lam = np.asarray(sde.log_snr(t))
    lam_lo, lam_hi = float(sde.log_snr(sde.T)), float(sde.log_snr(sde.t_min))
    u = np.sort((lam - lam_lo) / (lam_hi - lam_lo))
    assert np.max(np.abs(u - (np.arange(n) + 0.5) / n)) < 1.63 / math.sqrt(n)  # KS test at 1%
    np.testing.assert_allclose(
        w * sde.diffusion_sq(t) / sde.sigma(t) ** 2, (lam_hi - lam_lo) / (sde.T - sde.t_min), rtol=1e-8
    )
    # Unbiased: E_importance[w f(t)] = E_uniform[f(t)] for a smooth f.
    f = lambda t: jnp.sin(3 * t) + t**2
    exact = (-(jnp.cos(3.0) - jnp.cos(3 * sde.t_min)) / 3 + (1 - sde.t_min**3) / 3) / (1 - sde.t_min)
    est = w * f(t)
    assert abs(float(est.mean()) - float(exact)) < 4 * float(est.std()) / math.sqrt(n)
    # EDM's log-normal: ln sigma ~ N(-1.2, 1.2^2), through the inverse log-SNR of any SDE.
    for s in (EDMSDE(), VPSDE()):
        t, _ = L.LogNormalSigma()(key, n, s, jnp.float64)
        ls = np.log(np.asarray(s.sigma_tilde(t)))
        assert abs(ls.mean() + 1.2) < 0.05 and abs(ls.std() - 1.2) < 0.05


def _discrete_expected(alphas, sigmas, s_data):
    """E ||sigma * (exact score) + z||^2 / d for Gaussian data of std s_data, noise (alpha, sigma),
    averaged over uniform levels: alpha^2 s^2 / (alpha^2 s^2 + sigma^2)."""
    return float(np.mean(alphas**2 * s_data**2 / (alphas**2 * s_data**2 + sigmas**2)))


def test_discrete_smld_and_ddpm_losses(x64):
    """With the exact score of Gaussian data, score_sde's discrete losses equal their closed-form
    expectation; this pins the direction of the SMLD sigma table and the DDPM alpha-bar table."""
    s_data, d, n = 0.5, 4, 40000
    x0 = s_data * jax.random.normal(jax.random.PRNGKey(0), (n, d), jnp.float64)
    batch = {"image": x0}

    ve = VESDE(N=100, sigma_max=5.0)
    sig_desc = np.exp(np.linspace(np.log(5.0), np.log(0.01), 100))

    def smld_model(p, x, labels, cond, key):
        sigma = jnp.asarray(sig_desc)[labels][:, None]
        return -x / (s_data**2 + sigma**2)

    loss, aux = L.smld_loss_fn(smld_model, ve, reduce_mean=True)(None, batch, jax.random.PRNGKey(1))
    expected = _discrete_expected(np.ones(100), sig_desc, s_data)
    se = float(aux["loss_per_example"].std()) / math.sqrt(n)
    assert abs(float(loss) - expected) < 4 * se, (float(loss), expected, se)

    vp = VPSDE(N=100)
    abar = np.cumprod(1 - np.linspace(0.1 / 100, 20 / 100, 100))

    def ddpm_model(p, x, labels, cond, key):
        a, s = jnp.sqrt(abar[labels])[:, None], jnp.sqrt(1 - abar[labels])[:, None]
        score = -x / (a**2 * s_data**2 + s**2)
        return -s * score  # eps prediction

    loss, aux = L.ddpm_loss_fn(ddpm_model, vp, reduce_mean=True)(None, batch, jax.random.PRNGKey(2))
    expected = _discrete_expected(np.sqrt(abar), np.sqrt(1 - abar), s_data)
    se = float(aux["loss_per_example"].std()) / math.sqrt(n)
    assert abs(float(loss) - expected) < 4 * se, (float(loss), expected, se)


def test_mask_excludes_padding():
    param = P.Parametrization(output="eps")
    model = lambda p, x, c, cond, k: p * x
    loss_fn = L.dsm_loss_fn(model, VPSDE(), param)
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
    key = jax.random.PRNGKey(1)
    full, aux = loss_fn(0.5, {"image": x}, key)
    mask = jnp.array([1, 1, 1, 1, 0, 0])
    padded, _ = loss_fn(0.5, {"image": x, "mask": mask}, key)
    np.testing.assert_allclose(padded, aux["loss_per_example"][:4].mean(), rtol=1e-6)


def test_losses_are_jittable_and_differentiable():
    param = P.score_sde_parametrization("vpsde", continuous=True)
    model = lambda p, x, c, cond, k: p["w"] * x + p["b"] * c[:, None]
    loss_fn = L.dsm_loss_fn(model, VPSDE(), param, weighting="likelihood", time_sampler=L.LikelihoodImportanceTime())
    params = {"w": jnp.array(0.3), "b": jnp.array(0.01)}
    grads = jax.jit(jax.grad(lambda p, b, k: loss_fn(p, b, k)[0]))(
        params, {"image": jnp.ones((8, 5))}, jax.random.PRNGKey(0)
    )
    assert all(np.isfinite(v) for v in jax.tree_util.tree_leaves(grads))


def test_bad_input():
    param = P.Parametrization(output="eps")
    model = lambda p, x, c, cond, k: x
    with pytest.raises(ValueError, match="unknown loss weighting 'elbo'; valid: sigma2, eps, likelihood"):
        L.dsm_loss_fn(model, VPSDE(), param, weighting="elbo")
    with pytest.raises(ValueError, match="unknown time sampler 'beta'"):
        L.get_time_sampler("beta")
    general = GeneralSDE(drift_fn=lambda x, t: -x, diffusion_fn=lambda t: jnp.ones_like(t))
    with pytest.raises(TypeError, match="closed-form marginals"):
        L.dsm_loss_fn(model, general, param)
    with pytest.raises(TypeError, match="SMLD loss needs a VESDE"):
        L.smld_loss_fn(model, VPSDE())
    with pytest.raises(TypeError, match="DDPM loss needs a VPSDE"):
        L.ddpm_loss_fn(model, VESDE())
    bad = L.dsm_loss_fn(lambda p, x, c, cond, k: x[:, :2], VPSDE(), param)
    with pytest.raises(ValueError, match=r"network output shape \(4, 2\) differs from the data shape \(4, 3\)"):
        bad(None, {"image": jnp.ones((4, 3))}, jax.random.PRNGKey(0))
    with pytest.raises(KeyError, match="batch has no 'image' entry"):
        L.dsm_loss_fn(model, VPSDE(), param)(None, {"x": jnp.ones((4, 3))}, jax.random.PRNGKey(0))
