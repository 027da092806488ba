"""Training: state, optimiser, the sharded step, checkpoints, logging and the run loops."""

from diffusion_jax.training.state import TrainState, ema_update, init_train_state, make_optimizer
from diffusion_jax.training.step import make_eval_step, make_mesh, make_train_step, shard_batch

__all__ = [
    "TrainState",
    "ema_update",
    "init_train_state",
    "make_optimizer",
    "make_eval_step",
    "make_mesh",
    "make_train_step",
    "shard_batch",
]
