"""Logical axis names of every network's parameters, for sharding them over a device mesh.

Each network declares, per parameter, one logical name per array dimension (``'embed'``,
``'mlp'``, ``'conv_out'``, ...); rules in the config map those names to mesh axes
(``diffusion_jax.training.sharding``). A parameter whose axes are not declared gets None, and the
sharding layer reports it instead of replicating it silently.

* DiT declares its axes per parameter (:func:`diffusion_jax.models.dit.parameter_axes`).
* The convolutional networks (NCSN++, DDPM, NCSNv2) are built from a few Flax layer kinds, so
  their axes follow from the parameter's name and rank (:data:`CONV_NET_AXES`): a convolution
  kernel ``(kh, kw, C_in, C_out)`` is ``('conv_height', 'conv_width', 'conv_in', 'conv_out')``,
  a dense or network-in-network kernel ``(C_in, C_out)`` is ``('dense_in', 'dense_out')``, the
  class table is ``('vocab', 'dense_out')`` and every per-channel vector (biases, GroupNorm and
  InstanceNorm++ scales) is ``('channels',)``.

Only jax is imported here, as for every network module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from diffusion_jax.models import dit

__all__ = ["CONV_NET_AXES", "conv_net_axes", "LOGICAL_AXES", "declared_axes"]

Path = tuple[str, ...]

# (parameter name, rank) -> logical names, for the layers the U-Nets and NCSNv2 are made of.
CONV_NET_AXES: dict[tuple[str, int], tuple[str, ...]] = {
    ("kernel", 4): ("conv_height", "conv_width", "conv_in", "conv_out"),  # nn.Conv, layers.Conv2d (HWIO)
    ("kernel", 2): ("dense_in", "dense_out"),  # nn.Dense
    ("W", 2): ("dense_in", "dense_out"),  # layers.NIN
    ("embedding", 2): ("vocab", "dense_out"),  # nn.Embed (the class table)
    ("bias", 1): ("channels",),
    ("b", 1): ("channels",),
    ("scale", 1): ("channels",),  # GroupNorm
    ("alpha", 1): ("channels",),  # InstanceNorm++ (NCSNv2)
    ("gamma", 1): ("channels",),
    ("beta", 1): ("channels",),
    ("W", 1): ("freq",),  # GaussianFourierProjection (fixed random frequencies)
}


def conv_net_axes(path: Path, shape: tuple[int, ...]) -> tuple[str, ...] | None:
    """Axes of a convolutional network's parameter from its name (the last key) and rank."""
    return CONV_NET_AXES.get((path[-1], len(shape))) if path else None


def _dit_axes(path: Path, shape: tuple[int, ...]) -> tuple[str, ...] | None:
    names = dit.parameter_axes(path)
    return names if names is not None and len(names) == len(shape) else None


def _undeclared(path: Path, shape: tuple[int, ...]) -> None:
    return None


# config.model.name -> how its parameters' axes are named (same keys as models.MODELS).
LOGICAL_AXES: dict[str, Callable[[Path, tuple[int, ...]], tuple[str, ...] | None]] = {
    "ncsnpp": conv_net_axes,
    "ddpm": conv_net_axes,
    "ncsnv2_64": conv_net_axes,
    "ncsnv2_128": conv_net_axes,
    "ncsnv2_256": conv_net_axes,
    "classifier": conv_net_axes,
    "dit": _dit_axes,
}


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def declared_axes(model_name: str, params: Any) -> dict[Path, tuple[str, ...] | None]:
    """``{parameter path: logical names or None}`` for every leaf of ``params`` (arrays or
    ``jax.ShapeDtypeStruct``s) of the network ``model_name``; None marks a parameter whose axes
    the network does not declare (every parameter of a network without an entry in
    :data:`LOGICAL_AXES`)."""
    lookup = LOGICAL_AXES.get(model_name.lower(), _undeclared)
    out: dict[Path, tuple[str, ...] | None] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(_key_name(k) for k in path)
        out[keys] = lookup(keys, tuple(leaf.shape))
    return out
