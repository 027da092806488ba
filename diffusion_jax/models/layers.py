"""Building blocks shared by the score networks (NCSN++/DDPM++, DDPM, NCSNv2).

Every block takes and returns NHWC arrays. Submodule names inside a block follow Flax's automatic
naming in creation order (``Conv_0``, ``GroupNorm_1``, ``NIN_0``, ...), the same order as
score_sde's Flax blocks, so the parameter trees line up with score_sde's (see
``docs/score_sde_jax_checkpoints.md``).

Initialisers (Song et al. 2021, App. H; Ho et al. 2020):

* :func:`default_init` -- DDPM's ``variance_scaling(scale, 'fan_avg', 'uniform')``, with a zero
  scale replaced by 1e-10 so that "zero-initialised" output layers still carry a gradient signal.
* :func:`ncsn_kernel_init` / :func:`ncsn_bias_init` -- PyTorch's default convolution init used by
  NCSN/NCSNv2: ``U(-b, b)`` with ``b = sqrt(scale / fan_in)`` for both weight and bias.

Precision: the ``dtype`` fields set the compute dtype of convolutions, dense layers and the
attention matmuls (e.g. bfloat16); parameters live in ``param_dtype`` (float32). Normalisation
statistics and softmaxes are computed in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import resampling

Array = jax.Array
Dtype = Any

__all__ = [
    "ACTIVATIONS",
    "get_activation",
    "default_init",
    "ncsn_kernel_init",
    "ncsn_bias_init",
    "ddpm_conv",
    "ncsn_conv",
    "timestep_embedding",
    "geometric_sigmas",
    "GaussianFourierProjection",
    "group_norm",
    "NIN",
    "AttnBlock",
    "CrossAttnBlock",
    "ResnetBlockDDPM",
    "ResnetBlockBigGAN",
    "Conv2d",
    "Upsample",
    "Downsample",
    "Combine",
    "NameCounter",
]


# --------------------------------------------------------------------------------------------
# Activations and initialisers
# --------------------------------------------------------------------------------------------

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "swish": nn.swish,
    "elu": nn.elu,
    "relu": nn.relu,
    "lrelu": lambda x: nn.leaky_relu(x, negative_slope=0.2),
}


def get_activation(name: str) -> Callable[[Array], Array]:
    key = name.lower()
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown nonlinearity {name!r}; valid: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[key]


def default_init(scale: float = 1.0) -> Callable:
    """DDPM's initialiser: ``variance_scaling(scale, 'fan_avg', 'uniform')``; scale 0 -> 1e-10."""
    scale = 1e-10 if scale == 0 else scale
    return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def _fan_in(shape: Sequence[int]) -> int:
    # HWIO kernels (and (in, out) dense kernels): fan_in = prod(receptive field) * in.
    return int(np.prod(shape[:-1]))


def ncsn_kernel_init(scale: float = 1.0) -> Callable:
    """PyTorch's default conv init (as in NCSN/NCSNv2): ``U(+-sqrt(scale / fan_in))``."""
    scale = 1e-10 if scale == 0 else scale
    return nn.initializers.variance_scaling(scale / 3.0, "fan_in", "uniform")


def ncsn_bias_init(kernel_shape: Sequence[int], scale: float = 1.0) -> Callable:
    """PyTorch's default conv bias init: ``U(+-sqrt(scale / fan_in))`` with the kernel's fan_in."""
    scale = 1e-10 if scale == 0 else scale
    bound = math.sqrt(scale / _fan_in(kernel_shape))

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def ddpm_conv(
    features: int,
    *,
    kernel: int = 3,
    stride: int = 1,
    padding: Any = "SAME",
    init_scale: float = 1.0,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
    """A ``kernel x kernel`` convolution with DDPM initialisation (weights default_init, zero bias).

    With ``stride=2`` and 'SAME' padding on even sizes XLA pads (0, 1), the same as DDPM's
    explicit ``pad(0, 1)`` followed by a 'VALID' convolution.
    """
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        use_bias=use_bias,
        kernel_init=default_init(init_scale),
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def ncsn_conv(
    features: int,
    in_features: int,
    *,
    kernel: int = 3,
    dilation: int = 1,
    use_bias: bool = True,
    init_scale: float = 1.0,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
    """A 'SAME'-padded convolution with NCSN (PyTorch-default) initialisation."""
    kernel_shape = (kernel, kernel, in_features, features)
    return nn.Conv(
        features,
        (kernel, kernel),
        padding="SAME",
        kernel_dilation=(dilation, dilation),
        use_bias=use_bias,
        kernel_init=ncsn_kernel_init(init_scale),
        bias_init=ncsn_bias_init(kernel_shape, init_scale),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


# --------------------------------------------------------------------------------------------
# Noise-level embeddings
# --------------------------------------------------------------------------------------------


def timestep_embedding(timesteps: Array, dim: int, max_positions: float = 10000.0) -> Array:
    """Sinusoidal embedding of (possibly fractional) time steps (Vaswani et al. 2017, sec. 3.5;
    DDPM's ``get_timestep_embedding``): ``[sin(t w_i), cos(t w_i)]`` with
    ``w_i = max_positions^(-i / (dim/2 - 1))``. ``(B,) -> (B, dim)``, float32."""
    half = dim // 2
    # Frequencies in float64 numpy, rounded once to float32 (a constant of the program).
    freqs = np.exp(np.arange(half, dtype=np.float64) * -(math.log(max_positions) / (half - 1))).astype(np.float32)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def geometric_sigmas(sigma_min: float, sigma_max: float, num_scales: int) -> np.ndarray:
    """score_sde's discrete noise table ``exp(linspace(log sigma_max, log sigma_min, N))``
    (decreasing: index 0 is the largest noise level). float64 numpy, shape ``(N,)``."""
    return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_scales))


class GaussianFourierProjection(nn.Module, kw_only=True):
    """Random Fourier features of the log noise level (Tancik et al. 2020; Song et al. 2021,
    App. H): ``[sin(2 pi x W), cos(2 pi x W)]`` with fixed ``W ~ N(0, scale^2)``.

    ``W`` lives in the ``params`` collection (as in score_sde) but receives no gradient.
    ``(B,) -> (B, 2 * embedding_size)``, float32.
    """

    embedding_size: int = 256
    scale: float = 1.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        W = self.param("W", nn.initializers.normal(stddev=self.scale), (self.embedding_size,), jnp.float32)
        W = jax.lax.stop_gradient(W)
        proj = jnp.asarray(x, jnp.float32)[:, None] * W[None, :] * (2 * np.pi)
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


# --------------------------------------------------------------------------------------------
# Basic layers
# --------------------------------------------------------------------------------------------


class NIN(nn.Module, kw_only=True):
    """Network-in-network (a per-pixel dense layer): ``y = x W + b`` with ``W`` of shape
    ``(C_in, num_units)``, DDPM initialisation with ``init_scale`` (0.1 by default)."""

    num_units: int
    init_scale: float = 0.1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        W = self.param("W", default_init(self.init_scale), (x.shape[-1], self.num_units), self.param_dtype)
        b = self.param("b", nn.initializers.zeros, (self.num_units,), self.param_dtype)
        x = x.astype(self.dtype)
        return jnp.einsum("...i,io->...o", x, W.astype(self.dtype)) + b.astype(self.dtype)


def group_norm(num_groups: int, dtype: Dtype, param_dtype: Dtype, name: str | None = None) -> nn.GroupNorm:
    """GroupNorm with DDPM's epsilon 1e-6. Statistics in float32 with the two-pass variance
    (``E[(x - mean)^2]``), which avoids the cancellation of ``E[x^2] - mean^2``."""
    return nn.GroupNorm(
        num_groups=num_groups, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name
    )


def _groups(channels: int, num_groups: int | None) -> int:
    """DDPM uses 32 groups; NCSN++ uses ``min(C // 4, 32)`` (``num_groups=None``)."""
    return min(channels // 4, 32) if num_groups is None else num_groups


class AttnBlock(nn.Module, kw_only=True):
    """Single-head self-attention over all pixels (DDPM; Ho et al. 2020, App. B):
    ``x + NIN_3(softmax(q k^T / sqrt(C)) v)`` with ``q, k, v = NIN(GroupNorm(x))``.

    With ``skip_rescale`` the residual sum is divided by sqrt(2) (NCSN++). ``init_scale`` is the
    output projection's init scale (0 -> 1e-10, i.e. the block starts near the identity).
    ``num_groups=None`` means ``min(C // 4, 32)`` (NCSN++); DDPM uses 32.
    ``(B, H, W, C) -> (B, H, W, C)``.
    """

    num_groups: int | None = None
    skip_rescale: bool = False
    init_scale: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        B, H, W, C = x.shape
        nin = lambda **kw: NIN(num_units=C, dtype=self.dtype, param_dtype=self.param_dtype, **kw)  # noqa: E731
        h = group_norm(_groups(C, self.num_groups), self.dtype, self.param_dtype)(x)
        q = nin()(h).reshape(B, H * W, C)
        k = nin()(h).reshape(B, H * W, C)
        v = nin()(h).reshape(B, H * W, C)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * (C**-0.5)
        w = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        h = jnp.einsum("bqk,bkc->bqc", w, v).reshape(B, H, W, C)
        h = nin(init_scale=self.init_scale)(h)
        out = x + h
        return out / math.sqrt(2.0) if self.skip_rescale else out


class CrossAttnBlock(nn.Module, kw_only=True):
    """Multi-head cross-attention from pixels to a sequence of conditioning vectors
    (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", sec. 3.3):
    queries from ``GroupNorm(x)``, keys and values from ``context``; the output projection is
    initialised at ``init_scale`` (0 -> 1e-10) so the block starts as the identity.

    ``x: (B, H, W, C)``, ``context: (B, L, D)`` -> ``(B, H, W, C)``. ``C`` must be divisible by
    ``num_heads``.
    """

    num_heads: int = 1
    skip_rescale: bool = False
    init_scale: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        B, H, W, C = x.shape
        if C % self.num_heads:
            raise ValueError(f"CrossAttnBlock: {C} channels are not divisible by num_heads={self.num_heads}")
        d = C // self.num_heads
        dense = lambda name, scale=1.0: nn.Dense(  # noqa: E731
            C, kernel_init=default_init(scale), dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        h = group_norm(_groups(C, None), self.dtype, self.param_dtype)(x)
        q = dense("query")(h).reshape(B, H * W, self.num_heads, d)
        k = dense("key")(context).reshape(B, context.shape[1], self.num_heads, d)
        v = dense("value")(context).reshape(B, context.shape[1], self.num_heads, d)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (d**-0.5)
        w = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        h = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(B, H, W, C)
        h = dense("out", self.init_scale)(h)
        out = x + h
        return out / math.sqrt(2.0) if self.skip_rescale else out


# --------------------------------------------------------------------------------------------
# Residual blocks
# --------------------------------------------------------------------------------------------


class ResnetBlockDDPM(nn.Module, kw_only=True):
    """DDPM's residual block (Ho et al. 2020, App. B; score_sde's ``ResnetBlockDDPM`` and
    ``ResnetBlockDDPMpp``):

        h = Conv_1(Dropout(act(GN_1(Conv_0(act(GN_0(x))) + Dense_0(act(temb))))))
        out = shortcut(x) + h            (divided by sqrt(2) when skip_rescale)

    ``shortcut`` is the identity, or ``NIN_0`` (``Conv_2``, 3x3, with ``conv_shortcut``) when
    the channel count changes. DDPM: ``num_groups=32, skip_rescale=False, init_scale=0``;
    DDPM++: ``num_groups=None`` (``min(C//4, 32)``), ``skip_rescale=True``.
    ``(B, H, W, C) -> (B, H, W, out_ch)``; ``temb: (B, D)`` or None.
    """

    out_ch: int | None = None
    num_groups: int | None = None
    dropout: float = 0.1
    skip_rescale: bool = False
    init_scale: float = 0.0
    conv_shortcut: bool = False
    nonlinearity: str = "swish"
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Array | None = None) -> Array:
        act = get_activation(self.nonlinearity)
        C = x.shape[-1]
        out_ch = self.out_ch or C
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = act(group_norm(_groups(C, self.num_groups), **kw)(x))
        h = ddpm_conv(out_ch, **kw)(h)
        if temb is not None:
            h = h + nn.Dense(out_ch, kernel_init=default_init(), **kw)(act(temb))[:, None, None, :]
        h = act(group_norm(_groups(out_ch, self.num_groups), **kw)(h))
        h = nn.Dropout(self.dropout)(h, deterministic=self.deterministic)
        h = ddpm_conv(out_ch, init_scale=self.init_scale, **kw)(h)
        if C != out_ch:
            x = ddpm_conv(out_ch, **kw)(x) if self.conv_shortcut else NIN(num_units=out_ch, **kw)(x)
        out = x + h
        return out / math.sqrt(2.0) if self.skip_rescale else out


class ResnetBlockBigGAN(nn.Module, kw_only=True):
    """BigGAN-style residual block with optional up/down-sampling inside the block
    (Brock et al. 2019; Song et al. 2021, App. H; score_sde's ``ResnetBlockBigGANpp``):

        h = act(GN_0(x)); h, x = resample(h), resample(x)
        h = Conv_1(Dropout(act(GN_1(Conv_0(h) + Dense_0(act(temb))))))
        out = Conv_2(x) + h   (1x1 skip when channels change or resampling; / sqrt(2) if skip_rescale)

    Resampling is FIR (StyleGAN2) with ``fir`` or nearest / average-pool otherwise.
    ``(B, H, W, C) -> (B, H', W', out_ch)``.
    """

    out_ch: int | None = None
    up: bool = False
    down: bool = False
    dropout: float = 0.1
    fir: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    skip_rescale: bool = True
    init_scale: float = 0.0
    nonlinearity: str = "swish"
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Array | None = None) -> Array:
        act = get_activation(self.nonlinearity)
        C = x.shape[-1]
        out_ch = self.out_ch or C
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = act(group_norm(_groups(C, None), **kw)(x))
        if self.up:
            if self.fir:
                h = resampling.upsample_2d(h, self.fir_kernel, factor=2)
                x = resampling.upsample_2d(x, self.fir_kernel, factor=2)
            else:
                h = resampling.naive_upsample_2d(h, factor=2)
                x = resampling.naive_upsample_2d(x, factor=2)
        elif self.down:
            if self.fir:
                h = resampling.downsample_2d(h, self.fir_kernel, factor=2)
                x = resampling.downsample_2d(x, self.fir_kernel, factor=2)
            else:
                h = resampling.naive_downsample_2d(h, factor=2)
                x = resampling.naive_downsample_2d(x, factor=2)
        h = ddpm_conv(out_ch, **kw)(h)
        if temb is not None:
            h = h + nn.Dense(out_ch, kernel_init=default_init(), **kw)(act(temb))[:, None, None, :]
        h = act(group_norm(_groups(out_ch, None), **kw)(h))
        h = nn.Dropout(self.dropout)(h, deterministic=self.deterministic)
        h = ddpm_conv(out_ch, init_scale=self.init_scale, **kw)(h)
        if C != out_ch or self.up or self.down:
            x = ddpm_conv(out_ch, kernel=1, **kw)(x)
        out = x + h
        return out / math.sqrt(2.0) if self.skip_rescale else out


# --------------------------------------------------------------------------------------------
# Resampling layers
# --------------------------------------------------------------------------------------------


class Conv2d(nn.Module, kw_only=True):
    """3x3 (odd ``kernel``) convolution fused with FIR up- or down-sampling (StyleGAN2's
    ``Conv2d`` with ``up``/``down``; score_sde's ``up_or_down_sampling.Conv2d``).

    Parameters ``kernel`` (HWIO, DDPM init) and ``bias`` (zeros).
    """

    features: int
    kernel: int = 3
    up: bool = False
    down: bool = False
    resample_kernel: tuple[int, ...] = (1, 3, 3, 1)
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.up and self.down:
            raise ValueError("Conv2d: up and down are mutually exclusive")
        w = self.param(
            "kernel", default_init(), (self.kernel, self.kernel, x.shape[-1], self.features), self.param_dtype
        )
        w = w.astype(self.dtype)
        x = x.astype(self.dtype)
        if self.up:
            x = resampling.upsample_conv_2d(x, w, self.resample_kernel)
        elif self.down:
            x = resampling.conv_downsample_2d(x, w, self.resample_kernel)
        else:
            x = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            x = x + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
        return x


class Upsample(nn.Module, kw_only=True):
    """2x upsampling (score_sde's ``layerspp.Upsample``; with ``fir=False`` also DDPM's
    ``Upsample``): nearest neighbour [+ 3x3 ``Conv_0``], or FIR [fused with a 3x3 ``Conv2d_0``].
    ``(B, H, W, C) -> (B, 2H, 2W, out_ch or C)``."""

    out_ch: int | None = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        out_ch = self.out_ch or x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if not self.fir:
            h = resampling.naive_upsample_2d(x, 2)
            if self.with_conv:
                h = ddpm_conv(out_ch, **kw)(h)
        else:
            if self.with_conv:
                h = Conv2d(features=out_ch, up=True, resample_kernel=self.fir_kernel, **kw)(x)
            else:
                h = resampling.upsample_2d(x, self.fir_kernel, factor=2)
        return h


class Downsample(nn.Module, kw_only=True):
    """2x downsampling (score_sde's ``layerspp.Downsample``; with ``fir=False`` also DDPM's
    ``Downsample``): stride-2 3x3 ``Conv_0`` or 2x2 average pooling, or FIR [fused with a
    stride-2 3x3 ``Conv2d_0``]. ``(B, H, W, C) -> (B, H/2, W/2, out_ch or C)``."""

    out_ch: int | None = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        out_ch = self.out_ch or x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if not self.fir:
            if self.with_conv:
                # 'SAME' with stride 2 pads (0, 1) on even sizes: DDPM's pad-then-'VALID'.
                x = ddpm_conv(out_ch, stride=2, **kw)(x)
            else:
                x = resampling.naive_downsample_2d(x, 2)
        else:
            if self.with_conv:
                x = Conv2d(features=out_ch, down=True, resample_kernel=self.fir_kernel, **kw)(x)
            else:
                x = resampling.downsample_2d(x, self.fir_kernel, factor=2)
        return x


class Combine(nn.Module, kw_only=True):
    """Merges the input-image pyramid into the feature stream (NCSN++'s ``progressive_input``
    with ``input_skip``; Song et al. 2021, App. H): a 1x1 ``Conv_0`` maps the pyramid image
    ``x`` to ``y``'s channels, then the two are summed or concatenated (``[conv(x), y]``)."""

    method: str = "cat"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, y: Array) -> Array:
        h = ddpm_conv(y.shape[-1], kernel=1, dtype=self.dtype, param_dtype=self.param_dtype)(x)
        if self.method == "cat":
            return jnp.concatenate([h, y.astype(h.dtype)], axis=-1)
        if self.method == "sum":
            return h + y
        raise ValueError(f"Combine: unknown method {self.method!r}; valid: cat, sum")


# --------------------------------------------------------------------------------------------
# Naming
# --------------------------------------------------------------------------------------------


class NameCounter:
    """Generates Flax-style submodule names ``Kind_<n>``, counting per kind in creation order.

    The networks name their top-level submodules through this so that the names do not depend
    on the Python class (``nn.remat`` wraps a class under a new name) and match Flax's automatic
    names in score_sde, including the index consumed by parameter-free submodules.
    """

    def __init__(self):
        self._counts: dict[str, int] = {}

    def __call__(self, kind: str) -> str:
        n = self._counts.get(kind, 0)
        self._counts[kind] = n + 1
        return f"{kind}_{n}"
