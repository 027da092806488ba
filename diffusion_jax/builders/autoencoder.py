"""Build latent diffusion's autoencoder from a config (the ``autoencoder`` section), restore a
trained one from its workdir, and decode the samples of a model trained on latents.

A latent data set records the autoencoder that wrote it (workdir, step, parameter fingerprint);
:func:`latent_decoder` restores that autoencoder and refuses one whose parameters differ, so
samples are never decoded by a network that did not encode their training data.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.builders import config as config_lib
from diffusion_jax.builders.config import ConfigError
from diffusion_jax.models.autoencoder import AutoencoderKL
from diffusion_jax.models.discriminator import PatchDiscriminator
from diffusion_jax.training.autoencoder import autoencoder_loss_fn, params_fingerprint

__all__ = [
    "build_autoencoder",
    "build_discriminator",
    "build_autoencoder_loss",
    "init_autoencoder_params",
    "check_autoencoder",
    "RestoredAutoencoder",
    "restore_autoencoder",
    "latent_decoder",
]


def build_autoencoder(config) -> AutoencoderKL:
    """``AutoencoderKL`` for images of ``data.num_channels`` channels. The network's own scaling
    factor stays 1: the latent data set carries the scale (``autoencoder.scale_factor``)."""
    a = config.autoencoder
    channels = config.data.num_channels
    if channels is None:
        raise ConfigError("training.task = 'autoencoder' needs data.num_channels (the image channels)")
    try:
        return AutoencoderKL(
            in_channels=channels,
            out_channels=channels,
            block_out_channels=tuple(a.block_out_channels),
            layers_per_block=a.layers_per_block,
            latent_channels=a.latent_channels,
            norm_num_groups=a.norm_num_groups,
            mid_block_add_attention=a.mid_block_attention,
            scaling_factor=1.0,
        )
    except ValueError as e:
        raise ConfigError(f"config.autoencoder: {e}") from None


def build_discriminator(config) -> PatchDiscriminator | None:
    a = config.autoencoder
    if not a.disc_weight:
        return None
    return PatchDiscriminator(channels=a.disc_channels, num_layers=a.disc_layers)


def check_autoencoder(config) -> list[str]:
    """What the ``autoencoder`` section cannot build for this data (empty when it builds)."""
    try:
        ae = build_autoencoder(config)
    except ConfigError as e:
        return [str(e)]
    size = config.data.image_size
    problems = []
    if size is not None and size % ae.downsampling_factor:
        problems.append(
            f"autoencoder: data.image_size = {size} is not divisible by the downsampling factor "
            f"{ae.downsampling_factor} of {len(ae.block_out_channels)} levels (autoencoder.block_out_channels)"
        )
    if config.autoencoder.disc_weight and size is not None and size % 2**config.autoencoder.disc_layers:
        problems.append(
            f"autoencoder: data.image_size = {size} is not divisible by 2^disc_layers = "
            f"{2**config.autoencoder.disc_layers} (the patch discriminator's stride-2 layers)"
        )
    return problems


def build_autoencoder_loss(config, autoencoder: AutoencoderKL, discriminator: PatchDiscriminator | None):
    a = config.autoencoder
    return autoencoder_loss_fn(
        autoencoder,
        discriminator,
        reconstruction=a.reconstruction,
        kl_weight=a.kl_weight,
        sample_posterior=a.sample_posterior,
        disc_weight=a.disc_weight,
        disc_start=a.disc_start,
    )


def init_autoencoder_params(config, key) -> dict[str, Any]:
    """``{'autoencoder': ..., 'discriminator': ...}`` (the second only with ``disc_weight`` > 0)."""
    ae, disc = build_autoencoder(config), build_discriminator(config)
    size, channels = config.data.image_size, config.data.num_channels
    x = jnp.zeros((1, size, size, channels), jnp.float32)
    k_ae, k_disc = jax.random.split(key)
    params = {"autoencoder": ae.init(k_ae, x)["params"]}
    if disc is not None:
        params["discriminator"] = disc.init(k_disc, x)["params"]
    return params


@dataclasses.dataclass(frozen=True)
class RestoredAutoencoder:
    """A trained autoencoder: its workdir's config, the network, its parameters (the trained
    ones, not the EMA: latent diffusion's autoencoder is used as trained), the checkpoint step and
    the parameters' fingerprint."""

    config: Any
    module: AutoencoderKL
    params: Any
    step: int
    fingerprint: str
    workdir: pathlib.Path


def restore_autoencoder(workdir: str | os.PathLike, *, step: int | None = None) -> RestoredAutoencoder:
    """The autoencoder trained in ``workdir`` (its newest checkpoint, or ``step``); a workdir that
    is missing, holds no autoencoder, or has no readable checkpoint is a ConfigError."""
    from diffusion_jax.builders.diffusion import build_optimizer  # noqa: PLC0415
    from diffusion_jax.training import checkpoint as ckpt_lib  # noqa: PLC0415
    from diffusion_jax.training.state import init_train_state  # noqa: PLC0415

    workdir = pathlib.Path(workdir).expanduser()
    if not workdir.is_dir():
        raise ConfigError(f"autoencoder workdir {workdir} does not exist; train one with training.task = 'autoencoder'")
    config = config_lib.workdir_config(workdir)
    if config is None:
        raise ConfigError(f"{workdir} holds no config.py or config.json: it is not a trained autoencoder's workdir")
    config = config_lib.with_defaults(config)
    if config.training.task != "autoencoder":
        raise ConfigError(
            f"{workdir} was trained with training.task = {config.training.task!r}, not an autoencoder "
            "(training.task = 'autoencoder')"
        )
    module = build_autoencoder(config)
    params = jax.eval_shape(lambda k: init_autoencoder_params(config, k), jax.random.PRNGKey(0))
    optimizer = build_optimizer(config)
    template = jax.eval_shape(lambda p: init_train_state(p, optimizer, jax.random.PRNGKey(0)), params)
    template = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), template)
    if not (workdir / "checkpoints").is_dir():
        raise ConfigError(f"no checkpoint in {workdir / 'checkpoints'}; train the autoencoder first")
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", read_only=True)
    try:
        restored = checkpointer.restore(template, step=step)
    except ckpt_lib.NoCheckpointError as e:
        raise ConfigError(f"autoencoder workdir {workdir}: {e}") from None
    finally:
        checkpointer.close()
    ae_params = jax.device_get(restored.state.params["autoencoder"])
    return RestoredAutoencoder(
        config, module, ae_params, int(restored.step), params_fingerprint(ae_params), workdir.absolute()
    )


def latent_decoder(config, meta: dict[str, Any]) -> Callable[[Any], np.ndarray]:
    """``decode(latents) -> images in [0, 1]`` (NHWC numpy) for samples of a model trained on the
    latent data set described by ``meta`` (its ``latents.json``): divide by the set's scale
    factor, decode with the autoencoder that wrote the set, map [-1, 1] to [0, 1] when the
    autoencoder's data were centred. The autoencoder is ``data.autoencoder_workdir``, else the
    workdir recorded in ``meta``; a ConfigError when it is missing or its parameters are not the
    ones that wrote the latents."""
    recorded = meta["autoencoder"]
    workdir = config.data.autoencoder_workdir or recorded["workdir"]
    restored = restore_autoencoder(workdir, step=recorded["step"] if not config.data.autoencoder_workdir else None)
    if restored.fingerprint != recorded["fingerprint"]:
        raise ConfigError(
            f"the latents in {config.data.latent_dir} were written by another autoencoder: they record parameters "
            f"{recorded['fingerprint'][:16]}... (workdir {recorded['workdir']}, step {recorded['step']}), but "
            f"{restored.workdir} step {restored.step} has {restored.fingerprint[:16]}...; decode with the "
            "autoencoder that wrote them (data.autoencoder_workdir), or encode the data again with this one"
        )
    scale = float(meta["scale_factor"])
    centered = bool(meta["centered"])
    module, params = restored.module, restored.params

    @jax.jit
    def _decode(params, z):
        x = cast(jax.Array, module.apply({"params": params}, z / scale, method="decode"))
        return (x + 1.0) / 2.0 if centered else x

    def decode(latents) -> np.ndarray:
        out = [np.asarray(_decode(params, jnp.asarray(latents[i : i + 256]))) for i in range(0, len(latents), 256)]
        return np.clip(np.concatenate(out), 0.0, 1.0) if out else np.zeros((0,), np.float32)

    return decode
