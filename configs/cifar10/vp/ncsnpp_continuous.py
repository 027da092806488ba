"""diffusion-jax train --config configs/cifar10/vp/ncsnpp_continuous.py --workdir runs/cifar10_vp_ncsnpp_continuous

The NCSN++ architecture (FIR resampling, residual input pyramid) under the VP SDE: score_sde's
configs/vp/cifar10_ncsnpp_continuous.py. Everything else as DDPM++
(configs/cifar10/vp/ddpmpp_continuous.py): sinusoidal embedding, eps prediction, centred data.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("ddpmpp_continuous.py", relative_to=__file__)
    config.model.fir = True
    config.model.progressive_input = "residual"
    return config
