"""A score network conditioned on text through cross-attention, with its text encoder trained
alongside it (latent diffusion's text-to-image setup, Rombach et al. 2022 sec. 3.3, with a small
encoder trained from scratch on a closed vocabulary instead of a frozen CLIP).

``TextConditioned(network=unet, encoder=text_transformer)`` is itself a network of the usual
signature ``(x, c_noise, *, class_labels=None, context=None, train=False)``, where ``context`` is
a batch of token ids (B, L) (``<bos> words <eos> <pad>...``, a
:class:`~diffusion_jax.models.tokenizer.WordTokenizer`'s output) instead of vectors: the encoder
turns them into the (B, L, width) sequence the U-Net's cross-attention reads.

Classifier-free guidance (Ho & Salimans 2022) needs an unconditional model: the *null caption*
``<bos> <eos>`` (the empty prompt, as Stable Diffusion uses ``""``) stands for "no condition".
In training, each caption is replaced by it with probability ``caption_dropout`` (drawn from
the ``dropout`` RNG stream). ``context=None`` and rows that are all padding (the padding rows of
evaluation batches) are the null caption too, so no attention ever sees an all-masked row.

``EmbeddingConditioned(network=unet, context_dim=D)`` reads captions already embedded by a frozen
text encoder (``context``: float (B, L, D), e.g. CLIP's last hidden states stored in a latent
data set). "No caption" is a learned *null token* ``null_context`` (1, D) (zeros at
initialisation), the unconditional model of classifier-free guidance.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.text import TextTransformer

__all__ = ["TextConditioned", "EmbeddingConditioned", "null_caption"]


def null_caption(batch: int, max_length: int, *, bos_id: int = 1, eos_id: int = 2, pad_id: int = 0) -> jax.Array:
    """(batch, max_length) ids of the empty caption ``<bos> <eos> <pad>...``."""
    row = jnp.full((max_length,), pad_id, jnp.int32).at[0].set(bos_id).at[1].set(eos_id)
    return jnp.broadcast_to(row, (batch, max_length))


class TextConditioned(nn.Module, kw_only=True):
    network: nn.Module
    encoder: TextTransformer
    caption_dropout: float = 0.0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 0

    @property
    def max_length(self) -> int:
        return self.encoder.max_position_embeddings

    def null(self, batch: int) -> jax.Array:
        return null_caption(batch, self.max_length, bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id)

    @nn.compact
    def __call__(self, x, c_noise, *, class_labels=None, context=None, train: bool = False):
        b = x.shape[0]
        null = self.null(b)
        if context is None:
            ids = null
        else:
            ids = jnp.asarray(context).astype(jnp.int32)
            if ids.ndim != 2 or ids.shape != (b, self.max_length):
                raise ValueError(
                    f"TextConditioned: expected token ids of shape ({b}, {self.max_length}), got {tuple(ids.shape)}"
                )
            ids = jnp.where(ids[:, :1] == self.pad_id, null, ids)  # padding rows: the null caption
        if train and self.caption_dropout > 0:
            drop = jax.random.bernoulli(self.make_rng("dropout"), self.caption_dropout, (b,))
            ids = jnp.where(drop[:, None], null, ids)
        tokens = self.encoder(ids, attention_mask=ids != self.pad_id).last_hidden_state
        kwargs = {} if class_labels is None else {"class_labels": class_labels}
        return self.network(x, c_noise, context=tokens, train=train, **kwargs)


class EmbeddingConditioned(nn.Module, kw_only=True):
    """``network`` reading precomputed caption embeddings ``context`` (B, L, context_dim) through
    its cross-attention.

    The learned null token ``null_context`` (1, context_dim) stands for "no caption":
    ``context=None`` gives it as a (B, 1, D) context; rows that are all zeros (the padding rows of
    evaluation batches, and "no negative prompt" at sampling) become it broadcast to the L
    positions. Cross-attention over L identical tokens equals attention over one (the softmax
    weights are equal and sum to 1, so the output is that token's value), so both forms are the
    same unconditional model. With ``train`` and ``caption_dropout`` > 0, each row is replaced by
    the null token with that probability (RNG stream ``dropout``)."""

    network: nn.Module
    context_dim: int
    caption_dropout: float = 0.0

    @nn.compact
    def __call__(self, x, c_noise, *, class_labels=None, context=None, train: bool = False):
        b, d = x.shape[0], self.context_dim
        null = self.param("null_context", nn.initializers.zeros, (1, d), jnp.float32)
        if context is None:
            tokens = jnp.broadcast_to(null[None], (b, 1, d))
        else:
            tokens = jnp.asarray(context, jnp.float32)
            if tokens.ndim != 3 or tokens.shape[0] != b or tokens.shape[2] != d:
                raise ValueError(
                    f"EmbeddingConditioned: expected caption embeddings of shape ({b}, L, {d}), got "
                    f"{tuple(tokens.shape)}"
                )
            empty = jnp.all(tokens == 0, axis=(1, 2))  # padding rows: the null token
            if train and self.caption_dropout > 0:
                empty = empty | jax.random.bernoulli(self.make_rng("dropout"), self.caption_dropout, (b,))
            tokens = jnp.where(empty[:, None, None], null[None], tokens)
        kwargs = {} if class_labels is None else {"class_labels": class_labels}
        return self.network(x, c_noise, context=tokens, train=train, **kwargs)
