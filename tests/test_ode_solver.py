"""The generic adaptive Runge-Kutta integrator: tableaux, order of accuracy, tolerance control,
reverse time, stiff-ish problems, pytree states with extra quantities, error norms and NFE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _sampler_problems import MIXTURE

from diffusion_jax.sde import VPSDE
from diffusion_jax.solvers import ode
from diffusion_jax.solvers.ode import odeint, odeint_fixed

SOLVERS = ["dopri5", "tsit5"]


def _oscillator(y, t):
    x, v = y
    return (v, -x)


@pytest.mark.parametrize("name", SOLVERS)
def test_tableau_consistency(name):
    tab = ode.get_solver(name).tableau()
    np.testing.assert_allclose(tab.a.sum(axis=1), tab.c, atol=1e-14)
    np.testing.assert_allclose(tab.b.sum(), 1.0, atol=1e-14)
    np.testing.assert_allclose(tab.e.sum(), 0.0, atol=1e-14)
    np.testing.assert_allclose(tab.a[-1], tab.b)  # FSAL
    assert tab.c[-1] == 1.0 and tab.fsal


@pytest.mark.parametrize("name", SOLVERS)
def test_fixed_steps_have_order_five(name, x64):
    """The propagated solution of each pair converges at order 5 on the harmonic oscillator."""
    ns = [64, 128, 256, 512]
    errs = []
    for n in ns:
        ts = jnp.linspace(0.0, 10.0, n + 1)
        (x, v), nfe = odeint_fixed(_oscillator, (jnp.array(1.0), jnp.array(0.0)), ts, solver=name)
        errs.append(np.hypot(float(x) - np.cos(10.0), float(v) + np.sin(10.0)))
        assert int(nfe) == 1 + 6 * n
    slope = np.polyfit(np.log(ns), -np.log(errs), 1)[0]
    assert abs(slope - 5.0) < 0.3, (errs, slope)


@pytest.mark.parametrize("name", SOLVERS)
def test_error_estimate_has_local_order_five(name, x64):
    """The embedded estimate ``dt sum e_i k_i`` of one step of y' = y shrinks like dt^5 (it is
    the local error of the 4th-order embedded solution)."""
    tab = ode.get_solver(name).tableau()
    hs = np.array([0.2, 0.1, 0.05, 0.025])
    ests = []
    for h in hs:
        err = ode._rk_stages(lambda y, t: y, tab, jnp.array(1.0), jnp.array(0.0), jnp.array(h), jnp.array(1.0)).err
        ests.append(abs(float(err)))
    slope = np.polyfit(np.log(hs), np.log(ests), 1)[0]
    assert abs(slope - 5.0) < 0.3, (ests, slope)


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("tol", [1e-6, 1e-9])
def test_adaptive_meets_tolerance(name, tol, x64):
    y0 = (jnp.array(1.0), jnp.array(0.0))
    (x, v), stats = jax.jit(lambda y: odeint(_oscillator, y, 0.0, 10.0, solver=name, rtol=tol, atol=tol))(y0)
    err = np.hypot(float(x) - np.cos(10.0), float(v) + np.sin(10.0))
    assert bool(stats.success)
    # Global error over ~1.6 periods stays within a small multiple of the local tolerance.
    assert err < 20 * tol, err
    assert int(stats.nfe) == 2 + 6 * (int(stats.num_steps) + int(stats.num_rejected))

    decay, _ = odeint(lambda y, t: -2.0 * y, jnp.array(3.0), 0.0, 2.0, solver=name, rtol=tol, atol=tol)
    assert abs(float(decay) - 3.0 * np.exp(-4.0)) < 20 * tol


def test_tighter_tolerance_costs_more_and_is_more_accurate(x64):
    y0 = (jnp.array(1.0), jnp.array(0.0))
    out = []
    for tol in [1e-4, 1e-7, 1e-10]:
        (x, _), stats = odeint(_oscillator, y0, 0.0, 10.0, rtol=tol, atol=tol)
        out.append((abs(float(x) - np.cos(10.0)), int(stats.nfe)))
    errs, nfes = zip(*out)
    assert errs[0] > errs[1] > errs[2] and nfes[0] < nfes[1] < nfes[2]


@pytest.mark.parametrize("name", SOLVERS)
def test_reverse_time_integration(name, x64):
    y1 = (jnp.array(np.cos(10.0)), jnp.array(-np.sin(10.0)))
    (x, v), stats = odeint(_oscillator, y1, 10.0, 0.0, solver=name, rtol=1e-9, atol=1e-9)
    assert bool(stats.success)
    assert abs(float(x) - 1.0) < 1e-7 and abs(float(v)) < 1e-7


def test_stiff_problem_terminates_accurately(x64):
    """y' = -1000 (y - cos t): stiff for an explicit method; the controller keeps the steps at
    the stability limit and the solve still ends, accurately, well within max_steps."""
    f = lambda y, t: -1000.0 * (y - jnp.cos(t))
    y, stats = jax.jit(lambda y0: odeint(f, y0, 0.0, 1.0, rtol=1e-6, atol=1e-6, max_steps=20000))(jnp.array(0.0))
    exact = (1e6 * np.cos(1.0) + 1e3 * np.sin(1.0) - 1e6 * np.exp(-1000.0)) / (1e6 + 1.0)
    assert bool(stats.success)
    assert abs(float(y) - exact) < 1e-5
    assert 100 < int(stats.num_steps) < 20000


def test_max_steps_reports_failure(x64):
    y, stats = odeint(_oscillator, (jnp.array(1.0), jnp.array(0.0)), 0.0, 100.0, rtol=1e-10, atol=1e-10, max_steps=10)
    assert not bool(stats.success)
    assert int(stats.num_steps) + int(stats.num_rejected) == 10


def test_extra_state_log_density(x64):
    """State (x, delta_logp) of a linear flow dx/dt = A x: d logp / dt = -tr(A), exactly."""
    a = jnp.array([[-0.5, 1.0], [-1.0, -0.2]])
    x0 = jnp.array([[1.0, 0.0], [0.3, -2.0], [0.0, 0.5]])

    def field(state, t):
        x, _ = state
        return x @ a.T, -jnp.trace(a) * jnp.ones(x.shape[0])

    for mode in ["rms", "max", "per_sample"]:
        (x1, dlogp), stats = odeint(field, (x0, jnp.zeros(3)), 0.0, 1.5, rtol=1e-10, atol=1e-10, error_norm=mode)
        expected = x0 @ jax.scipy.linalg.expm(1.5 * a).T
        np.testing.assert_allclose(x1, expected, atol=1e-8)
        np.testing.assert_allclose(dlogp, -1.5 * float(jnp.trace(a)), atol=1e-8)


def test_per_sample_steps_are_independent_of_the_batch(x64):
    """With error_norm='per_sample' each sample takes its own steps: an easy sample needs fewer
    steps than a hard one, and its result is bitwise the one it gets when solved alone."""
    rates = jnp.array([0.5, 1.0, 20.0])
    f = lambda y, t: -jnp.sin(rates * t) * rates * y
    y_all, stats = odeint(f, jnp.ones(3), 0.0, 3.0, rtol=1e-8, atol=1e-8, error_norm="per_sample")
    steps = np.asarray(stats.num_steps)
    assert steps.shape == (3,) and steps[0] < steps[1] < steps[2]
    exact = jnp.exp(jnp.cos(rates * 3.0) - 1.0)
    np.testing.assert_allclose(y_all, exact, rtol=1e-6)
    rates_one = rates[:1]
    g = lambda y, t: -jnp.sin(rates_one * t) * rates_one * y
    y_one, _ = odeint(g, jnp.ones(1), 0.0, 3.0, rtol=1e-8, atol=1e-8, error_norm="per_sample")
    assert float(y_one[0]) == float(y_all[0])


def test_error_norms_and_the_hardest_sample(x64):
    """One hard sample among many easy ones. With the RMS over the batch its error is averaged
    away: the batch takes fewer steps than the hard sample needs on its own. With 'max' it
    dictates the step for everyone (exactly its own steps); with 'per_sample' it gets its own
    steps and the easy samples keep their cheaper ones."""
    rates = jnp.concatenate([jnp.full(63, 0.1), jnp.array([8.0])])
    f = lambda y, t: -jnp.sin(rates * t) * rates * y
    kw = dict(rtol=1e-6, atol=1e-6)
    alone = lambda y, t: -jnp.sin(8.0 * t) * 8.0 * y
    _, s_alone = odeint(alone, jnp.ones(1), 0.0, 3.0, error_norm="max", **kw)
    _, s_rms = odeint(f, jnp.ones(64), 0.0, 3.0, error_norm="rms", **kw)
    _, s_max = odeint(f, jnp.ones(64), 0.0, 3.0, error_norm="max", **kw)
    y_ps, s_ps = odeint(f, jnp.ones(64), 0.0, 3.0, error_norm="per_sample", **kw)
    assert int(s_rms.num_steps) < int(s_alone.num_steps)
    assert int(s_max.num_steps) == int(s_alone.num_steps)
    assert int(s_ps.num_steps[-1]) == int(s_alone.num_steps)
    assert int(s_ps.num_steps[0]) < int(s_alone.num_steps) // 2
    np.testing.assert_allclose(y_ps, jnp.exp(jnp.cos(rates * 3.0) - 1.0), rtol=2e-5)


def test_nfe_equals_vector_field_calls(x64):
    calls = []

    def f(y, t):
        calls.append(1)
        return -y

    with jax.disable_jit():
        _, stats = odeint(f, jnp.ones(4), 0.0, 1.0, rtol=1e-6, atol=1e-6)
    assert int(stats.nfe) == len(calls)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown ODE solver 'rk4'; valid names: dopri5, tsit5"):
        odeint(lambda y, t: y, jnp.ones(2), 0.0, 1.0, solver="rk4")
    with pytest.raises(ValueError, match="unknown error_norm"):
        odeint(lambda y, t: y, jnp.ones(2), 0.0, 1.0, error_norm="l1")
    with pytest.raises(ValueError, match="leading batch axis"):
        odeint(lambda y, t: y, (jnp.ones(2), jnp.ones(3)), 0.0, 1.0, error_norm="per_sample")


def test_probability_flow_log_density_of_a_mixture(x64):
    """Integrating (x, delta_logp) along the probability-flow ODE of the VP SDE with the exact
    mixture score recovers log p_0(x0) = log p_T(x_T) + int div v dt to 1e-6 (per-sample steps)."""
    sde = VPSDE()
    flow = sde.probability_flow(MIXTURE.score_fn(sde))
    x0 = MIXTURE.sample(jax.random.PRNGKey(0), 8, jnp.float64)

    def field(state, t):
        x, _ = state
        jac = jax.vmap(jax.jacfwd(lambda xi, ti: flow(xi[None], ti[None])[0]))(x, t)
        return flow(x, t), jnp.trace(jac, axis1=1, axis2=2)

    (x_T, dlogp), stats = odeint(
        field, (x0, jnp.zeros(8)), sde.t_min, sde.T, error_norm="per_sample", rtol=1e-8, atol=1e-8
    )
    assert bool(stats.success) and stats.num_steps.shape == (8,)
    logp = MIXTURE.log_prob(x_T, jnp.full(8, sde.T), sde) + dlogp
    np.testing.assert_allclose(logp, MIXTURE.log_prob(x0, jnp.full(8, sde.t_min), sde), atol=1e-6)
