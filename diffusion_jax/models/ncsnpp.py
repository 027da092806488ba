"""NCSN++ and DDPM++ (Song et al. 2021, "Score-Based Generative Modeling through Stochastic
Differential Equations", sec. 4.4 and App. H).

One U-Net with switches: residual blocks of DDPM or BigGAN type, optional FIR (anti-aliased)
resampling (StyleGAN2), rescaled skip connections, and "progressive growing" style input/output
image pyramids. DDPM++ is this network with ``embedding_type='positional'``, ``fir=False``,
``progressive_input='none'``, ``scale_by_sigma=False`` and centred data; NCSN++ uses Gaussian
Fourier features of ``log sigma``, FIR resampling and a residual input pyramid.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import conditioning
from diffusion_jax.models.layers import (
    AttnBlock,
    Combine,
    CrossAttnBlock,
    Downsample,
    GaussianFourierProjection,
    NameCounter,
    ResnetBlockBigGAN,
    ResnetBlockDDPM,
    Upsample,
    ddpm_conv,
    default_init,
    geometric_sigmas,
    get_activation,
    group_norm,
    timestep_embedding,
)

Array = jax.Array
Dtype = Any

__all__ = ["NCSNpp"]

_CHOICES = {
    "resblock_type": ("ddpm", "biggan"),
    "progressive": ("none", "output_skip", "residual"),
    "progressive_input": ("none", "input_skip", "residual"),
    "progressive_combine": ("sum", "cat"),
    "embedding_type": ("fourier", "positional"),
}


def _check(owner: str, ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"{owner}: {message}")


def _validate_common(m: nn.Module, owner: str) -> None:
    _check(owner, m.nf > 0, f"nf must be > 0, got {m.nf}")
    _check(
        owner, len(m.ch_mult) > 0 and all(c > 0 for c in m.ch_mult), f"ch_mult must be positive ints, got {m.ch_mult}"
    )
    _check(owner, m.num_res_blocks >= 1, f"num_res_blocks must be >= 1, got {m.num_res_blocks}")
    _check(owner, 0.0 <= m.dropout < 1.0, f"dropout must be in [0, 1), got {m.dropout}")
    _check(owner, m.num_classes >= 0, f"num_classes must be >= 0, got {m.num_classes}")
    _check(owner, m.cross_attn_heads >= 1, f"cross_attn_heads must be >= 1, got {m.cross_attn_heads}")
    get_activation(m.nonlinearity)


class NCSNpp(nn.Module, kw_only=True):
    """NCSN++ / DDPM++ score network.

    Call: ``apply(variables, x, noise_labels, *, class_labels=None, context=None, train=False,
    rngs={'dropout': key})`` with ``x: (B, H, W, C)`` float and ``noise_labels: (B,)`` (or a
    scalar): sigma(t) with ``embedding_type='fourier'`` (the network embeds ``log sigma`` and, with
    ``scale_by_sigma``, divides its output by sigma), a time step such as ``999 t`` or an integer
    index with ``'positional'`` (``scale_by_sigma`` then divides by ``sigmas[labels]`` of the
    decreasing table ``exp(linspace(log sigma_max, log sigma_min, num_scales))``).
    Returns ``(B, H, W, C)`` in ``x``'s dtype.

    ``centered=False`` means the data are in [0, 1] and are mapped to [-1, 1] first.
    ``num_classes > 0`` adds a class embedding (``null_label = num_classes`` is the unconditional
    token); ``cross_attn_resolutions`` adds cross-attention to ``context`` at those resolutions.
    With both off the parameter tree is exactly score_sde's.

    Defaults are score_sde's CIFAR-10 NCSN++ (``configs/ve/cifar10_ncsnpp_continuous.py``).
    """

    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    conditional: bool = True
    fir: bool = True
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    skip_rescale: bool = True
    resblock_type: str = "biggan"
    progressive: str = "none"
    progressive_input: str = "residual"
    progressive_combine: str = "sum"
    embedding_type: str = "fourier"
    fourier_scale: float = 16.0
    init_scale: float = 0.0
    scale_by_sigma: bool = True
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    num_scales: int = 1000
    centered: bool = False
    nonlinearity: str = "swish"
    num_classes: int = 0
    cross_attn_resolutions: tuple[int, ...] = ()
    cross_attn_heads: int = 1
    context_dim: int | None = None
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        owner = type(self).__name__
        for field, allowed in _CHOICES.items():
            value = getattr(self, field)
            _check(owner, value in allowed, f"{field} must be one of {allowed}, got {value!r}")
        _validate_common(self, owner)
        _check(owner, len(self.fir_kernel) >= 2, f"fir_kernel needs at least 2 taps, got {self.fir_kernel}")
        if self.embedding_type == "positional" and self.scale_by_sigma:
            _check(owner, self.num_scales >= 1, f"num_scales must be >= 1, got {self.num_scales}")
        super().__post_init__()

    @property
    def null_label(self) -> int:
        """The class label meaning "no class" (classifier-free guidance)."""
        return self.num_classes

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
        labels, context = conditioning.check_unet_inputs(self, x, noise_labels, context)
        B, _, _, channels = x.shape
        in_dtype = x.dtype
        act = get_activation(self.nonlinearity)
        name = NameCounter()
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        nf, num_resolutions = self.nf, len(self.ch_mult)
        sqrt2 = math.sqrt(2.0)

        # -- noise-level embedding (Song et al. 2021, App. H) --------------------------------
        temb: Array | None
        used_sigmas: Array | None
        if self.embedding_type == "fourier":
            used_sigmas = labels.astype(jnp.float32)
            temb = GaussianFourierProjection(
                embedding_size=nf, scale=self.fourier_scale, name=name("GaussianFourierProjection")
            )(jnp.log(used_sigmas))
        else:
            temb = timestep_embedding(labels, nf)
            used_sigmas = None
            if self.scale_by_sigma:
                table = jnp.asarray(geometric_sigmas(self.sigma_min, self.sigma_max, self.num_scales), jnp.float32)
                used_sigmas = table[labels.astype(jnp.int32)]
        if self.conditional:
            temb = nn.Dense(nf * 4, kernel_init=default_init(), name=name("Dense"), **kw)(temb)
            temb = nn.Dense(nf * 4, kernel_init=default_init(), name=name("Dense"), **kw)(act(temb))
        else:
            temb = None
        temb = conditioning.add_class_embedding(
            temb, class_labels, num_classes=self.num_classes, features=nf * 4, batch=B, owner=owner, **kw
        )

        # -- block constructors (remat wraps the heavy blocks; names stay score_sde's) ----------
        def wrap(cls):
            return nn.remat(cls) if self.remat else cls

        res_kw: dict[str, Any]
        if self.resblock_type == "ddpm":
            res_kind, res_cls = "ResnetBlockDDPMpp", wrap(ResnetBlockDDPM)
            res_kw = dict(num_groups=None)
        else:
            res_kind, res_cls = "ResnetBlockBigGANpp", wrap(ResnetBlockBigGAN)
            res_kw = dict(fir=self.fir, fir_kernel=self.fir_kernel)

        def resblock(**block_kw):
            return res_cls(
                dropout=self.dropout,
                skip_rescale=self.skip_rescale,
                init_scale=self.init_scale,
                nonlinearity=self.nonlinearity,
                deterministic=not train,
                name=name(res_kind),
                **res_kw,
                **block_kw,
                **kw,
            )

        def attn(h):
            block = wrap(AttnBlock)(
                skip_rescale=self.skip_rescale, init_scale=self.init_scale, name=name("AttnBlockpp"), **kw
            )
            return block(h)

        def cross_attn(h):
            if h.shape[1] not in self.cross_attn_resolutions:
                return h
            block = wrap(CrossAttnBlock)(
                num_heads=self.cross_attn_heads,
                skip_rescale=self.skip_rescale,
                init_scale=self.init_scale,
                name=name("CrossAttnBlock"),
                **kw,
            )
            assert context is not None  # check_unet_inputs requires it with cross_attn_resolutions
            return block(h, context.astype(self.dtype))

        def conv3x3(features, init_scale=1.0):
            return ddpm_conv(features, init_scale=init_scale, name=name("Conv"), **kw)

        def norm(h):
            return group_norm(min(h.shape[-1] // 4, 32), self.dtype, self.param_dtype, name=name("GroupNorm"))(h)

        resample_kw = dict(fir=self.fir, fir_kernel=self.fir_kernel, **kw)

        if not self.centered:
            x = 2.0 * x - 1.0  # data in [0, 1] -> [-1, 1]
        x = x.astype(self.dtype)

        # -- downsampling path ---------------------------------------------------------------
        input_pyramid = x  # the input image pyramid (used with progressive_input != "none")
        hs = [conv3x3(nf)(x)]
        for i_level in range(num_resolutions):
            for _ in range(self.num_res_blocks):
                h = resblock(out_ch=nf * self.ch_mult[i_level])(hs[-1], temb)
                if h.shape[1] in self.attn_resolutions:
                    h = attn(h)
                h = cross_attn(h)
                hs.append(h)
            if i_level != num_resolutions - 1:
                if self.resblock_type == "ddpm":
                    h = Downsample(with_conv=self.resamp_with_conv, name=name("Downsample"), **resample_kw)(hs[-1])
                else:
                    h = resblock(down=True)(hs[-1], temb)
                if self.progressive_input == "input_skip":
                    input_pyramid = Downsample(with_conv=False, name=name("Downsample"), **resample_kw)(input_pyramid)
                    h = Combine(method=self.progressive_combine, name=name("Combine"), **kw)(input_pyramid, h)
                elif self.progressive_input == "residual":
                    input_pyramid = Downsample(
                        out_ch=h.shape[-1], with_conv=True, name=name("Downsample"), **resample_kw
                    )(input_pyramid)
                    input_pyramid = (input_pyramid + h) / sqrt2 if self.skip_rescale else input_pyramid + h
                    h = input_pyramid
                hs.append(h)

        # -- middle ----------------------------------------------------------------------------
        h = hs[-1]
        h = resblock()(h, temb)
        h = attn(h)
        h = cross_attn(h)
        h = resblock()(h, temb)

        # -- upsampling path -------------------------------------------------------------------
        pyramid: Array | None = None  # the output image pyramid (progressive != "none")
        for i_level in reversed(range(num_resolutions)):
            for _ in range(self.num_res_blocks + 1):
                h = resblock(out_ch=nf * self.ch_mult[i_level])(jnp.concatenate([h, hs.pop()], axis=-1), temb)
            if h.shape[1] in self.attn_resolutions:
                h = attn(h)
            h = cross_attn(h)
            if self.progressive != "none":
                if i_level == num_resolutions - 1:
                    if self.progressive == "output_skip":
                        pyramid = conv3x3(channels, self.init_scale)(act(norm(h)))
                    else:  # residual
                        pyramid = conv3x3(h.shape[-1])(act(norm(h)))
                else:
                    assert pyramid is not None  # set at the lowest resolution, the first level up
                    if self.progressive == "output_skip":
                        pyramid = Upsample(with_conv=False, name=name("Upsample"), **resample_kw)(pyramid)
                        pyramid = pyramid + conv3x3(channels, self.init_scale)(act(norm(h)))
                    else:  # residual
                        pyramid = Upsample(out_ch=h.shape[-1], with_conv=True, name=name("Upsample"), **resample_kw)(
                            pyramid
                        )
                        pyramid = (pyramid + h) / sqrt2 if self.skip_rescale else pyramid + h
                        h = pyramid
            if i_level != 0:
                if self.resblock_type == "ddpm":
                    h = Upsample(with_conv=self.resamp_with_conv, name=name("Upsample"), **resample_kw)(h)
                else:
                    h = resblock(up=True)(h, temb)
        assert not hs

        if self.progressive == "output_skip":
            assert pyramid is not None
            h = pyramid
        else:
            h = conv3x3(channels, self.init_scale)(act(norm(h)))

        h = h.astype(jnp.float32)
        if self.scale_by_sigma:
            assert used_sigmas is not None  # set above whenever scale_by_sigma
            h = h / used_sigmas.reshape((B, 1, 1, 1))
        return h.astype(in_dtype)
