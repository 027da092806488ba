"""diffusion-jax train --config configs/cifar10/ve/ncsnpp_continuous.py --workdir runs/cifar10_ve_ncsnpp_continuous

NCSN++ with the VE SDE, continuous time: score_sde's configs/ve/cifar10_ncsnpp_continuous.py
(Song et al. 2021). 62,758,915 parameters (the fixed Gaussian Fourier projection included).

Sampling: PC with the reverse-diffusion predictor and one Langevin corrector step per noise
level (snr 0.16), N = 1000 steps.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("../../default_cifar10.py", relative_to=__file__)

    training = config.training
    training.sde = "vesde"
    training.continuous = True

    sampling = config.sampling
    sampling.method = "pc"
    sampling.predictor = "reverse_diffusion"
    sampling.corrector = "langevin"

    model = config.model
    model.name = "ncsnpp"
    model.scale_by_sigma = True
    model.ema_rate = 0.999
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 4
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = True
    model.fir_kernel = (1, 3, 3, 1)
    model.skip_rescale = True
    model.resblock_type = "biggan"
    model.progressive = "none"
    model.progressive_input = "residual"
    model.progressive_combine = "sum"
    model.attention_type = "ddpm"
    model.init_scale = 0.0
    model.fourier_scale = 16.0
    model.conv_size = 3
    return config
