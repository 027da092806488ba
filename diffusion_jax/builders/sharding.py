"""The device mesh and the parameter layout from ``config.mesh`` (docs/training_at_scale.md).

``mesh.data`` / ``mesh.fsdp`` / ``mesh.tensor`` give the mesh shape (one of them may be -1, the
rest of the devices); ``mesh.rules`` map the logical axis names the network declares
(:mod:`diffusion_jax.models.partitioning`) to the ``fsdp`` and ``tensor`` axes ('' = the
library's :data:`~diffusion_jax.training.sharding.DEFAULT_RULES`). On a mesh with ``fsdp`` or
``tensor`` > 1, parameters whose network declares no axes stop the run with their paths, unless
``mesh.replicate_unannotated`` accepts them replicated (then a warning lists them).
"""

from __future__ import annotations

import logging
from typing import Any

from jax.sharding import Mesh

from diffusion_jax.builders.config import ConfigError, with_defaults
from diffusion_jax.models import partitioning
from diffusion_jax.training import sharding

__all__ = ["build_mesh", "build_rules", "build_plan", "UnannotatedParameters"]

log = logging.getLogger(__name__)


class UnannotatedParameters(ConfigError):
    """Parameters without logical axes on a sharded mesh (``mesh.replicate_unannotated`` False)."""


def build_mesh(config: Any, devices: Any = None) -> Mesh:
    """The ``('data', 'fsdp', 'tensor')`` mesh of ``config.mesh`` over ``devices`` (default: all)."""
    m = _mesh_section(config)
    try:
        return sharding.make_mesh((m.data, m.fsdp, m.tensor), devices)
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from None


def _mesh_section(config: Any) -> Any:
    # A config written before the mesh keys existed (a workdir's config.json) means the defaults.
    return config.mesh if "mesh" in config else with_defaults({}).mesh


def build_rules(config: Any) -> tuple[tuple[str, str], ...]:
    text = _mesh_section(config).rules
    if not text.strip():
        return sharding.DEFAULT_RULES
    try:
        return sharding.parse_rules(text)
    except ValueError as e:
        raise ConfigError(f"config.mesh.rules: {e}") from None


def _listing(paths: list[tuple[str, ...]], limit: int = 12) -> str:
    names = ["/".join(p) for p in paths[:limit]]
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(names) + more


def build_plan(config: Any, params: Any, mesh: Mesh) -> sharding.Plan:
    """The layout of ``params`` (arrays or ``jax.eval_shape`` structs) on ``mesh``."""
    shapes = sharding.param_shapes(params)
    axes = partitioning.declared_axes(config.model.name, params)
    layout = sharding.plan(axes, shapes, mesh, build_rules(config))
    sharded = any(mesh.shape.get(a, 1) > 1 for a in ("fsdp", "tensor"))
    if sharded and layout.undeclared:
        what = (
            f"{len(layout.undeclared)} parameter(s) of model {config.model.name!r} declare no logical axes, so they "
            f"cannot be sharded over fsdp / tensor: {_listing(layout.undeclared)}"
        )
        if not _mesh_section(config).replicate_unannotated:
            raise UnannotatedParameters(
                f"{what}. Declare their axes (diffusion_jax/models/partitioning.py), or set "
                "mesh.replicate_unannotated = True to keep a full copy of them on every device"
            )
        log.warning("%s; replicated on every device (mesh.replicate_unannotated)", what)
    if layout.replicated:
        log.info(
            "%d parameter(s) stay replicated (no rule shards their axes): %s",
            len(layout.replicated),
            _listing(layout.replicated),
        )
    return layout
