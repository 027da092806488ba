"""diffusion-jax train --config configs/cifar10/vp/ddpm_continuous.py --workdir runs/cifar10_vp_ddpm_continuous

The DDPM network trained with the continuous-time VP SDE: score_sde's
configs/vp/ddpm/cifar10_continuous.py. Sampled with Euler-Maruyama, no corrector.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("ddpm.py", relative_to=__file__)
    config.training.continuous = True
    config.sampling.predictor = "euler_maruyama"
    return config
