"""diffusion-jax train --config configs/cifar10/ve/ncsnpp_deep_continuous.py --workdir runs/cifar10_ve_ncsnpp_deep_continuous

NCSN++ deep (8 residual blocks per resolution instead of 4) with the VE SDE: score_sde's
configs/ve/cifar10_ncsnpp_deep_continuous.py (Song et al. 2021). 107,587,075 parameters.
Trained for 950k steps instead of 1.3M.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("ncsnpp_continuous.py", relative_to=__file__)
    config.training.n_iters = 950001
    config.model.num_res_blocks = 8
    return config
