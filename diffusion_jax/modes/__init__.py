"""The command-line modes, one module each, over one shared run set-up (:mod:`.setup`):
:func:`train`, :func:`evaluate`, :func:`sample`, :func:`convert` and :func:`stats`. Each takes a config and a
workdir and is what ``diffusion-jax MODE`` runs; scripts and notebooks can call them too."""

from diffusion_jax.modes.convert import convert
from diffusion_jax.modes.evaluate import evaluate
from diffusion_jax.modes.sample import sample
from diffusion_jax.modes.stats import stats
from diffusion_jax.modes.train import train

__all__ = ["train", "evaluate", "sample", "convert", "stats"]
