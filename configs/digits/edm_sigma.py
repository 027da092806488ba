"""diffusion-jax train --config configs/digits/edm_sigma.py --workdir runs/digits_sigma

The main job (configs/digits/edm.py) on EDM's own SDE: time is the noise level sigma, from 0.002
to 80 (Karras et al. 2022), where an empty model.output and model.noise_cond mean EDM's
preconditioning and c_noise = ln(sigma) / 4. Everything else (network, data, loss weighting,
noise-level distribution, optimiser, EMA, Heun sampler) is the main job's.

This was the main job until experiments/digits_ablation showed that the VE SDE keeps its sample
quality with better bits/dim. What was measured on it keeps it: the sampler comparison
(experiments/digits_samplers), the inverse problems and classifier guidance
(experiments/digits_conditioning), and the configs built on it (edm_cond.py, edm_phema.py,
classifier.py, dit.py).
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("edm.py", relative_to=__file__)
    config.training.sde = "edm"
    config.model.sigma_min = 0.002
    config.model.sigma_max = 80.0
    config.model.output = ""
    config.model.noise_cond = ""
    return config
