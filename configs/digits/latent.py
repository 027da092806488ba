"""diffusion-jax train --config configs/digits/latent.py --workdir runs/digits_ldm

A class-conditional diffusion model in the latent space of configs/digits/autoencoder.py: first
`diffusion-jax train --config configs/digits/autoencoder.py --workdir runs/digits_ae`, then
`diffusion-jax encode --workdir runs/digits_ae --out runs/digits_latents`. Samples and snapshot
grids are decoded by that autoencoder (its parameters are checked against the latents' record).
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("ddpmpp_vp.py", relative_to=__file__)
    data = config.data
    data.dataset = "latent"
    data.latent_dir = "runs/digits_latents"
    data.image_size = 4  # the latents of configs/digits/autoencoder.py: 4x4x4 (checked against the set)
    data.num_channels = 4
    data.centered = False  # latents are not images: no value map applies

    model = config.model
    model.nf = 64
    model.ch_mult = (1, 2)
    model.attn_resolutions = (2,)
    model.num_classes = 10
    # The EMA warm-up (decay min(rate, (1 + n) / (10 + n))): without it an EMA of rate 0.999 is
    # still a fifth the initialisation after 1,500 steps (experiments/digits_ablation).
    model.ema_warmup = True
    config.training.class_dropout = 0.1
    config.sampling.guidance_scale = 1.0
    return config
