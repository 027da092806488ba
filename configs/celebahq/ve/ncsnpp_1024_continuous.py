"""diffusion-jax train --config configs/celebahq/ve/ncsnpp_1024_continuous.py --workdir runs/celebahq1024_ve_ncsnpp_continuous --config.data.folder_path=/path/to/celebahq1024

NCSN++ with the VE SDE on CelebA-HQ 1024x1024: score_sde's configs/ve/celebahq_ncsnpp_continuous.py.
Eight resolutions from 1024 to 8 with a narrow base (nf = 16, ch_mult 1, 2, 4, 8, 16, 32, 32, 32),
one residual block each, attention at 16x16, image pyramids in and out; VE SDE with
sigma_max = 1348 and N = 2000; batch 8; snr 0.15.

score_sde writes this config out in full rather than from default_lsun_configs.py; the values
are the same except those set below. Keys it leaves out (``eval.enable_sampling``,
``eval.enable_loss``, ...) come from configs/default_lsun.py here.

Data: score_sde reads CelebA-HQ from TFRecords, which need TensorFlow and are not supported here.
Put the 1024x1024 images in a folder and pass it with ``--config.data.folder_path``, as in the
command above; ``data.folder_path`` is empty here.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("../../default_lsun.py", relative_to=__file__)

    training = config.training
    training.batch_size = 8
    training.sde = "vesde"
    training.continuous = True
    training.reduce_mean = False

    sampling = config.sampling
    sampling.method = "pc"
    sampling.predictor = "reverse_diffusion"
    sampling.corrector = "langevin"
    sampling.snr = 0.15

    evaluate = config.eval
    evaluate.batch_size = 1024
    evaluate.num_samples = 50000
    evaluate.begin_ckpt = 1 * training.snapshot_freq
    evaluate.end_ckpt = 96 * training.snapshot_freq

    data = config.data
    data.dataset = "folder"
    data.folder_path = ""  # set on the command line
    data.image_size = 1024
    data.centered = False
    data.random_flip = True
    data.uniform_dequantization = False
    data.num_channels = 3

    model = config.model
    model.name = "ncsnpp"
    model.scale_by_sigma = True
    model.sigma_max = 1348.0
    model.num_scales = 2000
    model.ema_rate = 0.9999
    model.sigma_min = 0.01
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 16
    model.ch_mult = (1, 2, 4, 8, 16, 32, 32, 32)
    model.num_res_blocks = 1
    model.attn_resolutions = (16,)
    model.dropout = 0.0
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
    model.embedding_type = "fourier"
    return config
