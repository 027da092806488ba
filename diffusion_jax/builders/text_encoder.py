"""Frozen pretrained text encoders: CLIP's text transformer loaded from a user-supplied directory,
used to embed captions once (``diffusion-jax encode --text_encoder DIR``) and prompts at sampling
time (``model.text_encoder = 'precomputed'``).

The directory has transformers' ``CLIPTextModel`` layout (a Stable Diffusion 1.x pipeline's
``text_encoder/``): ``config.json`` and the weights, the first of ``model.safetensors``,
``pytorch_model.bin`` (needs torch) and ``model.npz``. Texts are tokenised with CLIP's BPE
(:class:`~diffusion_jax.models.tokenizer.CLIPTokenizer`, padded with the end token as Stable
Diffusion 1.x pads) and the context is the encoder's ``last_hidden_state``.

Truncation is exact: CLIP's attention is causal (token ``i`` sees tokens ``0..i``), so the hidden
states at the first ``L`` positions do not depend on the tokens after them. Embedding a caption
at ``L`` positions (the longest caption's token count, start and end tokens included) gives the
first ``L`` rows of its embedding at the full 77 positions, with no padding to store.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.builders.config import ConfigError
from diffusion_jax.models.text import TextEncoderOutput, TextTransformer

__all__ = ["FrozenTextEncoder", "load_frozen_text_encoder", "WEIGHT_FILES"]

# The weight files a text encoder's directory may hold, in the order they are looked for.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.npz")


@dataclasses.dataclass(frozen=True)
class FrozenTextEncoder:
    """A text encoder with fixed parameters and its tokenizer.

    ``path``: the directory it was loaded from (absolute); ``fingerprint``: SHA-256 of its
    parameters (:func:`diffusion_jax.training.autoencoder.params_fingerprint`); ``hidden_size``:
    the width ``D`` of its hidden states."""

    module: TextTransformer
    params: Any
    tokenizer: Any  # models.tokenizer.CLIPTokenizer
    path: str
    fingerprint: str
    hidden_size: int

    @property
    def max_length(self) -> int:
        """The most tokens (start and end tokens included) the encoder reads."""
        return self.module.max_position_embeddings

    def token_count(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) int: each text's number of tokens, the start and end tokens included."""
        return np.asarray([len(self.tokenizer.encode(t)) + 2 for t in texts], np.int64)

    def embed(self, texts: Sequence[str], length: int, *, batch_size: int = 64) -> np.ndarray:
        """(N, length, hidden_size) float32: the last hidden states of each text at its first
        ``length`` positions (the start token, the text's tokens, the end token, then end tokens
        as padding). Each distinct text is encoded once, in batches of ``batch_size`` (the last
        one padded, so one compilation serves every batch). A text of more than ``length``
        tokens is a ConfigError."""
        texts = list(texts)
        if not 2 <= length <= self.max_length:
            raise ConfigError(
                f"text encoder {self.path}: a context of {length} tokens is not in [2, {self.max_length}]"
            )
        counts = self.token_count(texts)
        if len(texts) and counts.max() > length:
            i = int(np.argmax(counts))
            raise ConfigError(
                f"{_shown(texts[i])} has {counts[i]} tokens with the start and end tokens; at most {length} fit"
            )
        unique = list(dict.fromkeys(texts))
        where = {t: i for i, t in enumerate(unique)}
        ids = self.tokenizer(unique, context_length=length, truncate=False)
        fn = _hidden_states(self.module)
        out = np.zeros((len(unique), length, self.hidden_size), np.float32)
        for start in range(0, len(unique), batch_size):
            chunk = ids[start : start + batch_size]
            padded = np.full((batch_size, length), self.tokenizer.pad_token_id, np.int32)
            padded[: len(chunk)] = chunk
            out[start : start + len(chunk)] = np.asarray(fn(self.params, jnp.asarray(padded)))[: len(chunk)]
        return out[[where[t] for t in texts]]


def _shown(text: str) -> str:
    return f"{text[:60]!r}{'...' if len(text) > 60 else ''}"


@functools.cache
def _hidden_states(module: TextTransformer) -> Callable:
    return jax.jit(lambda params, ids: cast(TextEncoderOutput, module.apply({"params": params}, ids)).last_hidden_state)


def _tokenizer():
    from diffusion_jax.models.tokenizer import CLIPTokenizer  # noqa: PLC0415

    try:
        return CLIPTokenizer.from_package()
    except (ImportError, FileNotFoundError, ValueError) as e:
        raise ConfigError(f"the text encoder needs CLIP's tokenizer: {e}") from None


def load_frozen_text_encoder(path: str | pathlib.Path) -> FrozenTextEncoder:
    """The CLIP text encoder in directory ``path`` (``config.json`` and a weight file of
    :data:`WEIGHT_FILES`); every problem is a ConfigError with one message: a missing directory,
    ``config.json`` or weight file, weights whose names or shapes differ from the config's
    network, a vocabulary smaller than CLIP's tokenizer's, or no tokenizer vocabulary installed."""
    from diffusion_jax.models.convert import ConversionError  # noqa: PLC0415
    from diffusion_jax.models.text import clip_text_kwargs_from_config, load_clip_text  # noqa: PLC0415
    from diffusion_jax.training.autoencoder import params_fingerprint  # noqa: PLC0415

    directory = pathlib.Path(path).expanduser().absolute()
    layout = "config.json and model.safetensors, as a Stable Diffusion pipeline's text_encoder/"
    if not directory.is_dir():
        raise ConfigError(f"text encoder directory {directory} does not exist (it should hold {layout})")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"text encoder directory {directory} has no config.json (it should hold {layout})")
    try:
        kwargs = clip_text_kwargs_from_config(json.loads(config_path.read_text()))
        module = TextTransformer(**kwargs)
    except (ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"{config_path} is not a CLIP text encoder's config: {e}") from None
    tokenizer = _tokenizer()
    if module.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"{config_path}: vocab_size {module.vocab_size} is smaller than CLIP's tokenizer's {tokenizer.vocab_size} "
            f"(ids up to {tokenizer.vocab_size - 1}); this encoder was not trained with CLIP's tokenizer"
        )
    weights = next((directory / f for f in WEIGHT_FILES if (directory / f).is_file()), None)
    if weights is None:
        raise ConfigError(f"text encoder directory {directory} has none of {', '.join(WEIGHT_FILES)}")
    try:
        params = load_clip_text(module, weights)
    except (ConversionError, ValueError, ImportError, OSError) as e:
        raise ConfigError(f"{weights}: {e}") from None
    return FrozenTextEncoder(
        module=module,
        params=params,
        tokenizer=tokenizer,
        path=str(directory),
        fingerprint=params_fingerprint(params),
        hidden_size=module.hidden_size,
    )
