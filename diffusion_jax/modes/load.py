"""A trained model from its workdir, for scripts and notebooks: :func:`load`.

>>> import jax, diffusion_jax
>>> model = diffusion_jax.load("runs/digits")             # the newest checkpoint, EMA weights
>>> images, info = model.sample(jax.random.PRNGKey(0), 16)  # values in the data's range
>>> images, info = model.sample(jax.random.PRNGKey(0), 16, sampler="dpmpp_2m", num_steps=10)
>>> logp, info = model.log_likelihood(jax.random.PRNGKey(1), x)  # x in the model's space
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import likelihood as likelihood_lib
from diffusion_jax import samplers as samplers_lib
from diffusion_jax.builders import config as config_lib
from diffusion_jax.builders.config import ConfigError
from diffusion_jax.builders.experiment import Experiment
from diffusion_jax.builders.sampler import build_sampler
from diffusion_jax.data.info import DataInfo
from diffusion_jax.modes import setup
from diffusion_jax.modes.posthoc_ema import chosen_params
from diffusion_jax.sde import SDE

__all__ = ["load", "TrainedModel", "load_params"]


@dataclasses.dataclass
class TrainedModel:
    """One checkpoint of a workdir: its config, SDE, network (``module``), EMA parameters and data.

    ``sample`` and the likelihoods use the EMA parameters, as the ``sample`` and ``eval`` modes do.
    """

    config: ml_collections.ConfigDict
    sde: SDE
    module: Any
    params: Any
    data_info: DataInfo | None
    step: int
    workdir: pathlib.Path
    experiment: Experiment

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one example, ``(H, W, C)`` for images."""
        return self.experiment.input_shape

    def score_fn(self, *, labels: Any = None, guidance_scale: float = 0.0):
        """``score(x, t)`` of the network; with ``labels`` (one per example) and
        ``guidance_scale`` w, classifier-free guidance (1 + w) s(x|y) - w s(x|null)."""
        if labels is not None:
            labels = jnp.asarray(labels, jnp.int32)
        return self.experiment.score_fn(self.params, class_labels=labels, guidance_scale=guidance_scale)

    def sample(
        self,
        key: jax.Array,
        n: int,
        *,
        sampler: samplers_lib.Sampler | str | None = None,
        labels: Sequence[int] | jax.Array | None = None,
        guidance_scale: float | None = None,
        data_range: bool = True,
        **sampler_kwargs: Any,
    ) -> tuple[np.ndarray, samplers_lib.SampleInfo]:
        """``n`` samples: ``(images, info)``. ``sampler``: a sampler, a name (built with
        ``sampler_kwargs``) or None for the config's. ``labels``: one class per sample (or one for
        all) of a class-conditional network; ``guidance_scale`` defaults to the config's. With
        ``data_range`` the samples are in the data's range ([0, 1] for images), else the model's."""
        if sampler is None:
            smp = build_sampler(self.config, sde=self.sde)
            if sampler_kwargs:
                smp = smp.replace(**sampler_kwargs)
        elif isinstance(sampler, str):
            smp = samplers_lib.get_sampler(sampler, **sampler_kwargs)
        else:
            smp = sampler
        y = None
        if labels is not None:
            if not self.config.model.num_classes:
                raise ValueError("labels need a class-conditional network (model.num_classes > 0)")
            y = jnp.broadcast_to(jnp.asarray(labels, jnp.int32).reshape(-1), (n,))
        w = self.config.sampling.guidance_scale if guidance_scale is None else guidance_scale
        fn = self.score_fn(labels=y, guidance_scale=w)
        x, info = samplers_lib.sample(key, fn, self.sde, (n, *self.shape), smp)
        host = np.asarray(jax.device_get(x))
        return (self.experiment.to_data_range(host) if data_range else host), info

    def log_likelihood(self, key: jax.Array, x: jax.Array, *, labels: Any = None, **kwargs: Any):
        """``(log p(x) in nats per example, info)`` of a batch ``x`` in the model's space
        (:func:`diffusion_jax.likelihood.log_likelihood`; ``kwargs`` go there)."""
        return likelihood_lib.log_likelihood(key, self.score_fn(labels=labels), self.sde, x, **kwargs)

    def bits_per_dim(self, key: jax.Array, levels: jax.Array, *, labels: Any = None, **kwargs: Any):
        """``(bits/dim per example, info)`` of integer ``levels`` of the data's discrete values
        (dequantized with the data's own number of levels and value range)."""
        info = self.data_info
        if info is None or info.num_levels is None:
            raise ValueError("bits per dimension need discrete data (the data set's DataInfo with num_levels)")
        lo, hi = info.value_range
        disc = likelihood_lib.Discretization(num_levels=info.num_levels, value_range=(float(lo), float(hi)))
        return likelihood_lib.bits_per_dim(
            key, self.score_fn(labels=labels), self.sde, levels, discretization=disc, **kwargs
        )


def load(workdir: str | pathlib.Path, step: int | None = None, *, config=None, ema: str | None = None) -> TrainedModel:
    """The model of ``workdir`` at checkpoint ``step`` (the newest readable one when None), built
    from the config stored in the workdir (or ``config``, which may differ only in sampling and
    evaluation keys). ``ema`` picks the average as ``sampling.ema`` does (default: the config's,
    normally the EMA of ``model.ema_rate``): ``'params'``, ``'rate:R'`` or ``'sigma_rel:S'``
    (docs/ema.md). Raises :class:`~diffusion_jax.builders.config.ConfigError` with one message
    when the workdir has no config or no checkpoint, or the average was not tracked or written."""
    setup.quiet_library_notices()
    workdir = pathlib.Path(workdir)
    stored = config_lib.workdir_config(workdir)
    if stored is None and config is None:
        raise ConfigError(f"{workdir} holds no config.py or config.json: train first, or pass config=")
    if config is None:
        config = stored
    elif stored is not None:
        config_lib.check_mutable(stored, config, str(workdir))
    if ema is not None:
        config = ml_collections.ConfigDict(config.to_dict())
        config.sampling.ema = ema
    run = setup.prepare(config, workdir, create=False, need_data=False)
    setup.checkpoint_steps(run.workdir)
    got, state = setup.restore_state(run.config, run.exp, run.workdir, step)
    exp = run.exp
    params = chosen_params(run.config, exp, run.workdir, int(got), state)
    return TrainedModel(run.config, exp.sde, exp.module, params, exp.data_info, int(got), workdir, exp)


def load_params(config, workdir, *, step: int | None = None) -> tuple[Experiment, int, Any]:
    """``(experiment, step, EMA parameters)`` of a checkpoint in ``workdir`` trained with ``config``."""
    model = load(workdir, step, config=config)
    return model.experiment, model.step, model.params
