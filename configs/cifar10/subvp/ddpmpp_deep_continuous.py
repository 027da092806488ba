"""diffusion-jax train --config configs/cifar10/subvp/ddpmpp_deep_continuous.py --workdir runs/cifar10_subvp_ddpmpp_deep_continuous

DDPM++ deep (continuous time) with the sub-VP SDE: score_sde's
configs/subvp/cifar10_ddpmpp_deep_continuous.py. Identical to
configs/cifar10/vp/ddpmpp_deep_continuous.py except for the SDE.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("../vp/ddpmpp_deep_continuous.py", relative_to=__file__)
    config.training.sde = "subvpsde"
    return config
