"""The sampler contract: every registered sampler implements the abstract base, and a sampler
written outside the package runs through ``sample()`` and ``get_sampler`` like a built-in one."""

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _sampler_problems import MIXTURE

from diffusion_jax import sample
from diffusion_jax import samplers as S
from diffusion_jax.sde import (
    SDE,
    VESDE,
    VPSDE,
    DiscreteChain,
    GeneralSDE,
    LinearSDE,
    MarginalsUnavailableError,
    require_marginals,
)


class MidpointSampler(S.FixedGridSampler):
    """The explicit midpoint rule on the scaled probability-flow ODE dx~/dsigma~ = eps, written
    against the public contract only: ``model.eps`` and ``sde.marginal``."""

    name: ClassVar[str] = "midpoint"

    def run(self, model, x, noise, *, return_trajectory=False):
        ts = self.grid(model.sde, self.num_steps).astype(x.dtype)

        def scaled(t):
            a, s = model.sde.marginal(t)
            return a, s / a

        def body(x, i):
            t, t_next = ts[i], ts[i + 1]
            a, st = scaled(t)
            a_next, st_next = scaled(t_next)
            st_mid = 0.5 * (st + st_next)
            t_mid = model.sde.t_from_log_snr(-2.0 * jnp.log(st_mid))
            a_mid, _ = scaled(t_mid)
            x_mid = a_mid * (x / a + (st_mid - st) * model.eps(x, t))
            return a_next * (x / a + (st_next - st) * model.eps(x_mid, t_mid)), None

        x, _ = jax.lax.scan(body, x, jnp.arange(self.num_steps))
        return x, S.base.fixed_info(2 * self.num_steps, self.num_steps)


def test_an_outside_sampler_runs_through_sample_and_get_sampler():
    sde = VPSDE()
    score = MIXTURE.score_fn(sde)
    key = jax.random.PRNGKey(0)
    smp = S.get_sampler(MidpointSampler, num_steps=8, grid="karras")
    assert isinstance(smp, S.Sampler) and smp.num_steps == 8
    x, info = sample(key, score, sde, (64, 2), smp)
    assert int(info.nfe) == 16
    # Second order: doubling the steps divides the distance to a fine reference by about 4.
    ref, _ = sample(key, score, sde, (64, 2), "heun", num_steps=256)

    def error(n):
        out, _ = sample(key, score, sde, (64, 2), S.get_sampler(MidpointSampler, num_steps=n))
        return float(np.max(np.abs(np.asarray(out) - np.asarray(ref))))

    e16, e32 = error(16), error(32)
    assert e32 < e16 / 3 and e32 < 0.05, (e16, e32)
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['eta'\] for sampler 'midpoint'"):
        S.get_sampler(MidpointSampler, eta=1.0)
    with pytest.raises(ValueError, match="midpoint: num_steps=0 is too small"):
        MidpointSampler(num_steps=0)


def test_the_contract_is_enforced():
    class NoRun(S.FixedGridSampler):
        pass

    with pytest.raises(TypeError, match="abstract method"):
        NoRun()
    with pytest.raises(TypeError, match="not a subclass of diffusion_jax.samplers.Sampler"):
        S.get_sampler(dict)


@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_every_registered_sampler_implements_the_base(name):
    smp = S.get_sampler(name, num_steps=4) if "num_steps" in S.sampler_fields(name) else S.get_sampler(name)
    assert isinstance(smp, S.Sampler)
    assert isinstance(smp.is_stochastic(), bool)
    general = GeneralSDE(drift_fn=lambda x, t: -x, diffusion_fn=lambda t: jnp.ones_like(t))
    if smp.needs_marginals:
        with pytest.raises(MarginalsUnavailableError, match="needs the closed-form marginals"):
            smp.validate(general)


def test_sde_capabilities_are_types():
    assert isinstance(VESDE(), DiscreteChain) and isinstance(VPSDE(), DiscreteChain)
    assert isinstance(VPSDE(), LinearSDE)
    general = GeneralSDE(drift_fn=lambda x, t: -x, diffusion_fn=lambda t: jnp.ones_like(t))
    assert isinstance(general, SDE) and not isinstance(general, LinearSDE)
    assert require_marginals(VPSDE(), "this test") == VPSDE()
    with pytest.raises(MarginalsUnavailableError, match="this test needs the closed-form marginals"):
        require_marginals(general, "this test")
    with pytest.raises(ValueError, match="needs an SDE with a discrete ancestral table"):
        sample(jax.random.PRNGKey(0), lambda x, t: -x, general, (2, 2), "ancestral", num_steps=3)
