"""diffusion-jax train --config configs/cifar10/vp/ncsnpp_deep_continuous.py --workdir runs/cifar10_vp_ncsnpp_deep_continuous

NCSN++ deep under the VP SDE: score_sde's configs/vp/cifar10_ncsnpp_deep_continuous.py.
8 residual blocks per resolution, 950k steps.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("ncsnpp_continuous.py", relative_to=__file__)
    config.training.n_iters = 950001
    config.model.num_res_blocks = 8
    return config
