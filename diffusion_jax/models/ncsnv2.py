"""NCSNv2 (Song & Ermon 2020, "Improved Techniques for Training Score-Based Generative Models"):
a RefineNet (Lin et al. 2017) on a ResNet backbone with dilated convolutions and InstanceNorm++,
not conditioned on the noise level except through the output scaling ``s(x) / sigma``
("Technique 3").

Three layouts as in score_sde: ``ncsnv2_64`` (images up to 64 px), ``ncsnv2_128`` and
``ncsnv2_256``. Layers follow the NCSNv2 paper and score_sde's PyTorch port (the parity fixture):

* MSF blocks upsample with bilinear interpolation on aligned corners (``interpolation='bilinear'``,
  as PyTorch's ``align_corners=True``); score_sde's JAX code used half-pixel bilinear resizing,
  available as ``'bilinear_half_pixel'``, and ``'nearest_neighbor'``.
* InstanceNorm++ standardises the per-channel means with their unbiased variance across channels
  (``norm_ddof=1``, PyTorch ``torch.var``); score_sde's JAX code used the biased one (``norm_ddof=0``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import conditioning
from diffusion_jax.models.layers import NameCounter, geometric_sigmas, get_activation, ncsn_conv

Array = jax.Array
Dtype = Any

__all__ = ["InstanceNorm2dPlus", "ResidualBlock", "RefineBlock", "NCSNv2", "NCSNv2_128", "NCSNv2_256"]

_INTERPOLATIONS = ("bilinear", "bilinear_half_pixel", "nearest_neighbor")


class InstanceNorm2dPlus(nn.Module, kw_only=True):
    """InstanceNorm++ (Song & Ermon 2019, "Generative Modeling by Estimating Gradients of the Data
    Distribution", App. A): instance normalisation that keeps the
    information in the per-channel means ``mu_k``:

        out = gamma_k * ((x_k - mu_k) / s_k + alpha_k * (mu_k - m) / v) + beta_k

    with ``s_k`` the per-channel spatial std (eps 1e-5), and ``m, v`` the mean and std of the
    ``mu_k`` across channels (variance with ``ddof``, eps 1e-5). ``alpha, gamma ~ N(1, 0.02^2)``,
    ``beta = 0``, each of shape ``(C,)``. ``(B, H, W, C) -> (B, H, W, C)``.
    """

    use_bias: bool = True
    ddof: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        C = x.shape[-1]
        near_one = lambda key, shape, dtype=jnp.float32: 1.0 + 0.02 * jax.random.normal(key, shape, dtype)  # noqa: E731
        alpha = self.param("alpha", near_one, (C,), self.param_dtype)
        gamma = self.param("gamma", near_one, (C,), self.param_dtype)
        xf = x.astype(jnp.float32)
        means = jnp.mean(xf, axis=(1, 2))  # (B, C)
        m = jnp.mean(means, axis=-1, keepdims=True)
        v = jnp.var(means, axis=-1, keepdims=True, ddof=self.ddof)
        means_plus = (means - m) / jnp.sqrt(v + 1e-5)
        var = jnp.var(xf, axis=(1, 2), keepdims=True)
        h = (xf - means[:, None, None, :]) / jnp.sqrt(var + 1e-5)
        h = h + means_plus[:, None, None, :] * alpha
        h = h * gamma
        if self.use_bias:
            h = h + self.param("beta", nn.initializers.zeros, (C,), self.param_dtype)
        return h.astype(self.dtype)


def _conv(features, in_features, dtype, param_dtype, **kw):
    return ncsn_conv(features, in_features, dtype=dtype, param_dtype=param_dtype, **kw)


class ConvMeanPool(nn.Module, kw_only=True):
    """Convolution ('SAME', NCSN init) followed by 2x2 average pooling. ``(B, H, W, C) -> (B, H/2, W/2, F)``."""

    features: int
    kernel: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = _conv(self.features, x.shape[-1], self.dtype, self.param_dtype, kernel=self.kernel)(x)
        B, H, W, C = h.shape
        return jnp.mean(h.reshape(B, H // 2, 2, W // 2, 2, C), axis=(2, 4))


class ResidualBlock(nn.Module, kw_only=True):
    """NCSNv2's pre-activation residual block (ELU, InstanceNorm++):

        out = shortcut(x) + conv2(act(norm2(conv1(act(norm1(x))))))

    ``resample='down'`` halves the resolution with ConvMeanPool layers, except with
    ``dilation > 1`` where the block keeps the resolution and uses dilated 3x3 convolutions
    instead (as in NCSNv2). Submodules are named in score_sde's creation order.
    ``(B, H, W, C) -> (B, H', W', output_dim)``.
    """

    output_dim: int
    resample: str | None = None
    dilation: int = 1
    nonlinearity: str = "elu"
    norm_ddof: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        act = get_activation(self.nonlinearity)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: InstanceNorm2dPlus(ddof=self.norm_ddof, name=name, **kw)  # noqa: E731
        C = x.shape[-1]
        d = self.dilation
        h = act(norm("InstanceNorm2dPlus_0")(x))
        if self.resample == "down":
            h = _conv(C, C, dilation=d, name="Conv_0", **kw)(h)
            h = act(norm("InstanceNorm2dPlus_1")(h))
            if d > 1:
                h = _conv(self.output_dim, C, dilation=d, name="Conv_1", **kw)(h)
                shortcut = _conv(self.output_dim, C, dilation=d, name="Conv_2", **kw)(x)
            else:
                h = ConvMeanPool(features=self.output_dim, name="ConvMeanPool_0", **kw)(h)
                shortcut = ConvMeanPool(features=self.output_dim, kernel=1, name="ConvMeanPool_1", **kw)(x)
        elif self.resample is None:
            names = iter(["Conv_0", "Conv_1", "Conv_2"])
            if self.output_dim == C:
                shortcut = x
            else:
                # score_sde creates the shortcut first: 3x3 dilated, or 1x1 without dilation.
                shortcut = _conv(self.output_dim, C, kernel=3 if d > 1 else 1, dilation=d, name=next(names), **kw)(x)
            h = _conv(self.output_dim, C, dilation=d, name=next(names), **kw)(h)
            h = act(norm("InstanceNorm2dPlus_1")(h))
            h = _conv(self.output_dim, self.output_dim, dilation=d, name=next(names), **kw)(h)
        else:
            raise ValueError(f"ResidualBlock: resample must be None or 'down', got {self.resample!r}")
        return h + shortcut


def _align_corners_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear interpolation weights ``(n_out, n_in)`` with aligned corners (output sample i sits at
    input coordinate ``i (n_in - 1) / (n_out - 1)``), as PyTorch's ``align_corners=True``."""
    A = np.zeros((n_out, n_in), np.float64)
    if n_out == 1 or n_in == 1:
        A[:, 0] = 1.0
        return A
    coords = np.arange(n_out) * (n_in - 1) / (n_out - 1)
    lo = np.clip(np.floor(coords).astype(int), 0, n_in - 2)
    frac = coords - lo
    A[np.arange(n_out), lo] = 1.0 - frac
    A[np.arange(n_out), lo + 1] += frac
    return A


def resize(x: Array, shape: Sequence[int], method: str) -> Array:
    """Resizes ``(B, H, W, C)`` to ``(B, *shape, C)`` for the MSF block."""
    B, H, W, C = x.shape
    if (H, W) == tuple(shape):
        return x
    if method == "bilinear":
        Ah = jnp.asarray(_align_corners_matrix(shape[0], H), x.dtype)
        Aw = jnp.asarray(_align_corners_matrix(shape[1], W), x.dtype)
        return jnp.einsum("ph,bhwc,qw->bpqc", Ah, x, Aw)
    if method == "bilinear_half_pixel":
        return jax.image.resize(x, (B, *shape, C), "bilinear")
    if method == "nearest_neighbor":
        return jax.image.resize(x, (B, *shape, C), "nearest")
    raise ValueError(f"unknown interpolation {method!r}; valid: {', '.join(_INTERPOLATIONS)}")


class RCUBlock(nn.Module, kw_only=True):
    """Residual conv unit: ``n_blocks`` times ``x + (act -> conv3x3) x n_stages`` (no biases)."""

    features: int
    n_blocks: int
    n_stages: int
    nonlinearity: str = "elu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        act = get_activation(self.nonlinearity)
        for _ in range(self.n_blocks):
            residual = x
            for _ in range(self.n_stages):
                x = _conv(self.features, x.shape[-1], self.dtype, self.param_dtype, use_bias=False)(act(x))
            x = x + residual
        return x


class CRPBlock(nn.Module, kw_only=True):
    """Chained residual pooling: ``x = act(x)``; ``path = conv(maxpool5x5(path))``; ``x += path``,
    ``n_stages`` times (no conv biases)."""

    features: int
    n_stages: int = 2
    nonlinearity: str = "elu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = get_activation(self.nonlinearity)(x)
        path = x
        for _ in range(self.n_stages):
            path = nn.max_pool(path, (5, 5), strides=(1, 1), padding="SAME")
            path = _conv(self.features, path.shape[-1], self.dtype, self.param_dtype, use_bias=False)(path)
            x = path + x
        return x


class MSFBlock(nn.Module, kw_only=True):
    """Multi-resolution fusion: conv3x3 (with bias) of each input, resized to ``shape``, summed."""

    features: int
    shape: tuple[int, int]
    interpolation: str = "bilinear"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, xs: Sequence[Array]) -> Array:
        total: Array | None = None
        for x in xs:
            h = _conv(self.features, x.shape[-1], self.dtype, self.param_dtype)(x)
            h = resize(h, self.shape, self.interpolation)
            total = h if total is None else total + h
        assert total is not None  # RefineBlock passes one input or more
        return total


class RefineBlock(nn.Module, kw_only=True):
    """RefineNet block (Lin et al. 2017): RCU adaptation of each input, multi-resolution fusion to
    ``output_shape`` (skipped for the first block, ``start``), chained residual pooling, and an
    output RCU (3 units for the last block, ``end``). Inputs are NHWC; output
    ``(B, *output_shape, features)``."""

    output_shape: tuple[int, int]
    features: int
    nonlinearity: str = "elu"
    interpolation: str = "bilinear"
    start: bool = False
    end: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, xs: Sequence[Array]) -> Array:
        kw = dict(nonlinearity=self.nonlinearity, dtype=self.dtype, param_dtype=self.param_dtype)
        hs = [RCUBlock(features=x.shape[-1], n_blocks=2, n_stages=2, **kw)(x) for x in xs]
        if not self.start:
            h = MSFBlock(
                features=self.features,
                shape=self.output_shape,
                interpolation=self.interpolation,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )(hs)
        else:
            h = hs[0]
        h = CRPBlock(features=self.features, n_stages=2, **kw)(h)
        return RCUBlock(features=self.features, n_blocks=3 if self.end else 1, n_stages=2, **kw)(h)


class NCSNv2(nn.Module, kw_only=True):
    """NCSNv2 for images up to 64 px (score_sde's ``ncsnv2_64``).

    Call: ``apply(variables, x, noise_labels, *, train=False)`` with ``x: (B, H, W, C)`` and
    ``noise_labels: (B,)`` integer indices into the decreasing noise table
    ``sigmas = exp(linspace(log sigma_max, log sigma_min, num_scales))``; with ``scale_by_sigma``
    (always on in the PyTorch port) the output is divided by ``sigmas[labels]``.
    ``class_labels`` and ``context`` are not supported by this architecture (it has no
    conditioning pathway). Returns ``(B, H, W, C)`` in ``x``'s dtype.
    """

    nf: int = 128
    centered: bool = False
    nonlinearity: str = "elu"
    interpolation: str = "bilinear"
    norm_ddof: int = 1
    scale_by_sigma: bool = True
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    num_scales: int = 232
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    # Layout: per stage (name, ((channel multiplier, resample, dilation), ...)), then the refine
    # blocks in forward order (name, feature multiplier).
    STAGES: ClassVar[tuple] = (
        ("res1", ((1, None, 1), (1, None, 1))),
        ("res2", ((2, "down", 1), (2, None, 1))),
        ("res3", ((2, "down", 2), (2, None, 2))),
        ("res4", ((2, "down", 4), (2, None, 4))),
    )
    REFINES: ClassVar[tuple] = (("refine1", 2), ("refine2", 2), ("refine3", 1), ("refine4", 1))

    def __post_init__(self):
        owner = type(self).__name__
        if self.nf <= 0:
            raise ValueError(f"{owner}: nf must be > 0, got {self.nf}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"{owner}: interpolation must be one of {_INTERPOLATIONS}, got {self.interpolation!r}")
        if self.norm_ddof not in (0, 1):
            raise ValueError(f"{owner}: norm_ddof must be 0 or 1, got {self.norm_ddof}")
        if self.num_scales < 1:
            raise ValueError(f"{owner}: num_scales must be >= 1, got {self.num_scales}")
        get_activation(self.nonlinearity)
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        x: Array,
        noise_labels: Array,
        *,
        class_labels: Array | None = None,
        context: Array | None = None,
        train: bool = False,
    ) -> Array:
        owner = type(self).__name__
        if x.ndim != 4:
            raise ValueError(f"{owner} expects NHWC images (B, H, W, C), got shape {x.shape}")
        if class_labels is not None or context is not None:
            raise ValueError(f"{owner} has no class or context conditioning; pass neither class_labels nor context")
        B, _, _, channels = x.shape
        in_dtype = x.dtype
        labels = conditioning.batch_labels(noise_labels, B, owner)
        act = get_activation(self.nonlinearity)
        name = NameCounter()
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        wrap = (lambda cls: nn.remat(cls)) if self.remat else (lambda cls: cls)

        h = x if self.centered else 2.0 * x - 1.0
        h = h.astype(self.dtype)
        h = ncsn_conv(self.nf, channels, name=name("Conv"), **kw)(h)
        layers = []
        for _, blocks in self.STAGES:
            for mult, resample, dilation in blocks:
                h = wrap(ResidualBlock)(
                    output_dim=self.nf * mult,
                    resample=resample,
                    dilation=dilation,
                    nonlinearity=self.nonlinearity,
                    norm_ddof=self.norm_ddof,
                    name=name("ResidualBlock"),
                    **kw,
                )(h)
            layers.append(h)
        ref: Array | None = None
        for i, (_, mult) in enumerate(self.REFINES):
            skip = layers[len(layers) - 1 - i]
            inputs = [skip] if ref is None else [skip, ref]
            ref = wrap(RefineBlock)(
                output_shape=tuple(skip.shape[1:3]),
                features=self.nf * mult,
                nonlinearity=self.nonlinearity,
                interpolation=self.interpolation,
                start=i == 0,
                end=i == len(self.REFINES) - 1,
                name=name("RefineBlock"),
                **kw,
            )(inputs)
        assert ref is not None  # REFINES is never empty
        h = act(InstanceNorm2dPlus(ddof=self.norm_ddof, name=name("InstanceNorm2dPlus"), **kw)(ref))
        h = ncsn_conv(channels, self.nf, name=name("Conv"), **kw)(h)
        h = h.astype(jnp.float32)
        if self.scale_by_sigma:
            table = jnp.asarray(geometric_sigmas(self.sigma_min, self.sigma_max, self.num_scales), jnp.float32)
            h = h / table[labels.astype(jnp.int32)].reshape((B, 1, 1, 1))
        return h.astype(in_dtype)


class NCSNv2_128(NCSNv2, kw_only=True):  # noqa: N801 (score_sde's name)
    """NCSNv2 for 96-128 px images (score_sde's ``ncsnv2_128``): one more resolution level."""

    STAGES: ClassVar[tuple] = (
        ("res1", ((1, None, 1), (1, None, 1))),
        ("res2", ((2, "down", 1), (2, None, 1))),
        ("res3", ((2, "down", 1), (2, None, 1))),
        ("res4", ((4, "down", 2), (4, None, 2))),
        ("res5", ((4, "down", 4), (4, None, 4))),
    )
    REFINES: ClassVar[tuple] = (("refine1", 4), ("refine2", 2), ("refine3", 2), ("refine4", 1), ("refine5", 1))


class NCSNv2_256(NCSNv2, kw_only=True):  # noqa: N801 (score_sde's name)
    """NCSNv2 for 129-256 px images (score_sde's ``ncsnv2_256``): two more resolution levels."""

    STAGES: ClassVar[tuple] = (
        ("res1", ((1, None, 1), (1, None, 1))),
        ("res2", ((2, "down", 1), (2, None, 1))),
        ("res3", ((2, "down", 1), (2, None, 1))),
        ("res31", ((2, "down", 1), (2, None, 1))),
        ("res4", ((4, "down", 2), (4, None, 2))),
        ("res5", ((4, "down", 4), (4, None, 4))),
    )
    REFINES: ClassVar[tuple] = (
        ("refine1", 4),
        ("refine2", 2),
        ("refine31", 2),
        ("refine3", 2),
        ("refine4", 1),
        ("refine5", 1),
    )
