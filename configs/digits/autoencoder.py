"""diffusion-jax train --config configs/digits/autoencoder.py --workdir runs/digits_ae

The autoencoder of latent diffusion on the embedded digits, upsampled to 16x16 (bilinear, 17
grey levels kept): KL-regularised, two stride-2 levels, so 16x16x1 images become 4x4x4 latents.
Then `diffusion-jax eval --workdir runs/digits_ae` reports the reconstruction error of the
held-out digits and `diffusion-jax encode --workdir runs/digits_ae --out runs/digits_latents`
writes the latent data set that configs/digits/latent.py trains on.
"""

from diffusion_jax.builders.config import default_config


def get_config():
    config = default_config()
    config.training.task = "autoencoder"
    training = config.training
    training.batch_size = 64
    training.n_iters = 2000
    training.log_freq = 100
    training.eval_freq = 250
    training.snapshot_freq = 1000
    training.snapshot_freq_for_preemption = 250
    training.snapshot_samples = 32
    training.n_jitted_steps = 5

    data = config.data
    data.dataset = "digits"
    data.image_size = 16
    data.num_channels = 1
    data.centered = True
    data.captions = "digits"  # `encode` writes "a thin seven", "a bold zero", ... with the latents

    ae = config.autoencoder
    ae.block_out_channels = (32, 64, 64)
    ae.layers_per_block = 1
    ae.latent_channels = 4
    ae.norm_num_groups = 8
    ae.reconstruction = "l1"
    ae.kl_weight = 1e-4
    ae.disc_weight = 0.0

    config.optim.lr = 1e-3
    config.optim.warmup = 100
    config.eval.batch_size = 128
    return config
