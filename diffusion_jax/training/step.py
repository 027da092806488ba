"""The jitted training step, data-parallel over a device mesh.

Data parallelism is a sharding of the batch (``NamedSharding(mesh, P('data'))``) with replicated
parameters; the same step runs on one CPU, several GPUs or a TPU pod, and XLA inserts the
gradient all-reduce. ``n_jitted_steps`` optimiser steps run per call under ``lax.scan``
(score_sde's ``training.n_jitted_steps``); ``grad_accum_steps`` splits each step's batch into
micro-batches whose gradients are averaged (same update, less activation memory).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_jax.training.ema import MultiEma
from diffusion_jax.training.state import TrainState, ema_decay, ema_update

__all__ = [
    "make_mesh",
    "make_train_step",
    "make_eval_step",
    "shard_batch",
    "replicate",
    "per_device_batch",
    "DATA_AXIS",
]

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over every device of every process, axis ``'data'``."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (DATA_AXIS,))


def per_device_batch(
    global_batch: int, *, num_devices: int, num_processes: int = 1, grad_accum_steps: int = 1, name: str = "batch_size"
) -> int:
    """The examples each device gets from a global batch of ``global_batch``; raises
    ``ValueError`` (naming ``name``) unless it divides evenly over the hosts, the devices and,
    on each device, into ``grad_accum_steps`` micro-batches."""
    if num_devices % num_processes:
        raise ValueError(f"{num_devices} devices do not split evenly over {num_processes} processes")
    plural = lambda n, word: f"{n} {word}{'s' if n != 1 else ''}"  # noqa: E731
    layout = f"{plural(num_processes, 'host')} x {plural(num_devices // num_processes, 'device')}"
    if global_batch % num_devices:
        lo = max(num_devices, global_batch // num_devices * num_devices)
        raise ValueError(
            f"{name} = {global_batch} (the global batch) does not divide over the {num_devices} devices "
            f"({layout}); use a multiple of {num_devices}, e.g. {lo} or {lo + num_devices}"
        )
    per_device = global_batch // num_devices
    if per_device % grad_accum_steps:
        raise ValueError(
            f"{name} = {global_batch} gives {per_device} examples per device ({layout}), which do not "
            f"split into grad_accum_steps = {grad_accum_steps} micro-batches; use a global batch that is a "
            f"multiple of {num_devices * grad_accum_steps}"
        )
    return per_device


def replicate(tree, mesh: Mesh):
    """Place a pytree replicated on every device of the mesh (works multi-host for values that
    are identical on every process)."""
    sharding = NamedSharding(mesh, P())
    return jax.tree_util.tree_map(
        lambda x: (
            jax.make_array_from_process_local_data(sharding, np.asarray(x))
            if jax.process_count() > 1
            else jax.device_put(x, sharding)
        ),
        tree,
    )


def shard_batch(batch: dict, mesh: Mesh, *, leading_steps: bool = False) -> dict:
    """Assemble global arrays from this process's share of the batch, sharded along the batch
    axis (axis 1 if the batch carries a leading ``n_jitted_steps`` axis) over the mesh's
    ``data`` axis, and its ``fsdp`` axis when it has one (:mod:`diffusion_jax.training.sharding`)."""
    present = tuple(a for a in (DATA_AXIS, "fsdp") if a in mesh.axis_names)
    axes = present[0] if len(present) == 1 else present
    sharding = NamedSharding(mesh, P(None, axes) if leading_steps else P(axes))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def _after(carry, x):
    """``x`` unchanged, but computed only once every leaf of ``carry`` is.

    Orders the micro-batches of an unrolled accumulation loop: without it XLA may run all their
    forward passes before any backward pass and keep every micro-batch's activations alive at
    once, so gradient accumulation would save no memory (and the larger working set runs
    slower on CPU; BENCHMARKS.md). ``lax.optimization_barrier`` does not order them on XLA:CPU,
    which removes barriers before scheduling, so this adds a zero that depends on one element of
    every leaf of ``carry`` to the floating-point leaves of ``x`` (non-finite values are masked
    first, so they cannot leak into ``x``).
    """
    tie = sum(jnp.ravel(leaf)[0].astype(jnp.float32) for leaf in jax.tree_util.tree_leaves(carry) if leaf.size)
    zero = jnp.where(jnp.isfinite(tie), tie, 0.0) * 0.0
    return jax.tree_util.tree_map(lambda v: v + zero.astype(v.dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v, x)


def make_train_step(
    loss_fn: Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]],
    optimizer: optax.GradientTransformation,
    *,
    ema_rate: float,
    ema_warmup: bool = False,
    grad_accum_steps: int = 1,
    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
    unroll: bool | None = None,
    extra_ema: MultiEma | None = None,
):
    """Returns ``step(state, batches) -> (state, metrics)``, not yet jitted.

    ``batches`` holds arrays with a leading axis of ``n`` optimiser steps. Each step: draw a key
    from the state's RNG, average the loss gradient over ``grad_accum_steps`` micro-batches,
    check loss and gradients for NaN/Inf, and apply the update and the EMA only if everything is
    finite (otherwise the state is left unchanged, apart from the RNG, and ``nonfinite`` = 1).
    ``metrics`` have a leading axis ``n``: loss, grad_norm, nonfinite, lr.

    ``unroll`` writes the ``n`` steps (and the micro-batches) as straight-line code instead of a
    ``lax.scan``; the default is to unroll on CPU, where XLA runs convolution gradients inside a
    while loop about 25x slower (BENCHMARKS.md), and to scan elsewhere (compile time).

    ``extra_ema`` updates the extra EMAs of ``state.emas`` (several rates, power profiles;
    :mod:`diffusion_jax.training.ema`) alongside the main one.
    """
    if unroll is None:
        unroll = jax.default_backend() == "cpu"

    def loop(body, carry, xs, ordered=False):
        """``lax.scan(body, carry, xs)``, or its unrolled form; ``ordered``: each unrolled
        iteration starts after the previous one has finished (see :func:`_after`)."""
        if not unroll:
            return jax.lax.scan(body, carry, xs)
        n = jax.tree_util.tree_leaves(xs)[0].shape[0]
        outs = []
        for i in range(n):
            x_i = jax.tree_util.tree_map(lambda v, i=i: v[i], xs)
            if ordered and i:
                x_i = _after(carry, x_i)
            carry, out = body(carry, x_i)
            outs.append(out)
        stacked = None if outs[0] is None else jax.tree_util.tree_map(lambda *v: jnp.stack(v), *outs)
        return carry, stacked

    def grads_for(params, batch, key):
        if grad_accum_steps == 1:
            (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
            return loss, grads

        def split(x):
            if x.shape[0] % grad_accum_steps:
                raise ValueError(
                    f"batch of {x.shape[0]} does not split into grad_accum_steps={grad_accum_steps} micro-batches"
                )
            # Micro-batch j holds examples j, j + k, j + 2k, ... The batch axis is sharded over
            # the devices in contiguous blocks, so (with a per-device batch divisible by k) every
            # device holds its share of every micro-batch and no example moves between devices;
            # contiguous micro-batches would sit on a few devices each, and XLA would move
            # examples around (collective-permutes) to spread them.
            return x.reshape((x.shape[0] // grad_accum_steps, grad_accum_steps) + x.shape[1:]).swapaxes(0, 1)

        micro = jax.tree_util.tree_map(split, batch)
        keys = jax.random.split(key, grad_accum_steps)

        def body(carry, inp):
            loss_sum, grad_sum = carry
            mb, k = inp
            (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb, k)
            return (loss_sum + loss, jax.tree_util.tree_map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        (loss_sum, grad_sum), _ = loop(body, (jnp.zeros((), jnp.float32), zeros), (micro, keys), ordered=True)
        scale = 1.0 / grad_accum_steps
        return loss_sum * scale, jax.tree_util.tree_map(lambda g: g * scale, grad_sum)

    def one_step(state: TrainState, batch):
        rng, key = jax.random.split(jax.random.wrap_key_data(state.rng))
        loss, grads = grads_for(state.params, batch, key)
        grad_norm = optax.tree.norm(grads)
        # A NaN/Inf anywhere in the gradients makes the global norm non-finite. (Checking every
        # leaf with a select over the whole state compiles ~3x slower on XLA:CPU.)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        new_ema = ema_update(state.ema_params, new_params, ema_decay(state.step, ema_rate, ema_warmup))
        new_emas = extra_ema.update(state.emas, new_params, state.step + 1) if extra_ema else state.emas
        keep = lambda new, old: jax.lax.cond(finite, lambda: new, lambda: old)
        new_state = TrainState(
            step=state.step + finite.astype(state.step.dtype),
            params=keep(new_params, state.params),
            ema_params=keep(new_ema, state.ema_params),
            opt_state=keep(new_opt_state, state.opt_state),
            rng=jax.random.key_data(rng),
            emas=keep(new_emas, state.emas),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "nonfinite": 1 - finite.astype(jnp.int32),
        }
        if learning_rate_fn is not None:
            metrics["lr"] = learning_rate_fn(state.step)
        return new_state, metrics

    def step(state: TrainState, batches):
        return loop(one_step, state, batches)

    return step


def make_eval_step(loss_fn):
    """``eval_step(params, batch, key) -> (sum of per-example losses, number of real examples)``,
    so a split's mean loss is exact whatever its batch padding."""

    def eval_step(params, batch, key):
        _, aux = loss_fn(params, batch, key)
        per_example = aux["loss_per_example"]
        mask = batch.get("mask")
        mask = jnp.ones_like(per_example) if mask is None else mask.astype(per_example.dtype)
        return jnp.sum(per_example * mask), jnp.sum(mask)

    return eval_step
