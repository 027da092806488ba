"""Prompts and negative prompts for ``sample``: tokenised with the model's caption tokenizer,
sampled with classifier-free guidance on text (:mod:`diffusion_jax.conditioning.text`)."""

from __future__ import annotations

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

__all__ = ["Prompt", "prompt_ids", "sample_prompt"]


class Prompt(NamedTuple):
    """Token ids (1, L) of the prompt and of the negative prompt (the empty caption without one)."""

    ids: np.ndarray
    negative_ids: np.ndarray


def prompt_ids(config, prompt: str, negative_prompt: str | None = None) -> Prompt:
    """Tokenise a prompt for the workdir's model; a ConfigError (one message) for a model without
    a text encoder, an unknown word, or a prompt that does not fit."""
    if config.model.text_encoder == "none":
        raise ConfigError(
            "--prompt needs a text-conditioned model (model.text_encoder); this workdir's model has no text encoder"
        )
    tok = caption_tokenizer(config.data.captions)
    try:
        ids = tok([prompt])
        neg = tok([negative_prompt]) if negative_prompt else None
    except TokenizerError as e:
        raise ConfigError(str(e)) from None
    if neg is None:
        neg = np.asarray(null_caption(1, tok.max_length, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id))
    return Prompt(ids, neg)


def _rows(ids: np.ndarray, n: int) -> np.ndarray:
    """``ids`` (1 or n rows) as n rows."""
    ids = np.asarray(ids, np.int32)
    if len(ids) not in (1, n):
        raise ValueError(f"{len(ids)} prompts for {n} samples; give one, or one per sample")
    return np.broadcast_to(ids, (n, ids.shape[1]))


def sample_prompt(exp: Any, params, key, n: int, sampler, prompt: Prompt, guidance_scale: float):
    """``n`` samples of ``exp`` for one prompt (or one per sample: ``prompt.ids`` with ``n`` rows),
    in chunks of ``sampling.batch_size`` (chunk ``i`` uses ``fold_in(key, i)``); returns the
    samples (model space) and the last chunk's info."""
    from diffusion_jax import samplers as samplers_lib  # noqa: PLC0415

    chunk = min(n, exp.config.sampling.batch_size)
    ids, neg = _rows(prompt.ids, n), _rows(prompt.negative_ids, n)
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
