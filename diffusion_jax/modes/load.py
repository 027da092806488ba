"""Loading a trained model from a workdir, for scripts and notebooks."""

from __future__ import annotations

from typing import Any

from diffusion_jax.builders.experiment import Experiment
from diffusion_jax.modes import setup

__all__ = ["load_params"]


def load_params(config, workdir, *, step: int | None = None) -> tuple[Experiment, int, Any]:
    """``(experiment, step, EMA parameters)`` of a checkpoint in ``workdir`` trained with
    ``config`` (the newest readable one when ``step`` is None): a trained model for scripts and
    notebooks, e.g. ``exp.score_fn(params)`` for :func:`diffusion_jax.sample` or the likelihood."""
    run = setup.prepare(config, workdir, create=False, need_data=False)
    setup.checkpoint_steps(run.workdir)
    got, state = setup.restore_state(run.config, run.exp, run.workdir, step)
    return run.exp, got, state.ema_params
