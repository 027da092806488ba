"""Conditioning inputs shared by the networks: noise labels, class labels, context sequences.

* Noise labels are whatever score_sde passed to its networks (``labels``): sigma(t) for VE
  continuous training, ``999 t`` for VP continuous, the integer step index for discrete training.
* Class labels ``(B,)`` int index an ``nn.Embed`` with ``num_classes + 1`` rows; the last row
  (``null_label = num_classes``) is the "no class" token used for classifier-free guidance
  (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", sec. 3.2). Omitting the labels of a
  class-conditional network means the null label for every example.
* ``context`` ``(B, L, D)`` is attended to by cross-attention blocks at chosen resolutions.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["batch_labels", "add_class_embedding", "check_context", "check_unet_inputs"]


def batch_labels(noise_labels: Any, batch: int, owner: str) -> Array:
    """Noise labels as a ``(B,)`` array: a scalar is broadcast to the batch."""
    labels = jnp.asarray(noise_labels)
    if labels.ndim == 0:
        return jnp.broadcast_to(labels, (batch,))
    if labels.shape != (batch,):
        raise ValueError(f"{owner}: noise_labels must be a scalar or of shape ({batch},), got {labels.shape}")
    return labels


def add_class_embedding(
    temb: Array | None,
    class_labels: Any,
    *,
    num_classes: int,
    features: int,
    batch: int,
    owner: str,
    dtype: Any,
    param_dtype: Any,
) -> Array | None:
    """Adds a learned class embedding to ``temb`` (``(B, features)``); must be called inside a
    compact method (it creates the submodule ``class_embed``). Returns ``temb`` unchanged when
    the network is unconditional (``num_classes == 0``)."""
    if num_classes <= 0:
        if class_labels is not None:
            raise ValueError(
                f"{owner} got class_labels but was built with num_classes=0; set num_classes > 0 "
                f"for a class-conditional network"
            )
        return temb
    if class_labels is None:
        labels = jnp.full((batch,), num_classes, jnp.int32)  # the null label
    else:
        labels = jnp.asarray(class_labels)
        if labels.shape != (batch,) or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(
                f"{owner}: class_labels must be integers of shape ({batch},), got {labels.dtype} {labels.shape}"
            )
    emb = nn.Embed(num_classes + 1, features, dtype=dtype, param_dtype=param_dtype, name="class_embed")(labels)
    return emb if temb is None else temb + emb


def check_context(context: Any, cross_attn_resolutions: tuple[int, ...], batch: int, owner: str) -> Array | None:
    """Validates the cross-attention context ``(B, L, D)`` against the network's configuration."""
    if not cross_attn_resolutions:
        if context is not None:
            raise ValueError(
                f"{owner} got a context but was built without cross-attention; set "
                f"cross_attn_resolutions to the resolutions that should attend to it"
            )
        return None
    if context is None:
        raise ValueError(
            f"{owner} was built with cross_attn_resolutions={cross_attn_resolutions} and needs a "
            f"context of shape (B, L, D)"
        )
    context = jnp.asarray(context)
    if context.ndim != 3 or context.shape[0] != batch:
        raise ValueError(f"{owner}: context must have shape ({batch}, L, D), got {context.shape}")
    return context


def check_unet_inputs(module: nn.Module, x: Any, noise_labels: Any, context: Any) -> tuple[Array, Array | None]:
    """The input checks the U-Nets (NCSN++ / DDPM++ and DDPM) share: NHWC images, one noise
    label per example (or one for all), and a context that fits the cross-attention settings.
    Returns ``(labels of shape (B,), context)``."""
    owner = type(module).__name__
    if x.ndim != 4:
        raise ValueError(f"{owner} expects NHWC images (B, H, W, C), got shape {x.shape}")
    batch = x.shape[0]
    labels = batch_labels(noise_labels, batch, owner)
    context = check_context(context, module.cross_attn_resolutions, batch, owner)
    if context is not None and module.context_dim is not None and context.shape[-1] != module.context_dim:
        raise ValueError(
            f"{owner}: context has {context.shape[-1]} features, expected context_dim={module.context_dim}"
        )
    return labels, context
