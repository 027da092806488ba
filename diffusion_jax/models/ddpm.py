"""The DDPM U-Net (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", App. B), as used by
score_sde (``models/ddpm.py``): a PixelCNN++-style U-Net of wide ResNet blocks with GroupNorm(32),
self-attention at chosen resolutions and a sinusoidal time-step embedding.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import conditioning
from diffusion_jax.models.layers import (
    AttnBlock,
    CrossAttnBlock,
    Downsample,
    NameCounter,
    ResnetBlockDDPM,
    Upsample,
    ddpm_conv,
    default_init,
    geometric_sigmas,
    get_activation,
    group_norm,
    timestep_embedding,
)
from diffusion_jax.models.ncsnpp import _check, _validate_common

Array = jax.Array
Dtype = Any

__all__ = ["DDPM"]


class DDPM(nn.Module, kw_only=True):
    """DDPM score network.

    Call: ``apply(variables, x, noise_labels, *, class_labels=None, context=None, train=False,
    rngs={'dropout': key})``. ``noise_labels: (B,)`` are DDPM time steps: ``999 t`` for VP
    continuous training or the integer step index for discrete training. With ``scale_by_sigma``
    the output is divided by ``sigmas[labels]`` of the decreasing table
    ``exp(linspace(log sigma_max, log sigma_min, num_scales))`` (integer labels only).
    ``conditional=False`` drops the time embedding altogether (the network ignores the labels).
    Class labels and cross-attention work as in :class:`~diffusion_jax.models.NCSNpp`.

    Defaults are score_sde's CIFAR-10 DDPM (``configs/vp/ddpm/cifar10.py``).
    """

    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    conditional: bool = True
    centered: bool = True
    scale_by_sigma: bool = False
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    num_scales: int = 1000
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
        _validate_common(self, owner)
        # GroupNorm(32) everywhere, as in DDPM.
        for mult in (1,) + tuple(self.ch_mult):
            _check(
                owner,
                (self.nf * mult) % 32 == 0,
                f"nf * ch_mult must be divisible by 32 (GroupNorm(32)), got nf={self.nf}, ch_mult={self.ch_mult}",
            )
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

        if self.conditional:
            temb = timestep_embedding(labels, nf)
            temb = nn.Dense(nf * 4, kernel_init=default_init(), name=name("Dense"), **kw)(temb)
            temb = nn.Dense(nf * 4, kernel_init=default_init(), name=name("Dense"), **kw)(act(temb))
        else:
            temb = None
        temb = conditioning.add_class_embedding(
            temb, class_labels, num_classes=self.num_classes, features=nf * 4, batch=B, owner=owner, **kw
        )

        wrap = (lambda cls: nn.remat(cls)) if self.remat else (lambda cls: cls)

        def resblock(out_ch=None):
            return wrap(ResnetBlockDDPM)(
                out_ch=out_ch,
                num_groups=32,
                dropout=self.dropout,
                skip_rescale=False,
                init_scale=0.0,
                nonlinearity=self.nonlinearity,
                deterministic=not train,
                name=name("ResnetBlockDDPM"),
                **kw,
            )

        def attn(h):
            return wrap(AttnBlock)(num_groups=32, name=name("AttnBlock"), **kw)(h)

        def cross_attn(h):
            if h.shape[1] not in self.cross_attn_resolutions:
                return h
            block = wrap(CrossAttnBlock)(num_heads=self.cross_attn_heads, name=name("CrossAttnBlock"), **kw)
            assert context is not None  # check_unet_inputs requires it with cross_attn_resolutions
            return block(h, context.astype(self.dtype))

        h = x if self.centered else 2.0 * x - 1.0  # data in [0, 1] -> [-1, 1]
        h = h.astype(self.dtype)

        hs = [ddpm_conv(nf, name=name("Conv"), **kw)(h)]
        for i_level in range(num_resolutions):
            for _ in range(self.num_res_blocks):
                h = resblock(nf * self.ch_mult[i_level])(hs[-1], temb)
                if h.shape[1] in self.attn_resolutions:
                    h = attn(h)
                h = cross_attn(h)
                hs.append(h)
            if i_level != num_resolutions - 1:
                hs.append(Downsample(with_conv=self.resamp_with_conv, name=name("Downsample"), **kw)(hs[-1]))

        h = hs[-1]
        h = resblock()(h, temb)
        h = attn(h)
        h = cross_attn(h)
        h = resblock()(h, temb)

        for i_level in reversed(range(num_resolutions)):
            for _ in range(self.num_res_blocks + 1):
                h = resblock(nf * self.ch_mult[i_level])(jnp.concatenate([h, hs.pop()], axis=-1), temb)
            if h.shape[1] in self.attn_resolutions:
                h = attn(h)
            h = cross_attn(h)
            if i_level != 0:
                h = Upsample(with_conv=self.resamp_with_conv, name=name("Upsample"), **kw)(h)
        assert not hs

        h = act(group_norm(32, self.dtype, self.param_dtype, name=name("GroupNorm"))(h))
        h = ddpm_conv(channels, init_scale=0.0, name=name("Conv"), **kw)(h)
        h = h.astype(jnp.float32)
        if self.scale_by_sigma:
            # Divide by sigma (useful with the NCSN loss); needs integer labels (score_sde).
            table = jnp.asarray(geometric_sigmas(self.sigma_min, self.sigma_max, self.num_scales), jnp.float32)
            h = h / table[labels.astype(jnp.int32)].reshape((B, 1, 1, 1))
        return h.astype(in_dtype)
