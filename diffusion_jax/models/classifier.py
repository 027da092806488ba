"""A noise-conditional image classifier ``log p(y | x_t)`` for classifier guidance.

score_sde guides its CIFAR-10 samples with a classifier trained on noised images (Song et al.
2021, Sec. 5 and App. I.4: a Wide-ResNet conditioned on the noise level); ADM's classifier is the
encoder half of its U-Net (Dhariwal & Nichol 2021, Sec. 4). This network is that encoder in
small: per resolution ``num_res_blocks`` residual blocks that add an embedding of the noise
level, 2x average pooling between resolutions, then GroupNorm, the activation, a global average
and a dense layer to ``num_classes`` logits.

Called like the score networks, ``logits = module.apply(variables, x, noise_labels, train=...,
rngs={'dropout': key})`` with ``x`` ``(B, H, W, C)`` (the parametrization's network input) and
``noise_labels`` ``(B,)`` (its noise conditioning); the output is ``(B, num_classes)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import GaussianFourierProjection, get_activation, timestep_embedding

Array = jax.Array

__all__ = ["NoiseConditionalClassifier"]


class _Block(nn.Module, kw_only=True):
    """Pre-activation residual block with the noise embedding added after the first convolution."""

    channels: int
    dropout: float
    nonlinearity: str

    @nn.compact
    def __call__(self, x: Array, emb: Array, train: bool) -> Array:
        act = get_activation(self.nonlinearity)
        h = act(nn.GroupNorm(num_groups=min(x.shape[-1] // 4, 32), epsilon=1e-6)(x))
        h = nn.Conv(self.channels, (3, 3))(h)
        h = h + nn.Dense(self.channels)(act(emb))[:, None, None, :]
        h = act(nn.GroupNorm(num_groups=min(self.channels // 4, 32), epsilon=1e-6)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.Conv(self.channels, (3, 3), kernel_init=nn.initializers.zeros)(h)
        if x.shape[-1] != self.channels:
            x = nn.Conv(self.channels, (1, 1))(x)
        return x + h


class NoiseConditionalClassifier(nn.Module, kw_only=True):
    """``(x (B, H, W, C), noise_labels (B,)) -> logits (B, num_classes)``.

    ``embedding_type``: ``"positional"`` embeds the noise label as the DDPM time embedding,
    ``"fourier"`` embeds its logarithm with random Fourier features (NCSN++'s choice for
    ``sigma``-valued labels).
    """

    num_classes: int
    nf: int = 32
    ch_mult: Sequence[int] = (1, 2)
    num_res_blocks: int = 1
    dropout: float = 0.0
    nonlinearity: str = "swish"
    embedding_type: str = "positional"
    fourier_scale: float = 16.0

    @nn.compact
    def __call__(self, x: Array, noise_labels: Array, *, train: bool = False) -> Array:
        act = get_activation(self.nonlinearity)
        labels = jnp.broadcast_to(jnp.asarray(noise_labels, jnp.float32), x.shape[:1])
        if self.embedding_type == "fourier":
            emb = GaussianFourierProjection(embedding_size=self.nf, scale=self.fourier_scale)(jnp.log(labels))
        elif self.embedding_type == "positional":
            emb = timestep_embedding(labels, self.nf)
        else:
            raise ValueError(f"unknown embedding_type {self.embedding_type!r}; valid: fourier, positional")
        emb = nn.Dense(4 * self.nf)(emb)
        emb = nn.Dense(4 * self.nf)(act(emb))
        h = nn.Conv(self.nf, (3, 3))(x)
        for level, mult in enumerate(self.ch_mult):
            for _ in range(self.num_res_blocks):
                h = _Block(channels=self.nf * mult, dropout=self.dropout, nonlinearity=self.nonlinearity)(h, emb, train)
            if level + 1 < len(self.ch_mult):
                h = nn.avg_pool(h, (2, 2), strides=(2, 2))
        h = act(nn.GroupNorm(num_groups=min(h.shape[-1] // 4, 32), epsilon=1e-6)(h))
        return nn.Dense(self.num_classes)(jnp.mean(h, axis=(1, 2)))
