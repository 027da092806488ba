"""Base config for CelebA 64x64: score_sde's configs/default_celeba_configs.py (not run directly).

score_sde's CelebA defaults: as for CIFAR-10 (configs/default_cifar10.py) except the data, a
larger VE noise scale (sigma_max = 90), the corrector's snr (0.17), and evaluation from the first
checkpoint with sampling on. ``eval.begin_ckpt`` / ``eval.end_ckpt`` are optimizer steps here
(score_sde's checkpoints 1..26 are steps 50,000..1,300,000).
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("default_cifar10.py", relative_to=__file__)

    config.sampling.snr = 0.17

    evaluate = config.eval
    evaluate.begin_ckpt = 1 * config.training.snapshot_freq
    evaluate.end_ckpt = 26 * config.training.snapshot_freq
    evaluate.batch_size = 1024
    evaluate.enable_sampling = True
    evaluate.num_samples = 50000

    data = config.data
    data.dataset = "CELEBA"  # TFDS celeb_a, centre-cropped to 140 and resized, as in score_sde
    data.image_size = 64
    data.random_flip = True
    data.uniform_dequantization = False
    data.centered = False
    data.num_channels = 3

    model = config.model
    model.sigma_max = 90.0
    model.sigma_min = 0.01
    model.num_scales = 1000
    model.dropout = 0.1
    return config
