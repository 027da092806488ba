"""diffusion_jax: score-based diffusion models in JAX/Flax."""

from typing import Any

from diffusion_jax import sde
from diffusion_jax.samplers import sample

__all__ = ["sde", "sample", "load"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # ``diffusion_jax.load`` pulls in the training and checkpoint code; import it on first use.
    if name == "load":
        from diffusion_jax.modes.load import load

        return load
    raise AttributeError(f"module 'diffusion_jax' has no attribute {name!r}")
