"""Posterior samplers against the exact posterior of a Gaussian mixture.

Prior: the 2-d three-component mixture of ``_sampler_problems`` and a 24-d four-component
mixture on ``(2, 4, 3)`` "images", with exact noised scores; measurement ``y = A x + 0.1 n`` of
one prior draw. The exact posterior is the Gaussian mixture of ``conditioning.mixture_posterior``
(checked against importance sampling in ``test_conditioning_operators.py``). Distances are
sliced 2-Wasserstein distances (256 projections) between N = 1000 samples and N exact draws; the
Monte-Carlo floor is measured as the distance between independent exact samples of size N (mean
and standard deviation over 4 pairs).

* TDS, asymptotically exact in the particles, must reach the floor: below mean + 3 std of the
  floor (the criterion of ``test_samplers_distribution.py``; a sampler with no bias is above it
  with probability about 0.1 %), on inpainting, super-resolution and colorization in 24-d and on
  2-d inpainting; with one particle (no reweighting) it must not.
* The approximate methods run one each on a different SDE (so that every SDE of the family and
  every method is exercised) on 2-d inpainting with ``x_1 = -1.2`` observed (posterior: the
  first component, 0.9996). Each must use the measurement (distance below half the prior's) and
  stay within its bound, the measured value (the runs are deterministic) plus 30 %. TDS's
  2-d inpainting measurement falls between two components (posterior weights 0.40 / 0.60), the
  hard case for the methods that approximate ``p(y | x_t)``; the benchmark
  (scripts/benchmark_posterior.py, docs/conditioning.md) measures all of them there.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _sampler_problems import MIXTURE, sliced_wasserstein

import diffusion_jax
from diffusion_jax import conditioning as C
from diffusion_jax.analytic import GaussianMixture
from diffusion_jax.sde import EDMSDE, VESDE, VPSDE, CosineVPSDE, RectifiedFlow, SubVPSDE

N = 1000
SIGMA_Y = 0.1
EVENT_HD = (2, 4, 3)


def _mixture_hd():
    rng = np.random.default_rng(0)
    k = 4
    return GaussianMixture(
        weights=np.full(k, 1.0 / k),
        means=rng.normal(size=(k,) + EVENT_HD),
        stds=rng.uniform(0.3, 0.6, size=(k,) + EVENT_HD),
    )


MIXTURE_HD = _mixture_hd()


class Problem:
    def __init__(self, prior, op, y1=None):
        k1, k2 = jax.random.split(jax.random.PRNGKey(11))
        self.prior, self.op = prior, op
        y1 = op.measure(k2, prior.sample(k1, 1))[0] if y1 is None else jnp.asarray(y1)
        self.post = C.mixture_posterior(prior, op, y1)
        self.y = jnp.broadcast_to(y1, (N,) + y1.shape)
        self.shape = (N,) + tuple(prior.event_shape)
        self.exact = np.asarray(self.post.sample(jax.random.PRNGKey(1), N))
        floors = [
            sliced_wasserstein(
                self._flat(self.post.sample(jax.random.PRNGKey(20 + 2 * i), N)),
                self._flat(self.post.sample(jax.random.PRNGKey(21 + 2 * i), N)),
            )
            for i in range(4)
        ]
        self.floor_mean, self.floor_std = float(np.mean(floors)), float(np.std(floors))
        self.prior_swd = self.swd(prior.sample(jax.random.PRNGKey(3), N))

    @staticmethod
    def _flat(x):
        x = np.asarray(x)
        return x.reshape(x.shape[0], -1)

    def swd(self, x):
        x = np.asarray(x)
        assert np.all(np.isfinite(x))
        return sliced_wasserstein(self._flat(x), self._flat(self.exact))

    def floor_bound(self):
        return self.floor_mean + 3 * self.floor_std


@functools.cache
def problem(name):
    return {
        "inpaint2": lambda: Problem(MIXTURE, C.inpainting(np.array([1.0, 0.0]), sigma_y=SIGMA_Y)),
        # x_1 = -1.2 observed: mostly the first component, its x_2 unknown.
        "easy2": lambda: Problem(MIXTURE, C.inpainting(np.array([1.0, 0.0]), sigma_y=SIGMA_Y), y1=[-1.2, 0.0]),
        "inpaint24": lambda: Problem(MIXTURE_HD, C.inpainting(C.box_mask(EVENT_HD, (0, 2), (2, 2)), sigma_y=SIGMA_Y)),
        "sr24": lambda: Problem(MIXTURE_HD, C.super_resolution(EVENT_HD, 2, sigma_y=SIGMA_Y)),
        "color24": lambda: Problem(MIXTURE_HD, C.colorization(3, sigma_y=SIGMA_Y)),
    }[name]()


@functools.cache
def _score_fn(prior_name, sde):
    return {"2": MIXTURE, "24": MIXTURE_HD}[prior_name].score_fn(sde)


def _solve(name, sde, method, seed=4, **options):
    p = problem(name)
    score_fn = _score_fn("2" if name.endswith("2") else "24", sde)
    return C.solve(jax.random.PRNGKey(seed), score_fn, sde, p.shape, p.op, p.y, method=method, **options)


TDS = dict(num_particles=16, num_steps=100)


@pytest.mark.parametrize("name", ["inpaint2", "inpaint24", "sr24", "color24"])
def test_tds_reaches_the_monte_carlo_floor(name):
    p = problem(name)
    x, info = _solve(name, VPSDE(), "tds", **TDS)
    assert int(info.nfe) == 100
    swd = p.swd(x)
    assert swd < p.floor_bound(), (swd, p.floor_mean, p.floor_std)


def test_tds_without_particles_is_biased():
    p = problem("inpaint2")
    x, _ = _solve("inpaint2", VPSDE(), "tds", num_particles=1, num_steps=100)
    swd = p.swd(x)
    assert swd > 2 * p.floor_bound(), (swd, p.floor_bound())


# method, SDE, options, bound on the distance: the measured value + 30 % (floor 0.031, prior 1.39)
APPROXIMATE = [
    ("pc_projection", VESDE(), dict(num_steps=200, predictor="euler_maruyama"), 0.50),
    ("replacement", RectifiedFlow(), dict(num_steps=50), 0.39),
    ("dps", VPSDE(), dict(num_steps=100, scale=3.0), 0.11),
    ("pigdm", CosineVPSDE(), dict(num_steps=50), 0.41),
    ("ddrm", SubVPSDE(), dict(num_steps=20), 0.41),
    ("diffpir", EDMSDE(), dict(num_steps=50), 0.64),
    ("daps", EDMSDE(), dict(num_steps=20), 0.48),
]


@pytest.mark.parametrize(
    "method,sde,options,bound", APPROXIMATE, ids=[f"{c[0]}-{type(c[1]).__name__}" for c in APPROXIMATE]
)
def test_approximate_methods_stay_within_their_bound(method, sde, options, bound):
    p = problem("easy2")
    x, info = _solve("easy2", sde, method, **options)
    swd = p.swd(x)
    print(f"{method}: swd {swd:.4f} floor {p.floor_mean:.4f} prior {p.prior_swd:.4f} nfe {int(info.nfe)}")
    assert swd < 0.5 * p.prior_swd, (swd, p.prior_swd)
    assert swd < bound, (swd, bound)


def test_nfe_counts_and_per_sample_keys():
    """DDRM's info.nfe is num_steps + 1; with per-sample keys a sample does not depend on the
    batch it is drawn in."""
    sde = VPSDE()
    op = C.inpainting(np.array([1.0, 0.0]), sigma_y=SIGMA_Y)
    y = jnp.tile(jnp.array([[0.5, 0.0]]), (5, 1))
    x5, info = C.solve(
        jax.random.PRNGKey(0), _score_fn("2", sde), sde, (5, 2), op, y, "ddrm", num_steps=8, per_sample_keys=True
    )
    x3, _ = C.solve(
        jax.random.PRNGKey(0), _score_fn("2", sde), sde, (3, 2), op, y[:3], "ddrm", num_steps=8, per_sample_keys=True
    )
    assert int(info.nfe) == 9
    np.testing.assert_allclose(x5[:3], x3, rtol=1e-5, atol=1e-6)


def test_sdedit_strength():
    """Strength near 0 returns the reference; strength 1 forgets it (the unconditional mixture)."""
    sde = EDMSDE()
    ref = jnp.tile(jnp.array([[2.0, -2.0]]), (N, 1))
    score_fn = _score_fn("2", sde)
    near, _ = C.sdedit(jax.random.PRNGKey(0), score_fn, sde, ref, "heun", strength=1e-4, num_steps=32)
    np.testing.assert_allclose(np.asarray(near), np.asarray(ref), atol=0.05)
    far, info = C.sdedit(jax.random.PRNGKey(0), score_fn, sde, ref, "heun", strength=1.0, num_steps=32)
    assert int(info.nfe) == 64
    floors = [
        sliced_wasserstein(
            MIXTURE.sample(jax.random.PRNGKey(30 + 2 * i), N), MIXTURE.sample(jax.random.PRNGKey(31 + 2 * i), N)
        )
        for i in range(4)
    ]
    swd = sliced_wasserstein(np.asarray(far), np.asarray(MIXTURE.sample(jax.random.PRNGKey(5), N)))
    assert swd < np.mean(floors) + 3 * np.std(floors), (swd, floors)
    assert diffusion_jax  # the entry point the wrappers use


def test_gradient_methods_accept_a_nonlinear_operator():
    """DPS needs only A and its gradients (TDS too: it never asks for an SVD): with
    y = x_1 + x_1^3 / 5 + 0.1 n observed at x_1 = -1.2, the samples' x_1 concentrates near -1.2
    (the prior's x_1 has mean 0.1, std 1.15)."""
    sde = VPSDE()
    op = C.FunctionOperator(fn=lambda x: x[:, :1] + 0.2 * x[:, :1] ** 3, sigma_y=SIGMA_Y)
    n = 200
    y = jnp.full((n, 1), -1.2 + 0.2 * (-1.2) ** 3)
    x, _ = C.solve(jax.random.PRNGKey(0), _score_fn("2", sde), sde, (n, 2), op, y, "dps", num_steps=50, scale=3.0)
    x1 = np.asarray(x)[:, 0]
    assert abs(np.median(x1) + 1.2) < 0.1, np.median(x1)
