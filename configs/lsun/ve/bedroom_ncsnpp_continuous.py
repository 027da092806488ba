"""diffusion-jax train --config configs/lsun/ve/bedroom_ncsnpp_continuous.py --workdir runs/lsun_bedroom_ve_ncsnpp_continuous

NCSN++ with the VE SDE on LSUN bedroom 256x256: score_sde's configs/ve/bedroom_ncsnpp_continuous.py.
The 256x256 NCSN++: seven resolutions (ch_mult 1, 1, 2, 2, 2, 2, 2), two residual blocks each,
attention at 16x16, output and input image pyramids (progressive = output_skip, progressive_input
= input_skip). VE SDE with sigma_max = 378 and N = 2000; PC sampling with reverse diffusion and
Langevin (snr 0.075). LSUN is read through TFDS (``lsun/bedroom``), centre-cropped and resized.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("../../default_lsun.py", relative_to=__file__)

    training = config.training
    training.sde = "vesde"
    training.continuous = True

    sampling = config.sampling
    sampling.method = "pc"
    sampling.predictor = "reverse_diffusion"
    sampling.corrector = "langevin"

    config.data.category = "bedroom"

    model = config.model
    model.name = "ncsnpp"
    model.scale_by_sigma = True
    model.ema_rate = 0.999
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 128
    model.ch_mult = (1, 1, 2, 2, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = True
    model.fir_kernel = (1, 3, 3, 1)
    model.skip_rescale = True
    model.resblock_type = "biggan"
    model.progressive = "output_skip"
    model.progressive_input = "input_skip"
    model.progressive_combine = "sum"
    model.attention_type = "ddpm"
    model.init_scale = 0.0
    model.fourier_scale = 16.0
    model.conv_size = 3
    return config
