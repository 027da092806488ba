"""Measurement operators: forward against their dense matrices, the transpose is the adjoint, the
SVD reproduces the operator, the pseudo-inverse inverts it; the closed-form Gaussian-mixture
posterior matches importance sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import conditioning as C
from diffusion_jax.analytic import GaussianMixture

EVENT = (4, 6, 3)


def _operators():
    return {
        "box": C.inpainting(C.box_mask(EVENT, (1, 2), (2, 3))),
        "random": C.inpainting(C.random_mask(0, EVENT, 0.5)),
        "border": C.inpainting(C.border_mask(EVENT, 1)),
        "color": C.colorization(3),
        "color_weights": C.colorization(3, weights=(0.299, 0.587, 0.114)),
        "sr": C.super_resolution(EVENT, 2),
        "gauss_blur": C.gaussian_blur(EVENT, 0.8),
        "uniform_blur": C.uniform_blur(EVENT, 3),
        "denoise": C.denoising(sigma_y=0.1),
    }


OPS = _operators()


@pytest.mark.parametrize("name", list(OPS))
def test_operator_algebra(name):
    op = OPS[name]
    x = jax.random.normal(jax.random.PRNGKey(0), (3,) + EVENT)
    y = op.forward(x)
    a = C.dense_matrix(op, EVENT)
    # Forward is the dense matrix on flattened data.
    np.testing.assert_allclose(np.asarray(y).reshape(3, -1), np.asarray(x).reshape(3, -1) @ a.T, atol=1e-5)
    # Transpose is the adjoint: <A x, w> = <x, A^T w>.
    w = jax.random.normal(jax.random.PRNGKey(1), y.shape)
    lhs = jnp.sum(y * w)
    rhs = jnp.sum(x * op.transpose(w))
    np.testing.assert_allclose(float(lhs), float(rhs), rtol=1e-4)
    # The SVD reproduces A (SVDOperator's generic forward from U S V^T), V is orthogonal.
    np.testing.assert_allclose(C.SVDOperator.forward(op, x), y, atol=1e-5)
    np.testing.assert_allclose(op.v(op.vt(x)), x, atol=1e-5)
    # A A^+ y = y for measurements in the range of A.
    np.testing.assert_allclose(op.forward(op.pinv(y, x)), y, atol=1e-4)
    # Number of non-zero singular values = rank of the matrix.
    s = np.broadcast_to(np.asarray(op.singular_values(x)), x.shape)[0]
    assert int((s > 1e-6).sum()) == np.linalg.matrix_rank(a)


def test_shapes_and_masks():
    x = jnp.ones((2,) + EVENT)
    assert OPS["sr"].forward(x).shape == (2, 2, 3, 3)
    assert OPS["color"].forward(x).shape == (2, 4, 6, 1)
    assert OPS["box"].forward(x).shape == x.shape
    m = C.border_mask((5, 5, 1), 1)
    assert m.sum() == 9 and m[0].sum() == 0
    assert C.random_mask(0, (8, 8, 3), 0.5).shape == (8, 8, 1)
    with pytest.raises(ValueError, match="not divisible"):
        C.super_resolution((5, 5, 3), 2)
    with pytest.raises(ValueError, match="odd"):
        C.uniform_blur(EVENT, 4)


def test_measure_adds_noise_only_where_observed():
    op = C.inpainting(C.box_mask((8,), (2,), (4,)), sigma_y=0.5)
    x = jnp.zeros((4000, 8))
    y = op.measure(jax.random.PRNGKey(0), x)
    assert np.all(np.asarray(y)[:, 2:6] == 0)
    np.testing.assert_allclose(np.asarray(y)[:, :2].std(), 0.5, rtol=0.05)


def test_svd_methods_refuse_a_nonlinear_operator():
    op = C.FunctionOperator(fn=lambda x: jnp.tanh(x), sigma_y=0.1)
    y = jnp.zeros((2, 2))
    for name in ("ddrm", "pigdm", "diffpir", "replacement", "pc_projection"):
        with pytest.raises(TypeError, match="SVD"):
            C.get_method(name, op, y)
    with pytest.raises(ValueError, match="valid names"):
        C.get_method("nope", op, y)
    with pytest.raises(ValueError, match="valid"):
        C.get_method("ddrm", C.denoising(sigma_y=0.1), y, bogus=1)
    for name in ("tds", "daps"):  # both weight by p(y | x), which is singular without noise
        with pytest.raises(ValueError, match=f"{name.upper()} .*sigma_y > 0"):
            C.get_method(name, C.denoising(sigma_y=0.0), y)


def test_mixture_posterior_matches_importance_sampling():
    """The closed form against self-normalised importance sampling with the prior as proposal:
    component weights, mean and covariance within Monte-Carlo error (2e5 draws)."""
    prior = GaussianMixture(
        weights=np.array([0.3, 0.4, 0.3]),
        means=np.array([[-1.5, 0.5, 0.0], [1.0, 1.0, 0.5], [0.5, -1.5, -1.0]]),
        stds=np.array([[0.3, 0.5, 0.4], [0.5, 0.4, 0.6], [0.4, 0.4, 0.3]]),
    )
    op = C.Separable.create({1: np.array([[1.0, 0.5, 0.0], [0.0, 1.0, -1.0]])}, sigma_y=0.3)
    y = jnp.array([0.7, 0.4])
    post = C.mixture_posterior(prior, op, y)
    n = 200_000
    key_c, key_n = jax.random.split(jax.random.PRNGKey(0))
    comp = np.asarray(jax.random.choice(key_c, 3, (n,), p=jnp.asarray(prior.weights)))
    x = np.asarray(prior.means)[comp] + np.asarray(prior.stds)[comp] * np.asarray(jax.random.normal(key_n, (n, 3)))
    a = C.dense_matrix(op, (3,))
    logw = -0.5 * np.sum((np.asarray(y) - x @ a.T) ** 2, axis=1) / 0.3**2
    w = np.exp(logw - logw.max())
    w /= w.sum()
    ess = 1.0 / np.sum(w**2)
    assert ess > 1e4
    comp_w = np.array([w[comp == k].sum() for k in range(3)])
    np.testing.assert_allclose(comp_w, post.weights, atol=5 / np.sqrt(ess))
    mean_is = w @ x
    cov_is = (x - mean_is).T @ ((x - mean_is) * w[:, None])
    exact = np.asarray(post.sample(jax.random.PRNGKey(1), 400_000), np.float64)
    np.testing.assert_allclose(mean_is, exact.mean(0), atol=0.03)
    np.testing.assert_allclose(cov_is, np.cov(exact.T), atol=0.04)
    # And the formula's mixture mean against the draws.
    np.testing.assert_allclose(post.mean(), exact.mean(0), atol=0.01)
