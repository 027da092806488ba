"""The command-line modes, one module each, over one shared run set-up (:mod:`.setup`):
:func:`train`, :func:`evaluate`, :func:`sample`, :func:`convert`, :func:`stats`, :func:`posthoc_ema` and
:func:`encode`. Each takes a config and a workdir and is what ``diffusion-jax MODE`` runs; scripts and
notebooks can call them too."""

from diffusion_jax.modes.convert import convert
from diffusion_jax.modes.encode import encode
from diffusion_jax.modes.evaluate import evaluate
from diffusion_jax.modes.posthoc_ema import posthoc_ema
from diffusion_jax.modes.sample import sample
from diffusion_jax.modes.stats import stats
from diffusion_jax.modes.sweep import sweep
from diffusion_jax.modes.train import train

__all__ = ["train", "evaluate", "sample", "convert", "stats", "posthoc_ema", "encode", "sweep"]
