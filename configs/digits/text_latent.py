"""diffusion-jax train --config configs/digits/text_latent.py --workdir runs/digits_t2i

Text-to-digits in latent space: a DDPM++ U-Net on the 4x4x4 latents of configs/digits/autoencoder.py,
reading its caption ("a thin seven", "a bold zero", ...) through cross-attention to a small text
transformer trained with it; the caption is replaced by the empty one with probability 0.1 for
classifier-free guidance. First
`diffusion-jax train --config configs/digits/autoencoder.py --workdir runs/digits_ae` and
`diffusion-jax encode --workdir runs/digits_ae --out runs/digits_latents`; then

    diffusion-jax sample --workdir runs/digits_t2i --prompt "a bold seven" --negative_prompt "a one" \
        --guidance_scale 2
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("latent.py", relative_to=__file__)
    config.data.captions = "digits"
    model = config.model
    model.num_classes = 0  # the caption is the condition
    model.text_encoder = "tiny"
    model.context_dim = 64
    model.cross_attn_resolutions = (4, 2)
    model.cross_attn_heads = 4
    config.training.caption_dropout = 0.1
    config.sampling.guidance_scale = 2.0
    return config
