"""diffusion-jax train --config configs/cifar10/ve/ddpm.py --workdir runs/cifar10_ve_ddpm

The original DDPM network (Ho et al. 2020) trained with SMLD's discrete VE objective:
score_sde's configs/ve/cifar10_ddpm.py. Unlike configs/cifar10/vp/ddpm.py the output is divided
by sigma (``scale_by_sigma``), the data stay in [0, 1] and the EMA rate is 0.999.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("../../default_cifar10.py", relative_to=__file__)

    training = config.training
    training.sde = "vesde"
    training.continuous = False

    sampling = config.sampling
    sampling.method = "pc"
    sampling.predictor = "reverse_diffusion"
    sampling.corrector = "langevin"

    model = config.model
    model.name = "ddpm"
    model.scale_by_sigma = True
    model.ema_rate = 0.999
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    model.conv_size = 3
    return config
