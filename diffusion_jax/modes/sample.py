"""``diffusion-jax sample``: samples of a checkpoint with ``config.sampling``, as ``.npz`` and PNG."""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.builders.config import ConfigError
from diffusion_jax.builders.sampler import build_sampler
from diffusion_jax.modes import setup
from diffusion_jax.modes.posthoc_ema import chosen_params, ema_tag

__all__ = ["sample"]


def sample(
    config,
    workdir,
    *,
    num_samples: int | None = None,
    out: str | None = None,
    step: int | None = None,
    labels: Sequence[int] | None = None,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    guidance_scale: float | None = None,
) -> pathlib.Path:
    """Write samples of a checkpoint (newest by default) with ``config.sampling``: ``<out>.npz``
    (``samples`` in the data's range, the class ``labels`` of a class-conditional network, and
    the sampler settings) and ``<out>.png`` (a grid); process 0 writes. ``labels`` gives one class
    per sample (repeated to ``num_samples`` when it has one entry); by default a class-conditional
    network cycles through its classes. The data set need not be present: the config describes
    the samples. ``prompt`` (with ``negative_prompt`` and ``guidance_scale``, default
    ``sampling.guidance_scale``) samples a text-conditioned model (docs/latent.md)."""
    run = setup.prepare(config, workdir, create=False, need_data=False)
    config, workdir, exp = run.config, run.workdir, run.exp
    if config.training.task == "autoencoder":
        raise ConfigError(
            f"{workdir} holds an autoencoder (training.task = 'autoencoder'), which draws no samples; "
            f"`diffusion-jax encode --workdir {workdir} --out DIR` writes its latent data set"
        )
    if prompt is None and (negative_prompt is not None or guidance_scale is not None):
        raise ConfigError("--negative_prompt and --guidance_scale need --prompt")
    text, w = None, 0.0
    if prompt is not None:
        from diffusion_jax.modes.prompts import prompt_context  # noqa: PLC0415

        text = prompt_context(config, prompt, negative_prompt)
        w = config.sampling.guidance_scale if guidance_scale is None else guidance_scale
    n = num_samples or (len(labels) if labels is not None and len(labels) > 1 else config.eval.num_samples)
    chosen = _labels(exp, labels, n)
    setup.checkpoint_steps(workdir)
    got, state = setup.restore_state(config, exp, workdir, step)
    sampler = build_sampler(config, sde=exp.sde)
    t0 = time.perf_counter()
    params = chosen_params(config, exp, workdir, got, state)
    if text is not None:
        from diffusion_jax.modes.prompts import sample_prompt  # noqa: PLC0415

        x, sinfo = sample_prompt(exp, params, jax.random.PRNGKey(config.seed + got), n, sampler, text, w)
    else:
        x, sinfo = setup.sample_images(exp, params, jax.random.PRNGKey(config.seed + got), n, sampler, labels=chosen)
    seconds = time.perf_counter() - t0
    tag = ema_tag(config)
    name = f"samples_{got:08d}_{config.sampling.method}" + (f"_{tag}" if tag else "")
    out_path = pathlib.Path(out) if out else workdir / "samples" / name
    if not run.primary:
        return out_path.with_suffix(".npz")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    settings = {f"sampling.{k}": v for k, v in config.sampling.to_dict().items()}
    settings.update(step=got, seed=config.seed, nfe=int(np.asarray(sinfo.nfe)))
    arrays: dict[str, Any] = {
        "samples": exp.to_data_range(x),
        "settings": np.asarray(json.dumps(settings, default=str)),
    }
    if chosen is not None:
        arrays["labels"] = np.asarray(chosen)
    if exp.decode is not None:  # latent diffusion: "samples" are the decoded images
        arrays["latents"] = np.asarray(x)
    if text is not None:
        arrays.update(prompt=np.asarray(prompt), negative_prompt=np.asarray(negative_prompt or ""), guidance_scale=w)
    np.savez(out_path.with_suffix(".npz"), **arrays)
    setup.save_samples(exp, x, out_path.with_suffix(".png"))
    print(
        f"wrote {n} samples of checkpoint {got} ({config.sampling.method}, nfe={int(np.asarray(sinfo.nfe))}, "
        f"{seconds:.1f} s) to {out_path.with_suffix('.npz')} and .png",
        flush=True,
    )
    return out_path.with_suffix(".npz")


def _labels(exp, labels: Sequence[int] | None, n: int):
    """The class of each sample, checked against the network (a ConfigError names the problem)."""
    if labels is None:
        return setup.class_labels(exp, n)
    num_classes = exp.config.model.num_classes
    if not num_classes:
        raise ConfigError("labels need a class-conditional network (model.num_classes > 0); this one has none")
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
        raise ConfigError(f"labels {bad} are outside the network's classes 0..{num_classes - 1}")
    if len(labels) == 1:
        labels = list(labels) * n
    if len(labels) != n:
        raise ConfigError(f"{len(labels)} labels for {n} samples; give one label, or one per sample")
    return jnp.asarray(labels, jnp.int32)
