"""diffusion_jax: score-based diffusion models in JAX/Flax."""

from diffusion_jax import sde
from diffusion_jax.samplers import sample

__all__ = ["sde", "sample"]
__version__ = "0.1.0"
