"""Prompts and negative prompts for ``sample``: tokenised with the model's caption tokenizer
(``model.text_encoder = 'tiny'``) or embedded by the frozen text encoder that wrote the latent
set's caption embeddings (``'precomputed'``), then sampled with classifier-free guidance on text
(:mod:`diffusion_jax.conditioning.text`)."""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.builders.config import ConfigError
from diffusion_jax.builders.model import caption_tokenizer
from diffusion_jax.conditioning.text import text_guided_score
from diffusion_jax.models.text_conditioned import null_caption
from diffusion_jax.models.tokenizer import TokenizerError
from diffusion_jax.training.logging import progress_bar

__all__ = ["Prompt", "prompt_context", "sample_prompt"]


class Prompt(NamedTuple):
    """The network's context for the prompt and for the negative prompt: token ids (1, L) (the
    empty caption without a negative prompt) or embeddings (1, L, D) (zeros, the null token,
    without one)."""

    context: np.ndarray
    negative_context: np.ndarray


def prompt_context(config, prompt: str, negative_prompt: str | None = None) -> Prompt:
    """The prompt as the workdir's model reads it; a ConfigError (one message) for a model
    without a text encoder, an unknown word, a prompt that does not fit, or (precomputed
    embeddings) a text encoder that is gone or is not the one that wrote the latent set."""
    if config.model.text_encoder == "none":
        raise ConfigError(
            "--prompt needs a text-conditioned model (model.text_encoder); this workdir's model has no text encoder"
        )
    if config.model.text_encoder == "precomputed":
        return _embedded(config, prompt, negative_prompt)
    tok = caption_tokenizer(config.data.captions)
    try:
        ids = tok([prompt])
        neg = tok([negative_prompt]) if negative_prompt else None
    except TokenizerError as e:
        raise ConfigError(str(e)) from None
    if neg is None:
        neg = np.asarray(null_caption(1, tok.max_length, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id))
    return Prompt(ids, neg)


def _embedded(config, prompt: str, negative_prompt: str | None) -> Prompt:
    """(1, L, D) embeddings of the prompt and negative prompt by the text encoder recorded in the
    latent set, after checking it is the one that wrote the captions' embeddings."""
    from diffusion_jax.builders.text_encoder import load_frozen_text_encoder  # noqa: PLC0415
    from diffusion_jax.data.latent import read_metadata  # noqa: PLC0415
    from diffusion_jax.modes.setup import check_latent_captions  # noqa: PLC0415

    meta = read_metadata(config.data.latent_dir)
    check_latent_captions(config, meta)  # embeddings of the model's captions and width
    captions = meta["captions"]
    embedding = captions["embedding"]
    length = int(captions["max_length"])
    path = embedding["path"]
    if not os.path.isdir(path):
        raise ConfigError(
            f"the caption embeddings of {config.data.latent_dir} were written by the text encoder at {path}, which "
            "is gone; prompts must be embedded by that encoder: put its directory back there"
        )
    encoder = load_frozen_text_encoder(path)
    if encoder.fingerprint != embedding["fingerprint"]:
        raise ConfigError(
            f"the text encoder at {path} is not the one that wrote these embeddings (its parameters' fingerprint is "
            f"{encoder.fingerprint[:12]}..., {config.data.latent_dir} records {embedding['fingerprint'][:12]}...); "
            "restore its weights, or encode the data again with it and retrain"
        )
    texts = [prompt] + ([negative_prompt] if negative_prompt else [])
    for text, count in zip(texts, encoder.token_count(texts)):
        if count > length:
            raise ConfigError(
                f"prompt {text!r} has {count} tokens with the start and end tokens; at most {length} fit (the "
                "longest caption this model was trained on)"
            )
    embedded = encoder.embed(texts, length)
    neg = embedded[1:] if negative_prompt else np.zeros_like(embedded[:1])  # zeros: the null token
    return Prompt(embedded[:1], neg)


def _rows(context: np.ndarray, n: int) -> np.ndarray:
    """``context`` (1 or n rows: token ids (., L) or embeddings (., L, D)) as n rows, int32 ids or
    float32 embeddings."""
    context = np.asarray(context)
    context = context.astype(np.int32 if np.issubdtype(context.dtype, np.integer) else np.float32)
    if len(context) not in (1, n):
        raise ValueError(f"{len(context)} prompts for {n} samples; give one, or one per sample")
    return np.broadcast_to(context, (n, *context.shape[1:]))


def sample_prompt(exp: Any, params, key, n: int, sampler, prompt: Prompt, guidance_scale: float):
    """``n`` samples of ``exp`` for one prompt (or one per sample: ``prompt.context`` with ``n`` rows),
    in chunks of ``sampling.batch_size`` (chunk ``i`` uses ``fold_in(key, i)``); returns the
    samples (model space) and the last chunk's info."""
    from diffusion_jax import samplers as samplers_lib  # noqa: PLC0415

    chunk = min(n, exp.config.sampling.batch_size)
    ids, neg = _rows(prompt.context, n), _rows(prompt.negative_context, n)
    out, info = [], None
    starts = range(0, n, chunk)
    for i, start in enumerate(progress_bar(starts, len(starts), f"sampling {n}")):
        rows = np.arange(start, start + chunk) % n  # the last chunk wraps around: one shape, one compilation
        score_fn = text_guided_score(
            exp.module,
            exp.sde,
            exp.parametrization,
            params,
            jnp.asarray(ids[rows]),
            jnp.asarray(neg[rows]),
            guidance_scale,
        )
        x, info = samplers_lib.sample(jax.random.fold_in(key, i), score_fn, exp.sde, (chunk, *exp.input_shape), sampler)
        out.append(np.asarray(jax.device_get(x)))
    return np.concatenate(out)[:n], info
