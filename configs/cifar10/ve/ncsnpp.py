"""diffusion-jax train --config configs/cifar10/ve/ncsnpp.py --workdir runs/cifar10_ve_ncsnpp

NCSN++ trained with SMLD's discrete objective (``training.continuous = False``: the N = 1000
noise scales of the VE SDE, integer noise-level labels): score_sde's configs/ve/cifar10_ncsnpp.py.
The network is configs/cifar10/ve/ncsnpp_continuous.py's with a sinusoidal (positional)
embedding of the noise-level index instead of the Fourier embedding of log sigma.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("ncsnpp_continuous.py", relative_to=__file__)
    config.training.continuous = False
    config.model.embedding_type = "positional"
    return config
