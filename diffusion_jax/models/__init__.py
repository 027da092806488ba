"""Score networks: NCSN++ / DDPM++, the DDPM U-Net and NCSNv2 (score_sde's architectures), and DiT.

Every network is a Flax linen module with typed fields, called as

    out = module.apply(variables, x, noise_labels, *, class_labels=None, context=None,
                       train=False, rngs={'dropout': key})

with ``x`` NHWC and ``out`` of the same shape and dtype. ``noise_labels`` are what score_sde fed
its networks (sigma(t) for VE continuous, ``999 t`` for VP continuous, the integer step for
discrete training). Build one from a config with :func:`diffusion_jax.builders.model.build_model`.

The networks around latent diffusion are exported here too, outside the score-network registry
:data:`MODELS`: :class:`AutoencoderKL` (Stable Diffusion's VAE), :class:`TextTransformer` (CLIP's
text transformer, and :func:`tiny_text_encoder`) and their tokenizers (docs/latent.md).
"""

from __future__ import annotations

import flax.linen as nn

from diffusion_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian, load_autoencoder_kl
from diffusion_jax.models.classifier import NoiseConditionalClassifier
from diffusion_jax.models.ddpm import DDPM
from diffusion_jax.models.dit import DiT
from diffusion_jax.models.ncsnpp import NCSNpp
from diffusion_jax.models.ncsnv2 import NCSNv2, NCSNv2_128, NCSNv2_256
from diffusion_jax.models.text import TextTransformer, load_clip_text, tiny_text_encoder
from diffusion_jax.models.tokenizer import CLIPTokenizer, TokenizerError, WordTokenizer

__all__ = [
    "NCSNpp",
    "DDPM",
    "NCSNv2",
    "NCSNv2_128",
    "NCSNv2_256",
    "DiT",
    "NoiseConditionalClassifier",
    "MODELS",
    "get_model",
    "AutoencoderKL",
    "DiagonalGaussian",
    "load_autoencoder_kl",
    "TextTransformer",
    "tiny_text_encoder",
    "load_clip_text",
    "CLIPTokenizer",
    "WordTokenizer",
    "TokenizerError",
]

# score_sde's model names (``config.model.name``) -> module class.
MODELS: dict[str, type[nn.Module]] = {
    "ncsnpp": NCSNpp,
    "ddpm": DDPM,
    "ncsnv2_64": NCSNv2,
    "ncsnv2_128": NCSNv2_128,
    "ncsnv2_256": NCSNv2_256,
    # Diffusion transformer (Peebles & Xie 2023); its size comes from model.dit_preset or the
    # explicit size keys (docs/dit.md).
    "dit": DiT,
    # Not a score network: the noise-conditional classifier of classifier guidance, trained with
    # training.task = "classifier" (its logits, not a score, come out).
    "classifier": NoiseConditionalClassifier,
}


def get_model(name: str, **kwargs) -> nn.Module:
    """Builds a named network from keyword hyperparameters; unknown names list the valid ones."""
    key = name.lower()
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    return MODELS[key](**kwargs)
