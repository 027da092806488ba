"""FIR resampling against direct numpy implementations of StyleGAN2's definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import resampling
from diffusion_jax.models.layers import Conv2d, Downsample, Upsample


def upfirdn2d_reference(x, k, up, down, pad):
    """Literal upfirdn2d on NHWC: zero-stuff, pad/crop, full 2-D convolution, keep every down-th."""
    k = np.outer(k, k).astype(np.float64)
    B, H, W, C = x.shape
    z = np.zeros((B, H * up, W * up, C))
    z[:, ::up, ::up] = x
    p0, p1 = pad
    z = np.pad(z, ((0, 0), (max(p0, 0), max(p1, 0)), (max(p0, 0), max(p1, 0)), (0, 0)))
    z = z[:, max(-p0, 0) : z.shape[1] - max(-p1, 0), max(-p0, 0) : z.shape[2] - max(-p1, 0)]
    K = k.shape[0]
    n = z.shape[1] - K + 1
    out = np.zeros((B, n, n, C))
    for i in range(n):
        for j in range(n):
            window = z[:, i : i + K, j : j + K]
            out[:, i, j] = np.einsum("bhwc,hw->bc", window, k[::-1, ::-1])  # true convolution
    return out[:, ::down, ::down]


@pytest.mark.parametrize(
    "k, up, down, pad",
    [
        ((1, 3, 3, 1), 1, 1, (2, 1)),
        ((1, 3, 3, 1), 2, 1, (2, 1)),
        ((1, 3, 3, 1), 1, 2, (1, 1)),
        ((1, 2, 3), 2, 1, (1, -1)),
        ((1, 4, 2), 1, 2, (0, 2)),
    ],
)
def test_upfirdn2d_matches_definition(k, up, down, pad):
    x = np.random.default_rng(0).standard_normal((2, 6, 6, 3))
    taps = np.asarray(k, np.float64) / np.sum(k)
    ref = upfirdn2d_reference(x, taps, up, down, pad)
    out = resampling.upfirdn2d(jnp.asarray(x, jnp.float32), k, up=up, down=down, pad=pad)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_fir_resampling_shapes_and_constant_images():
    x = jnp.ones((1, 8, 8, 2))
    up = resampling.upsample_2d(x)
    down = resampling.downsample_2d(x)
    assert up.shape == (1, 16, 16, 2) and down.shape == (1, 4, 4, 2)
    # Unit DC gain away from the zero-padded border.
    np.testing.assert_allclose(up[:, 2:-2, 2:-2], 1.0, rtol=1e-6)
    np.testing.assert_allclose(down[:, 1:-1, 1:-1], 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        resampling.naive_upsample_2d(jnp.arange(4.0).reshape(1, 2, 2, 1))[0, :, :, 0],
        [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]],
    )
    np.testing.assert_allclose(
        resampling.naive_downsample_2d(jnp.arange(16.0).reshape(1, 4, 4, 1))[0, :, :, 0], [[2.5, 4.5], [10.5, 12.5]]
    )


def test_fused_upsample_conv_matches_transposed_conv_then_fir():
    """StyleGAN2's upsample_conv_2d: stride-2 transposed convolution, then FIR with gain 4."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 5, 5, 2))
    w = rng.standard_normal((3, 3, 2, 4))
    # Transposed convolution by scattering every input pixel's contribution (true convolution
    # of the zero-stuffed input with w).
    y = np.zeros((1, 2 * 4 + 3, 2 * 4 + 3, 4))
    for i in range(5):
        for j in range(5):
            y[0, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3] += np.einsum("c,hwco->hwo", x[0, i, j], w[::-1, ::-1])
    taps = np.array([1, 3, 3, 1]) / 8.0
    ref = upfirdn2d_reference(y, taps * 2.0, 1, 1, (1, 1))
    out = resampling.upsample_conv_2d(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    assert out.shape == (1, 10, 10, 4)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_fused_conv_downsample_matches_fir_then_strided_conv():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 8, 8, 2))
    w = rng.standard_normal((3, 3, 2, 3))
    taps = np.array([1, 3, 3, 1]) / 8.0
    f = upfirdn2d_reference(x, taps, 1, 1, (2, 2))  # (1, 9, 9, 2)
    ref = np.zeros((1, 4, 4, 3))
    for i in range(4):
        for j in range(4):
            ref[0, i, j] = np.einsum("hwc,hwco->o", f[0, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3], w)
    out = resampling.conv_downsample_2d(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_resampling_layers_shapes_and_parameters():
    x = jnp.ones((2, 8, 8, 4))
    cases = [
        (Upsample(out_ch=6, with_conv=True, fir=True), (2, 16, 16, 6), {"Conv2d_0"}),
        (Upsample(with_conv=True, fir=False), (2, 16, 16, 4), {"Conv_0"}),
        (Upsample(fir=True), (2, 16, 16, 4), set()),
        (Downsample(out_ch=6, with_conv=True, fir=True), (2, 4, 4, 6), {"Conv2d_0"}),
        (Downsample(with_conv=True, fir=False), (2, 4, 4, 4), {"Conv_0"}),
        (Downsample(fir=True), (2, 4, 4, 4), set()),
    ]
    for layer, shape, params in cases:
        variables = jax.eval_shape(lambda layer=layer: layer.init(jax.random.key(0), x))
        assert set(variables.get("params", {})) == params
        assert jax.eval_shape(lambda v, layer=layer: layer.apply(v, x), variables).shape == shape
    v = jax.eval_shape(lambda: Conv2d(features=5, up=True).init(jax.random.key(0), x))
    assert v["params"]["kernel"].shape == (3, 3, 4, 5) and v["params"]["bias"].shape == (5,)
