"""The experiment: the typed objects one config describes (network, SDE, parametrization, mesh),
and the check that they build.

The modes (:mod:`diffusion_jax.modes`) start from :func:`build_experiment`; the config schema's
validation calls :func:`check_buildable`, so that every combination a constructor refuses is
reported before any work.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import parametrization as param_lib
from diffusion_jax.builders import diffusion as diffusion_builders
from diffusion_jax.builders import sharding as sharding_builders
from diffusion_jax.builders.config import ConfigError
from diffusion_jax.training import sharding as sharding_lib

__all__ = ["Experiment", "build_experiment", "check_buildable"]


@dataclasses.dataclass
class Experiment:
    """Everything built from one config."""

    config: ml_collections.ConfigDict
    module: Any
    sde: Any
    parametrization: param_lib.Parametrization
    mesh: Any
    data_info: Any
    input_shape: tuple[int, ...]
    _score_impl: Any = None
    # Latent diffusion: latents -> images in [0, 1] (the autoencoder that wrote the latent data
    # set; builders.autoencoder.latent_decoder), set by the modes' set-up. None: data space.
    decode: Any = None

    @property
    def null_label(self) -> int | None:
        """The reserved "no class" label of a class-conditional network (``model.num_classes``);
        None for unconditional networks and for a classifier (``training.task = 'classifier'``,
        whose ``num_classes`` are its outputs, not an input)."""
        if self.config.training.task == "classifier":
            return None
        return self.config.model.num_classes or None

    def model_fn(self, *, train: bool):
        return diffusion_builders.make_model_fn(
            self.module,
            train=train,
            class_dropout=self.config.training.class_dropout if train else 0.0,
            null_label=self.null_label,
        )

    def score_fn(self, params, *, class_labels=None, guidance_scale: float = 0.0):
        """The score of the network with ``params``; with class labels and ``guidance_scale`` w,
        classifier-free guidance (1 + w) s(x|y) - w s(x|null) (Ho & Salimans 2022).

        Returned as a ``jax.tree_util.Partial`` holding the parameters, so the samplers take
        them as arguments (no recompilation for new parameters, no giant constants)."""
        if self._score_impl is None:
            self._score_impl = functools.partial(_score, self.module, self.sde, self.parametrization, self.null_label)
        return jax.tree_util.Partial(self._score_impl, params, class_labels, float(guidance_scale))

    def init_params(self, key):
        x = jnp.zeros((1,) + self.input_shape, jnp.float32)
        labels = jnp.zeros((1,), jnp.float32)
        kwargs = {"class_labels": jnp.zeros((1,), jnp.int32)} if self.null_label is not None else {}
        init = jax.jit(
            lambda k: self.module.init({"params": k, "dropout": k}, x, labels, train=False, **kwargs)["params"]
        )
        return init(key)

    def layout(self, params) -> sharding_lib.Plan:
        """How ``params`` (arrays or ``jax.eval_shape`` structs) lie on the mesh (``config.mesh``)."""
        return sharding_builders.build_plan(self.config, params, self.mesh)

    def state_shardings(self, state, layout: sharding_lib.Plan | None = None):
        """``NamedSharding``s for a training state: the parameters by their layout, the Adam
        moments and every EMA like their parameters, the rest replicated."""
        return sharding_lib.state_shardings(state, layout if layout is not None else self.layout(state.params))

    def to_data_range(self, x):
        """Model-space samples -> the data's natural range [0, 1] (images) or as is (toys); latents
        of a latent data set are decoded to images in [0, 1]."""
        if self.decode is not None:
            return self.decode(x)
        centered = self.data_info.centered if self.data_info is not None else self.config.data.centered
        return (np.asarray(x) + 1.0) / 2.0 if centered else np.asarray(x)


def _score(module, sde, parametrization, null_label, params, class_labels, guidance_scale, x, t):
    def net(labels):
        kwargs = {} if labels is None else {"class_labels": labels}
        return lambda x_in, c: module.apply({"params": params}, x_in, c, train=False, **kwargs)

    score = parametrization.apply(net(class_labels), sde, x, t, "score")
    if class_labels is None or not guidance_scale:
        return score
    uncond = parametrization.apply(net(jnp.full_like(class_labels, null_label)), sde, x, t, "score")
    return (1.0 + guidance_scale) * score - guidance_scale * uncond


def build_experiment(config, *, data_info=None, devices=None) -> Experiment:
    """The experiment of ``config``, its mesh (``config.mesh``) over ``devices`` (default: all)."""
    from diffusion_jax.builders.model import build_model, model_input_shape

    module: Any
    try:
        if config.training.task == "autoencoder":  # the network is the autoencoder
            from diffusion_jax.builders.autoencoder import build_autoencoder  # noqa: PLC0415

            module = build_autoencoder(config)
        else:
            module = build_model(config)
        input_shape = tuple(model_input_shape(config, 1)[1:])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    sde = diffusion_builders.build_sde(config)
    parametrization = diffusion_builders.build_parametrization(config)
    mesh = sharding_builders.build_mesh(config, devices)
    return Experiment(config, module, sde, parametrization, mesh, data_info, input_shape)


def check_buildable(config) -> list[str]:
    """Messages for every part of the experiment that ``config`` cannot build (empty when all
    build): the network (when the image shape is known), SDE, parametrization, loss, optimiser
    and sampler. Nothing is initialised: this takes milliseconds."""
    from diffusion_jax.builders.model import build_model
    from diffusion_jax.builders.sampler import build_sampler

    problems: list[str] = []

    def attempt(what, fn):
        try:
            return fn()
        except (ConfigError, ValueError, TypeError) as e:
            problems.append(f"{what}: {e}" if not str(e).startswith(("config", what)) else str(e))
            return None

    if config.data.image_size is not None and config.data.num_channels is not None:
        if config.training.task == "autoencoder":  # the score network's keys are not read
            from diffusion_jax.builders.autoencoder import check_autoencoder  # noqa: PLC0415

            problems.extend(check_autoencoder(config))
        else:
            attempt("model", lambda: build_model(config))
    sde = attempt("training.sde", lambda: diffusion_builders.build_sde(config))
    parametrization = attempt("model", lambda: diffusion_builders.build_parametrization(config))
    if sde is not None and parametrization is not None:
        attempt(
            "training",
            lambda: diffusion_builders.build_loss(
                config, model_fn=lambda *a: None, sde=sde, parametrization=parametrization
            ),
        )
        attempt("sampling", lambda: build_sampler(config, sde=sde))
    attempt("optim", lambda: diffusion_builders.build_optimizer(config))
    return problems
