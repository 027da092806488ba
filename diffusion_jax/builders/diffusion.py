"""Build the diffusion pieces from a config: SDE, parametrization, loss and optimiser.

Reads ``config.training`` (sde, continuous, weighting, ...), ``config.model`` (SDE parameters
under score_sde's names, ``output`` / ``noise_cond``) and ``config.optim``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from diffusion_jax import losses as losses_lib
from diffusion_jax import parametrization as param_lib
from diffusion_jax import sde as sde_lib
from diffusion_jax.builders.config import ConfigError
from diffusion_jax.training.ema import MultiEma
from diffusion_jax.training.state import learning_rate_schedule, make_optimizer

__all__ = [
    "build_sde",
    "build_parametrization",
    "build_loss",
    "build_optimizer",
    "build_ema",
    "learning_rate_fn",
    "make_model_fn",
]


def build_sde(config) -> sde_lib.SDE:
    """``training.sde`` with its parameters from ``config.model`` (score_sde's layout)."""
    name = config.training.sde.lower()
    m = config.model
    kwargs: dict[str, Any] = {
        "vesde": dict(sigma_min=m.sigma_min, sigma_max=m.sigma_max, N=m.num_scales),
        "vpsde": dict(beta_min=m.beta_min, beta_max=m.beta_max, N=m.num_scales),
        "subvpsde": dict(beta_min=m.beta_min, beta_max=m.beta_max, N=m.num_scales),
        "edm": dict(sigma_min=m.sigma_min, sigma_max=m.sigma_max),
        "cosine": dict(s=m.cosine_s),
        "rectified_flow": {},
    }[name]
    if m.T and name != "edm":
        kwargs["T"] = m.T
    if m.sampling_eps and name != "edm":
        kwargs["t_min"] = m.sampling_eps
    try:
        return sde_lib.get_sde(name, **kwargs)
    except ValueError as e:
        raise ConfigError(f"config.model (SDE {name!r}): {e}") from None


def build_parametrization(config) -> param_lib.Parametrization:
    """``model.output`` / ``model.noise_cond``; empty means score_sde's convention for the SDE
    (and EDM's preconditioning for ``training.sde = 'edm'``)."""
    m, training = config.model, config.training
    name = training.sde.lower()
    if not m.output:
        if name == "edm":
            return param_lib.edm_parametrization(m.sigma_data)
        try:
            return param_lib.score_sde_parametrization(name, continuous=training.continuous, num_scales=m.num_scales)
        except ValueError:
            raise ConfigError(
                f"training.sde = {training.sde!r} has no score_sde convention: set model.output (one of "
                f"{', '.join(param_lib.OUTPUTS)}) and model.noise_cond (one of "
                f"{', '.join(param_lib.NOISE_CONDITIONINGS)})"
            ) from None
    try:
        return param_lib.Parametrization(
            output=m.output,
            noise_cond=m.noise_cond,
            input_scaling="edm" if m.output == "edm" else "none",
            sigma_data=m.sigma_data,
            num_scales=m.num_scales,
        )
    except ValueError as e:
        raise ConfigError(f"config.model: {e}") from None


def make_model_fn(module, *, train: bool, class_dropout: float = 0.0, null_label: int | None = None):
    """Adapt a network ``module.apply(variables, x, labels, class_labels=, context=, train=, rngs=)``
    to the losses' ``model_fn(params, x, c_noise, cond, key)``. With ``class_dropout`` > 0, class
    labels are replaced by the null label with that probability (classifier-free guidance
    training, Ho & Salimans 2022)."""

    def model_fn(params, x, c_noise, cond, key):
        # Unconditional networks ignore the data set's labels.
        labels = cond.get("label") if null_label is not None else None
        k_drop, k_cfg = jax.random.split(key)
        if labels is not None and null_label is not None and class_dropout > 0 and train:
            drop = jax.random.bernoulli(k_cfg, class_dropout, labels.shape)
            labels = jnp.where(drop, null_label, labels)
        kwargs = {}
        if labels is not None:
            kwargs["class_labels"] = labels
        if "context" in cond:
            kwargs["context"] = cond["context"]
        return module.apply({"params": params}, x, c_noise, train=train, rngs={"dropout": k_drop}, **kwargs)

    return model_fn


def build_loss(config, *, model_fn: Callable, sde: sde_lib.SDE, parametrization: param_lib.Parametrization):
    """score_sde's ``get_step_fn`` choice: continuous DSM for any linear SDE; discrete SMLD for
    VE and DDPM for VP when ``training.continuous`` is False (the schema allows no other SDE)."""
    training = config.training
    if not training.continuous:
        if training.sde.lower() == "vesde":
            return losses_lib.smld_loss_fn(model_fn, sde, reduce_mean=training.reduce_mean)
        return losses_lib.ddpm_loss_fn(model_fn, sde, reduce_mean=training.reduce_mean)
    weighting = "likelihood" if training.likelihood_weighting else training.weighting
    name = training.time_sampler
    if name == "lognormal":
        sampler = losses_lib.LogNormalSigma(p_mean=training.p_mean, p_std=training.p_std)
    else:
        sampler = losses_lib.get_time_sampler(name, t_min=training.eps)
    if training.task == "classifier":
        # Cross-entropy of the label at the noise levels the diffusion loss draws.
        from diffusion_jax.conditioning.classifier import classifier_loss_fn

        try:
            return classifier_loss_fn(model_fn, sde, parametrization, time_sampler=sampler)
        except ValueError as e:
            raise ConfigError(f"config.training: {e}") from None
    try:
        return losses_lib.dsm_loss_fn(
            model_fn,
            sde,
            parametrization,
            weighting=weighting,
            time_sampler=sampler,
            reduce_mean=training.reduce_mean,
            sigma_data=config.model.sigma_data,
            min_snr_gamma=training.min_snr_gamma,
        )
    except ValueError as e:
        raise ConfigError(f"config.training: {e}") from None


def build_optimizer(config):
    o = config.optim
    return make_optimizer(
        optimizer=o.optimizer,
        lr=o.lr,
        beta1=o.beta1,
        beta2=o.beta2,
        eps=o.eps,
        weight_decay=o.weight_decay,
        warmup=o.warmup,
        grad_clip=o.grad_clip,
    )


def build_ema(config) -> MultiEma | None:
    """The extra EMAs of ``model.ema_rates`` and ``model.ema_sigma_rels``; None when there are none."""
    m = config.model
    ema = MultiEma(rates=tuple(m.ema_rates), sigma_rels=tuple(m.ema_sigma_rels), warmup=m.ema_warmup)
    return ema if ema else None


def learning_rate_fn(config) -> optax.Schedule:
    """The learning-rate schedule the optimiser of :func:`build_optimizer` uses (for the logs)."""
    return learning_rate_schedule(lr=config.optim.lr, warmup=config.optim.warmup)
