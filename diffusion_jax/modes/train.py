"""``diffusion-jax train``: train from a config into a workdir, resuming from its newest checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_jax.builders import diffusion as diffusion_builders
from diffusion_jax.builders.config import ConfigError
from diffusion_jax.builders.experiment import Experiment
from diffusion_jax.builders.sampler import build_sampler
from diffusion_jax.modes import setup
from diffusion_jax.training import checkpoint as ckpt_lib
from diffusion_jax.training import loop as loop_lib
from diffusion_jax.training import sharding as sharding_lib
from diffusion_jax.training.ema_snapshots import Snapshotter
from diffusion_jax.training.logging import MetricWriter
from diffusion_jax.training.state import init_train_state
from diffusion_jax.training.step import make_eval_step, make_train_step, shard_batch

__all__ = ["train"]


def train(config, workdir, *, stop_after: int | None = None) -> loop_lib.RunSummary:
    """Train from ``config`` into ``workdir``, resuming from its newest checkpoint."""
    run = setup.prepare(config, workdir, create=True)
    if run.config.training.task == "autoencoder":
        from diffusion_jax.modes.autoencoder import train_autoencoder  # noqa: PLC0415

        return train_autoencoder(run, stop_after=stop_after)
    config, workdir, exp, primary = run.config, run.workdir, run.exp, run.primary
    training = config.training
    per_device = setup.check_batch(
        "training.batch_size", training.batch_size, grad_accum_steps=training.grad_accum_steps, mesh=exp.mesh
    )
    if training.eval_freq and training.eval_freq <= training.n_iters:
        setup.check_batch("eval.batch_size", config.eval.batch_size, mesh=exp.mesh)

    # The parameters' layout on config.mesh; one that cannot be built (parameters without
    # logical axes on a sharded mesh) stops the run here, before any work.
    layout = exp.layout(jax.eval_shape(exp.init_params, jax.random.PRNGKey(config.seed)))

    train_iter = setup.build_data(config, split="train")
    if primary:
        # Written once the data and the network are known to build, so a failed start does
        # not tie the workdir to a config that never ran.
        setup.write_config(workdir, config)
        print(
            f"global batch {training.batch_size} = {jax.process_count()} host(s) x {jax.local_device_count()} "
            f"device(s) x {per_device} example(s)"
            + (f" in {training.grad_accum_steps} micro-batches" if training.grad_accum_steps > 1 else ""),
            flush=True,
        )

    optimizer = diffusion_builders.build_optimizer(config)
    loss_fn = diffusion_builders.build_loss(
        config, model_fn=exp.model_fn(train=True), sde=exp.sde, parametrization=exp.parametrization
    )
    key = jax.random.PRNGKey(config.seed)
    k_init, k_state, k_eval, k_sample = jax.random.split(key, 4)
    params = exp.init_params(k_init)
    extra_ema = diffusion_builders.build_ema(config)
    state = init_train_state(params, optimizer, k_state, ema=extra_ema)
    # Parameters, Adam moments and EMAs laid out on the mesh of config.mesh (replicated on a
    # data-only mesh); a checkpoint of another layout is restored into this one.
    state_sharding = exp.state_shardings(state, layout)
    state = sharding_lib.place(state, state_sharding)
    if primary and exp.mesh.devices.size > 1:
        print(sharding_lib.layout_summary(layout), flush=True)

    checkpointer = ckpt_lib.Checkpointer(
        workdir / "checkpoints",
        keep_period=training.snapshot_freq,
        max_to_keep=training.max_to_keep,
        async_save=training.async_checkpointing,
    )
    writer = MetricWriter(workdir)
    snapshots = None
    if config.model.ema_snapshot_freq:
        # Several processes: synchronous snapshots after the checkpoint in flight (Snapshotter).
        multihost = jax.process_count() > 1
        snapshots = Snapshotter(
            workdir,
            tuple(config.model.ema_sigma_rels),
            async_save=training.async_checkpointing and not multihost,
            before_save=checkpointer.wait if multihost else None,
        )
    try:
        state = setup.resume(checkpointer, state, train_iter, writer, primary=primary)

        replicated = NamedSharding(exp.mesh, P())
        step_fn = jax.jit(
            make_train_step(
                loss_fn,
                optimizer,
                ema_rate=config.model.ema_rate,
                ema_warmup=config.model.ema_warmup,
                extra_ema=extra_ema,
                grad_accum_steps=training.grad_accum_steps,
                learning_rate_fn=diffusion_builders.learning_rate_fn(config),
            ),
            out_shardings=(state_sharding, replicated),
            donate_argnums=0,
        )
        eval_fn = _make_periodic_eval(config, exp, k_eval) if training.eval_freq else None
        sampler = build_sampler(config, sde=exp.sde)
        n_snap = training.snapshot_samples

        def snapshot_fn(state, step):
            if not training.snapshot_sampling:
                return
            x, _ = setup.sample_images(
                exp,
                state.ema_params,
                jax.random.fold_in(k_sample, step),
                n_snap,
                sampler,
                labels=setup.class_labels(exp, n_snap),
            )
            if primary:
                setup.save_samples(exp, x, workdir / "samples" / f"step_{step:08d}.png")

        meta = {"config_sde": config.training.sde, "model": config.model.name}
        state, summary = loop_lib.fit(
            state=state,
            step_fn=step_fn,
            data_iter=train_iter,
            mesh=exp.mesh,
            n_iters=training.n_iters,
            n_jitted_steps=training.n_jitted_steps,
            background_compile=training.background_compile,
            checkpointer=checkpointer,
            checkpoint_every=math.gcd(training.snapshot_freq_for_preemption, training.snapshot_freq),
            writer=writer,
            log_freq=training.log_freq,
            eval_freq=training.eval_freq,
            eval_fn=eval_fn,
            snapshot_freq=training.snapshot_freq,
            snapshot_fn=snapshot_fn,
            nan_policy=training.nan_policy,
            max_consecutive_nan=training.max_consecutive_nan,
            meta=meta,
            stop_after=stop_after,
            hooks=[(config.model.ema_snapshot_freq, snapshots)] if snapshots is not None else [],
        )
        final = summary.final_step
        if final == training.n_iters and training.snapshot_sampling and training.n_iters % training.snapshot_freq:
            snapshot_fn(state, final)  # always leave a grid of the final model
        if snapshots is not None and final == training.n_iters:
            snapshots(state, final)  # post-hoc EMA can reconstruct the final step
        if primary:
            setup.write_atomically(workdir / "summary.json", json.dumps(dataclasses.asdict(summary), indent=2))
            print(
                f"trained steps {summary.start_step}->{final} in {summary.seconds:.1f} s "
                f"({summary.steps_per_second:.2f} steps/s); final loss "
                f"{summary.last_metrics.get('loss', float('nan')):.4f}; "
                f"non-finite steps skipped: {summary.nonfinite_steps}; workdir {workdir}",
                flush=True,
            )
        return summary
    finally:
        checkpointer.close()
        if snapshots is not None:
            snapshots.close()
        writer.close()
        close = getattr(train_iter, "close", None)
        if close:
            close()


def _make_periodic_eval(config, exp: Experiment, key):
    """Loss of the EMA parameters on the next eval batch (score_sde's eval during training)."""
    loss_fn = diffusion_builders.build_loss(
        config, model_fn=exp.model_fn(train=False), sde=exp.sde, parametrization=exp.parametrization
    )
    eval_step = jax.jit(make_eval_step(loss_fn))
    holder: dict[str, Any] = {"it": None}

    def next_batch():
        for _ in range(2):
            if holder["it"] is None:
                holder["it"] = setup.build_data(config, split="eval")
            try:
                return next(holder["it"])
            except StopIteration:
                holder["it"] = None
        raise ConfigError("the eval split is empty")

    def eval_fn(state, step):
        batch = shard_batch(next_batch(), exp.mesh)
        total, count = eval_step(state.ema_params, batch, jax.random.fold_in(key, step))
        return {"loss": float(total) / max(float(count), 1.0)}

    return eval_fn
