"""diffusion-jax train --config configs/cifar10/vp/ncsnpp.py --workdir runs/cifar10_vp_ncsnpp

NCSN++ trained with DDPM's discrete objective: score_sde's configs/vp/cifar10_ncsnpp.py.
Sampled with the reverse-diffusion predictor, no corrector.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("ncsnpp_continuous.py", relative_to=__file__)
    config.training.continuous = False
    config.sampling.predictor = "reverse_diffusion"
    return config
