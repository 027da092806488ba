"""The sampling entry point: registry, exact NFE, per-sample reproducibility, sharding, jit
without host round-trips, errors, grids, thresholding, prediction kinds and trajectories."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _sampler_problems import MIXTURE

import diffusion_jax
from diffusion_jax import samplers as S
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

ALL_SDES = [VESDE(), VPSDE(), SubVPSDE(), EDMSDE(), CosineVPSDE(), RectifiedFlow()]
KEY = jax.random.PRNGKey(0)

# A small configuration of every registered sampler (num_steps >= every order).
SMALL = {
    "euler_maruyama": dict(num_steps=6),
    "reverse_diffusion": dict(num_steps=40),
    "ancestral": dict(num_steps=40),
    "pc": dict(num_steps=40, n_steps=2),
    "ode": dict(rtol=1e-3, atol=1e-3),
    "ddim": dict(num_steps=6),
    "euler": dict(num_steps=6),
    "heun": dict(num_steps=6),
    "plms": dict(num_steps=6),
    "ipndm": dict(num_steps=6),
    "dpmpp_2m": dict(num_steps=6),
    "dpmpp_3m": dict(num_steps=6),
    "dpmpp_2s": dict(num_steps=6),
    "unipc": dict(num_steps=6, order=3),
    "ddpm": dict(num_steps=6),
    "sde_dpmpp_2m": dict(num_steps=6),
    "edm": dict(num_steps=6),
}


def _sde_for(name):
    # The ancestral and reverse-diffusion predictors step through VP's discrete table, which
    # needs N == num_steps entries (N >= ~25 keeps the DDPM betas b_max / N below 1).
    return VPSDE(N=40) if name in ("ancestral", "reverse_diffusion", "pc") else VPSDE()


def test_every_registered_sampler_is_covered():
    assert set(SMALL) == set(S.SAMPLERS)


def test_top_level_entry_point():
    assert diffusion_jax.sample is S.sample


@pytest.mark.parametrize("name", sorted(SMALL))
def test_nfe_equals_score_calls(name):
    """``info.nfe`` equals the number of score calls, counted in Python with jit disabled (every
    scan / while loop then runs its body once per trip)."""
    sde = _sde_for(name)
    calls = []
    score = MIXTURE.score_fn(sde)

    def counting(x, t):
        calls.append(1)
        return score(x, t)

    with jax.disable_jit():
        x, info = S.sample(KEY, counting, sde, (3, 2), S.get_sampler(name, **SMALL[name]))
    assert int(info.nfe) == len(calls) > 0
    assert x.shape == (3, 2) and bool(jnp.all(jnp.isfinite(x)))


@pytest.mark.parametrize("name", ["ddim", "heun", "dpmpp_3m", "unipc", "plms", "ode"])
def test_nfe_with_final_denoising_step(name):
    calls = []
    score = MIXTURE.score_fn(VPSDE())
    counting = lambda x, t: (calls.append(1), score(x, t))[1]
    with jax.disable_jit():
        _, info = S.sample(KEY, counting, VPSDE(), (2, 2), S.get_sampler(name, denoise=True, **SMALL[name]))
    assert int(info.nfe) == len(calls)
    if name != "ode":
        plain = S.get_sampler(name, **SMALL[name])
        _, info0 = S.sample(KEY, MIXTURE.score_fn(VPSDE()), VPSDE(), (2, 2), plain)
        assert int(info.nfe) == int(info0.nfe) + 1


def test_pc_reports_true_nfe_unlike_score_sde():
    """score_sde reports N (n_steps + 1) whatever the predictor and corrector."""
    sde = SubVPSDE()
    score = MIXTURE.score_fn(sde)
    cases = [("reverse_diffusion", "none", 1, 10), ("none", "langevin", 3, 30), ("euler_maruyama", "langevin", 2, 30)]
    for pred, corr, n_steps, expected in cases:
        smp = S.get_sampler("pc", predictor=pred, corrector=corr, n_steps=n_steps, num_steps=10)
        _, info = S.sample(KEY, score, sde, (4, 2), smp)
        assert int(info.nfe) == expected, (pred, corr)


STOCHASTIC = {
    "ddpm": (VPSDE(), dict(num_steps=20)),
    "ddim_eta": (VESDE(), dict(num_steps=20, eta=0.5)),
    "sde_dpmpp_2m": (CosineVPSDE(), dict(num_steps=20)),
    "edm": (EDMSDE(), dict(num_steps=20)),
    "euler_maruyama": (SubVPSDE(), dict(num_steps=30)),
    "pc": (VESDE(N=20), dict(num_steps=20, norm="per_sample", corrector="annealed_langevin")),
    "pc_langevin": (VPSDE(N=40), dict(num_steps=40, norm="per_sample")),
    "ancestral": (VPSDE(N=40), dict(num_steps=40)),
    "ode": (RectifiedFlow(), dict(rtol=1e-5, atol=1e-5)),
}


@pytest.mark.parametrize("case", sorted(STOCHASTIC))
def test_per_sample_keys_make_samples_batch_size_independent(case):
    sde, kw = STOCHASTIC[case]
    name = {"ddim_eta": "ddim", "pc_langevin": "pc"}.get(case, case)
    if case == "pc":
        kw = {k: v for k, v in kw.items() if k != "norm"}
    sampler = S.get_sampler(name, **kw)
    score = MIXTURE.score_fn(sde)
    big, _ = S.sample(KEY, score, sde, (7, 2), sampler, per_sample_keys=True)
    small, _ = S.sample(KEY, score, sde, (3, 2), sampler, per_sample_keys=True)
    np.testing.assert_allclose(small, big[:3], rtol=1e-5, atol=1e-5)
    # Sample i does not depend on the order or company it is drawn in: reversing the batch
    # indices is not possible, but a different key gives different samples (the noise is used).
    other, _ = S.sample(jax.random.PRNGKey(1), score, sde, (3, 2), sampler, per_sample_keys=True)
    assert not np.allclose(other, small, atol=1e-3)


@pytest.mark.slow
def test_sharded_batch_gives_the_same_samples():
    """The same samples, bit for bit up to float round-off, when the batch is sharded over two
    (host) devices with a NamedSharding; run in a subprocess to get two CPU devices."""
    code = textwrap.dedent(
        """
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        import sys; sys.path.insert(0, "tests")
        from _sampler_problems import MIXTURE
        from diffusion_jax import samplers as S
        from diffusion_jax.sde import VPSDE
        assert len(jax.devices()) == 2
        sde = VPSDE(); score = MIXTURE.score_fn(sde); key = jax.random.PRNGKey(3)
        mesh = Mesh(np.array(jax.devices()), ("data",))
        x_T = sde.prior_sample(jax.random.PRNGKey(1), (8, 2))
        x_T_sharded = jax.device_put(x_T, NamedSharding(mesh, P("data")))
        for name in ["sde_dpmpp_2m", "dpmpp_3m", "ode"]:
            smp = S.get_sampler(name) if name == "ode" else S.get_sampler(name, num_steps=10)
            ref, _ = S.sample(key, score, sde, (8, 2), smp, x_init=x_T, per_sample_keys=True)
            out, _ = S.sample(key, score, sde, (8, 2), smp, x_init=x_T_sharded, per_sample_keys=True)
            assert len(out.sharding.device_set) == 2, out.sharding
            np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
        print("OK")
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": root},
        timeout=300,
    )
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize("name", ["sde_dpmpp_2m", "ode", "pc"])
def test_compiled_sampler_has_no_host_round_trips(name):
    sde = _sde_for(name)
    smp = S.get_sampler(name, **SMALL[name])
    jaxpr = str(jax.make_jaxpr(lambda k: S.sample(k, MIXTURE.score_fn(sde), sde, (4, 2), smp))(KEY))
    assert "callback" not in jaxpr
    assert ("while" in jaxpr) if name == "ode" else ("scan" in jaxpr)


def test_sampling_inside_a_user_jit_and_pytree_score_parameters():
    sde = VPSDE()
    smp = S.get_sampler("dpmpp_2m", num_steps=8)

    def score_with_params(params, x, t):
        return params["scale"] * MIXTURE.score(x, t, sde)

    outer = jax.jit(
        lambda k: S.sample(k, jax.tree_util.Partial(score_with_params, {"scale": 1.0}), sde, (4, 2), smp)[0]
    )
    direct, _ = S.sample(KEY, MIXTURE.score_fn(sde), sde, (4, 2), smp)
    np.testing.assert_allclose(outer(KEY), direct, rtol=1e-5, atol=1e-5)
    # Parameters in a Partial are arguments of the compiled sampler, not constants.
    fn = lambda s: jax.tree_util.Partial(score_with_params, {"scale": jnp.asarray(s)})
    S.sample(KEY, fn(1.0), sde, (4, 2), smp)
    size = S.api._sample_jit._cache_size()
    S.sample(KEY, fn(0.5), sde, (4, 2), smp)
    assert S.api._sample_jit._cache_size() == size


def test_x_init_and_trajectory():
    sde = EDMSDE()
    score = MIXTURE.score_fn(sde)
    x_T = sde.prior_sample(jax.random.PRNGKey(5), (4, 2))
    smp = S.get_sampler("heun", num_steps=7)
    a, info = S.sample(jax.random.PRNGKey(1), score, sde, (4, 2), smp, x_init=x_T, return_trajectory=True)
    b, _ = S.sample(jax.random.PRNGKey(2), score, sde, (4, 2), smp, x_init=x_T)
    np.testing.assert_array_equal(a, b)  # deterministic sampler: the key is unused
    assert info.trajectory.shape == (7, 4, 2)
    np.testing.assert_array_equal(info.trajectory[-1], a)
    _, info_plms = S.sample(KEY, score, sde, (4, 2), S.get_sampler("plms", num_steps=6), return_trajectory=True)
    assert info_plms.trajectory.shape == (6, 4, 2)


def test_prior_draw_matches_the_sde_prior():
    sde = VESDE()
    smp = S.get_sampler("ddim", num_steps=1)
    # With a zero score DDIM leaves a VE state unchanged (x0 = x, eps = 0): the output is x_T.
    x, _ = S.sample(KEY, lambda x, t: jnp.zeros_like(x), sde, (4000, 3), smp)
    assert abs(float(jnp.std(x)) / sde.sigma_max - 1.0) < 0.03
    assert abs(float(jnp.mean(x))) < 0.05 * sde.sigma_max


@pytest.mark.parametrize("kind", ["eps", "x0", "v", "flow"])
def test_prediction_kinds_are_converted(kind):
    sde = CosineVPSDE()
    score = MIXTURE.score_fn(sde)
    from diffusion_jax import parametrization as P

    pred = lambda x, t: P.convert(score(x, t), from_kind="score", to_kind=kind, sde=sde, x=x, t=t)
    smp = S.get_sampler("unipc", num_steps=8)
    a, _ = S.sample(KEY, score, sde, (5, 2), smp)
    b, _ = S.sample(KEY, pred, sde, (5, 2), smp, kind=kind)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def _general_vp():
    vp = VPSDE()
    return GeneralSDE(drift_fn=lambda x, t: vp.drift(x, t), diffusion_fn=lambda t: vp.diffusion(t), T=1.0, t_min=1e-3)


MARGINAL_SAMPLERS = [
    "ddim",
    "euler",
    "heun",
    "plms",
    "ipndm",
    "dpmpp_2m",
    "dpmpp_3m",
    "dpmpp_2s",
    "unipc",
    "ddpm",
    "sde_dpmpp_2m",
    "edm",
]


@pytest.mark.parametrize("name", MARGINAL_SAMPLERS)
def test_samplers_needing_marginals_reject_a_general_sde(name):
    score = MIXTURE.score_fn(VPSDE())
    with pytest.raises(MarginalsUnavailableError, match="the '.*' sampler needs the closed-form marginals"):
        S.sample(KEY, score, _general_vp(), (2, 2), S.get_sampler(name, **SMALL[name]))


def test_general_sde_works_with_euler_maruyama_pc_and_ode():
    """A GeneralSDE with VP's drift and diffusion gives the VPSDE result for samplers that need
    only drift, diffusion and score; PC with Langevin runs too (its step scale alpha is the DDPM
    table's 1 - beta_i for VPSDE and 1 for an SDE without a table, so it differs slightly)."""
    vp, gen = VPSDE(), _general_vp()
    score = MIXTURE.score_fn(vp)
    x_T = vp.prior_sample(jax.random.PRNGKey(4), (6, 2))
    for smp in [S.get_sampler("euler_maruyama", num_steps=20), S.get_sampler("ode", rtol=1e-6, atol=1e-6)]:
        a, ia = S.sample(KEY, score, vp, (6, 2), smp, x_init=x_T)
        b, ib = S.sample(KEY, score, gen, (6, 2), smp, x_init=x_T)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        assert int(ia.nfe) == int(ib.nfe)
    for pred in ["euler_maruyama", "reverse_diffusion"]:
        pc = S.get_sampler("pc", predictor=pred, corrector="langevin", num_steps=10)
        x, info = S.sample(KEY, score, gen, (6, 2), pc, x_init=x_T)
        assert bool(jnp.all(jnp.isfinite(x))) and int(info.nfe) == 20
    with pytest.raises(MarginalsUnavailableError, match="AnnealedLangevinCorrector"):
        S.sample(KEY, score, gen, (2, 2), S.get_sampler("pc", corrector="annealed_langevin", num_steps=4))
    with pytest.raises(MarginalsUnavailableError):
        S.sample(KEY, score, gen, (2, 2), S.get_sampler("ode", denoise=True))


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown sampler 'dpm'; valid names: euler_maruyama, .*unipc"):
        S.get_sampler("dpm")
    with pytest.raises(ValueError, match=r"unknown time grid 'cosine'; valid names: uniform, karras, log_snr"):
        S.get_grid("cosine")
    with pytest.raises(ValueError, match=r"unknown time grid 'cosine'"):
        S.get_sampler("ddim", grid="cosine")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['order'\] for sampler 'dpmpp_2m'; valid: "):
        S.get_sampler("dpmpp_2m", order=3)
    with pytest.raises(ValueError, match=r"unknown predictor 'heun'; valid names: euler_maruyama"):
        S.get_sampler("pc", predictor="heun")
    with pytest.raises(ValueError, match=r"unknown corrector"):
        S.get_sampler("pc", corrector="mala")
    with pytest.raises(ValueError, match=r"unknown thresholding"):
        S.get_sampler("ddim", thresholding="percentile")
    with pytest.raises(ValueError, match=r"unknown sampler 'dpm'; valid names"):
        S.sample(KEY, MIXTURE.score_fn(VPSDE()), VPSDE(), (2, 2), "dpm")
    with pytest.raises(TypeError, match="sampler must be a sampler object"):
        S.sample(KEY, MIXTURE.score_fn(VPSDE()), VPSDE(), (2, 2), object())
    with pytest.raises(TypeError, match=r"sampler options go with a name"):
        S.sample(KEY, MIXTURE.score_fn(VPSDE()), VPSDE(), (2, 2), S.get_sampler("ddim"), num_steps=3)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: S.get_sampler("dpmpp_3m", num_steps=2), r"num_steps=2 is too small; need >= 3"),
        (lambda: S.get_sampler("unipc", order=3, num_steps=2), r"num_steps=2 is too small; need >= 3"),
        (lambda: S.get_sampler("ipndm", num_steps=3), r"need >= 4"),
        (lambda: S.get_sampler("plms", num_steps=3), r"need >= 4"),
        (lambda: S.get_sampler("ddim", num_steps=0), r"need >= 1"),
        (lambda: S.get_sampler("unipc", order=4), "order must be 1, 2 or 3"),
        (lambda: S.get_sampler("unipc", variant="bh3"), "variant must be 'bh1' or 'bh2'"),
        (lambda: S.DPMSolverPP(method="singlestep", order=3), "order 2"),
        (lambda: S.get_sampler("pc", predictor="ancestral", probability_flow=True), "no probability-flow form"),
        (lambda: S.get_sampler("ode", error_norm="l2"), "unknown error_norm"),
        (lambda: S.ExplicitGrid(times=np.array([1.0, 0.5, 0.7])), "strictly decreasing"),
    ],
)
def test_bad_configurations_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_calls_raise():
    sde = VPSDE()
    score = MIXTURE.score_fn(sde)
    with pytest.raises(ValueError, match=r"x_init has shape \(3, 2\), expected \(4, 2\)"):
        S.sample(KEY, score, sde, (4, 2), S.DDIM(num_steps=3), x_init=jnp.zeros((3, 2)))
    grid = S.ExplicitGrid(times=np.array([1.0, 0.5, 0.1, 1e-3]))
    with pytest.raises(
        ValueError, match=r"ExplicitGrid has 4 times, i.e. 3 steps, but the sampler asks for num_steps=5"
    ):
        S.sample(KEY, score, sde, (4, 2), S.DDIM(num_steps=5, grid=grid))
    with pytest.raises(ValueError, match="ancestral predictor needs an SDE with a discrete ancestral table"):
        S.sample(KEY, MIXTURE.score_fn(EDMSDE()), EDMSDE(), (2, 2), S.get_sampler("ancestral", num_steps=4))
    for name in ["ancestral", "reverse_diffusion"]:
        with pytest.raises(ValueError, match=r"VPSDE's discrete table of N=1000 steps; use num_steps=1000"):
            S.sample(KEY, score, sde, (2, 2), S.get_sampler(name, num_steps=20))
    with pytest.raises(ValueError, match="unknown prediction kind"):
        S.sample(KEY, score, sde, (4, 2), S.DDIM(num_steps=3), kind="noise")
    with pytest.raises(ValueError, match="returned shape"):
        S.sample(KEY, lambda x, t: x[:, :1], sde, (4, 2), S.DDIM(num_steps=3))


# --------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sde", ALL_SDES, ids=[type(s).__name__ for s in ALL_SDES])
@pytest.mark.parametrize("name", ["uniform", "karras", "log_snr", "quadratic"])
def test_grids_run_from_T_to_t_min(sde, name, x64):
    ts = np.asarray(S.get_grid(name)(sde, 12))
    assert ts.shape == (13,)
    assert ts[0] == float(sde.T) and ts[-1] == float(sde.t_min)
    assert np.all(np.diff(ts) < 0)


def test_grid_definitions(x64):
    edm = EDMSDE()
    sig = np.asarray(S.KarrasGrid(rho=7.0)(edm, 10))
    i = np.arange(11) / 10
    expected = (80.0 ** (1 / 7) + i * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7  # Karras et al., eq. 5
    np.testing.assert_allclose(sig, expected, rtol=1e-10)
    vp = VPSDE()
    lam = np.asarray(vp.log_snr(S.LogSNRGrid()(vp, 10)))
    np.testing.assert_allclose(np.diff(lam), np.full(10, (lam[-1] - lam[0]) / 10), rtol=1e-8)
    q = np.asarray(S.QuadraticGrid()(vp, 4))
    np.testing.assert_allclose(q, 1e-3 + (1 - 1e-3) * np.array([1, 0.5625, 0.25, 0.0625, 0.0]), rtol=1e-12)
    # Karras on VP: uniform in sigma~ ** (1/rho).
    st = np.asarray(vp.sigma_tilde(S.KarrasGrid()(vp, 10)))
    np.testing.assert_allclose(
        np.diff(st ** (1 / 7)), np.full(10, (st[-1] ** (1 / 7) - st[0] ** (1 / 7)) / 10), rtol=1e-6
    )


def test_score_sde_grid_visits_each_table_entry_once(x64):
    for sde in [VPSDE(N=1000), VESDE(N=500)]:
        ts = S.ScoreSDEGrid()(sde, sde.N)
        idx = np.asarray(sde.timestep(ts[:-1]))
        np.testing.assert_array_equal(idx, np.arange(sde.N)[::-1])


# --------------------------------------------------------------------------------------------
# Thresholding
# --------------------------------------------------------------------------------------------


def test_dynamic_thresholding_follows_imagen():
    x0 = jnp.array([[0.2, -0.5, 0.9, 0.1], [3.0, -1.0, 0.5, 2.0]])
    out = S.DynamicThreshold(percentile=0.75)(x0)
    for row, res in zip(np.asarray(x0), np.asarray(out)):
        s = max(np.quantile(np.abs(row), 0.75), 1.0)
        np.testing.assert_allclose(res, np.clip(row, -s, s) / s, rtol=1e-6)
    np.testing.assert_allclose(S.StaticClip(limit=1.0)(x0), jnp.clip(x0, -1, 1))


@pytest.mark.parametrize("name", ["ddim", "heun", "dpmpp_2m", "unipc", "ipndm", "ddpm", "sde_dpmpp_2m"])
def test_thresholding_limits_the_data_prediction(name):
    """Data far outside [-1, 1]: with a final denoising step the clipped prediction is returned,
    so every sample lies in [-1, 1]; without clipping they do not."""
    from diffusion_jax.analytic import GaussianMixture

    wide = GaussianMixture(
        weights=np.array([0.5, 0.5]), means=np.array([[-3.0, 2.0], [3.0, -2.0]]), stds=np.array([0.5, 0.5])
    )
    sde = VPSDE()
    for th in ["static", "dynamic"]:
        smp = S.get_sampler(name, num_steps=10, denoise=True, thresholding=th)
        x, _ = S.sample(KEY, wide.score_fn(sde), sde, (64, 2), smp)
        assert float(jnp.max(jnp.abs(x))) <= 1.0 + 1e-6
    x, _ = S.sample(KEY, wide.score_fn(sde), sde, (64, 2), S.get_sampler(name, num_steps=10, denoise=True))
    assert float(jnp.max(jnp.abs(x))) > 2.0


def test_samplers_are_frozen_pytrees():
    smp = S.get_sampler("edm", num_steps=4)
    leaves = jax.tree_util.tree_leaves(smp)
    assert any(np.isclose(float(l), 40.0) for l in leaves)  # s_churn is a leaf
    with pytest.raises(dataclasses.FrozenInstanceError):
        smp.s_churn = 1.0
    assert smp.replace(num_steps=8).num_steps == 8
