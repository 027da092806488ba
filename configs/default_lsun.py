"""Base config for LSUN 256x256: score_sde's configs/default_lsun_configs.py (not run directly).

Also the base of the 256x256 and 1024x1024 CelebA-HQ / FFHQ configs, as in score_sde. Compared
with CIFAR-10 (configs/default_cifar10.py): batch 64, 2.4M steps, preemption checkpoints every
5,000 steps, VE sigma_max = 378 with N = 2000 noise scales, no dropout, snr = 0.075, and
evaluation with sampling on.

score_sde evaluates its checkpoints 50..96, i.e. steps 2,500,000..4,800,000 here
(``eval.begin_ckpt`` / ``eval.end_ckpt`` are optimizer steps): beyond ``training.n_iters``, so
set ``--config.eval.begin_ckpt`` / ``--config.eval.end_ckpt`` to the steps you trained.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("default_cifar10.py", relative_to=__file__)

    training = config.training
    training.batch_size = 64
    training.n_iters = 2400001
    training.snapshot_freq = 50000
    training.snapshot_freq_for_preemption = 5000

    config.sampling.snr = 0.075

    evaluate = config.eval
    evaluate.begin_ckpt = 50 * training.snapshot_freq
    evaluate.end_ckpt = 96 * training.snapshot_freq
    evaluate.batch_size = 512
    evaluate.enable_sampling = True
    evaluate.num_samples = 50000

    data = config.data
    data.dataset = "LSUN"  # the category is set by each variant (data.category)
    data.image_size = 256
    data.random_flip = True
    data.uniform_dequantization = False
    data.centered = False
    data.num_channels = 3

    model = config.model
    model.sigma_max = 378.0
    model.sigma_min = 0.01
    model.num_scales = 2000
    model.dropout = 0.0
    return config
