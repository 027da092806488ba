"""diffusion-jax train --config configs/digits/dit.py --workdir runs/digits_dit

The main job on EDM's SDE (configs/digits/edm_sigma.py: EDM's preconditioning, log-normal noise
levels, 12 Heun steps) with a small DiT instead of the DDPM++ U-Net: 2x2 patches of the 8x8 digits (16 tokens
of width 64), 4 adaLN-Zero blocks with 4 heads, about 0.3M parameters. Everything else (data,
loss, optimiser, sampler, evaluation) is edm_sigma.py's, so the two networks compare directly.

Shard it like any network, e.g. on 8 devices ``--config.mesh.fsdp=4 --config.mesh.tensor=2``.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("edm_sigma.py", __file__)
    model = config.model
    model.name = "dit"
    model.dit_preset = ""
    model.patch_size = 2
    model.hidden_size = 64
    model.depth = 4
    model.num_heads = 4
    model.mlp_ratio = 4.0
    model.learn_sigma = False
    model.dropout = 0.0
    config.optim.lr = 1e-3  # half the U-Net's 2e-3 (Peebles & Xie 2023 train DiT with 1e-4 at batch 256)
    return config
