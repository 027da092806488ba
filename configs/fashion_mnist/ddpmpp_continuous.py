"""diffusion-jax train --config configs/fashion_mnist/ddpmpp_continuous.py --workdir runs/fashion_mnist_ddpmpp_continuous

The small DDPM++ of configs/mnist/ddpmpp_continuous.py on Fashion-MNIST 28x28x1, with random
horizontal flips (garments are mirror-symmetric, digits are not). Not one of score_sde's
experiments.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("../mnist/ddpmpp_continuous.py", relative_to=__file__)
    config.data.dataset = "fashion_mnist"
    config.data.random_flip = True
    return config
