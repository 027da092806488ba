"""EMAs: several constant rates at once, EDM2's power-function EMA and its post-hoc
reconstruction (diffusion_jax/training/ema.py), and the ``posthoc_ema`` mode with the choice of
the average in ``sample`` / ``eval`` / ``load``.

The mathematics is checked against closed forms and quadrature in float64; one module-scoped
tiny digits run (8 steps, snapshots every 2) serves the command-line tests."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _scale_cli import TINY_NET, cli_in_process
from scipy import integrate

from diffusion_jax.training import ema as E
from diffusion_jax.training import ema_snapshots as S
from diffusion_jax.training.state import init_train_state
from diffusion_jax.training.step import make_train_step

ROOT = pathlib.Path(__file__).resolve().parent.parent


# -- the profile and its parameters ------------------------------------------------------------


def test_sigma_rel_and_gamma_invert_each_other_and_match_the_profiles_moments():
    # EDM2 (sec. 3.1): sigma_rel 0.05 and 0.10 are gamma = 16.97 and 6.94.
    assert E.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
    assert E.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)
    assert E.sigma_rel_to_gamma(E.SIGMA_REL_MAX) == pytest.approx(0.0, abs=1e-9)
    for gamma in (0.0, 0.3, 2.0, 6.94, 16.97, 150.0):
        s = E.gamma_to_sigma_rel(gamma)
        assert E.sigma_rel_to_gamma(s) == pytest.approx(gamma, rel=1e-10, abs=1e-10)
        # The relative std of p(tau) = (g+1) tau^g on [0, 1], by quadrature.
        mean = integrate.quad(lambda tau, g=gamma: tau * (g + 1) * tau**g, 0, 1)[0]
        second = integrate.quad(lambda tau, g=gamma: tau * tau * (g + 1) * tau**g, 0, 1)[0]
        assert np.sqrt(second - mean**2) == pytest.approx(s, rel=1e-8)
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(ValueError, match="outside"):
            E.sigma_rel_to_gamma(bad)


@pytest.mark.parametrize("t_a,g_a,t_b,g_b", [(40, 6.94, 100, 16.97), (100, 0.0, 100, 2.5), (7, 3.0, 5, 0.4)])
def test_profile_inner_products_match_quadrature(t_a, g_a, t_b, g_b):
    def p(tau, t, g):
        return (g + 1) * tau**g / t ** (g + 1) if tau <= t else 0.0

    numeric = integrate.quad(lambda tau: p(tau, t_a, g_a) * p(tau, t_b, g_b), 0, min(t_a, t_b), epsabs=0, epsrel=1e-12)
    assert E.profile_dot(t_a, g_a, t_b, g_b) == pytest.approx(numeric[0], rel=1e-9)
    assert E.profile_dot(t_b, g_b, t_a, g_a) == pytest.approx(numeric[0], rel=1e-9)  # symmetric
    # Large exponents do not overflow (the ratio form).
    assert np.isfinite(E.profile_dot(1e6, 1e4, 2e6, 2e4)) and E.profile_dot(1e6, 1e4, 2e6, 2e4) >= 0


# -- the update rule -----------------------------------------------------------------------------


def _trajectory(n_steps: int, dim: int = 6, seed: int = 0) -> np.ndarray:
    """Parameters of a toy run: noisy gradient descent on a quadratic, float64, shape [T, dim]."""
    rng = np.random.default_rng(seed)
    a = np.diag(np.linspace(0.2, 2.0, dim))
    theta, out = rng.normal(size=dim) * 3, []
    for _ in range(n_steps):
        theta = theta - 0.02 * (a @ theta - 1.0) + 0.05 * rng.normal(size=dim)
        out.append(theta.copy())
    return np.asarray(out)


def _track(traj: np.ndarray, ema: E.MultiEma, start: np.ndarray):
    """Every EMA of ``ema`` after each step of ``traj`` (a scan of ``MultiEma.update``)."""

    def body(state, inp):
        theta, step = inp
        state = ema.update(state, theta, step)
        return state, state

    steps = jnp.arange(1, traj.shape[0] + 1)
    _, history = jax.lax.scan(body, ema.init(jnp.asarray(start)), (jnp.asarray(traj), steps))
    return history


def test_power_ema_update_equals_its_closed_form_weights(x64):
    traj = _trajectory(300)
    history = _track(traj, E.MultiEma(sigma_rels=(0.05, 0.2)), start=np.full(6, 1e3))
    for k, s in enumerate((0.05, 0.2)):
        g = E.sigma_rel_to_gamma(s)
        for t in (1, 2, 37, 300):
            tau = np.arange(1, t + 1, dtype=np.float64)
            w = (tau ** (g + 1) - (tau - 1) ** (g + 1)) / t ** (g + 1)  # the telescoped betas
            expected = w @ traj[:t]  # the start value (1e3) has weight 0
            np.testing.assert_allclose(np.asarray(history.power[k][t - 1]), expected, rtol=1e-12, atol=1e-12)


def test_several_rates_equal_separately_tracked_emas():
    """Extra rates in one train step give bit for bit the main EMA of runs with that rate."""
    params = {"w": jnp.linspace(-1.0, 1.0, 8), "b": jnp.zeros(())}

    def loss_fn(p, batch, key):
        r = batch["x"] @ p["w"] + p["b"] - batch["y"] + 0.01 * jax.random.normal(key, batch["y"].shape)
        return jnp.mean(r**2), {}

    optimizer = optax.adam(0.05)
    rng = np.random.default_rng(0)
    batches = {"x": rng.normal(size=(5, 4, 8)).astype(np.float32), "y": rng.normal(size=(5, 4)).astype(np.float32)}
    extra = E.MultiEma(rates=(0.9, 0.5), sigma_rels=(0.1,), warmup=True)

    def run(rate, ema):
        step = jax.jit(make_train_step(loss_fn, optimizer, ema_rate=rate, ema_warmup=True, extra_ema=ema))
        state = init_train_state(params, optimizer, jax.random.PRNGKey(0), ema=ema)
        state, metrics = step(state, batches)
        return state, metrics

    together, m_together = run(0.99, extra)
    for i, rate in enumerate(extra.rates):
        alone, m_alone = run(rate, None)
        assert alone.emas is None
        np.testing.assert_array_equal(m_together["loss"], m_alone["loss"])  # training is unchanged
        for leaf_a, leaf_b in zip(jax.tree.leaves(together.emas.rates[i]), jax.tree.leaves(alone.ema_params)):
            np.testing.assert_array_equal(leaf_a, leaf_b)
    np.testing.assert_array_equal(together.params["w"], alone.params["w"])


# -- post-hoc reconstruction ---------------------------------------------------------------------


def _reconstruct(history, snap_steps, sigma_rels, target_step, target_sigma_rel):
    """The EMA of ``target_sigma_rel`` at ``target_step`` from the power EMAs of ``history`` at
    ``snap_steps``; also the weights and the profile residual."""
    gammas = [E.sigma_rel_to_gamma(s) for s in sigma_rels]
    t = np.repeat(np.asarray(snap_steps, np.float64), len(gammas))
    g = np.tile(gammas, len(snap_steps))
    g_r = E.sigma_rel_to_gamma(target_sigma_rel)
    x = E.solve_posthoc_weights(t, g, target_step, g_r)[:, 0]
    snaps = np.stack([np.asarray(history.power[k][s - 1]) for s in snap_steps for k in range(len(gammas))])
    residual = E.profile_residual(t, g, x, target_step, g_r)[0]
    return x @ snaps, x, residual


def test_posthoc_reconstruction_matches_a_directly_tracked_ema(x64):
    """A toy run in float64 (1,000 steps) tracks EDM2's pair (0.05, 0.10) with snapshots every 5
    steps (0.5% of the run), and directly the profiles 0.07, 0.15 and 0.02, which are
    reconstructed from the snapshots alone (scripts/posthoc_ema_accuracy.py: other spacings)."""
    n = 1000
    traj = _trajectory(n, dim=40)
    sigma_rels = (0.05, 0.10)
    history = _track(traj, E.MultiEma(sigma_rels=(*sigma_rels, 0.07, 0.15, 0.02)), start=traj[0])
    snap_steps = list(range(5, n + 1, 5))
    # (target, step, tolerance): lengths between the tracked ones at the end of the run; an
    # earlier step (fewer snapshots); a shorter length than both (extrapolation).
    cases = [(2, 0.07, n, 1e-6), (3, 0.15, n, 1e-6), (2, 0.07, 500, 1e-5), (4, 0.02, n, 1e-4)]
    for k, target, t_r, tol in cases:
        got, x, residual = _reconstruct(history, [s for s in snap_steps if s <= t_r], sigma_rels, t_r, target)
        direct = np.asarray(history.power[k][t_r - 1])
        rel = np.linalg.norm(got - direct) / np.linalg.norm(direct)
        assert rel < tol, (target, t_r, rel)
        # The Cauchy-Schwarz bound |err| <= residual ||p_r|| ||theta|| holds per parameter
        # (the discrete EMA is the profile applied to the piecewise-constant trajectory).
        g_r = E.sigma_rel_to_gamma(target)
        bound = residual * np.sqrt(E.profile_dot(t_r, g_r, t_r, g_r)) * np.linalg.norm(traj[:t_r], axis=0)
        assert np.all(np.abs(got - direct) <= bound * (1 + 1e-9) + 1e-12)


def test_reconstruction_is_exact_for_a_trajectory_in_the_span_of_the_snapshot_profiles(x64):
    """Uniform averages (gamma = 0) snapshotted every 5 steps span the trajectories constant
    between snapshots; any profile is then reconstructed exactly (the residual is orthogonal)."""
    rng = np.random.default_rng(1)
    traj = np.repeat(rng.normal(size=(20, 3)), 5, axis=0)  # constant on (5k, 5k + 5]
    history = _track(traj, E.MultiEma(sigma_rels=(E.SIGMA_REL_MAX, 0.04)), start=traj[0])
    got, _, residual = _reconstruct(history, list(range(5, 101, 5)), (E.SIGMA_REL_MAX,), 100, 0.04)
    assert residual > 1e-3  # the profile itself is not in the span ...
    np.testing.assert_allclose(got, np.asarray(history.power[1][99]), rtol=1e-9)  # ... the average is


def test_solver_refuses_bad_inputs():
    with pytest.raises(ValueError, match="no snapshots"):
        E.solve_posthoc_weights([], [], 10, 1.0)
    with pytest.raises(ValueError, match=">= 1"):
        E.solve_posthoc_weights([0, 5], [1.0, 1.0], 10, 1.0)


# -- config ------------------------------------------------------------------------------------


def test_config_keys_are_typed_and_checked():
    from diffusion_jax.builders import config as config_lib

    parse = config_lib.parse_override
    assert parse("model.ema_sigma_rels", "0.05,0.1") == (0.05, 0.1)
    assert parse("model.ema_rates", "0.999") == (0.999,) and parse("model.ema_rates", "()") == ()
    with pytest.raises(config_lib.ConfigError, match="expected numbers like"):
        parse("model.ema_rates", "(0.9, 'a')")
    bad = {
        "model.ema_snapshot_freq": (10, "needs model.ema_sigma_rels"),
        "model.ema_sigma_rels": ((0.05, 0.5), r"in \(0, 0.2887\]"),
        "model.ema_rates": ((0.9, 0.9), "must not repeat"),
        "sampling.ema": ("rate:0.3", "tracks the rates"),
    }
    for path, (value, message) in bad.items():
        config = config_lib.default_config()
        section, name = path.split(".")
        config[section][name] = value
        with pytest.raises(config_lib.ConfigError, match=message):
            config_lib.validate_config(config, build=False)
    assert config_lib.ema_choice("sigma_rel:0.05") == ("sigma_rel", 0.05)
    assert config_lib.ema_choice("") == ("main", None) and config_lib.ema_choice("params") == ("params", None)
    for text in ("sigma_rel:0.4", "rate:1.5", "rate:x", "average"):
        with pytest.raises(ValueError):
            config_lib.ema_choice(text)


# -- the command line ----------------------------------------------------------------------------

TINY = [
    *TINY_NET,
    "--config.training.batch_size=16",
    "--config.training.n_iters=8",
    "--config.training.n_jitted_steps=1",
    "--config.training.log_freq=4",
    "--config.training.eval_freq=100",
    "--config.training.snapshot_freq=4",
    "--config.training.snapshot_freq_for_preemption=4",
    "--config.training.snapshot_sampling=False",
    "--config.sampling.method=heun",
    "--config.sampling.num_steps=2",
    "--config.sampling.batch_size=4",
    "--config.eval.num_samples=4",
    "--config.optim.warmup=0",
    "--config.model.ema_rates=0.9,0.2",
    "--config.model.ema_sigma_rels=0.05,0.1",
    "--config.model.ema_snapshot_freq=2",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ema_cli")
    wd = root / "run"
    argv = ["train", f"--config={ROOT / 'configs' / 'digits' / 'edm.py'}", f"--workdir={wd}", *TINY]
    argv.append(f"--config.data.data_dir={root / 'data'}")
    # Stopped after 3 steps and resumed: the extra EMAs go through a checkpoint.
    assert cli_in_process(*argv, "--stop_after=3") == 0
    assert S.snapshot_steps(wd) == [2]
    assert cli_in_process(*argv) == 0
    return wd


def test_training_saves_snapshots_and_posthoc_mode_writes_what_load_and_sample_use(workdir, capsys):
    import diffusion_jax

    assert S.snapshot_steps(workdir) == [2, 4, 6, 8]
    assert cli_in_process("posthoc_ema", f"--workdir={workdir}", "--sigma_rel=0.07,0.2") == 0
    out = capsys.readouterr().out
    assert "post-hoc EMA at step 8 from 4 snapshots x 2 profiles" in out
    report = json.loads((workdir / "posthoc_ema" / "report_00000008.json").read_text())
    assert report["snapshot_steps"] == [2, 4, 6, 8] and len(report["weights"]["0.07"]) == 8

    # load picks each average; the reconstruction is the weighted sum of the snapshots.
    main = diffusion_jax.load(workdir)
    state_rate = diffusion_jax.load(workdir, ema="rate:0.2").params
    tracked = diffusion_jax.load(workdir, ema="sigma_rel:0.1").params
    rebuilt = diffusion_jax.load(workdir, ema="sigma_rel:0.07").params
    raw = diffusion_jax.load(workdir, ema="params").params
    leaf = lambda tree: np.asarray(jax.tree.leaves(tree)[0], np.float64)  # noqa: E731
    assert not np.array_equal(leaf(main.params), leaf(state_rate)) and not np.array_equal(leaf(raw), leaf(tracked))
    template = tuple(jax.tree.map(jnp.zeros_like, main.params) for _ in range(2))
    g = [E.sigma_rel_to_gamma(s) for s in (0.05, 0.1)]
    x = np.asarray(report["weights"]["0.07"])
    np.testing.assert_allclose(
        x, E.solve_posthoc_weights(np.repeat([2.0, 4, 6, 8], 2), np.tile(g, 4), 8.0, E.sigma_rel_to_gamma(0.07))[:, 0]
    )
    expected = sum(
        x[2 * i + k] * leaf(S.read_snapshot(workdir, s, template)[0][k])
        for i, s in enumerate((2, 4, 6, 8))
        for k in (0, 1)
    )
    np.testing.assert_allclose(leaf(rebuilt), expected, rtol=1e-5, atol=1e-6)
    # The tracked 0.1 profile at step 8 is the last snapshot's.
    np.testing.assert_array_equal(leaf(tracked), leaf(S.read_snapshot(workdir, 8, template)[0][1]))

    argv = ["sample", f"--workdir={workdir}", "--num_samples=4", "--config.sampling.ema=sigma_rel:0.07"]
    assert cli_in_process(*argv) == 0
    assert (workdir / "samples" / "samples_00000008_heun_sigma_rel_0p07.npz").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["posthoc_ema", "--sigma_rel=0.5"], "out of range"),
        (["posthoc_ema", "--sigma_rel=0"], "out of range"),
        (["posthoc_ema", "--sigma_rel=abc"], "expected numbers"),
        (["posthoc_ema"], "--sigma_rel"),
        (["sample", "--config.sampling.ema=sigma_rel:0.15"], "posthoc_ema --workdir"),
        (["sample", "--config.sampling.ema=rate:0.7"], "tracks the rates"),
        (["sample", "--config.sampling.ema=average"], "sampling.ema"),
    ],
)
def test_bad_inputs_exit_2_with_one_message(workdir, capsys, argv, message):
    assert cli_in_process(argv[0], f"--workdir={workdir}", *argv[1:]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 3


def test_posthoc_without_snapshots_exits_2(workdir, tmp_path, capsys):
    copy = tmp_path / "no_snapshots"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("ema_snapshots", "posthoc_ema"))
    assert cli_in_process("posthoc_ema", f"--workdir={copy}", "--sigma_rel=0.07") == 2
    err = capsys.readouterr().err
    assert "no EMA snapshots" in err and "Traceback" not in err
