"""DiT: diffusion transformers (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers", sec. 3.2 and Table 1).

The image ``(B, H, W, C)`` is cut into ``p x p`` patches, each linearly embedded into a token
of width ``hidden_size``, plus a fixed 2-D sine-cosine position table (no parameters). A stack
of ``depth`` transformer blocks follows, each conditioned by adaLN-Zero: the sum ``c`` of the
noise-label embedding and the class embedding regresses, per block, the shift, scale and gate of
both sub-layers (attention and MLP); the regression is zero-initialised, so every block starts as
the identity (sec. 3.2, "adaLN-Zero block"). A final adaptive LayerNorm and a linear layer map
each token back to ``p * p * out_channels`` values, which are put back in place.

Call contract (as the U-Nets): ``apply({'params': p}, x, c_noise, *, class_labels=None,
train=False) -> (B, H, W, C)`` in ``x``'s dtype; ``c_noise`` is the noise label the
parametrization feeds (DiT's own checkpoints were trained on DDPM time steps 0..999).
With ``learn_sigma`` the network also predicts ``C`` channels for the learned reverse-process
variance (Nichol & Dhariwal 2021, eq. 15); they are not part of the x-shaped output and are
returned by ``apply(..., method='full_output')``, which gives all ``2 C`` channels.

Parameters that cannot be learned here: the position table is a constant of the program, so the
parameter tree holds only trainable arrays. :data:`DIT_PRESETS` are the 12 published sizes;
:func:`load_dit_state_dict` reads the official PyTorch weights; :func:`logical_axes` names the
axes of every parameter for a sharding layer. See ``docs/dit.md``.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import PartitionSpec

from diffusion_jax.models import conditioning

Array = jax.Array
Dtype = Any

__all__ = [
    "DiT",
    "DIT_PRESETS",
    "dit_preset",
    "sincos_2d_positions",
    "timestep_frequencies",
    "count_dit_params",
    "dit_state_dict_mapping",
    "TensorEntry",
    "load_dit_state_dict",
    "logical_axes",
    "parameter_axes",
    "LOGICAL_AXIS_NAMES",
]

# The published configurations (Peebles & Xie 2023, Table 1): (depth, hidden size, heads) per
# model size, each at patch sizes 2, 4 and 8. Other fields keep the DiT defaults
# (input_size=32, in_channels=4: 256x256 images through the Stable Diffusion VAE; 1000 classes).
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_PRESETS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{patch}": dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
    for size, (depth, hidden, heads) in _SIZES.items()
    for patch in (2, 4, 8)
}

_FREQUENCY_DIM = 256  # width of the sinusoidal noise-label features fed to the t_embedder MLP
_MAX_PERIOD = 10000.0


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"DiT: {message}")


# --------------------------------------------------------------------------------------------
# Fixed embeddings
# --------------------------------------------------------------------------------------------


@functools.cache
def sincos_2d_positions(dim: int, grid: int) -> np.ndarray:
    """DiT's fixed position table (MAE's 2-D sine-cosine embedding), ``(grid * grid, dim)`` float32.

    Tokens are numbered row by row (token ``i * grid + j`` is patch row ``i``, column ``j``). The
    first ``dim / 2`` features encode the column ``j``, the last ``dim / 2`` the row ``i``, each
    as ``[sin(pos w_k), cos(pos w_k)]`` with ``w_k = 10000^(-k / (dim / 4))``,
    ``k = 0 .. dim / 4 - 1`` (Vaswani et al. 2017, sec. 3.5, applied per axis).
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position table needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / _MAX_PERIOD ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def one_axis(pos):
        angles = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([one_axis(cols), one_axis(rows)], axis=1).astype(np.float32)
    table.setflags(write=False)  # cached: shared by every caller
    return table


def timestep_frequencies(c_noise: Array, dim: int = _FREQUENCY_DIM) -> Array:
    """DiT's sinusoidal noise-label features ``[cos(c w_k), sin(c w_k)]`` with
    ``w_k = 10000^(-k / (dim / 2))``, ``k = 0 .. dim / 2 - 1`` (note: cosines first, and the
    exponent's denominator is ``dim / 2``, unlike DDPM's). ``(B,) -> (B, dim)`` float32; the
    frequencies are computed in float32 as in the reference."""
    half = dim // 2
    freqs = jnp.exp(-math.log(_MAX_PERIOD) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(c_noise, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
    """adaLN: ``x (1 + scale) + shift`` with per-example ``(B, D)`` shift and scale."""
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


# --------------------------------------------------------------------------------------------
# Initialisers (DiT's initialize_weights)
# --------------------------------------------------------------------------------------------

_xavier = nn.initializers.xavier_uniform()
# The patch embedding is initialised as a (hidden, C p p) linear map: fans over (p, p, C) and hidden.
_patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)
_normal002 = nn.initializers.normal(0.02)
_zeros = nn.initializers.zeros


# --------------------------------------------------------------------------------------------
# Sub-modules
# --------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module, kw_only=True):
    """``(B, H, W, C) -> (B, (H/p)(W/p), hidden)``: a stride-``p`` ``p x p`` convolution, tokens
    in row-major patch order."""

    patch_size: int
    hidden_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        p = self.patch_size
        h = nn.Conv(
            self.hidden_size,
            (p, p),
            strides=(p, p),
            padding="VALID",
            kernel_init=_patch_init,
            bias_init=_zeros,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="proj",
        )(x)
        B, gh, gw, D = h.shape
        return h.reshape(B, gh * gw, D)


class TimestepEmbedder(nn.Module, kw_only=True):
    """Noise label ``(B,)`` -> ``(B, hidden)``: sinusoidal features, Dense, SiLU, Dense."""

    hidden_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, c_noise: Array) -> Array:
        kw = dict(kernel_init=_normal002, bias_init=_zeros, dtype=self.dtype, param_dtype=self.param_dtype)
        h = timestep_frequencies(c_noise).astype(self.dtype)
        h = nn.Dense(self.hidden_size, name="fc1", **kw)(h)
        return nn.Dense(self.hidden_size, name="fc2", **kw)(nn.silu(h))


class LabelEmbedder(nn.Module, kw_only=True):
    """Class label ``(B,)`` int -> ``(B, hidden)``; a table of ``num_rows`` rows (the last one is
    the null class when the network has one)."""

    num_rows: int
    hidden_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, labels: Array) -> Array:
        table = self.param("embedding_table", _normal002, (self.num_rows, self.hidden_size), self.param_dtype)
        return jnp.take(table, labels, axis=0).astype(self.dtype)


class Attention(nn.Module, kw_only=True):
    """Multi-head self-attention with one fused q/k/v projection (kernel ``(D, 3, heads, D/heads)``)
    and an output projection (kernel ``(heads, D/heads, D)``); logits scaled by ``(D/heads)^-1/2``
    (Vaswani et al. 2017, eq. 1), softmax in float32."""

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        D = x.shape[-1]
        head_dim = D // self.num_heads
        kw = dict(kernel_init=_xavier, bias_init=_zeros, dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = nn.DenseGeneral((3, self.num_heads, head_dim), name="qkv", **kw)(x)  # (B, T, 3, H, Dh)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * (head_dim**-0.5), k)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        h = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return nn.DenseGeneral(D, axis=(-2, -1), name="proj", **kw)(h)


class Mlp(nn.Module, kw_only=True):
    """Dense, GELU (tanh approximation), Dense."""

    hidden_features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(kernel_init=_xavier, bias_init=_zeros, dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.Dense(self.hidden_features, name="fc1", **kw)(x)
        h = nn.gelu(h, approximate=True)
        return nn.Dense(x.shape[-1], name="fc2", **kw)(h)


def _layer_norm(dtype: Dtype) -> nn.LayerNorm:
    # No affine parameters (adaLN supplies shift and scale); statistics in float32 (Flax does).
    return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype)


class DiTBlock(nn.Module, kw_only=True):
    """adaLN-Zero transformer block (Peebles & Xie 2023, Fig. 3):
    ``x += gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa))``,
    ``x += gate_mlp * MLP(modulate(LN(x), shift_mlp, scale_mlp))``, the six ``(B, D)`` vectors
    regressed from ``SiLU(c)`` by one zero-initialised Dense layer."""

    num_heads: int
    mlp_ratio: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        D = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mod = nn.Dense(6 * D, kernel_init=_zeros, bias_init=_zeros, name="adaLN_modulation", **kw)(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        h = _modulate(_layer_norm(self.dtype)(x), shift_msa, scale_msa)
        x = x + gate_msa[:, None, :] * Attention(num_heads=self.num_heads, name="attn", **kw)(h)
        h = _modulate(_layer_norm(self.dtype)(x), shift_mlp, scale_mlp)
        mlp = Mlp(hidden_features=int(D * self.mlp_ratio), name="mlp", **kw)
        return x + gate_mlp[:, None, :] * mlp(h)


class FinalLayer(nn.Module, kw_only=True):
    """Adaptive LayerNorm (shift, scale from ``SiLU(c)``) and a zero-initialised Dense to
    ``p * p * out_channels`` values per token, ordered (patch row, patch column, channel)."""

    patch_size: int
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        D = x.shape[-1]
        kw = dict(kernel_init=_zeros, bias_init=_zeros, dtype=self.dtype, param_dtype=self.param_dtype)
        shift, scale = jnp.split(nn.Dense(2 * D, name="adaLN_modulation", **kw)(nn.silu(c)), 2, axis=-1)
        h = _modulate(_layer_norm(self.dtype)(x), shift, scale)
        return nn.Dense(self.patch_size**2 * self.out_channels, name="linear", **kw)(h)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


class DiT(nn.Module, kw_only=True):
    """Diffusion transformer with adaLN-Zero conditioning.

    Call: ``apply(variables, x, c_noise, *, class_labels=None, train=False)`` with
    ``x: (B, input_size, input_size, in_channels)`` float and ``c_noise: (B,)`` (or a scalar),
    the noise label of the parametrization (embedded as it is). Returns ``(B, H, W, in_channels)``
    in ``x``'s dtype. ``apply(..., method='full_output')`` returns all ``out_channels`` channels
    (with ``learn_sigma`` the last ``in_channels`` are the variance outputs) and
    ``apply(..., method='guided_output', scale=w)`` the reference's classifier-free guidance.

    ``num_classes > 0`` adds a class embedding; with ``null_class`` (default) its table has one
    more row, ``null_label = num_classes``, the "no class" token of classifier-free guidance
    (omitted labels mean the null label). DiT's ``class_dropout_prob > 0`` is ``null_class=True``;
    the label dropout itself is the training loop's (``training.class_dropout``), not the
    network's. ``train`` is accepted for the common contract; DiT has no dropout.

    Defaults are DiT-XL/2 at 256x256 (32x32x4 latents, 1000 classes, learned sigma); see
    :data:`DIT_PRESETS` and :func:`dit_preset` for the other published sizes.
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    null_class: bool = True
    learn_sigma: bool = True
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        _check(self.input_size > 0, f"input_size must be > 0, got {self.input_size}")
        _check(self.patch_size > 0, f"patch_size must be > 0, got {self.patch_size}")
        _check(
            self.input_size % self.patch_size == 0,
            f"input_size ({self.input_size}) must be a multiple of patch_size ({self.patch_size})",
        )
        _check(self.in_channels > 0, f"in_channels must be > 0, got {self.in_channels}")
        _check(self.depth >= 1, f"depth must be >= 1, got {self.depth}")
        _check(self.num_heads >= 1, f"num_heads must be >= 1, got {self.num_heads}")
        _check(
            self.hidden_size > 0 and self.hidden_size % self.num_heads == 0,
            f"hidden_size ({self.hidden_size}) must be a positive multiple of num_heads ({self.num_heads})",
        )
        _check(
            self.hidden_size % 4 == 0,
            f"hidden_size must be divisible by 4 (2-D sin-cos positions), got {self.hidden_size}",
        )
        _check(self.mlp_ratio > 0, f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        _check(self.num_classes >= 0, f"num_classes must be >= 0, got {self.num_classes}")
        super().__post_init__()

    # -- derived sizes ---------------------------------------------------------------------
    @property
    def out_channels(self) -> int:
        """Channels of :meth:`full_output`: ``2 in_channels`` with ``learn_sigma``."""
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def null_label(self) -> int | None:
        """The class label meaning "no class" (classifier-free guidance); None without one."""
        return self.num_classes if self.num_classes > 0 and self.null_class else None

    # -- modules ---------------------------------------------------------------------------
    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.x_embedder = PatchEmbed(patch_size=self.patch_size, hidden_size=self.hidden_size, **kw)
        self.t_embedder = TimestepEmbedder(hidden_size=self.hidden_size, **kw)
        if self.num_classes > 0:
            rows = self.num_classes + int(self.null_class)
            self.y_embedder = LabelEmbedder(num_rows=rows, hidden_size=self.hidden_size, **kw)
        block = nn.remat(DiTBlock) if self.remat else DiTBlock
        self.blocks = [block(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, **kw) for _ in range(self.depth)]
        self.final_layer = FinalLayer(patch_size=self.patch_size, out_channels=self.out_channels, **kw)

    def _labels(self, class_labels: Any, batch: int) -> Array | None:
        if self.num_classes == 0:
            _check(
                class_labels is None,
                "got class_labels but was built with num_classes=0; set num_classes > 0 for a "
                "class-conditional network",
            )
            return None
        if class_labels is None:
            _check(
                self.null_class,
                "class_labels are required: this network has no null class (built with null_class=False)",
            )
            return jnp.full((batch,), self.num_classes, jnp.int32)
        labels = jnp.asarray(class_labels)
        _check(
            labels.shape == (batch,) and jnp.issubdtype(labels.dtype, jnp.integer),
            f"class_labels must be integers of shape ({batch},), got {labels.dtype} {labels.shape}",
        )
        return labels

    def full_output(self, x: Array, c_noise: Array, *, class_labels: Array | None = None, train: bool = False) -> Array:
        """All output channels, ``(B, H, W, out_channels)`` in ``x``'s dtype."""
        del train  # no dropout in DiT
        _check(x.ndim == 4, f"expects NHWC images (B, H, W, C), got shape {x.shape}")
        B, H, W, C = x.shape
        _check(
            (H, W, C) == (self.input_size, self.input_size, self.in_channels),
            f"expects images of shape (B, {self.input_size}, {self.input_size}, {self.in_channels}) "
            f"(input_size, in_channels), got {x.shape}",
        )
        noise = conditioning.batch_labels(c_noise, B, "DiT")
        labels = self._labels(class_labels, B)
        in_dtype = x.dtype

        grid = self.input_size // self.patch_size
        pos = jnp.asarray(sincos_2d_positions(self.hidden_size, grid))
        h = self.x_embedder(x.astype(self.dtype)) + pos.astype(self.dtype)[None]
        c = self.t_embedder(noise)
        if labels is not None:
            c = c + self.y_embedder(labels)
        for block in self.blocks:
            h = block(h, c)
        h = self.final_layer(h, c).astype(jnp.float32)  # (B, T, p * p * out_channels)

        # Tokens back to pixels: (B, gh, gw, p, p, C') -> (B, gh, p, gw, p, C') -> (B, H, W, C').
        p = self.patch_size
        h = h.reshape(B, grid, grid, p, p, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
        return h.reshape(B, H, W, self.out_channels).astype(in_dtype)

    def __call__(self, x: Array, c_noise: Array, *, class_labels: Array | None = None, train: bool = False) -> Array:
        """The x-shaped prediction ``(B, H, W, in_channels)`` (the variance channels dropped)."""
        return self.full_output(x, c_noise, class_labels=class_labels, train=train)[..., : self.in_channels]

    def guided_output(
        self, x: Array, c_noise: Array, *, class_labels: Array, scale: float, guided_channels: int | None = None
    ) -> Array:
        """Classifier-free guidance as DiT's sampling code applies it (``forward_with_cfg``):
        one batch of ``2 B`` (conditional, then null-label) and, on the first ``guided_channels``
        channels (default: all ``in_channels``; the reference uses 3 to reproduce its paper's
        numbers), ``uncond + scale (cond - uncond)`` (Ho & Salimans 2022, eq. 6). The other
        channels (the rest of the prediction, and the variance) are the conditional pass's.
        Returns ``(B, H, W, out_channels)``."""
        _check(self.null_label is not None, "guided_output needs a class-conditional network with a null class")
        k = self.in_channels if guided_channels is None else guided_channels
        _check(0 < k <= self.in_channels, f"guided_channels must be in 1..{self.in_channels}, got {k}")
        B = x.shape[0]
        labels = self._labels(class_labels, B)
        assert labels is not None
        noise = conditioning.batch_labels(c_noise, B, "DiT")
        both = self.full_output(
            jnp.concatenate([x, x]),
            jnp.concatenate([noise, noise]),
            class_labels=jnp.concatenate([labels, jnp.full_like(labels, self.num_classes)]),
        )
        cond, uncond = both[:B], both[B:]
        guided = uncond[..., :k] + scale * (cond[..., :k] - uncond[..., :k])
        return jnp.concatenate([guided, cond[..., k:]], axis=-1)


def dit_preset(name: str, **overrides: Any) -> DiT:
    """A published DiT size by name (``"DiT-XL/2"``, ...; see :data:`DIT_PRESETS`), with any other
    field overridden (e.g. ``num_classes=0``, ``input_size=64``, ``dtype=jnp.bfloat16``)."""
    if name not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}; valid names: {', '.join(DIT_PRESETS)}")
    clash = set(overrides) & set(DIT_PRESETS[name])
    if clash:
        raise ValueError(f"dit_preset({name!r}): {sorted(clash)} are set by the preset; use DiT(...) instead")
    fields: dict[str, Any] = {**DIT_PRESETS[name], **overrides}
    return DiT(**fields)


def _example_inputs(module: DiT, batch: int = 1) -> tuple[Array, Array, dict]:
    x = jnp.zeros((batch, module.input_size, module.input_size, module.in_channels), jnp.float32)
    kwargs = {"class_labels": jnp.zeros((batch,), jnp.int32)} if module.num_classes > 0 else {}
    return x, jnp.zeros((batch,), jnp.float32), kwargs


def _param_shapes(module: DiT) -> dict:
    x, c, kwargs = _example_inputs(module)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), x, c, **kwargs))["params"]


def count_dit_params(module: DiT) -> dict[str, int]:
    """``{'trainable': n, 'total_incl_pos_embed': n + tokens * hidden}`` via ``jax.eval_shape``
    (nothing is allocated). The second count is the reference's, whose fixed position table is
    a (non-trainable) parameter."""
    trainable = int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(_param_shapes(module))))
    return {"trainable": trainable, "total_incl_pos_embed": trainable + module.num_patches * module.hidden_size}


# --------------------------------------------------------------------------------------------
# Official PyTorch weights
# --------------------------------------------------------------------------------------------


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


class TensorEntry(NamedTuple):
    """One tensor of the reference's state dict: where it goes in our tree (None for the fixed
    ``pos_embed``), its shape in the reference, and the conversion of its layout."""

    path: tuple[str, ...] | None
    torch_shape: tuple[int, ...]
    convert: Callable[[np.ndarray], np.ndarray]


def _dense(shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    """``nn.Linear`` weight ``(out, in)`` -> our kernel ``shape`` (``(in, out)`` reshaped)."""
    return lambda w: np.transpose(w).reshape(shape)


def _same(shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    return lambda w: np.reshape(w, shape)


def dit_state_dict_mapping(module: DiT) -> dict[str, TensorEntry]:
    """``{state-dict name: TensorEntry(our path or None, reference shape, converter)}`` for the
    official implementation's ``DiT`` with the same settings. ``pos_embed`` maps to ``None`` (it
    is our constant table). Layouts: Conv2d OIHW -> HWIO; Linear ``(out, in)`` -> ``(in, out)``;
    the fused qkv ``(3D, D)`` -> ``(D, 3, heads, D/heads)`` (timm splits the 3D outputs as
    (q/k/v, head, channel)); the attention output ``(D, D)`` -> ``(heads, D/heads, D)``."""
    D, H, p = module.hidden_size, module.num_heads, module.patch_size
    C, Co, Dh = module.in_channels, module.out_channels, module.hidden_size // module.num_heads
    M = int(D * module.mlp_ratio)
    m: dict[str, TensorEntry] = {}

    def linear(torch_name, path, out_f, in_f, kernel_shape=None, bias_shape=None):
        m[f"{torch_name}.weight"] = TensorEntry(
            path + ("kernel",), (out_f, in_f), _dense(kernel_shape or (in_f, out_f))
        )
        m[f"{torch_name}.bias"] = TensorEntry(path + ("bias",), (out_f,), _same(bias_shape or (out_f,)))

    m["pos_embed"] = TensorEntry(None, (1, module.num_patches, D), _same((module.num_patches, D)))
    m["x_embedder.proj.weight"] = TensorEntry(
        ("x_embedder", "proj", "kernel"),
        (D, C, p, p),
        lambda w: np.transpose(w, (2, 3, 1, 0)),
    )
    m["x_embedder.proj.bias"] = TensorEntry(("x_embedder", "proj", "bias"), (D,), _same((D,)))
    linear("t_embedder.mlp.0", ("t_embedder", "fc1"), D, _FREQUENCY_DIM)
    linear("t_embedder.mlp.2", ("t_embedder", "fc2"), D, D)
    if module.num_classes > 0:
        rows = module.num_classes + int(module.null_class)
        m["y_embedder.embedding_table.weight"] = TensorEntry(
            ("y_embedder", "embedding_table"), (rows, D), _same((rows, D))
        )
    for i in range(module.depth):
        t, f = f"blocks.{i}", ("blocks_" + str(i),)
        linear(f"{t}.attn.qkv", f + ("attn", "qkv"), 3 * D, D, (D, 3, H, Dh), (3, H, Dh))
        linear(f"{t}.attn.proj", f + ("attn", "proj"), D, D, (H, Dh, D))
        linear(f"{t}.mlp.fc1", f + ("mlp", "fc1"), M, D)
        linear(f"{t}.mlp.fc2", f + ("mlp", "fc2"), D, M)
        linear(f"{t}.adaLN_modulation.1", f + ("adaLN_modulation",), 6 * D, D)
    linear("final_layer.linear", ("final_layer", "linear"), p * p * Co, D)
    linear("final_layer.adaLN_modulation.1", ("final_layer", "adaLN_modulation"), 2 * D, D)
    return m


def load_dit_state_dict(
    module: DiT, source: Mapping[str, Any] | str | os.PathLike, *, use_ema: bool = True, pos_atol: float = 1e-5
) -> dict:
    """The official implementation's weights as our parameter tree (plain numpy float32 arrays,
    ``{'x_embedder': {'proj': {'kernel': ...}}, ...}``; pass it as ``{'params': tree}``).

    ``source``: a state dict ``{name: array}`` (numpy or torch tensors, e.g. an ``np.load``-ed
    ``.npz``), a path to a ``.npz``, or a path to a PyTorch file (read by
    :func:`diffusion_jax.models.convert.load_torch_checkpoint`, which imports torch only then).
    A training checkpoint ``{'model': ..., 'ema': ..., ...}`` gives its ``'ema'`` weights
    (``use_ema=False``: ``'model'``); ``module.`` prefixes (DistributedDataParallel) are removed.

    Every tensor is checked: a missing, extra or misshaped one raises ``ConversionError`` with its
    name; ``pos_embed`` must equal our fixed table within ``pos_atol``.
    """
    from diffusion_jax.models.convert import ConversionError, load_torch_checkpoint, strip_prefix

    loaded: Any = source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if path.endswith(".npz"):
            with np.load(path) as data:
                loaded = {k: data[k] for k in data.files}
        else:
            loaded = load_torch_checkpoint(path)
    if not isinstance(loaded, Mapping):
        raise TypeError(f"load_dit_state_dict: expected a state dict or a path, got {type(loaded).__name__}")
    if "model" in loaded and isinstance(loaded["model"], Mapping):
        key = "ema" if use_ema and isinstance(loaded.get("ema"), Mapping) else "model"
        loaded = loaded[key]
    state = {k: _to_numpy(v) for k, v in strip_prefix(loaded).items()}

    mapping = dit_state_dict_mapping(module)
    missing = [n for n in mapping if n not in state]
    extra = [n for n in state if n not in mapping]
    if missing or extra:
        raise ConversionError(
            f"the state dict does not match this DiT (depth={module.depth}, hidden_size={module.hidden_size}, "
            f"num_classes={module.num_classes}, null_class={module.null_class}, learn_sigma={module.learn_sigma}): "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}"
        )
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for name, (path, shape, convert) in mapping.items():
        value = state[name]
        if tuple(value.shape) != shape:
            raise ConversionError(f"{name}: shape {tuple(value.shape)}, this DiT expects {shape}")
        value = convert(value.astype(np.float32))
        if path is None:  # the fixed position table: a check, not a parameter
            ours = sincos_2d_positions(module.hidden_size, module.input_size // module.patch_size)
            err = float(np.max(np.abs(value - ours)))
            if err > pos_atol:
                raise ConversionError(
                    f"pos_embed differs from the fixed 2-D sin-cos table by {err:.3g} (> {pos_atol}); "
                    f"this DiT has no learned positions"
                )
            continue
        flat[path] = value
    expected = traverse_util.flatten_dict(_param_shapes(module))
    for path, leaf in expected.items():  # the mapping and the module must agree leaf for leaf
        if path not in flat or flat[path].shape != leaf.shape:
            raise ConversionError(f"internal: parameter {'/'.join(path)} {leaf.shape} not produced by the mapping")
    if set(flat) != set(expected):
        raise ConversionError(f"internal: mapping produced unknown parameters {sorted(set(flat) - set(expected))}")
    return traverse_util.unflatten_dict(flat)


# --------------------------------------------------------------------------------------------
# Logical axes (for a sharding layer)
# --------------------------------------------------------------------------------------------

# Vocabulary of the names, for the rules that map them to mesh axes:
LOGICAL_AXIS_NAMES: dict[str, str] = {
    "embed": "the residual width hidden_size",
    "embed_out": "the output side of the square t_embedder fc2 kernel (hidden_size; a second name so "
    "that one mesh axis is not used twice in one array)",
    "mlp": "the MLP's hidden features (mlp_ratio * hidden_size)",
    "heads": "attention heads",
    "kv": "channels per head (hidden_size / num_heads)",
    "qkv": "the 3 of the fused query/key/value projection",
    "modulation": "the adaLN outputs (6 or 2 vectors of hidden_size)",
    "patch": "pixel values per patch and channel of the output layer (p * p * out_channels)",
    "freq": "the 256 sinusoidal noise-label features",
    "vocab": "rows of the class table (num_classes + null)",
    "conv_height": "patch-embedding kernel rows",
    "conv_width": "patch-embedding kernel columns",
    "conv_in": "input image channels",
}

_AXES: dict[tuple[str, ...], tuple[str, ...]] = {
    # keyed by the path without the block index: (module..., parameter)
    ("x_embedder", "proj", "kernel"): ("conv_height", "conv_width", "conv_in", "embed"),
    ("x_embedder", "proj", "bias"): ("embed",),
    ("t_embedder", "fc1", "kernel"): ("freq", "embed"),
    ("t_embedder", "fc1", "bias"): ("embed",),
    ("t_embedder", "fc2", "kernel"): ("embed", "embed_out"),
    ("t_embedder", "fc2", "bias"): ("embed_out",),
    ("y_embedder", "embedding_table"): ("vocab", "embed"),
    ("blocks", "attn", "qkv", "kernel"): ("embed", "qkv", "heads", "kv"),
    ("blocks", "attn", "qkv", "bias"): ("qkv", "heads", "kv"),
    ("blocks", "attn", "proj", "kernel"): ("heads", "kv", "embed"),
    ("blocks", "attn", "proj", "bias"): ("embed",),
    ("blocks", "mlp", "fc1", "kernel"): ("embed", "mlp"),
    ("blocks", "mlp", "fc1", "bias"): ("mlp",),
    ("blocks", "mlp", "fc2", "kernel"): ("mlp", "embed"),
    ("blocks", "mlp", "fc2", "bias"): ("embed",),
    ("blocks", "adaLN_modulation", "kernel"): ("embed", "modulation"),
    ("blocks", "adaLN_modulation", "bias"): ("modulation",),
    ("final_layer", "adaLN_modulation", "kernel"): ("embed", "modulation"),
    ("final_layer", "adaLN_modulation", "bias"): ("modulation",),
    ("final_layer", "linear", "kernel"): ("embed", "patch"),
    ("final_layer", "linear", "bias"): ("patch",),
}


def parameter_axes(path: tuple[str, ...]) -> tuple[str, ...] | None:
    """The logical axis names of the DiT parameter at ``path`` (``('blocks_3', 'mlp', 'fc1',
    'kernel')``), one per dimension; None for a path this table does not know."""
    if path and path[0].startswith("blocks_"):
        path = ("blocks",) + tuple(path[1:])
    return _AXES.get(tuple(path))


def logical_axes(params: Any) -> Any:
    """A tree of the same structure as ``params`` (a DiT parameter tree, or its
    ``jax.eval_shape``) whose leaves are ``PartitionSpec``s of logical axis names, one name per
    array dimension (vocabulary: :data:`LOGICAL_AXIS_NAMES`). ``PartitionSpec`` is a pytree leaf
    (a plain tuple would not be), so the trees match leaf for leaf, and Flax maps it to mesh axes
    directly: ``flax.linen.logical_to_mesh_sharding(logical_axes(params), mesh, rules)`` with e.g.
    ``rules = (('embed', 'fsdp'), ('mlp', 'tensor'), ('heads', 'tensor'))``; names without a rule
    are replicated. An unknown parameter path raises ``KeyError``."""

    def axes(path, leaf):
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        names = parameter_axes(keys)
        if keys and keys[0].startswith("blocks_"):
            keys = ("blocks",) + keys[1:]
        if names is None:
            raise KeyError(f"logical_axes: no axis names for DiT parameter {'/'.join(keys)}")
        if len(names) != len(leaf.shape):
            raise ValueError(f"logical_axes: {'/'.join(keys)} has shape {leaf.shape}, names {names}")
        return PartitionSpec(*names)

    return jax.tree_util.tree_map_with_path(axes, params)
