"""Ablation sweeps: a sweep file (a base config and factors as config overrides), a runner on
Optuna's storage (one trial per point, any number of workers, resumable), and a report (tables,
plots, TensorBoard hparams). ``diffusion-jax sweep`` is the command line; see the README's
"Sweeps" section.

:mod:`.spec` (sweep files, points, checks) imports no JAX code; :mod:`.engine` runs each point as
its own ``diffusion-jax train`` / ``eval`` subprocess and knows nothing of networks."""

from diffusion_jax.sweeps.spec import (
    SEED,
    Factor,
    Level,
    Plan,
    Point,
    Sweep,
    format_value,
    levels,
    load_sweep,
    resolve,
    seeds,
    values,
    zipped,
)

__all__ = [
    "SEED",
    "Factor",
    "Level",
    "Plan",
    "Point",
    "Sweep",
    "format_value",
    "levels",
    "load_sweep",
    "resolve",
    "seeds",
    "values",
    "zipped",
]
