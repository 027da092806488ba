"""Builds a score network from a config: the only model code that reads a config.

Reads ``config.model.*`` (score_sde's key names) and ``config.data.{image_size, num_channels,
centered}``. Types, defaults and single-key checks live in the schema
(:mod:`diffusion_jax.builders.config`); what is checked here is what only the network knows, such as
which resolutions a U-Net reaches. A partial config (e.g. score_sde's ``model`` and ``data``
sections alone) takes the schema's defaults for the rest.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.builders.config import with_defaults
from diffusion_jax.models import MODELS

__all__ = ["build_model", "model_input_shape"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _reachable_check(key: str, values: tuple[int, ...], reachable: list[int]) -> None:
    bad = [r for r in values if r not in reachable]
    if bad:
        raise ValueError(f"config.model.{key} = {tuple(values)}: resolutions must be among the network's {reachable}")


def _conditioning(m: Any, reachable: list[int]) -> dict[str, Any]:
    cross = tuple(m.cross_attn_resolutions)
    _reachable_check("cross_attn_resolutions", cross, reachable)
    return dict(
        num_classes=m.num_classes,
        cross_attn_resolutions=cross,
        cross_attn_heads=m.cross_attn_heads,
        context_dim=m.context_dim,
        remat=m.remat,
        dtype=_DTYPES[m.dtype],
    )


def _unet_common(config: Any) -> tuple[dict[str, Any], list[int]]:
    m, image_size = config.model, config.data.image_size
    ch_mult = tuple(m.ch_mult)
    levels = len(ch_mult)
    if image_size % (2 ** (levels - 1)):
        raise ValueError(
            f"config.data.image_size={image_size} must be divisible by 2**(len(config.model.ch_mult) - 1) = "
            f"{2 ** (levels - 1)}"
        )
    if m.normalization.lower() != "groupnorm":
        raise ValueError(f"config.model.normalization = {m.normalization!r}: the U-Nets use 'GroupNorm'")
    reachable = [image_size // 2**i for i in range(levels)]
    _reachable_check("attn_resolutions", tuple(m.attn_resolutions), reachable)
    common = dict(
        nf=m.nf,
        ch_mult=ch_mult,
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        dropout=float(m.dropout),
        resamp_with_conv=m.resamp_with_conv,
        conditional=m.conditional,
        scale_by_sigma=m.scale_by_sigma,
        sigma_min=float(m.sigma_min),
        sigma_max=float(m.sigma_max),
        num_scales=m.num_scales,
        nonlinearity=m.nonlinearity.lower(),
        centered=config.data.centered,
    )
    return common, reachable


def _build_ncsnpp(config: Any, cls: type[nn.Module]) -> nn.Module:
    m = config.model
    common, reachable = _unet_common(config)
    if not m.fir_kernel or sum(m.fir_kernel) == 0:
        raise ValueError(f"config.model.fir_kernel = {tuple(m.fir_kernel)}: FIR taps need a non-zero sum")
    return cls(
        **common,
        fir=m.fir,
        fir_kernel=tuple(m.fir_kernel),
        skip_rescale=m.skip_rescale,
        resblock_type=m.resblock_type.lower(),
        progressive=m.progressive.lower(),
        progressive_input=m.progressive_input.lower(),
        progressive_combine=m.progressive_combine.lower(),
        embedding_type=m.embedding_type.lower(),
        fourier_scale=float(m.fourier_scale),
        init_scale=float(m.init_scale),
        **_conditioning(m, reachable),
    )


def _build_ddpm(config: Any, cls: type[nn.Module]) -> nn.Module:
    common, reachable = _unet_common(config)
    for mult in (1, *common["ch_mult"]):
        if (common["nf"] * mult) % 32:
            raise ValueError(
                f"config.model.nf = {common['nf']}: DDPM uses GroupNorm(32), so nf times every ch_mult must be "
                "divisible by 32"
            )
    return cls(**common, **_conditioning(config.model, reachable))


def _build_ncsnv2(config: Any, cls: Any) -> nn.Module:
    m, image_size = config.model, config.data.image_size
    downsamplings = sum(
        1 for _, blocks in cls.STAGES for _, resample, dilation in blocks if resample == "down" and dilation == 1
    )
    if image_size % (2**downsamplings):
        raise ValueError(
            f"config.data.image_size={image_size} must be divisible by {2**downsamplings} for {cls.__name__}"
        )
    if m.normalization.lower() != "instancenorm++":
        raise ValueError(f"config.model.normalization = {m.normalization!r}: NCSNv2 uses 'InstanceNorm++'")
    if m.num_classes:
        raise ValueError("config.model.num_classes must be 0: NCSNv2 has no class conditioning")
    if m.cross_attn_resolutions:
        raise ValueError("config.model.cross_attn_resolutions must be (): NCSNv2 has no cross-attention")
    return cls(
        nf=m.nf,
        centered=config.data.centered,
        nonlinearity=m.nonlinearity.lower(),
        interpolation=m.interpolation,
        scale_by_sigma=m.scale_by_sigma,
        sigma_min=float(m.sigma_min),
        sigma_max=float(m.sigma_max),
        num_scales=m.num_scales,
        remat=m.remat,
        dtype=_DTYPES[m.dtype],
    )


# config.model.name -> builder (the model class comes from diffusion_jax.models.MODELS).
_BUILDERS = {
    "ncsnpp": _build_ncsnpp,
    "ddpm": _build_ddpm,
    "ncsnv2_64": _build_ncsnv2,
    "ncsnv2_128": _build_ncsnv2,
    "ncsnv2_256": _build_ncsnv2,
}


def build_model(config: Any) -> nn.Module:
    """The Flax module described by ``config.model`` and ``config.data`` (a ValueError names the
    key of a combination the network cannot build)."""
    config = with_defaults(config)
    name = config.model.name
    if not isinstance(name, str) or name.lower() not in _BUILDERS:
        raise ValueError(f"config.model.name: unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    return _BUILDERS[name.lower()](config, MODELS[name.lower()])


def model_input_shape(config: Any, batch_size: int = 1) -> tuple[int, int, int, int]:
    """``(batch_size, image_size, image_size, num_channels)`` from ``config.data``."""
    data = with_defaults(config).data
    return (batch_size, data.image_size, data.image_size, data.num_channels)
