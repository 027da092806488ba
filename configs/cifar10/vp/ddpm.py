"""diffusion-jax train --config configs/cifar10/vp/ddpm.py --workdir runs/cifar10_vp_ddpm

DDPM (Ho et al. 2020) reproduced in score_sde: configs/vp/ddpm/cifar10.py. The discrete VP
objective (N = 1000, beta from 1e-4 to 0.02, i.e. beta_min = 0.1 and beta_max = 20 over unit
time), the original U-Net (35,218,947 parameters), ancestral sampling.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("../../default_cifar10.py", relative_to=__file__)

    training = config.training
    training.sde = "vpsde"
    training.continuous = False
    training.reduce_mean = True

    sampling = config.sampling
    sampling.method = "pc"
    sampling.predictor = "ancestral"
    sampling.corrector = "none"

    config.data.centered = True

    model = config.model
    model.name = "ddpm"
    model.scale_by_sigma = False
    model.ema_rate = 0.9999
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    return config
