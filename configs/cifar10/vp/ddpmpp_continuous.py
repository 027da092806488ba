"""diffusion-jax train --config configs/cifar10/vp/ddpmpp_continuous.py --workdir runs/cifar10_vp_ddpmpp_continuous

DDPM++ with the VP SDE, continuous time: score_sde's configs/vp/cifar10_ddpmpp_continuous.py
(Song et al. 2021). 61,804,419 parameters. DDPM++ is the NCSN++ code path with DDPM's choices:
sinusoidal embedding of 999 t, no FIR resampling, no input pyramid, no division by sigma (the
network predicts the noise); data centred to [-1, 1]; loss averaged over pixels.

Sampling: PC with the Euler-Maruyama predictor and no corrector, N = 1000 steps.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("../../default_cifar10.py", relative_to=__file__)

    training = config.training
    training.sde = "vpsde"
    training.continuous = True
    training.reduce_mean = True

    sampling = config.sampling
    sampling.method = "pc"
    sampling.predictor = "euler_maruyama"
    sampling.corrector = "none"

    config.data.centered = True

    model = config.model
    model.name = "ncsnpp"
    model.scale_by_sigma = False
    model.ema_rate = 0.9999
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 4
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = False
    model.fir_kernel = (1, 3, 3, 1)
    model.skip_rescale = True
    model.resblock_type = "biggan"
    model.progressive = "none"
    model.progressive_input = "none"
    model.progressive_combine = "sum"
    model.attention_type = "ddpm"
    model.init_scale = 0.0
    model.embedding_type = "positional"
    model.fourier_scale = 16.0
    model.conv_size = 3
    return config
