"""Convergence of every deterministic sampler to the exact probability-flow ODE solution.

Problem: the 2-D three-component Gaussian mixture of ``_sampler_problems`` under the VP SDE
(beta in [0.1, 20], t in [1e-3, 1]), whose noised score is exact; 32 samples from fixed prior
noise; float64. The reference is the same ODE solved by Dopri5 at rtol = atol = 1e-12 from the
same noise (it agrees with rtol = 1e-10 to ~1e-10, far below the smallest error measured here,
~1e-9). The error is the RMS distance of the final samples (at t_min) to the reference.

Choice of step counts: the measured region starts where the leading error term dominates
(for the higher-order methods the first few doublings are pre-asymptotic: very large first steps
at high noise on the log-SNR and EDM grids) and stops while the error is still >= 1e-9, well
above the reference error and float64 round-off. The empirical order is the least-squares slope
of -log(error) against log(N), required within 0.3 of theory.

Theory, as implemented:

* DDIM (eta = 0) and Euler: order 1 (the same step, Euler on dx~/dsigma~ = eps).
* EDM Heun, DPM-Solver++(2M), DPM-Solver++(2S), SDE-DPM-Solver++(2M) with eta = 0: order 2.
* DPM-Solver++(3M): order 3 (exact integration of the quadratic interpolant in lambda). Its DDIM
  and 2M warm-up steps have local errors O(h^2), O(h^3), but they are taken at the noisiest end
  where the data prediction barely changes, so their constant is negligible at every N used.
* UniPC-p (predictor UniP-p + corrector UniC-p): order p + 1 (Zhao et al. 2023, Theorem 3.2),
  measured on the log-SNR grid where its theory holds.
* iPNDM and PLMS with the published fixed Adams-Bashforth weights: order 2 on a non-uniform grid
  (the weights of uniform steps are consistent only to second order when step ratios vary);
  with ``variable_step=True`` (weights from the actual steps): order 4.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from _sampler_problems import MIXTURE, empirical_order, prior_noise, reference_solution, rms

from diffusion_jax import samplers as S
from diffusion_jax.sde import VPSDE

SDE = VPSDE()
BATCH = 32

CASES = [
    ("ddim", S.DDIM(), 1, [40, 80, 160]),
    ("euler", S.Euler(), 1, [40, 80, 160]),
    ("heun", S.EDMSampler(), 2, [40, 80, 160]),
    ("dpmpp_2m", S.DPMSolverPP(order=2), 2, [40, 80, 160]),
    ("dpmpp_2s", S.DPMSolverPP(order=2, method="singlestep"), 2, [40, 80, 160]),
    ("sde_dpmpp_2m_eta0", S.SDEDPMSolverPP(eta=0.0), 2, [40, 80, 160]),
    ("dpmpp_3m", S.DPMSolverPP(order=3), 3, [80, 160, 320]),
    ("unipc_1", S.UniPC(order=1), 2, [40, 80, 160]),
    ("unipc_2_bh2", S.UniPC(order=2, variant="bh2"), 3, [80, 160, 320]),
    ("unipc_2_bh1", S.UniPC(order=2, variant="bh1"), 3, [80, 160, 320]),
    ("unipc_3", S.UniPC(order=3), 4, [320, 640, 1280]),
    ("ipndm", S.IPNDM(), 2, [20, 40, 80, 160]),
    ("ipndm_variable_step", S.IPNDM(variable_step=True), 4, [160, 320, 640]),
    ("plms", S.PLMS(), 2, [20, 40, 80, 160]),
    ("plms_variable_step", S.PLMS(variable_step=True), 4, [160, 320, 640]),
]


@functools.cache
def _problem():
    with jax.enable_x64(True):
        x_T = prior_noise(SDE, BATCH)
        return x_T, reference_solution(SDE, x_T)


def _errors(sampler, ns):
    x_T, ref = _problem()
    score = MIXTURE.score_fn(SDE)
    errs = []
    for n in ns:
        x, info = S.sample(jax.random.PRNGKey(0), score, SDE, x_T.shape, sampler.replace(num_steps=n), x_init=x_T)
        assert x.dtype == jnp.float64
        errs.append(rms(x, ref))
    return errs


@pytest.mark.parametrize("name,sampler,order,ns", CASES, ids=[c[0] for c in CASES])
def test_empirical_order_matches_theory(name, sampler, order, ns, x64):
    errs = _errors(sampler, ns)
    assert min(errs) > 5e-10, f"{name}: errors {errs} reach the reference accuracy"
    measured = empirical_order(ns, errs)
    assert abs(measured - order) < 0.3, f"{name}: order {measured:.2f}, theory {order}; errors {errs}"


def test_higher_order_wins_at_moderate_steps(x64):
    """At 40 steps the third-order multistep solvers are several times more accurate than 2M."""
    e2 = _errors(S.DPMSolverPP(order=2), [40])[0]
    e3 = _errors(S.DPMSolverPP(order=3), [40])[0]
    eu = _errors(S.UniPC(order=3), [40])[0]
    assert e3 < e2 / 3 and eu < e2 / 3, (e2, e3, eu)


@pytest.mark.parametrize("solver", ["dopri5", "tsit5"])
def test_adaptive_ode_sampler_meets_tolerance(solver, x64):
    x_T, ref = _problem()
    score = MIXTURE.score_fn(SDE)
    prev = None
    for tol in [1e-4, 1e-6, 1e-8]:
        sampler = S.get_sampler("ode", solver=solver, rtol=tol, atol=tol)
        x, info = S.sample(jax.random.PRNGKey(0), score, SDE, x_T.shape, sampler, x_init=x_T)
        err = rms(x, ref)
        assert bool(info.success)
        # Samples are O(1): the global error stays within a small multiple of the tolerance.
        assert err < 10 * tol, (solver, tol, err, int(info.nfe))
        assert int(info.nfe) > 0 and (prev is None or int(info.nfe) > prev)
        prev = int(info.nfe)
