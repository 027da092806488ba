"""diffusion-jax train --config configs/mnist/ddpmpp_continuous.py --workdir runs/mnist_ddpmpp_continuous

A small DDPM++ with the VP SDE on MNIST 28x28x1: a quick, cheap experiment, not one of
score_sde's (its settings are ours, chosen for a single accelerator and a short run).

Network: score_sde's DDPM++ scaled down: nf = 64, three resolutions 28, 14, 7 (ch_mult 1, 2, 2),
2 residual blocks per resolution, attention at 14x14; 6,987,585 parameters. Training: VP SDE in
continuous time, eps prediction, batch 128 for 100k steps, EMA 0.9999. No flips (digits are not
mirror-symmetric). Sampling: PC with Euler-Maruyama over the SDE's 1000 steps.
"""

from diffusion_jax.builders.config import default_config


def get_config():
    config = default_config()
    config.seed = 42

    training = config.training
    training.sde = "vpsde"
    training.continuous = True
    training.reduce_mean = True
    training.batch_size = 128
    training.n_iters = 100001
    training.snapshot_freq = 10000
    training.snapshot_freq_for_preemption = 5000
    training.eval_freq = 500
    training.n_jitted_steps = 5

    sampling = config.sampling
    sampling.method = "pc"
    sampling.predictor = "euler_maruyama"
    sampling.corrector = "none"
    sampling.num_steps = 0  # the SDE's N
    sampling.grid = "score_sde"

    evaluate = config.eval
    evaluate.begin_ckpt = 0
    evaluate.end_ckpt = -1
    evaluate.batch_size = 1024

    data = config.data
    data.dataset = "mnist"
    data.image_size = 28
    data.num_channels = 1
    data.random_flip = False
    data.centered = True
    data.uniform_dequantization = False

    model = config.model
    model.name = "ncsnpp"
    model.beta_min = 0.1
    model.beta_max = 20.0
    model.num_scales = 1000
    model.scale_by_sigma = False
    model.ema_rate = 0.9999
    model.dropout = 0.1
    model.nf = 64
    model.ch_mult = (1, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (14,)
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = False
    model.skip_rescale = True
    model.resblock_type = "biggan"
    model.progressive = "none"
    model.progressive_input = "none"
    model.progressive_combine = "sum"
    model.attention_type = "ddpm"
    model.init_scale = 0.0
    model.embedding_type = "positional"
    model.conv_size = 3

    optim = config.optim
    optim.optimizer = "Adam"
    optim.lr = 2e-4
    optim.warmup = 1000
    optim.grad_clip = 1.0
    return config
