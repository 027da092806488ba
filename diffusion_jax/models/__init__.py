"""Score networks: NCSN++ / DDPM++, the DDPM U-Net and NCSNv2 (score_sde's architectures).

Every network is a Flax linen module with typed fields, called as

    out = module.apply(variables, x, noise_labels, *, class_labels=None, context=None,
                       train=False, rngs={'dropout': key})

with ``x`` NHWC and ``out`` of the same shape and dtype. ``noise_labels`` are what score_sde fed
its networks (sigma(t) for VE continuous, ``999 t`` for VP continuous, the integer step for
discrete training). Build one from a config with :func:`diffusion_jax.builders.model.build_model`.
"""

from __future__ import annotations

import flax.linen as nn

from diffusion_jax.models.ddpm import DDPM
from diffusion_jax.models.ncsnpp import NCSNpp
from diffusion_jax.models.ncsnv2 import NCSNv2, NCSNv2_128, NCSNv2_256

__all__ = ["NCSNpp", "DDPM", "NCSNv2", "NCSNv2_128", "NCSNv2_256", "MODELS", "get_model"]

# score_sde's model names (``config.model.name``) -> module class.
MODELS: dict[str, type[nn.Module]] = {
    "ncsnpp": NCSNpp,
    "ddpm": DDPM,
    "ncsnv2_64": NCSNv2,
    "ncsnv2_128": NCSNv2_128,
    "ncsnv2_256": NCSNv2_256,
}


def get_model(name: str, **kwargs) -> nn.Module:
    """Builds a named network from keyword hyperparameters; unknown names list the valid ones."""
    key = name.lower()
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    return MODELS[key](**kwargs)
