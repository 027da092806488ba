"""diffusion-jax train --config configs/cifar10/vp/ddpmpp_deep_continuous.py --workdir runs/cifar10_vp_ddpmpp_deep_continuous

DDPM++ deep (8 residual blocks per resolution instead of 4) with the VP SDE: score_sde's
configs/vp/cifar10_ddpmpp_deep_continuous.py. 106,632,579 parameters. Trained for 950k steps.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("ddpmpp_continuous.py", relative_to=__file__)
    config.training.n_iters = 950001
    config.model.num_res_blocks = 8
    return config
