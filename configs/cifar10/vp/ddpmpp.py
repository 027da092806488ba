"""diffusion-jax train --config configs/cifar10/vp/ddpmpp.py --workdir runs/cifar10_vp_ddpmpp

DDPM++ trained with DDPM's discrete objective (``training.continuous = False``: N = 1000 steps,
integer time labels): score_sde's configs/vp/cifar10_ddpmpp.py. Sampled with DDPM's ancestral
sampler (score_sde's ``ancestral_sampling`` predictor), no corrector.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("ddpmpp_continuous.py", relative_to=__file__)
    config.training.continuous = False
    config.sampling.predictor = "ancestral"
    return config
