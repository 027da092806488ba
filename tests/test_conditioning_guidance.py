"""Classifier and classifier-free guidance on a Gaussian mixture whose classes are its components.

* With the exact noise-conditional classifier and scale 1, classifier guidance *is* the
  class-conditional score (Bayes' rule), for every SDE of the family; sampling with it
  reproduces the component (sliced Wasserstein distance within the Monte-Carlo floor).
* Classifier-free guidance at w = 1 (our convention: w weights the conditional score) equals the
  conditional model, w = 0 the reference; outside its interval it is the conditional model.
* A negative label moves mass away from its class.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _sampler_problems import MIXTURE, sliced_wasserstein

import diffusion_jax
from diffusion_jax import conditioning as C
from diffusion_jax.sde import EDMSDE, VESDE, VPSDE, CosineVPSDE, RectifiedFlow, SubVPSDE

SDES = [VESDE(), VPSDE(), SubVPSDE(), EDMSDE(), CosineVPSDE(), RectifiedFlow()]
K = 3  # components; the null label is K


def _points(sde, n=64, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    t = jax.random.uniform(k1, (n,), minval=sde.t_min, maxval=sde.T)
    x = 2.0 * jax.random.normal(k2, (n, 2))
    return x, t


@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
def test_guidance_identities(sde):
    """Classifier guidance at scale 1 with the exact classifier is the class-conditional score
    (scale 0: the unconditional one); classifier-free guidance at w = 1 is the conditional
    score, w = 0 the null one, w = 3 is 3 s_c - 2 s_null, and outside its interval the
    conditional score."""
    x, t = _points(sde)
    labels = jnp.arange(x.shape[0]) % K
    null = jnp.full_like(labels, K)
    cond = C.mixture_conditional_score(MIXTURE, sde)
    classifier = C.mixture_classifier(MIXTURE, sde)
    mid = float(np.median(np.asarray(t)))

    @jax.jit
    def run(x, t):
        def cg(scale):
            return C.classifier_guidance(MIXTURE.score_fn(sde), classifier, labels, sde, scale=scale)(x, t)

        def cfg(w, **kw):
            return C.classifier_free_guidance(cond, labels, sde, guidance=w, null_label=K, **kw)(x, t)

        return dict(
            cg1=cg(1.0),
            cg0=cg(0.0),
            plain=MIXTURE.score(x, t, sde),
            s_c=cond(x, t, labels),
            s_null=cond(x, t, null),
            w1=cfg(1.0),
            w0=cfg(0.0),
            w3=cfg(3.0),
            w3_interval=cfg(3.0, interval=(sde.t_min, mid)),
        )

    r = {k: np.asarray(v) for k, v in run(x, t).items()}
    np.testing.assert_allclose(r["cg1"], r["s_c"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(r["cg0"], r["plain"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r["w1"], r["s_c"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r["w0"], r["s_null"], rtol=1e-5, atol=1e-5)
    # The library's Experiment convention (1 + w') s_c - w' s_null is w = 1 + w'.
    guided = 3.0 * r["s_c"] - 2.0 * r["s_null"]
    np.testing.assert_allclose(r["w3"], guided, rtol=1e-4, atol=1e-4)
    inside = np.asarray(t) <= mid
    np.testing.assert_allclose(r["w3_interval"][~inside], r["s_c"][~inside], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r["w3_interval"][inside], guided[inside], rtol=1e-4, atol=1e-4)
    # The unconditional mixture is the null label's score.
    np.testing.assert_allclose(r["s_null"], r["plain"], rtol=1e-4, atol=1e-4)


N = 4000


def _floor(reference_sampler):
    return [sliced_wasserstein(reference_sampler(2 * i), reference_sampler(2 * i + 1)) for i in range(4)]


def test_classifier_guided_sampling_reproduces_the_component():
    sde = EDMSDE()
    labels = jnp.full((N,), 2)
    guided = C.classifier_guidance(MIXTURE.score_fn(sde), C.mixture_classifier(MIXTURE, sde), labels, sde)
    x, info = diffusion_jax.sample(jax.random.PRNGKey(0), guided, sde, (N, 2), "heun", num_steps=32)
    comp = C.component(MIXTURE, 2)
    floor = _floor(lambda s: comp.sample(jax.random.PRNGKey(100 + s), N))
    swd = sliced_wasserstein(x, comp.sample(jax.random.PRNGKey(7), N))
    assert swd < np.mean(floor) + 3 * np.std(floor), (swd, floor)
    assert int(info.nfe) == 64


def test_negative_label_moves_mass_away():
    """With c = null, u = class 1 and w = 3 (density ~ p^3 / p_1^2 along the path) the fraction of
    samples in class 1 falls well below its prior weight 0.4, and guidance in a small interval
    near t = 0 (where the classes no longer overlap) has a smaller effect."""
    sde = VPSDE()
    cond = C.mixture_conditional_score(MIXTURE, sde)
    null = jnp.full((N,), K)
    neg = jnp.full((N,), 1)

    def frac(**kw):
        fn = C.classifier_free_guidance(cond, null, sde, null_label=K, negative_labels=neg, **kw)
        x, _ = diffusion_jax.sample(jax.random.PRNGKey(1), fn, sde, (N, 2), "dpmpp_2m", num_steps=30)
        return C.mixture_class_counts(MIXTURE, np.asarray(x))

    base = frac(guidance=1.0)  # = the unconditional model
    assert abs(base[1] - 0.4) < 0.04, base
    away = frac(guidance=3.0)
    assert away[1] < 0.15, away
    late = frac(guidance=3.0, interval=(0.0, 0.05))
    assert away[1] < late[1], (away, late)
