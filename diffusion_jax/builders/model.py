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

__all__ = ["build_model", "model_input_shape", "caption_tokenizer"]

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


def _build_classifier(config: Any, cls: Any) -> nn.Module:
    m, image_size = config.model, config.data.image_size
    if image_size % (2 ** (len(m.ch_mult) - 1)):
        raise ValueError(
            f"config.data.image_size={image_size} must be divisible by 2**(len(config.model.ch_mult) - 1) = "
            f"{2 ** (len(m.ch_mult) - 1)}"
        )
    if m.num_classes < 2:
        raise ValueError(f"config.model.num_classes = {m.num_classes}: a classifier needs at least 2 classes")
    return cls(
        num_classes=m.num_classes,
        nf=m.nf,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        dropout=float(m.dropout),
        nonlinearity=m.nonlinearity.lower(),
        embedding_type=m.embedding_type.lower(),
        fourier_scale=float(m.fourier_scale),
    )


_DIT_SIZE_KEYS = ("patch_size", "hidden_size", "depth", "num_heads")


def _build_dit(config: Any, cls: Any) -> nn.Module:
    """DiT (docs/dit.md): its size from ``model.dit_preset`` or the four size keys, the image from
    ``config.data``, class conditioning with a null class as the U-Nets' (``model.num_classes``)."""
    from diffusion_jax.models.dit import DIT_PRESETS

    m = config.model
    explicit = {k: m[k] for k in _DIT_SIZE_KEYS if m[k] is not None}
    if m.dit_preset:
        clash = sorted(explicit)
        if clash:
            raise ValueError(
                f"config.model.dit_preset = {m.dit_preset!r} sets {', '.join(_DIT_SIZE_KEYS)}; leave "
                f"config.model.{{{', '.join(clash)}}} at None, or set dit_preset = '' and all four keys"
            )
        sizes = dict(DIT_PRESETS[m.dit_preset])
    else:
        missing = [k for k in _DIT_SIZE_KEYS if k not in explicit]
        if missing:
            raise ValueError(
                f"config.model.name = 'dit' needs config.model.dit_preset (one of {', '.join(DIT_PRESETS)}) or "
                f"all of config.model.{{{', '.join(_DIT_SIZE_KEYS)}}}; missing {', '.join(missing)}"
            )
        sizes = explicit
    if m.dropout:
        raise ValueError(f"config.model.dropout = {m.dropout}: DiT has no dropout; set it to 0")
    if m.cross_attn_resolutions or m.context_dim is not None:
        raise ValueError("config.model.cross_attn_resolutions / context_dim: DiT has no cross-attention")
    if config.training.sde.lower() == "vesde" and not m.output:
        # score_sde's VE convention has the network output the score, divided by sigma inside
        # the network (scale_by_sigma); DiT has no such output scaling.
        raise ValueError(
            "training.sde = 'vesde' with score_sde's convention needs a network that divides its output by "
            "sigma, which DiT does not: set config.model.output and config.model.noise_cond (e.g. 'eps' and "
            "'sigma'), or use EDM's preconditioning"
        )
    try:
        return cls(
            input_size=config.data.image_size,
            in_channels=config.data.num_channels,
            mlp_ratio=float(m.mlp_ratio),
            num_classes=m.num_classes,
            null_class=True,
            learn_sigma=m.learn_sigma,
            remat=m.remat,
            dtype=_DTYPES[m.dtype],
            **sizes,
        )
    except ValueError as e:
        raise ValueError(f"config.model (DiT {sizes}): {e}") from None


# config.model.name -> builder (the model class comes from diffusion_jax.models.MODELS).
_BUILDERS = {
    "ncsnpp": _build_ncsnpp,
    "ddpm": _build_ddpm,
    "ncsnv2_64": _build_ncsnv2,
    "ncsnv2_128": _build_ncsnv2,
    "ncsnv2_256": _build_ncsnv2,
    "classifier": _build_classifier,
    "dit": _build_dit,
}


def build_model(config: Any) -> nn.Module:
    """The Flax module described by ``config.model`` and ``config.data`` (a ValueError names the
    key of a combination the network cannot build)."""
    config = with_defaults(config)
    name = config.model.name
    if not isinstance(name, str) or name.lower() not in _BUILDERS:
        raise ValueError(f"config.model.name: unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    module = _BUILDERS[name.lower()](config, MODELS[name.lower()])
    if config.model.text_encoder != "none":
        module = _TEXT_ENCODERS[config.model.text_encoder](config, module)
    return module


def caption_tokenizer(name: str):
    """The closed-vocabulary tokenizer of the captioner ``name`` (``data.captions``): the one
    `encode` writes the captions with and text-conditioned networks read them with."""
    from diffusion_jax.data.captions import CAPTIONERS  # noqa: PLC0415
    from diffusion_jax.models.tokenizer import WordTokenizer  # noqa: PLC0415

    if name not in CAPTIONERS:
        raise ValueError(f"data.captions = {name!r}: no such captioner; valid: {', '.join(CAPTIONERS)}")
    captioner = CAPTIONERS[name]
    return WordTokenizer(captioner.vocabulary, max_length=captioner.max_words + 2)


def _text_conditioned(config: Any, network: nn.Module) -> nn.Module:
    """``network`` reading token ids of ``data.captions`` through a small text transformer of
    width ``model.context_dim`` trained with it (``model.text_encoder = 'tiny'``)."""
    from diffusion_jax.models.text import tiny_text_encoder  # noqa: PLC0415
    from diffusion_jax.models.text_conditioned import TextConditioned  # noqa: PLC0415

    tok = caption_tokenizer(config.data.captions)
    encoder = tiny_text_encoder(
        tok.vocab_size, tok.max_length, eos_token_id=tok.eos_id, hidden_size=config.model.context_dim
    )
    return TextConditioned(
        network=network,
        encoder=encoder,
        caption_dropout=config.training.caption_dropout,
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
    )


def _embedding_conditioned(config: Any, network: nn.Module) -> nn.Module:
    """``network`` reading caption embeddings of width ``model.context_dim`` precomputed by a frozen
    text encoder and stored with the latent data set (``model.text_encoder = 'precomputed'``)."""
    from diffusion_jax.models.text_conditioned import EmbeddingConditioned  # noqa: PLC0415

    return EmbeddingConditioned(
        network=network, context_dim=config.model.context_dim, caption_dropout=config.training.caption_dropout
    )


# config.model.text_encoder -> the wrapper that conditions the network on the captions.
_TEXT_ENCODERS = {"tiny": _text_conditioned, "precomputed": _embedding_conditioned}


def model_input_shape(config: Any, batch_size: int = 1) -> tuple[int, int, int, int]:
    """``(batch_size, image_size, image_size, num_channels)`` from ``config.data``."""
    data = with_defaults(config).data
    return (batch_size, data.image_size, data.image_size, data.num_channels)
