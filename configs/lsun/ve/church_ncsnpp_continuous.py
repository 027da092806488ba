"""diffusion-jax train --config configs/lsun/ve/church_ncsnpp_continuous.py --workdir runs/lsun_church_ve_ncsnpp_continuous

NCSN++ with the VE SDE on LSUN church_outdoor 256x256: score_sde's
configs/ve/church_ncsnpp_continuous.py. The bedroom network and settings
(configs/lsun/ve/bedroom_ncsnpp_continuous.py) with sigma_max = 380.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("bedroom_ncsnpp_continuous.py", relative_to=__file__)
    config.data.category = "church_outdoor"
    config.model.sigma_max = 380.0
    return config
