"""Text encoders for conditioning: CLIP's text transformer (Radford et al. 2021, "Learning
Transferable Visual Models From Natural Language Supervision", sec. 2.4), the encoder of Stable
Diffusion 1.x, and small closed-vocabulary encoders trained from scratch.

:class:`TextTransformer` (ids ``(B, L)`` -> :class:`TextEncoderOutput`):

    h_0 = token_embedding[ids] + position_embedding[0..L-1]
    h   = h + Attn(LN_1(h));  h = h + MLP(LN_2(h))           (num_layers pre-LayerNorm blocks)
    last_hidden_state = final_layer_norm(h)                  (B, L, hidden_size)
    pooled_output     = last_hidden_state[b, first position of the end token]   (B, hidden_size)

Attention is multi-head scaled dot-product attention (Vaswani et al. 2017, eq. 1) with a causal
mask (token ``i`` sees ``0..i``), optionally combined with a padding mask on the keys; the MLP is
``fc2(act(fc1(x)))`` with CLIP's quick GELU ``x sigmoid(1.702 x)`` (Hendrycks & Gimpel 2016,
sec. 2) or the exact GELU. Stable Diffusion conditions its U-Net on ``last_hidden_state`` (the
whole sequence, through cross-attention); ``pooled_output`` summarises the prompt.

Submodule names follow transformers' ``CLIPTextModel`` (``encoder.layers.3.self_attn.q_proj`` is
our ``encoder/layers_3/self_attn/q_proj``), so :func:`load_clip_text` maps its state dict by rule,
checking every name and shape. :data:`CLIP_TEXT_PRESETS` holds the published configuration.
See ``docs/latent.md``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffusion_jax.models.convert import read_state_dict

Array = jax.Array
Dtype = Any

__all__ = [
    "TextTransformer",
    "TextEncoderOutput",
    "CLIP_TEXT_PRESETS",
    "ACTIVATIONS",
    "quick_gelu",
    "clip_text_kwargs_from_config",
    "clip_text_state_dict_shapes",
    "load_clip_text",
    "tiny_text_encoder",
]


def quick_gelu(x: Array) -> Array:
    """CLIP's GELU approximation ``x sigmoid(1.702 x)`` (Hendrycks & Gimpel 2016, sec. 2)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

POOLINGS = ("eos", "argmax")

# CLIP ViT-L/14's text transformer, the text encoder of Stable Diffusion 1.x (width 768, 12 layers,
# 12 heads, context 77, 49,408 ids): 123,060,480 parameters, as transformers' CLIPTextModel with
# the same config.
CLIP_TEXT_PRESETS: dict[str, dict[str, Any]] = {
    "clip-vit-large-patch14": dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_layers=12,
        num_heads=12,
        max_position_embeddings=77,
        activation="quick_gelu",
        eos_token_id=49407,
    ),
}


class TextEncoderOutput(NamedTuple):
    """``last_hidden_state (B, L, D)``, ``pooled_output (B, D)``, and ``hidden_states``: the
    embeddings and every block's output (before the final LayerNorm), ``num_layers + 1`` arrays
    ``(B, L, D)``, or ``None`` unless requested (Stable Diffusion 2.x conditions on the
    penultimate block's output, passed through ``final_layer_norm``)."""

    last_hidden_state: Array
    pooled_output: Array
    hidden_states: tuple[Array, ...] | None = None


def _layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    # Two-pass variance in float32, as PyTorch's LayerNorm.
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name=name)


def _dense(features: int, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=nn.initializers.normal(0.02), dtype=dtype, param_dtype=param_dtype, name=name)


class _SelfAttention(nn.Module, kw_only=True):
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        B, L, D = x.shape
        d = D // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = _dense(D, name="q_proj", **kw)(x).reshape(B, L, self.num_heads, d)
        k = _dense(D, name="k_proj", **kw)(x).reshape(B, L, self.num_heads, d)
        v = _dense(D, name="v_proj", **kw)(x).reshape(B, L, self.num_heads, d)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (d**-0.5)
        logits = jnp.where(mask[:, None, :, :], logits, jnp.finfo(jnp.float32).min)
        w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        h = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(B, L, D)
        return _dense(D, name="out_proj", **kw)(h)


class _Block(nn.Module, kw_only=True):
    num_heads: int
    intermediate_size: int
    activation: str
    layer_norm_eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _layer_norm(self.layer_norm_eps, name="layer_norm1", **kw)(x)
        x = x + _SelfAttention(num_heads=self.num_heads, name="self_attn", **kw)(h, mask)
        h = _layer_norm(self.layer_norm_eps, name="layer_norm2", **kw)(x)
        h = _Mlp(intermediate_size=self.intermediate_size, activation=self.activation, name="mlp", **kw)(h)
        return x + h


class _Mlp(nn.Module, kw_only=True):
    intermediate_size: int
    activation: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = ACTIVATIONS[self.activation](_dense(self.intermediate_size, name="fc1", **kw)(x))
        return _dense(x.shape[-1], name="fc2", **kw)(h)


class _Embeddings(nn.Module, kw_only=True):
    vocab_size: int
    max_position_embeddings: int
    hidden_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        init = nn.initializers.normal(0.02)
        tokens = nn.Embed(self.vocab_size, self.hidden_size, embedding_init=init, name="token_embedding", **kw)(ids)
        positions = nn.Embed(
            self.max_position_embeddings, self.hidden_size, embedding_init=init, name="position_embedding", **kw
        )(jnp.arange(ids.shape[1]))
        return tokens + positions[None]


class _Encoder(nn.Module, kw_only=True):
    num_layers: int
    num_heads: int
    intermediate_size: int
    activation: str
    layer_norm_eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> list[Array]:
        states = [x]
        for i in range(self.num_layers):
            x = _Block(
                num_heads=self.num_heads,
                intermediate_size=self.intermediate_size,
                activation=self.activation,
                layer_norm_eps=self.layer_norm_eps,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"layers_{i}",
            )(x, mask)
            states.append(x)
        return states


class TextTransformer(nn.Module, kw_only=True):
    """Pre-LayerNorm transformer text encoder with learned positions (CLIP's text tower).

    ``apply({'params': p}, ids, *, attention_mask=None, output_hidden_states=False)`` with
    ``ids (B, L)`` int, ``L <= max_position_embeddings``, and ``attention_mask (B, L)`` (1 for
    tokens, 0 for padding; None: attend to all) -> :class:`TextEncoderOutput`.

    ``pooling``: ``'eos'`` pools at the first position of ``eos_token_id`` (transformers' current
    rule); ``'argmax'`` at the largest id of each row (CLIP's original rule, which relies on the
    end token having the largest id; transformers applies it to configs that carry the old
    ``eos_token_id = 2``). A row without an end token pools at position 0 under ``'eos'``.
    ``causal=False`` gives a bidirectional encoder (for encoders trained from scratch).
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_layers: int = 12
    num_heads: int = 8
    max_position_embeddings: int = 77
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    pooling: str = "eos"
    causal: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        problems = []
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if self.pooling not in POOLINGS:
            problems.append(f"pooling {self.pooling!r} is not one of {list(POOLINGS)}")
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if min(self.vocab_size, self.num_layers, self.max_position_embeddings, self.intermediate_size) < 1:
            problems.append("vocab_size, num_layers, max_position_embeddings and intermediate_size must be >= 1")
        if problems:
            raise ValueError("TextTransformer: " + "; ".join(problems))
        super().__post_init__()

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = _Embeddings(
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            hidden_size=self.hidden_size,
            **kw,
        )
        self.encoder = _Encoder(
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            activation=self.activation,
            layer_norm_eps=self.layer_norm_eps,
            **kw,
        )
        self.final_layer_norm = _layer_norm(self.layer_norm_eps, name="final_layer_norm", **kw)

    def __call__(
        self, ids: Array, *, attention_mask: Array | None = None, output_hidden_states: bool = False
    ) -> TextEncoderOutput:
        if ids.ndim != 2 or ids.shape[1] > self.max_position_embeddings:
            raise ValueError(
                f"TextTransformer: expected ids of shape (B, L) with L <= {self.max_position_embeddings}, "
                f"got {tuple(ids.shape)}"
            )
        B, L = ids.shape
        mask = jnp.ones((B, L, L), bool)
        if self.causal:
            mask = mask & jnp.tril(jnp.ones((L, L), bool))[None]
        if attention_mask is not None:
            mask = mask & (jnp.asarray(attention_mask) > 0)[:, None, :]
        states = self.encoder(self.embeddings(ids), mask)
        last = self.final_layer_norm(states[-1])
        if self.pooling == "eos":
            index = jnp.argmax(ids == self.eos_token_id, axis=-1)
        else:
            index = jnp.argmax(ids, axis=-1)
        pooled = jnp.take_along_axis(last, index[:, None, None], axis=1)[:, 0]
        return TextEncoderOutput(last, pooled, tuple(states) if output_hidden_states else None)


def tiny_text_encoder(
    vocab_size: int,
    max_length: int,
    *,
    eos_token_id: int = 2,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    causal: bool = False,
    **kwargs: Any,
) -> TextTransformer:
    """A small bidirectional :class:`TextTransformer` for a closed vocabulary trained from scratch,
    sized for a :class:`~diffusion_jax.models.tokenizer.WordTokenizer`:
    ``tiny_text_encoder(tok.vocab_size, tok.max_length, eos_token_id=tok.eos_id)``; call it with
    ``attention_mask=(ids != tok.pad_id)``. MLP width ``4 hidden_size``, exact GELU."""
    fields: dict[str, Any] = dict(
        vocab_size=vocab_size,
        max_position_embeddings=max_length,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        activation="gelu",
        eos_token_id=eos_token_id,
        pooling="eos",
        causal=causal,
    )
    fields.update(kwargs)
    return TextTransformer(**fields)


# --------------------------------------------------------------------------------------------
# transformers' CLIPTextModel weights
# --------------------------------------------------------------------------------------------


def clip_text_kwargs_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """:class:`TextTransformer` keyword arguments from a transformers ``CLIPTextConfig`` dict
    (``config.json`` of a ``CLIPTextModel``, or the ``text_config`` entry of a ``CLIPModel``).
    A config with ``eos_token_id == 2`` (written before transformers fixed the field) pools by
    ``argmax``, as transformers does."""
    config = config.get("text_config", config)
    act = config.get("hidden_act", "quick_gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"hidden_act {act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    eos = int(config.get("eos_token_id", 49407))
    return dict(
        vocab_size=int(config.get("vocab_size", 49408)),
        hidden_size=int(config.get("hidden_size", 512)),
        intermediate_size=int(config.get("intermediate_size", 2048)),
        num_layers=int(config.get("num_hidden_layers", 12)),
        num_heads=int(config.get("num_attention_heads", 8)),
        max_position_embeddings=int(config.get("max_position_embeddings", 77)),
        activation=act,
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
        eos_token_id=eos,
        pooling="argmax" if eos == 2 else "eos",
    )


def _torch_name(path: tuple[str, ...]) -> str:
    parts = [re.sub(r"^(layers)_(\d+)$", r"\1.\2", p) for p in path[:-1]]
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}[path[-1]]
    return ".".join(parts + [leaf])


def clip_text_state_dict_shapes(module: TextTransformer) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """``{transformers state-dict name (without 'text_model.'): (our path, its shape)}``."""
    ids = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids))["params"]
    out = {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        shape = tuple(leaf.shape)
        out[_torch_name(path)] = (path, shape[::-1] if path[-1] == "kernel" else shape)
    return out


# Buffers of transformers' CLIPTextModel (not parameters), present in older checkpoints.
_BUFFERS = ("embeddings.position_ids",)


def load_clip_text(
    module: TextTransformer, source: Mapping[str, Any] | str | os.PathLike, *, dtype: Any = np.float32
) -> dict:
    """transformers ``CLIPTextModel`` weights as ``module``'s parameter tree (numpy arrays; pass
    it as ``{'params': tree}``).

    ``source``: ``model.safetensors`` (read with numpy only), a weights-only ``.bin``/``.pth``,
    an ``.npz``, or a state dict. A ``text_model.`` prefix is removed; the ``position_ids``
    buffer is ignored. Every other tensor is checked: a missing, unexpected or misshaped one
    raises :class:`diffusion_jax.models.convert.ConversionError` naming it (build ``module``
    with :func:`clip_text_kwargs_from_config` of the checkpoint's ``config.json``). ``Linear``
    weights ``(out, in)`` become ``(in, out)`` kernels, LayerNorm ``weight`` becomes ``scale``.
    """
    from diffusion_jax.models.convert import ConversionError, check_tensor_names, strip_prefix  # noqa: PLC0415

    state = strip_prefix(read_state_dict(source), "text_model.")
    state = {n: v for n, v in state.items() if n not in _BUFFERS}
    expected = clip_text_state_dict_shapes(module)
    config = (
        f"vocab_size={module.vocab_size}, hidden_size={module.hidden_size}, num_layers={module.num_layers}, "
        f"intermediate_size={module.intermediate_size}, max_position_embeddings={module.max_position_embeddings}"
    )
    check_tensor_names(
        state,
        expected,
        what="CLIP text weights",
        built_with=config,
        extra_hint="; a full CLIPModel checkpoint needs its 'text_model.' entries selected",
    )
    flat = {}
    for name, (path, shape) in expected.items():
        value = np.asarray(state[name], dtype=np.float32)
        if tuple(value.shape) != shape:
            raise ConversionError(
                f"CLIP text weights: tensor {name!r} has shape {tuple(value.shape)}, expected {shape} "
                f"(module built with {config})"
            )
        flat[path] = (value.T if path[-1] == "kernel" else value).astype(dtype)
    return traverse_util.unflatten_dict(flat)
