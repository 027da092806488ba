"""Training state, optimiser and EMA.

One :class:`TrainState` pytree carries everything a run needs to continue bit-for-bit: the step,
parameters, EMA parameters, optimiser state and the RNG key.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from diffusion_jax.training.ema import MultiEma

__all__ = ["TrainState", "learning_rate_schedule", "make_optimizer", "ema_decay", "ema_update", "init_train_state"]


@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data (orbax- and sharding-friendly)
    # The extra EMAs of ``model.ema_rates`` / ``model.ema_sigma_rels`` (an ``ema.EmaState``);
    # None when there are none.
    emas: Any = None

    def replace(self, **changes: Any) -> TrainState:
        return dataclasses.replace(self, **changes)


# A pytree whose children are the fields above, keyed by name (as a flax struct's are), except
# that ``emas`` is left out when it is None: a state without extra EMAs then has exactly the
# structure of the states saved before they existed, so their checkpoints still restore.
_FIELDS = ("step", "params", "ema_params", "opt_state", "rng")


def _state_flatten_with_keys(state: TrainState):
    names = _FIELDS + (("emas",) if state.emas is not None else ())
    return [(jax.tree_util.GetAttrKey(n), getattr(state, n)) for n in names], state.emas is not None


def _state_flatten(state: TrainState):
    names = _FIELDS + (("emas",) if state.emas is not None else ())
    return [getattr(state, n) for n in names], state.emas is not None


def _state_unflatten(has_emas: bool, children) -> TrainState:
    return TrainState(*children)  # without emas, its default None


jax.tree_util.register_pytree_with_keys(TrainState, _state_flatten_with_keys, _state_unflatten, _state_flatten)


def learning_rate_schedule(*, lr: float, warmup: int = 0) -> optax.Schedule:
    """score_sde's learning rate: a linear warm-up over ``warmup`` steps, ``lr * min(step / warmup, 1)``.
    The optimiser steps with it and the logs report it, so the logged rate is the one used."""
    return optax.linear_schedule(0.0, lr, warmup) if warmup > 0 else optax.constant_schedule(lr)


def make_optimizer(
    *,
    optimizer: str = "Adam",
    lr: float = 2e-4,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    warmup: int = 0,
    grad_clip: float = -1.0,
) -> optax.GradientTransformation:
    """score_sde's optimiser: gradient clipping by global norm (when ``grad_clip >= 0``), Adam,
    and a linear learning-rate warm-up over ``warmup`` steps, ``lr * min(step / warmup, 1)``."""
    schedule = learning_rate_schedule(lr=lr, warmup=warmup)
    name = optimizer.lower()
    if name == "adam":
        if weight_decay:
            # score_sde's Adam adds L2 weight decay to the gradient (torch.optim.Adam semantics).
            opt = optax.chain(
                optax.add_decayed_weights(weight_decay), optax.adam(schedule, b1=beta1, b2=beta2, eps=eps)
            )
        else:
            opt = optax.adam(schedule, b1=beta1, b2=beta2, eps=eps)
    elif name == "adamw":
        opt = optax.adamw(schedule, b1=beta1, b2=beta2, eps=eps, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: Adam, AdamW")
    if grad_clip is not None and grad_clip >= 0:
        opt = optax.chain(optax.clip_by_global_norm(grad_clip), opt)
    return opt


def ema_decay(step: jax.Array, rate: float, warmup: bool) -> jax.Array:
    """EMA decay at ``step``; with ``warmup``, ``min(rate, (1 + step) / (10 + step))`` so early
    averages are not dominated by the initialisation."""
    decay = jnp.asarray(rate, jnp.float32)
    if not warmup:
        return decay
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema_params, params, decay):
    return jax.tree_util.tree_map(lambda e, p: e * decay + (1.0 - decay) * p.astype(e.dtype), ema_params, params)


def init_train_state(
    params, optimizer: optax.GradientTransformation, rng: jax.Array, *, ema: MultiEma | None = None
) -> TrainState:
    """The state before the first step; ``ema`` adds the extra EMAs it tracks (``emas``)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree_util.tree_map(jnp.copy, params),
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng,
        emas=ema.init(params) if ema else None,
    )
