"""The KL-regularised convolutional autoencoder of latent diffusion (Rombach et al. 2022,
"High-Resolution Image Synthesis with Latent Diffusion Models", sec. 3 and App. G), the
architecture of Stable Diffusion's VAE, laid out as diffusers' ``AutoencoderKL``.

Encoder ``(B, H, W, in_channels) -> (B, H/f, W/f, 2 latent_channels)`` with
``f = 2^(len(block_out_channels) - 1)``:

    conv_in -> per level i: layers_per_block ResNet blocks to block_out_channels[i]
               (and a stride-2 convolution, except at the last level)
            -> mid block: ResNet, single-head self-attention, ResNet
            -> GroupNorm, SiLU, conv_out -> quant_conv (1x1)

The moments are split into ``mean`` and ``logvar`` (clipped to [-30, 20], as the reference does)
of a diagonal Gaussian posterior ``q(z | x)`` (:class:`DiagonalGaussian`). The decoder mirrors it:
``post_quant_conv`` (1x1), ``conv_in``, the mid block, per level (deepest first)
``layers_per_block + 1`` ResNet blocks and a nearest-neighbour 2x upsampling followed by a 3x3
convolution (except at the last level), GroupNorm, SiLU, ``conv_out``.

ResNet block (He et al. 2016, with GroupNorm as in DDPM): ``x' + conv2(SiLU(GN2(conv1(SiLU(GN1(x))))))``
where ``x'`` is ``x`` or a 1x1 ``conv_shortcut`` when the channel count changes. Every GroupNorm has
``norm_num_groups`` groups and epsilon 1e-6. The down-sampling convolution pads by one pixel at the
bottom and right only, then applies a 3x3 stride-2 'VALID' convolution (diffusers' ``padding=0``).

Diffusion runs on scaled latents ``(z - shift_factor) * scaling_factor`` (:meth:`AutoencoderKL.scale_latents`);
Stable Diffusion 1.x/2.x use ``scaling_factor = 0.18215`` and no shift (diffusers' default config).

Submodule names follow the diffusers state dict (``down_blocks.0.resnets.1.conv2`` is our
``down_blocks_0/resnets_1/conv2``), so :func:`load_autoencoder_kl` maps weights by rule and
checks every name and shape. All arrays are NHWC. See ``docs/latent.md``.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffusion_jax.models.convert import read_safetensors, read_state_dict
from diffusion_jax.models.layers import group_norm

Array = jax.Array
Dtype = Any

__all__ = [
    "AutoencoderKL",
    "DiagonalGaussian",
    "VAEEncoder",
    "VAEDecoder",
    "VAEResnetBlock",
    "VAEAttention",
    "STABLE_DIFFUSION_VAE",
    "LOGVAR_RANGE",
    "read_safetensors",
    "read_state_dict",
    "autoencoder_state_dict_shapes",
    "load_autoencoder_kl",
    "autoencoder_kwargs_from_config",
]

# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)

# The published Stable Diffusion 1.x / 2.x VAE (diffusers' AutoencoderKL config of those pipelines):
# 512x512x3 images -> 64x64x4 latents (f = 8), 83.65M parameters.
STABLE_DIFFUSION_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    scaling_factor=0.18215,
)


# --------------------------------------------------------------------------------------------
# The posterior
# --------------------------------------------------------------------------------------------


class DiagonalGaussian(flax.struct.PyTreeNode):
    """``q(z | x) = N(mean, diag(exp(logvar)))``, NHWC arrays ``(B, h, w, latent_channels)``.

    A pytree: it passes through ``jit`` and ``vmap``. ``logvar`` is already clipped to
    :data:`LOGVAR_RANGE` (as diffusers' ``DiagonalGaussianDistribution``)."""

    mean: Array
    logvar: Array

    @classmethod
    def from_moments(cls, moments: Array) -> DiagonalGaussian:
        """Splits ``(..., 2 L)`` moments into mean (first ``L`` channels) and logvar (last ``L``)."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, *LOGVAR_RANGE))

    @property
    def std(self) -> Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> Array:
        return jnp.exp(self.logvar)

    def sample(self, key: Array) -> Array:
        """``mean + std * eps`` with ``eps ~ N(0, I)`` drawn from ``key``."""
        eps = jax.random.normal(key, self.mean.shape, jnp.float32).astype(self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> Array:
        return self.mean

    def kl(self) -> Array:
        """``KL(q || N(0, I))`` per example, summed over latent pixels and channels: ``(B,)``
        (Kingma & Welling 2014, App. B)."""
        terms = jnp.square(self.mean.astype(jnp.float32)) + self.var.astype(jnp.float32) - 1.0 - self.logvar
        return 0.5 * jnp.sum(terms.astype(jnp.float32), axis=tuple(range(1, self.mean.ndim)))


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


def _conv(features: int, kernel: int, dtype: Dtype, param_dtype: Dtype, name: str, **kw: Any) -> nn.Conv:
    # PyTorch's default Conv2d initialisation (kaiming_uniform with a = sqrt(5)): U(+-1/sqrt(fan_in)).
    return nn.Conv(
        features,
        (kernel, kernel),
        kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        **kw,
    )


class VAEResnetBlock(nn.Module, kw_only=True):
    """``x' + conv2(Dropout(SiLU(GN2(conv1(SiLU(GN1(x)))))))``; ``x'`` is ``x`` or the 1x1
    ``conv_shortcut`` when the channel count changes. ``(B, H, W, C) -> (B, H, W, out_channels)``."""

    out_channels: int
    norm_num_groups: int = 32
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(group_norm(self.norm_num_groups, name="norm1", **kw)(x))
        h = _conv(self.out_channels, 3, padding=((1, 1), (1, 1)), name="conv1", **kw)(h)
        h = nn.silu(group_norm(self.norm_num_groups, name="norm2", **kw)(h))
        h = nn.Dropout(self.dropout)(h, deterministic=self.deterministic)
        h = _conv(self.out_channels, 3, padding=((1, 1), (1, 1)), name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, padding="VALID", name="conv_shortcut", **kw)(x)
        return x + h


class VAEAttention(nn.Module, kw_only=True):
    """Single-head self-attention over all pixels with a residual connection (the VAE mid
    block's): ``x + to_out_0(softmax(q k^T / sqrt(C)) v)``, ``q, k, v`` dense projections of
    ``GroupNorm(x)``. Softmax in float32. ``(B, H, W, C) -> (B, H, W, C)``."""

    norm_num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        B, H, W, C = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = group_norm(self.norm_num_groups, name="group_norm", **kw)(x).reshape(B, H * W, C)
        q = nn.Dense(C, name="to_q", **kw)(h)
        k = nn.Dense(C, name="to_k", **kw)(h)
        v = nn.Dense(C, name="to_v", **kw)(h)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * (C**-0.5)
        w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        h = jnp.einsum("bqk,bkc->bqc", w, v)
        h = nn.Dense(C, name="to_out_0", **kw)(h)
        return x + h.reshape(B, H, W, C)


class VAEMidBlock(nn.Module, kw_only=True):
    """ResNet block, self-attention (if ``add_attention``), ResNet block; channels unchanged."""

    norm_num_groups: int = 32
    add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(norm_num_groups=self.norm_num_groups, dtype=self.dtype, param_dtype=self.param_dtype)
        C = x.shape[-1]
        x = VAEResnetBlock(out_channels=C, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = VAEAttention(name="attentions_0", **kw)(x)
        return VAEResnetBlock(out_channels=C, name="resnets_1", **kw)(x)


class _Downsample(nn.Module, kw_only=True):
    """Zero-pad one pixel at the bottom and right, then a 3x3 stride-2 'VALID' convolution."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.channels, 3, self.dtype, self.param_dtype, "conv", strides=(2, 2), padding="VALID")(x)


class _Upsample(nn.Module, kw_only=True):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.channels, 3, self.dtype, self.param_dtype, "conv", padding=((1, 1), (1, 1)))(x)


class _Level(nn.Module, kw_only=True):
    """One resolution level: ``num_layers`` ResNet blocks, then an optional resampler."""

    out_channels: int
    num_layers: int
    resample: str | None  # 'down', 'up' or None
    norm_num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.num_layers):
            x = VAEResnetBlock(
                out_channels=self.out_channels, norm_num_groups=self.norm_num_groups, name=f"resnets_{i}", **kw
            )(x)
        if self.resample == "down":
            x = _Downsample(channels=self.out_channels, name="downsamplers_0", **kw)(x)
        elif self.resample == "up":
            x = _Upsample(channels=self.out_channels, name="upsamplers_0", **kw)(x)
        return x


class VAEEncoder(nn.Module, kw_only=True):
    """``(B, H, W, in_channels) -> (B, H/f, W/f, 2 latent_channels)`` moments (before ``quant_conv``)."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        groups = self.norm_num_groups
        chans = self.block_out_channels
        h = _conv(chans[0], 3, padding=((1, 1), (1, 1)), name="conv_in", **kw)(x)
        for i, c in enumerate(chans):
            last = i == len(chans) - 1
            h = _Level(
                out_channels=c,
                num_layers=self.layers_per_block,
                resample=None if last else "down",
                norm_num_groups=groups,
                name=f"down_blocks_{i}",
                **kw,
            )(h)
        h = VAEMidBlock(norm_num_groups=groups, add_attention=self.mid_block_add_attention, name="mid_block", **kw)(h)
        h = nn.silu(group_norm(groups, name="conv_norm_out", **kw)(h))
        return _conv(2 * self.latent_channels, 3, padding=((1, 1), (1, 1)), name="conv_out", **kw)(h)


class VAEDecoder(nn.Module, kw_only=True):
    """``(B, h, w, latent_channels) -> (B, h f, w f, out_channels)`` (after ``post_quant_conv``)."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    out_channels: int
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        groups = self.norm_num_groups
        chans = tuple(reversed(self.block_out_channels))
        h = _conv(chans[0], 3, padding=((1, 1), (1, 1)), name="conv_in", **kw)(z)
        h = VAEMidBlock(norm_num_groups=groups, add_attention=self.mid_block_add_attention, name="mid_block", **kw)(h)
        for i, c in enumerate(chans):
            last = i == len(chans) - 1
            h = _Level(
                out_channels=c,
                num_layers=self.layers_per_block + 1,
                resample=None if last else "up",
                norm_num_groups=groups,
                name=f"up_blocks_{i}",
                **kw,
            )(h)
        h = nn.silu(group_norm(groups, name="conv_norm_out", **kw)(h))
        return _conv(self.out_channels, 3, padding=((1, 1), (1, 1)), name="conv_out", **kw)(h)


# --------------------------------------------------------------------------------------------
# The autoencoder
# --------------------------------------------------------------------------------------------


class AutoencoderKL(nn.Module, kw_only=True):
    """KL-regularised autoencoder (Rombach et al. 2022), diffusers' ``AutoencoderKL`` in NHWC.

    Methods (``module.apply({'params': p}, x, method=...)``):

    * ``encode(x) -> DiagonalGaussian``: ``x (B, H, W, in_channels)`` in [-1, 1]; posterior of
      shape ``(B, H/f, W/f, latent_channels)``, ``f = 2^(len(block_out_channels) - 1)``.
    * ``decode(z) -> (B, h f, w f, out_channels)`` from unscaled latents ``z``.
    * ``__call__(x, *, key=None)``: ``decode(encode(x).sample(key))``, or ``decode(mode)``
      without a key.

    The latent scaling (:meth:`scale_latents`, :meth:`unscale_latents`) needs no parameters and
    is called on the module itself. ``STABLE_DIFFUSION_VAE`` holds the published configuration:
    ``AutoencoderKL(**STABLE_DIFFUSION_VAE)``.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        chans = tuple(self.block_out_channels)
        if not chans or min(chans) <= 0:
            raise ValueError(f"AutoencoderKL: block_out_channels must be non-empty and positive, got {chans}")
        bad = [c for c in chans if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"AutoencoderKL: norm_num_groups={self.norm_num_groups} must divide every block_out_channels "
                f"entry; {bad} are not divisible"
            )
        if self.layers_per_block < 1 or self.latent_channels < 1:
            raise ValueError(
                f"AutoencoderKL: layers_per_block ({self.layers_per_block}) and latent_channels "
                f"({self.latent_channels}) must be >= 1"
            )
        object.__setattr__(self, "block_out_channels", chans)
        super().__post_init__()

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self):
        kw = dict(
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            mid_block_add_attention=self.mid_block_add_attention,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        L = self.latent_channels
        self.encoder = VAEEncoder(latent_channels=L, **kw)
        self.decoder = VAEDecoder(out_channels=self.out_channels, **kw)
        conv = dict(padding="VALID", dtype=self.dtype, param_dtype=self.param_dtype)
        self.quant_conv = _conv(2 * L, 1, name="quant_conv", **conv) if self.use_quant_conv else None
        self.post_quant_conv = _conv(L, 1, name="post_quant_conv", **conv) if self.use_post_quant_conv else None

    def _check_image(self, x: Array) -> None:
        f = self.downsampling_factor
        if x.ndim != 4 or x.shape[-1] != self.in_channels or x.shape[1] % f or x.shape[2] % f:
            raise ValueError(
                f"AutoencoderKL.encode: expected NHWC images (B, H, W, {self.in_channels}) with H and W "
                f"divisible by {f}, got shape {tuple(x.shape)}"
            )

    def encode(self, x: Array) -> DiagonalGaussian:
        self._check_image(x)
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: Array) -> Array:
        if z.ndim != 4 or z.shape[-1] != self.latent_channels:
            raise ValueError(
                f"AutoencoderKL.decode: expected NHWC latents (B, h, w, {self.latent_channels}), got {tuple(z.shape)}"
            )
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: Array, *, key: Array | None = None) -> Array:
        posterior = self.encode(x)
        return self.decode(posterior.mode() if key is None else posterior.sample(key))

    def scale_latents(self, z: Array) -> Array:
        """Latents as the diffusion model sees them: ``(z - shift_factor) * scaling_factor``."""
        return (z - self.shift_factor) * self.scaling_factor

    def unscale_latents(self, z: Array) -> Array:
        """The inverse of :meth:`scale_latents` (apply before :meth:`decode`)."""
        return z / self.scaling_factor + self.shift_factor


# --------------------------------------------------------------------------------------------
# Reading weights (the state-dict readers live in diffusion_jax.models.convert)
# --------------------------------------------------------------------------------------------


def _torch_name(path: tuple[str, ...]) -> str:
    # Our 'down_blocks_0' / 'resnets_1' / 'to_out_0' are diffusers' 'down_blocks.0' / ... ; leaves:
    # 'kernel' -> 'weight', GroupNorm 'scale' -> 'weight', 'bias' -> 'bias'.
    parts = [re.sub(r"^(.*)_(\d+)$", r"\1.\2", p) for p in path[:-1]]
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]]
    return ".".join(parts + [leaf])


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == "kernel" and len(shape) == 4:  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    if path[-1] == "kernel" and len(shape) == 2:  # (in, out) -> (out, in)
        return (shape[1], shape[0])
    return shape


def _from_torch(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 2:
        return np.transpose(value)
    return value


def autoencoder_state_dict_shapes(module: AutoencoderKL) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """``{diffusers state-dict name: (our parameter path, diffusers shape)}`` for ``module``."""
    return dict(
        _state_dict_shapes(
            module.in_channels,
            module.out_channels,
            tuple(module.block_out_channels),
            module.layers_per_block,
            module.latent_channels,
            module.norm_num_groups,
            module.use_quant_conv,
            module.use_post_quant_conv,
            module.mid_block_add_attention,
        )
    )


@functools.lru_cache(maxsize=16)
def _state_dict_shapes(*fields: Any) -> tuple[tuple[str, tuple[tuple[str, ...], tuple[int, ...]]], ...]:
    # Traced once per architecture (shapes only, no weights); cached because tracing the whole
    # network takes about a second.
    names = (
        "in_channels",
        "out_channels",
        "block_out_channels",
        "layers_per_block",
        "latent_channels",
        "norm_num_groups",
        "use_quant_conv",
        "use_post_quant_conv",
        "mid_block_add_attention",
    )
    module = AutoencoderKL(**dict(zip(names, fields)))
    f = module.downsampling_factor
    x = jnp.zeros((1, f, f, module.in_channels), jnp.float32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x))["params"]
    return tuple(
        (_torch_name(path), (path, _torch_shape(path, tuple(leaf.shape))))
        for path, leaf in traverse_util.flatten_dict(shapes).items()
    )


# Older diffusers VAE checkpoints name the mid-block attention's projections differently.
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_deprecated(name: str) -> str:
    m = re.fullmatch(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)", name)
    return f"{m.group(1)}.{_DEPRECATED_ATTENTION[m.group(2)]}.{m.group(3)}" if m else name


def load_autoencoder_kl(
    module: AutoencoderKL, source: Mapping[str, Any] | str | os.PathLike, *, dtype: Any = np.float32
) -> dict:
    """diffusers ``AutoencoderKL`` weights as ``module``'s parameter tree (numpy arrays; pass it
    as ``{'params': tree}``).

    ``source``: a diffusers ``diffusion_pytorch_model.safetensors`` (fp32, fp16 or bf16), a
    weights-only ``.pth``/``.bin``, an ``.npz``, or a state dict ``{name: array}``. Older names of
    the mid-block attention (``query``, ``key``, ``value``, ``proj_attn``) are accepted.

    Every tensor is checked: a missing, unexpected or misshaped one raises
    :class:`diffusion_jax.models.convert.ConversionError` naming it (build ``module`` with the
    checkpoint's ``config.json`` values). Layouts: Conv2d OIHW -> HWIO, Linear ``(out, in)`` ->
    ``(in, out)``, GroupNorm ``weight`` -> ``scale``.
    """
    from diffusion_jax.models.convert import ConversionError, check_tensor_names  # noqa: PLC0415

    state = {_rename_deprecated(n): v for n, v in read_state_dict(source).items()}
    expected = autoencoder_state_dict_shapes(module)
    config = (
        f"block_out_channels={module.block_out_channels}, layers_per_block={module.layers_per_block}, "
        f"latent_channels={module.latent_channels}, use_quant_conv={module.use_quant_conv}, "
        f"use_post_quant_conv={module.use_post_quant_conv}, mid_block_add_attention={module.mid_block_add_attention}"
    )
    check_tensor_names(state, expected, what="AutoencoderKL weights", built_with=config)
    flat = {}
    for name, (path, shape) in expected.items():
        value = state[name]
        if tuple(value.shape) != shape:
            raise ConversionError(
                f"AutoencoderKL weights: tensor {name!r} has shape {tuple(value.shape)}, expected {shape} "
                f"(module built with {config})"
            )
        flat[path] = _from_torch(np.asarray(value, dtype=np.float32)).astype(dtype)
    return traverse_util.unflatten_dict(flat)


def autoencoder_kwargs_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``AutoencoderKL`` keyword arguments from a diffusers ``config.json`` (a dict). Only the
    KL autoencoder's block types are accepted; a ``None`` shift factor means 0."""
    down = set(config.get("down_block_types", ("DownEncoderBlock2D",)))
    up = set(config.get("up_block_types", ("UpDecoderBlock2D",)))
    if down != {"DownEncoderBlock2D"} or up != {"UpDecoderBlock2D"}:
        raise ValueError(
            f"only DownEncoderBlock2D / UpDecoderBlock2D autoencoders are supported, got {sorted(down)} / {sorted(up)}"
        )
    if config.get("act_fn", "silu") != "silu":
        raise ValueError(f"only act_fn='silu' is supported, got {config['act_fn']!r}")
    kwargs: dict[str, Any] = {}
    for key in (
        "in_channels",
        "out_channels",
        "layers_per_block",
        "latent_channels",
        "norm_num_groups",
        "scaling_factor",
        "use_quant_conv",
        "use_post_quant_conv",
        "mid_block_add_attention",
    ):
        if config.get(key) is not None:
            kwargs[key] = config[key]
    if "block_out_channels" in config:
        kwargs["block_out_channels"] = tuple(config["block_out_channels"])
    if config.get("shift_factor") is not None:
        kwargs["shift_factor"] = float(config["shift_factor"])
    return kwargs
