"""diffusion-jax train --config configs/digits/ddpmpp_vp.py --workdir runs/digits

Small DDPM++ on the embedded 8x8 digits (17 grey levels), VP SDE, continuous time.
"""

from diffusion_jax.builders.config import default_config


def get_config():
    config = default_config()
    training = config.training
    training.sde = "vpsde"
    training.continuous = True
    training.reduce_mean = True
    training.batch_size = 128
    training.n_iters = 3000
    training.log_freq = 100
    training.eval_freq = 500
    training.snapshot_freq = 1000
    training.snapshot_freq_for_preemption = 500
    training.n_jitted_steps = 10

    sampling = config.sampling
    sampling.method = "dpmpp_2m"
    sampling.num_steps = 20

    data = config.data
    data.dataset = "digits"
    data.image_size = 8
    data.num_channels = 1
    data.centered = True
    data.random_flip = False

    model = config.model
    model.name = "ncsnpp"
    model.scale_by_sigma = False
    model.ema_rate = 0.999
    model.nf = 32
    model.ch_mult = (1, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (4,)
    model.dropout = 0.0
    model.fir = False
    model.resblock_type = "biggan"
    model.progressive = "none"
    model.progressive_input = "none"
    model.embedding_type = "positional"
    model.init_scale = 0.0

    config.optim.lr = 2e-3
    config.optim.warmup = 200
    config.eval.batch_size = 300
    return config
