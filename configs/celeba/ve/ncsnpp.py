"""diffusion-jax train --config configs/celeba/ve/ncsnpp.py --workdir runs/celeba_ve_ncsnpp

NCSN++ on CelebA 64x64 trained with SMLD's discrete objective: score_sde's
configs/ve/celeba_ncsnpp.py. The CIFAR-10 NCSN++ network (configs/cifar10/ve/ncsnpp.py: four
resolutions, 4 residual blocks, attention at 16x16, sinusoidal embedding of the noise-level
index) with CelebA's VE noise scales (sigma_max = 90, N = 1000) and snr 0.17.

score_sde's stray ``model.sigma_begin = 90`` (read by no code; sigma_max is already 90) is left
out.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("../../default_celeba.py", relative_to=__file__)

    training = config.training
    training.sde = "vesde"
    training.continuous = False

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
    model.conv_size = 3
    model.embedding_type = "positional"
    return config
