"""``diffusion-jax eval``: evaluate the saved checkpoints of a workdir (loss over the eval split,
samples, bits/dim); results go to ``<workdir>/eval/``."""

from __future__ import annotations

import functools
import json
from typing import Any

import jax
import numpy as np

from diffusion_jax.builders import diffusion as diffusion_builders
from diffusion_jax.builders import evaluation as quality
from diffusion_jax.builders.config import ConfigError
from diffusion_jax.builders.experiment import Experiment
from diffusion_jax.builders.likelihood import evaluate_bpd
from diffusion_jax.builders.sampler import build_sampler
from diffusion_jax.modes import setup
from diffusion_jax.modes.posthoc_ema import chosen_params, ema_tag
from diffusion_jax.training.logging import MetricWriter, progress_bar
from diffusion_jax.training.step import make_eval_step, shard_batch

__all__ = ["evaluate"]


def evaluate(config, workdir) -> dict:
    """Evaluate saved checkpoints in ``[eval.begin_ckpt, eval.end_ckpt]``: loss over the whole
    eval split, samples, and bits/dim; results go to ``<workdir>/eval/`` (process 0 writes)."""
    run = setup.prepare(config, workdir, create=False)
    if run.config.training.task == "autoencoder":
        from diffusion_jax.modes.autoencoder import evaluate_autoencoder  # noqa: PLC0415

        return evaluate_autoencoder(run)
    config, workdir, exp, primary = run.config, run.workdir, run.exp, run.primary
    steps = setup.checkpoint_steps(workdir)
    e = config.eval
    end = steps[-1] if e.end_ckpt < 0 else e.end_ckpt
    chosen = [s for s in steps if e.begin_ckpt <= s <= end]
    if not chosen:
        raise ConfigError(
            f"no checkpoint step in [eval.begin_ckpt={e.begin_ckpt}, eval.end_ckpt={e.end_ckpt}]; saved: {steps}"
        )
    setup.check_batch("eval.batch_size", e.batch_size)
    out_dir = workdir / "eval"
    # The detector is built (its weights read) before any checkpoint is touched; the reference
    # statistics of the real data when the first samples need them.
    detector = quality.build_detector(config) if e.enable_quality else None
    reference = None
    if primary:
        out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    writer = MetricWriter(workdir)
    # What a result depends on besides the checkpoint: a rerun (e.g. after Ctrl-C) keeps the
    # results already computed with the same settings and evaluates the rest.
    settings = json.loads(
        json.dumps({"eval": config.eval.to_dict(), "sampling": config.sampling.to_dict(), "seed": config.seed})
    )
    # A non-default average (sampling.ema) gets its own result files and metric split.
    tag = ema_tag(config)
    suffix = f"_{tag}" if tag else ""
    for step in chosen:
        done = out_dir / f"results_{step:08d}{suffix}.json"
        previous = _previous(done, settings)
        if previous is not None:
            results[step] = previous
            if primary:
                print(f"checkpoint {step}: evaluated before with these settings ({done.name})", flush=True)
            continue
        _, state = setup.restore_state(config, exp, workdir, step)
        params = chosen_params(config, exp, workdir, step, state)
        res: dict[str, Any] = {"step": step, **({"ema": config.sampling.ema} if tag else {})}
        if e.enable_loss:
            res.update(_eval_loss(config, exp, params, step))
        if e.enable_sampling:
            sampler = build_sampler(config, sde=exp.sde)
            # Each process draws its share of the chunks and extracts their features; the rows
            # are gathered in chunk order, so the results do not depend on the process count.
            x, sinfo = setup.sample_images(
                exp,
                params,
                jax.random.PRNGKey(step),
                e.num_samples,
                sampler,
                labels=setup.class_labels(exp, e.num_samples),
                share=True,
            )
            chunk = min(e.num_samples, config.sampling.batch_size)
            gather = functools.partial(setup.gather_chunks, n=e.num_samples, chunk=chunk)
            if sinfo is not None:
                res["sampling_nfe"] = int(np.asarray(sinfo.nfe))
            if detector is not None:
                if reference is None:
                    reference = quality.build_reference(
                        config, detector, lambda: _real_images(config, exp), workdir, primary=primary
                    )
                images = np.clip(exp.to_data_range(x), 0.0, 1.0)  # as saved and shown
                res.update(quality.quality_metrics(config, detector, reference, images, step, gather=gather))
            x = gather(x)
            if primary:
                np.savez(out_dir / f"samples_{step:08d}{suffix}.npz", samples=exp.to_data_range(x))
                setup.save_samples(exp, x, out_dir / f"samples_{step:08d}{suffix}.png")
        if e.enable_bpd:
            res.update(evaluate_bpd(config, exp, params, step=step))
        results[step] = res
        writer.write(
            step,
            {k: v for k, v in res.items() if k != "step" and isinstance(v, (int, float))},
            split=f"evaluation_{tag}" if tag else "evaluation",
        )
        writer.flush()
        if primary:
            setup.write_atomically(done, json.dumps({**res, "settings": settings}, indent=2))
            print(json.dumps(res), flush=True)
    writer.close()
    return results


def _real_images(config, exp: Experiment):
    """The train split's images in [0, 1], batch by batch (padding rows dropped)."""
    with setup.build_data(config, split="train", evaluation=True, uniform_dequantization=False) as it:
        for batch in it:
            keep = batch["mask"] if "mask" in batch else slice(None)
            yield np.clip(exp.to_data_range(batch["image"][keep]), 0.0, 1.0)


def _previous(path, settings: dict) -> dict | None:
    """The results stored at ``path`` if they were computed with ``settings``, else None."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if stored.pop("settings", None) != settings:
        return None
    return stored


def _eval_loss(config, exp: Experiment, params, step: int) -> dict:
    """Mean loss over every example of the eval split (padded batches are masked)."""
    loss_fn = diffusion_builders.build_loss(
        config, model_fn=exp.model_fn(train=False), sde=exp.sde, parametrization=exp.parametrization
    )
    eval_step = jax.jit(make_eval_step(loss_fn))
    total = count = 0.0
    key = jax.random.PRNGKey(step)
    with setup.build_data(config, split="eval") as it:
        for i, batch in enumerate(progress_bar(it, it.num_batches or 0, f"eval loss, step {step}")):
            s, c = eval_step(params, shard_batch(batch, exp.mesh), jax.random.fold_in(key, i))
            total, count = total + float(s), count + float(c)
    return {"eval_loss": total / max(count, 1.0), "eval_examples": int(count)}
