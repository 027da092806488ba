"""The autoencoder task of latent diffusion: its loss, its reconstruction metrics and the
fingerprint that ties latents to the parameters that wrote them.

Rombach et al. 2022 (sec. 3, App. G) train a KL-regularised autoencoder with

    L = sum_pixels |x - D(z)|  +  kl_weight * KL(q(z | x) || N(0, I))  +  disc_weight * L_G,
    z ~ q(z | x) = N(mean(x), diag(exp(logvar(x)))),

the reconstruction summed over pixels and averaged over the batch (``kl_weight`` 1e-6 in their
configs), and, from step ``disc_start``, a patch discriminator trained with the hinge loss

    L_D = 1/2 (E[max(0, 1 - D(x))] + E[max(0, 1 + D(x_hat))]),   L_G = -E[D(x_hat)]

(Lim & Ye 2017; the expectations over patches and the batch). Differences from their loss: the
weight of ``L_G`` is fixed (``disc_weight``) instead of their adaptive ratio of gradient norms at
the decoder's last layer, there is no perceptual (LPIPS) term, and the per-pixel log-variance they
learn is fixed at 0 (their initial value), which makes their NLL term the plain reconstruction.

Both networks train in one step with one optimiser: the parameters are one pytree
``{'autoencoder': ..., 'discriminator': ...}`` and the loss is ``L_ae + L_D`` where the
autoencoder's terms see the discriminator's parameters through ``stop_gradient`` and ``L_D``
sees the reconstruction through ``stop_gradient``. The gradient of the sum with respect to each
group is then exactly the gradient of that group's own loss, and Adam, being per-parameter, acts
as two optimisers with the same settings (as the reference uses).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

__all__ = ["RECONSTRUCTIONS", "autoencoder_loss_fn", "reconstruction_metrics", "params_fingerprint"]

RECONSTRUCTIONS = ("l1", "l2")


def _per_example_sum(x: jax.Array) -> jax.Array:
    return jnp.sum(x.astype(jnp.float32), axis=tuple(range(1, x.ndim)))


def autoencoder_loss_fn(
    autoencoder: Any,
    discriminator: Any | None = None,
    *,
    reconstruction: str = "l1",
    kl_weight: float = 1e-6,
    sample_posterior: bool = True,
    disc_weight: float = 0.0,
    disc_start: int = 0,
) -> Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]:
    """``loss_fn(params, batch, key) -> (loss, aux)`` for :func:`diffusion_jax.training.make_train_step`.

    ``params``: ``{'autoencoder': ..., 'discriminator': ...}`` (the second only with a
    ``discriminator``). ``batch['image']`` (B, H, W, C) in [-1, 1]; ``batch['step']`` (B,), the
    optimiser step of the batch, switches the adversarial terms on at ``disc_start``; a batch
    without ``'step'`` (evaluation) has none. ``aux['loss_per_example']`` (B,) is the
    reconstruction plus the weighted KL; ``aux`` also holds the batch means of ``rec`` and ``kl``.
    """
    if reconstruction not in RECONSTRUCTIONS:
        raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {reconstruction!r}")
    if disc_weight and discriminator is None:
        raise ValueError("disc_weight > 0 needs a discriminator")

    def loss_fn(params, batch, key):
        x = batch["image"]
        posterior = autoencoder.apply({"params": params["autoencoder"]}, x, method="encode")
        z = posterior.sample(key) if sample_posterior else posterior.mode()
        x_hat = autoencoder.apply({"params": params["autoencoder"]}, z, method="decode").astype(jnp.float32)
        err = x_hat - x
        rec = _per_example_sum(jnp.abs(err) if reconstruction == "l1" else jnp.square(err))
        kl = posterior.kl()
        per_example = rec + kl_weight * kl
        loss = jnp.mean(per_example)
        aux = {"loss_per_example": per_example, "rec": jnp.mean(rec), "kl": jnp.mean(kl)}
        if discriminator is not None and "step" in batch:
            d_params = params["discriminator"]
            on = (batch["step"] >= disc_start).astype(jnp.float32)  # (B,)
            # Generator term: gradients reach the autoencoder only.
            fake_for_g = discriminator.apply({"params": jax.lax.stop_gradient(d_params)}, x_hat)
            g_loss = -jnp.mean(fake_for_g, axis=(1, 2, 3))
            # Hinge loss of the discriminator: gradients reach the discriminator only.
            real = discriminator.apply({"params": d_params}, x)
            fake = discriminator.apply({"params": d_params}, jax.lax.stop_gradient(x_hat))
            d_loss = 0.5 * (
                jnp.mean(jax.nn.relu(1.0 - real), axis=(1, 2, 3)) + jnp.mean(jax.nn.relu(1.0 + fake), axis=(1, 2, 3))
            )
            loss = loss + jnp.mean(on * (disc_weight * g_loss + d_loss))
            aux.update(g_loss=jnp.mean(g_loss), d_loss=jnp.mean(d_loss))
        return loss, aux

    return loss_fn


def reconstruction_metrics(autoencoder: Any, *, value_width: float = 2.0) -> Callable[[Any, dict], dict]:
    """``metrics(ae_params, batch) -> sums`` over the real examples of a (masked) batch,
    reconstructing from the posterior mean, with errors in units of the data's value range
    (``value_width``: 2 for data centred to [-1, 1]), i.e. as for images in [0, 1]: ``count``,
    ``abs`` (sum over examples of the mean |x - x_hat| per pixel), ``sq`` (of the mean squared
    error) and ``psnr`` (of 10 log10(1 / mean squared error), in dB)."""

    def metrics(params, batch):
        x = batch["image"]
        x_hat = autoencoder.apply({"params": params}, x).astype(jnp.float32)
        err = (x_hat - x) / value_width
        mask = batch.get("mask")
        mask = jnp.ones(x.shape[:1], jnp.float32) if mask is None else mask.astype(jnp.float32)
        d = float(np.prod(x.shape[1:]))
        per_abs = _per_example_sum(jnp.abs(err)) / d
        per_sq = _per_example_sum(jnp.square(err)) / d
        psnr_terms = -10.0 * jnp.log10(jnp.maximum(per_sq, 1e-12))
        return {
            "count": jnp.sum(mask),
            "abs": jnp.sum(mask * per_abs),
            "sq": jnp.sum(mask * per_sq),
            "psnr": jnp.sum(mask * psnr_terms),
        }

    return metrics


def params_fingerprint(params: Any) -> str:
    """SHA-256 of a parameter pytree: every leaf's path, dtype, shape and bytes, in sorted path
    order. Equal parameters give equal fingerprints on any host and device layout; any changed
    value changes it."""
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/") if isinstance(params, dict) else None
    if flat is None:
        leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(params))
        flat = {jax.tree_util.keystr(p): v for p, v in leaves}
    h = hashlib.sha256()
    for name in sorted(flat):
        value = np.ascontiguousarray(np.asarray(flat[name]))
        h.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        h.update(value.tobytes())
    return h.hexdigest()
