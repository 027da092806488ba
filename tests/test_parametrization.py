"""Parametrizations: conversions between score / eps / x0 / v / flow round-trip for every SDE,
exact targets agree with each other, and score_sde's and EDM's conventions are reproduced."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import parametrization as P
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


def _problem(sde, shape=(5, 3, 2)):
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x0 = jax.random.normal(k1, shape, jnp.float64)
    eps = jax.random.normal(k2, shape, jnp.float64)
    t = jnp.linspace(sde.t_min, sde.T, shape[0] + 2)[1:-1].astype(jnp.float64)
    return x0, eps, t, sde.perturb(x0, t, eps)


@pytest.mark.parametrize("sde", ALL, ids=IDS)
def test_conversions_round_trip(sde, x64):
    x0, eps, t, x = _problem(sde)
    value = jax.random.normal(jax.random.PRNGKey(7), x.shape, jnp.float64)
    for a, b in itertools.permutations(P.KINDS, 2):
        there = P.convert(value, from_kind=a, to_kind=b, sde=sde, x=x, t=t)
        back = P.convert(there, from_kind=b, to_kind=a, sde=sde, x=x, t=t)
        np.testing.assert_allclose(back, value, rtol=1e-8, atol=1e-8, err_msg=f"{a}->{b}->{a}")


@pytest.mark.parametrize("sde", ALL, ids=IDS)
def test_exact_targets_are_consistent(sde, x64):
    """The exact target of each kind converts into the exact target of every other kind, and
    the score target is the true conditional score."""
    x0, eps, t, x = _problem(sde)
    for a, b in itertools.permutations(P.KINDS, 2):
        got = P.convert(P.target(a, sde, x0, eps, t), from_kind=a, to_kind=b, sde=sde, x=x, t=t)
        np.testing.assert_allclose(got, P.target(b, sde, x0, eps, t), rtol=1e-7, atol=1e-7, err_msg=f"{a}->{b}")
    np.testing.assert_allclose(P.target("score", sde, x0, eps, t), sde.conditional_score(x, x0, t), rtol=1e-10)
    # flow is the time derivative of x_t along the straight (fixed x0, eps) path.
    dx_dt = jax.jvp(lambda tt: sde.perturb(x0, tt, eps), (t,), (jnp.ones_like(t),))[1]
    np.testing.assert_allclose(P.target("flow", sde, x0, eps, t), dx_dt, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sde", ALL, ids=IDS)
def test_error_scale(sde, x64):
    """An eps error delta becomes an error k(t) delta in every other kind."""
    x0, eps, t, x = _problem(sde)
    delta = 1e-3 * jax.random.normal(jax.random.PRNGKey(3), x.shape, jnp.float64)
    for kind in P.KINDS:
        err = P.from_eps(kind, eps + delta, sde, x, t) - P.target(kind, sde, x0, eps, t)
        k = P.error_scale(kind, sde, t)[:, None, None]
        np.testing.assert_allclose(err, k * delta, rtol=1e-6, atol=1e-12, err_msg=kind)


def test_score_sde_conventions():
    """Labels and score scaling of score_sde's get_score_fn for each SDE / training mode."""
    t = jnp.array([0.15, 0.75])
    x = jnp.ones((2, 4, 4, 3))
    out = jnp.arange(2 * 48, dtype=jnp.float32).reshape(x.shape) / 100
    net = lambda x_in, c: out

    vp = VPSDE()
    p = P.score_sde_parametrization("vpsde", continuous=True)
    _, labels = p.network_inputs(vp, x, t)
    np.testing.assert_allclose(labels, 999 * t, rtol=1e-6)
    std = vp.sigma(t)[:, None, None, None]
    np.testing.assert_allclose(p.score_fn(net, vp)(x, t), -out / std, rtol=1e-6)

    p = P.score_sde_parametrization("subvpsde", continuous=True)
    sub = SubVPSDE()
    np.testing.assert_allclose(p.score_fn(net, sub)(x, t), -out / sub.sigma(t)[:, None, None, None], rtol=1e-6)

    p = P.score_sde_parametrization("vpsde", continuous=False)
    _, labels = p.network_inputs(vp, x, t)
    np.testing.assert_allclose(labels, t * 999, rtol=1e-6)

    ve = VESDE()
    p = P.score_sde_parametrization("vesde", continuous=True)
    x_in, labels = p.network_inputs(ve, x, t)
    np.testing.assert_allclose(labels, 0.01 * (50 / 0.01) ** t, rtol=1e-5)
    assert x_in is x
    np.testing.assert_allclose(p.score_fn(net, ve)(x, t), out, rtol=1e-6)

    p = P.score_sde_parametrization("vesde", continuous=False, num_scales=232)
    _, labels = p.network_inputs(ve, x, t)
    np.testing.assert_array_equal(labels, np.round((1 - np.array([0.15, 0.75])) * 231).astype(int))
    assert labels.dtype == jnp.int32

    with pytest.raises(ValueError, match="no convention for SDE 'edm'"):
        P.score_sde_parametrization("edm", continuous=True)


@pytest.mark.parametrize("sde", [EDMSDE(), VPSDE(), VESDE()], ids=["EDM", "VP", "VE"])
def test_edm_preconditioning(sde, x64):
    """c_noise = ln(sigma)/4; D = c_skip x~ + c_out F with c_in scaling of the input
    (Karras et al. 2022, Table 1), for sigma~ = sigma/alpha and x~ = x/alpha."""
    p = P.edm_parametrization(sigma_data=0.5)
    x0, eps, t, x = _problem(sde)
    st = sde.sigma_tilde(t)
    a = sde.alpha(t)
    x_in, c_noise = p.network_inputs(sde, x, t)
    np.testing.assert_allclose(c_noise, np.log(st) / 4, rtol=1e-12)
    c_in = 1 / np.sqrt(st**2 + 0.25)
    np.testing.assert_allclose(x_in, x / a[:, None, None] * c_in[:, None, None], rtol=1e-12)
    c_skip = 0.25 / (st**2 + 0.25)
    c_out = st * 0.5 / np.sqrt(st**2 + 0.25)
    # A network returning the ideal F recovers x0 exactly.
    F = (x0 - c_skip[:, None, None] * x / a[:, None, None]) / c_out[:, None, None]
    np.testing.assert_allclose(p.prediction(sde, x, t, F), x0, rtol=1e-9, atol=1e-12)
    # ...and every other kind through the conversions.
    np.testing.assert_allclose(p.apply(lambda xi, c: F, sde, x, t, "eps"), eps, rtol=1e-6, atol=1e-9)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown prediction kind 'noise'"):
        P.convert(jnp.ones(2), from_kind="noise", to_kind="eps", sde=VPSDE(), x=jnp.ones(2), t=0.5)
    with pytest.raises(ValueError, match="unknown network output 'y'"):
        P.Parametrization(output="y")
    with pytest.raises(ValueError, match="unknown noise conditioning 'sigmas'; valid: time, time_999"):
        P.Parametrization(noise_cond="sigmas")
    p = P.Parametrization(output="eps")
    with pytest.raises(ValueError, match=r"network output shape \(2, 3\) differs from the data shape \(2, 4\)"):
        p.apply(lambda x, c: jnp.ones((2, 3)), VPSDE(), jnp.ones((2, 4)), jnp.array([0.1, 0.2]))
    general = GeneralSDE(drift_fn=lambda x, t: -x, diffusion_fn=lambda t: jnp.ones_like(t))
    with pytest.raises(MarginalsUnavailableError):
        P.convert(
            jnp.ones((2, 3)), from_kind="eps", to_kind="x0", sde=general, x=jnp.ones((2, 3)), t=jnp.array([0.1, 0.2])
        )


def test_parametrization_is_a_pytree():
    p = P.edm_parametrization(sigma_data=0.3)
    leaves, treedef = jax.tree_util.tree_flatten(p)
    assert leaves == [0.3]
    f = jax.jit(lambda p, x, t: p.network_inputs(VPSDE(), x, t)[1])
    np.testing.assert_allclose(
        f(p, jnp.ones((2, 3)), jnp.array([0.1, 0.5])), np.log(VPSDE().sigma_tilde(jnp.array([0.1, 0.5]))) / 4, rtol=1e-5
    )
