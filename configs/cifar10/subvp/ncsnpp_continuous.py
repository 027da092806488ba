"""diffusion-jax train --config configs/cifar10/subvp/ncsnpp_continuous.py --workdir runs/cifar10_subvp_ncsnpp_continuous

NCSN++ (continuous time, DDPM++'s embedding and eps prediction) with the sub-VP SDE: score_sde's
configs/subvp/cifar10_ncsnpp_continuous.py. Identical to configs/cifar10/vp/ncsnpp_continuous.py
except for the SDE.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("../vp/ncsnpp_continuous.py", relative_to=__file__)
    config.training.sde = "subvpsde"
    return config
