"""``training.task = 'autoencoder'``: ``train`` and ``eval`` of latent diffusion's autoencoder.

The same loop, checkpoints, resume, logging and data pipeline as the diffusion model
(:mod:`diffusion_jax.training`); only the parameters (``{'autoencoder', 'discriminator'}``),
the loss (:mod:`diffusion_jax.training.autoencoder`) and what is evaluated differ. ``eval``
writes the reconstruction error of the eval split (the held-out data), from the posterior mean,
to ``<workdir>/eval/reconstruction_<step>.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_jax.builders import autoencoder as ae_builders
from diffusion_jax.builders import diffusion as diffusion_builders
from diffusion_jax.modes import setup
from diffusion_jax.training import checkpoint as ckpt_lib
from diffusion_jax.training import loop as loop_lib
from diffusion_jax.training.autoencoder import reconstruction_metrics
from diffusion_jax.training.logging import MetricWriter, save_image_grid
from diffusion_jax.training.state import init_train_state
from diffusion_jax.training.step import make_train_step, replicate, shard_batch

__all__ = ["train_autoencoder", "evaluate_autoencoder", "reconstruction_error"]


def _with_steps(step_fn):
    """Give every example of each step's batch that step's number (``batch['step']``, (n, B)),
    which switches the discriminator on at ``autoencoder.disc_start``."""

    def wrapped(state, batches):
        n, b = batches["image"].shape[:2]
        steps = state.step + jnp.arange(n, dtype=state.step.dtype)
        return step_fn(state, {**batches, "step": jnp.broadcast_to(steps[:, None], (n, b))})

    return wrapped


def train_autoencoder(run: setup.Run, *, stop_after: int | None = None) -> loop_lib.RunSummary:
    """Train the autoencoder of ``run.config`` into ``run.workdir`` (resuming from its newest checkpoint)."""
    config, workdir, mesh, primary = run.config, run.workdir, run.exp.mesh, run.primary
    training = config.training
    setup.check_batch("training.batch_size", training.batch_size, grad_accum_steps=training.grad_accum_steps)
    if training.eval_freq and training.eval_freq <= training.n_iters:
        setup.check_batch("eval.batch_size", config.eval.batch_size)
    ae, disc = ae_builders.build_autoencoder(config), ae_builders.build_discriminator(config)
    train_iter = setup.build_data(config, split="train")
    if primary:
        setup.write_config(workdir, config)
    optimizer = diffusion_builders.build_optimizer(config)
    loss_fn = ae_builders.build_autoencoder_loss(config, ae, disc)
    k_init, k_state = jax.random.split(jax.random.PRNGKey(config.seed))
    params = jax.jit(lambda k: ae_builders.init_autoencoder_params(config, k))(k_init)
    state = replicate(init_train_state(params, optimizer, k_state), mesh)
    checkpointer = ckpt_lib.Checkpointer(
        workdir / "checkpoints",
        keep_period=training.snapshot_freq,
        max_to_keep=training.max_to_keep,
        async_save=training.async_checkpointing,
    )
    writer = MetricWriter(workdir)
    try:
        state = setup.resume(checkpointer, state, train_iter, writer, primary=primary)
        replicated = NamedSharding(mesh, P())
        step_fn = jax.jit(
            _with_steps(
                make_train_step(
                    loss_fn,
                    optimizer,
                    ema_rate=config.model.ema_rate,
                    ema_warmup=config.model.ema_warmup,
                    grad_accum_steps=training.grad_accum_steps,
                    learning_rate_fn=diffusion_builders.learning_rate_fn(config),
                )
            ),
            out_shardings=(jax.tree_util.tree_map(lambda _: replicated, state), replicated),
            donate_argnums=0,
        )
        metrics_fn = jax.jit(reconstruction_metrics(ae, value_width=_value_width(config)))
        held_out: dict[str, Any] = {}

        def eval_batch():
            if "batch" not in held_out:
                held_out["batch"] = next(iter(setup.build_data(config, split="eval")))
            return held_out["batch"]

        def eval_fn(state, step):
            sums = metrics_fn(state.params["autoencoder"], shard_batch(eval_batch(), mesh))
            count = max(float(sums["count"]), 1.0)
            return {"mae": float(sums["abs"]) / count, "mse": float(sums["sq"]) / count}

        def snapshot_fn(state, step):
            if not (training.snapshot_sampling and primary):
                return
            batch = eval_batch()
            k = min(training.snapshot_samples, len(batch["image"]))
            x = batch["image"][:k]
            x_hat = np.asarray(ae.apply({"params": jax.device_get(state.params["autoencoder"])}, x))
            pair = np.concatenate([x, x_hat])  # originals, then their reconstructions
            images = (pair + 1.0) / 2.0 if config.data.centered else pair
            save_image_grid(
                workdir / "samples" / f"reconstructions_{step:08d}.png",
                np.clip(images, 0.0, 1.0),
                upscale=max(1, 64 // images.shape[1]),
            )

        state, summary = loop_lib.fit(
            state=state,
            step_fn=step_fn,
            data_iter=train_iter,
            mesh=mesh,
            n_iters=training.n_iters,
            n_jitted_steps=training.n_jitted_steps,
            checkpointer=checkpointer,
            checkpoint_every=math.gcd(training.snapshot_freq_for_preemption, training.snapshot_freq),
            writer=writer,
            log_freq=training.log_freq,
            eval_freq=training.eval_freq,
            eval_fn=eval_fn if training.eval_freq else None,
            snapshot_freq=training.snapshot_freq,
            snapshot_fn=snapshot_fn,
            nan_policy=training.nan_policy,
            max_consecutive_nan=training.max_consecutive_nan,
            meta={"task": "autoencoder"},
            stop_after=stop_after,
        )
        if primary:
            setup.write_atomically(workdir / "summary.json", json.dumps(dataclasses.asdict(summary), indent=2))
            print(
                f"trained the autoencoder, steps {summary.start_step}->{summary.final_step} in {summary.seconds:.1f} s "
                f"({summary.steps_per_second:.2f} steps/s); final loss "
                f"{summary.last_metrics.get('loss', float('nan')):.4f}; workdir {workdir}",
                flush=True,
            )
        return summary
    finally:
        checkpointer.close()
        writer.close()
        close = getattr(train_iter, "close", None)
        if close:
            close()


def _value_width(config) -> float:
    return 2.0 if config.data.centered else 1.0


def reconstruction_error(config, module, params, *, split: str = "eval") -> dict[str, float]:
    """Mean absolute and squared reconstruction error per pixel (in units of the [0, 1] image
    range) and mean PSNR (dB) over every example of ``split``, sharded over the devices and
    hosts, reconstructing from the posterior mean."""
    from diffusion_jax.training.step import make_mesh  # noqa: PLC0415

    mesh = make_mesh()
    metrics_fn = jax.jit(reconstruction_metrics(module, value_width=_value_width(config)))
    params = replicate(params, mesh)
    totals = {"count": 0.0, "abs": 0.0, "sq": 0.0, "psnr": 0.0}
    for batch in setup.build_data(config, split=split, evaluation=True):
        sums = metrics_fn(params, shard_batch(batch, mesh))
        for k in totals:
            totals[k] += float(sums[k])
    n = max(totals["count"], 1.0)
    return {
        "examples": int(totals["count"]),
        "mae": totals["abs"] / n,
        "mse": totals["sq"] / n,
        "psnr_db": totals["psnr"] / n,
    }


def evaluate_autoencoder(run: setup.Run) -> dict:
    """The reconstruction error of the newest checkpoint (``eval.end_ckpt``) on the eval split."""
    config, workdir = run.config, run.workdir
    setup.check_batch("eval.batch_size", config.eval.batch_size)
    step = None if config.eval.end_ckpt < 0 else config.eval.end_ckpt
    restored = ae_builders.restore_autoencoder(workdir, step=step)
    result = {"step": restored.step, "split": "eval", **reconstruction_error(config, restored.module, restored.params)}
    if run.primary:
        out = workdir / "eval"
        out.mkdir(parents=True, exist_ok=True)
        setup.write_atomically(out / f"reconstruction_{restored.step:08d}.json", json.dumps(result, indent=2))
        print(
            f"checkpoint {restored.step}: reconstruction of {result['examples']} held-out examples: "
            f"MAE {result['mae']:.4f}, MSE {result['mse']:.5f}, PSNR {result['psnr_db']:.2f} dB (images in [0, 1])",
            flush=True,
        )
    return result
