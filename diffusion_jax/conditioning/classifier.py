"""Training and using a noise-conditional classifier ``p(y | x_t)`` for classifier guidance.

* :func:`classifier_loss_fn` -- the training objective (Song et al. 2021, App. I.4; Dhariwal &
  Nichol 2021, Sec. 4): cross-entropy of the label of ``x_0`` given ``x_t = alpha(t) x_0 +
  sigma(t) eps``, with ``t`` drawn by the same time samplers as the diffusion loss and the network
  called through the same parametrization (its input scaling and noise conditioning). The
  minimiser is the exact noised classifier ``p(y | x_t)`` at every ``t`` the sampler visits.
* :func:`trained_classifier` -- the network as the ``classifier_fn(x, t) -> logits`` that
  :class:`~diffusion_jax.conditioning.ClassifierGuidance` differentiates.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax.parametrization import Parametrization
from diffusion_jax.sde import SDE, require_marginals

Array = jax.Array

__all__ = ["classifier_loss_fn", "trained_classifier"]


def classifier_loss_fn(
    model_fn: Callable,
    sde: SDE,
    parametrization: Parametrization,
    *,
    time_sampler: Callable,
    data_key: str = "image",
    label_key: str = "label",
) -> Callable:
    """``loss_fn(params, batch, key) -> (loss, aux)``: the mean over the batch (its real examples
    when it carries a ``mask``) of ``-importance(t) log p_theta(y | x_t)``.

    ``model_fn(params, x_in, c_noise, cond, key) -> logits (B, num_classes)`` is the network as
    the training step calls it (:func:`diffusion_jax.builders.diffusion.make_model_fn`); ``batch``
    holds ``data_key`` ``(B, ...)`` and integer ``label_key`` ``(B,)``. ``aux``: the
    per-example loss, ``t`` and ``correct`` (1 where the arg-max class is the label)."""
    sde = require_marginals(sde, "classifier training")

    def loss_fn(params, batch, key):
        if label_key not in batch:
            raise KeyError(f"classifier training needs labels: the batch has no {label_key!r} entry ({sorted(batch)})")
        x0, labels = batch[data_key], batch[label_key].astype(jnp.int32)
        k_t, k_eps, k_model = jax.random.split(key, 3)
        t, importance = time_sampler(k_t, x0.shape[0], sde, jnp.promote_types(x0.dtype, jnp.float32))
        eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
        x_in, c_noise = parametrization.network_inputs(sde, sde.perturb(x0, t, eps), t)
        logits = model_fn(params, x_in, c_noise, {}, k_model).astype(jnp.float32)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=1)[:, 0]
        per_example = -importance * logp
        mask = batch.get("mask")
        mask = jnp.ones_like(per_example) if mask is None else mask.astype(per_example.dtype)
        loss = jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
        return loss, {"loss_per_example": per_example, "t": t, "correct": correct}

    return loss_fn


def _logits(module, sde: SDE, parametrization: Parametrization, params, x: Array, t: Array) -> Array:
    x_in, c_noise = parametrization.network_inputs(sde, x, t)
    return module.apply({"params": params}, x_in, c_noise, train=False)


def trained_classifier(module: Any, params: Any, sde: SDE, parametrization: Parametrization):
    """``classifier_fn(x, t) -> logits (B, num_classes)`` of a trained noise-conditional
    classifier, for :func:`~diffusion_jax.conditioning.classifier_guidance`. A
    ``jax.tree_util.Partial`` holding the parameters (passed to the jitted sampler as arguments,
    not baked in as constants). ``sde`` and ``parametrization`` must be those it was trained
    with: ``t`` means the same noise level for the classifier and the score model."""
    return jax.tree_util.Partial(functools.partial(_logits, module, sde, parametrization), params)
