"""Sharded training state on a 3-D device mesh: data parallelism, FSDP and tensor parallelism.

The mesh has the named axes ``('data', 'fsdp', 'tensor')``:

* the batch is split over ``data x fsdp`` (every device of a ``tensor`` group holds the same
  examples);
* parameters, the optimizer state and the EMA are split by logical axis names that each network
  declares per parameter (:mod:`diffusion_jax.models.partitioning`), mapped to mesh axes by
  rules: ``(('mlp', 'tensor'), ('embed', 'fsdp'), ...)``. With ``fsdp > 1`` every device keeps
  1/fsdp of each sharded array (ZeRO-3 / FSDP: XLA gathers a weight where it is used and
  reduce-scatters its gradient); ``tensor > 1`` splits attention heads and MLP features
  (Megatron-style tensor parallelism) in DiT.

Resolving a parameter's names against the rules (:func:`plan`): the rules are tried in order;
a rule ``(name, axis)`` shards the (largest) dimension called ``name`` over ``axis`` when the
axis is longer than 1, not yet used by this array, and divides that dimension. A parameter that
declares no names is listed in :attr:`Plan.undeclared` (the caller refuses or warns), and one
whose declared dimensions no rule could shard is listed in :attr:`Plan.replicated`.

Every other array of the training state follows its parameter: a leaf of the state whose key
path ends with a parameter's path and has its shape (Adam's ``mu`` and ``nu``, the EMA, EMA
snapshots) gets that parameter's sharding; anything else (step counters, the RNG) is
replicated. The same step function then runs on any layout: ``jax.jit`` with these output
shardings, and XLA's SPMD partitioner inserts the collectives.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "MESH_AXES",
    "BATCH_AXES",
    "DEFAULT_RULES",
    "resolve_mesh_shape",
    "make_mesh",
    "parse_rules",
    "format_rules",
    "batch_axes",
    "batch_shards",
    "batch_sharding",
    "Plan",
    "plan",
    "param_shapes",
    "state_shardings",
    "place",
    "bytes_per_device",
    "layout_summary",
]

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Path = tuple[str, ...]

# Tried in order (see the module docstring). Tensor parallelism first, so that a DiT MLP kernel
# ('embed', 'mlp') puts 'mlp' on 'tensor' and 'embed' on 'fsdp'; then FSDP for every name that
# DiT and the convolutional networks declare (a name may be listed for both axes).
DEFAULT_RULES: tuple[tuple[str, str], ...] = (
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("modulation", "tensor"),
    ("embed", "fsdp"),
    ("embed_out", "fsdp"),
    ("mlp", "fsdp"),
    ("modulation", "fsdp"),
    ("heads", "fsdp"),
    ("kv", "fsdp"),
    ("vocab", "fsdp"),
    ("patch", "fsdp"),
    ("conv_out", "fsdp"),
    ("conv_in", "fsdp"),
    ("dense_out", "fsdp"),
    ("dense_in", "fsdp"),
    ("channels", "fsdp"),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """``(data, fsdp, tensor)`` sizes with at most one ``-1`` standing for the rest of the
    ``num_devices`` devices; ``ValueError`` (naming the sizes) when they do not multiply to it."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"a mesh shape has {len(MESH_AXES)} sizes {MESH_AXES}, got {shape}")
    named = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, shape))
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh sizes must be >= 1 or -1 (the rest), got {named}")
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh size may be -1 (the rest), got {named}")
    fixed = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % fixed:
            raise ValueError(f"the mesh {named} needs a multiple of {fixed} devices; there are {num_devices}")
        shape = tuple(num_devices // fixed if s == -1 else s for s in shape)
    elif fixed != num_devices:
        raise ValueError(f"the mesh {named} has {fixed} devices; there are {num_devices}")
    return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with axes ``('data', 'fsdp', 'tensor')`` over ``devices`` (default: every device
    of every process). Devices are laid out in ``jax.devices()`` order, ``tensor`` fastest, so a
    tensor group is consecutive devices (the same host whenever ``tensor`` divides the devices
    per host) and ``data`` spans the hosts."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(shape, len(devices))
    if jax.process_count() > 1 and sizes[2] > 1 and jax.local_device_count() % sizes[2]:
        raise ValueError(
            f"tensor = {sizes[2]} must divide the {jax.local_device_count()} devices of each host (a tensor group "
            "shares its examples, so it must not span hosts that read different data)"
        )
    return Mesh(np.asarray(devices, dtype=object).reshape(sizes), MESH_AXES)


def parse_rules(text: str) -> tuple[tuple[str, str], ...]:
    """``"heads:tensor, embed:fsdp"`` -> ``(('heads', 'tensor'), ('embed', 'fsdp'))``; ``ValueError``
    for a malformed rule or an axis other than ``fsdp`` / ``tensor`` (the batch owns ``data``).
    An empty string means no rules (everything replicated)."""
    rules = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, axis = (part.strip() for part in item.partition(":"))
        if not sep or not name or not axis:
            raise ValueError(f"rule {item!r} is not 'logical_name:mesh_axis'")
        if axis not in ("fsdp", "tensor"):
            raise ValueError(f"rule {item!r}: the mesh axis must be fsdp or tensor, got {axis!r}")
        rules.append((name, axis))
    return tuple(rules)


def format_rules(rules: Iterable[tuple[str, str]]) -> str:
    return ", ".join(f"{name}:{axis}" for name, axis in rules)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch is split over: those of ``('data', 'fsdp')`` the mesh has (a 1-D
    ``('data',)`` mesh gives ``('data',)``)."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_shards(mesh: Mesh) -> int:
    """Into how many parts the batch is split (devices over ``tensor`` share theirs)."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh, *, leading_steps: bool = False) -> NamedSharding:
    """The batch axis (axis 1 after a leading ``n_jitted_steps`` axis) over ``data x fsdp``."""
    axes = batch_axes(mesh)
    return NamedSharding(mesh, P(None, axes) if leading_steps else P(axes))


class Plan(NamedTuple):
    """How one parameter tree is laid out on a mesh (see :func:`plan`).

    ``specs``: ``{path: PartitionSpec}`` for every parameter; ``shapes``: ``{path: shape}``.
    ``undeclared``: paths of parameters whose network declares no logical axes (replicated).
    ``replicated``: paths (on a mesh with fsdp or tensor > 1) whose declared dimensions no rule
    could shard (no rule for their names, or no divisible one). ``mesh``: the mesh."""

    specs: dict[Path, P]
    shapes: dict[Path, tuple[int, ...]]
    undeclared: list[Path]
    replicated: list[Path]
    mesh: Mesh

    def sharding(self, path: Path) -> NamedSharding:
        return NamedSharding(self.mesh, self.specs[path])


def _resolve(names: tuple[str, ...], shape: tuple[int, ...], rules, mesh: Mesh) -> P:
    assigned: list[str | None] = [None] * len(shape)
    used: set[str] = set()
    for name, axis in rules:
        size = mesh.shape.get(axis, 1)
        if size <= 1 or axis in used:
            continue
        dims = [i for i, n in enumerate(names) if n == name and assigned[i] is None and shape[i] % size == 0]
        if dims:
            best = max(dims, key=lambda i: shape[i])
            assigned[best] = axis
            used.add(axis)
    return P(*assigned)


def plan(
    axes: Mapping[Path, tuple[str, ...] | None], shapes: Mapping[Path, tuple[int, ...]], mesh: Mesh, rules
) -> Plan:
    """Lay out parameters: ``axes`` are their declared logical names (None: not declared),
    ``shapes`` their shapes, ``rules`` the ``(logical name, mesh axis)`` pairs in priority order."""
    specs: dict[Path, P] = {}
    undeclared: list[Path] = []
    replicated: list[Path] = []
    sharded_mesh = any(mesh.shape.get(a, 1) > 1 for a in ("fsdp", "tensor"))
    for path, shape in shapes.items():
        names = axes.get(path)
        if names is None:
            specs[path] = P()
            undeclared.append(path)
            continue
        if len(names) != len(shape):
            raise ValueError(f"parameter {'/'.join(path)} of shape {shape} declares {len(names)} axes {names}")
        spec = _resolve(tuple(names), tuple(shape), rules, mesh)
        specs[path] = spec
        if sharded_mesh and all(a is None for a in spec) and math.prod(shape) > 1:
            replicated.append(path)
    return Plan(specs, {p: tuple(s) for p, s in shapes.items()}, undeclared, replicated, mesh)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def param_shapes(params: Any) -> dict[Path, tuple[int, ...]]:
    """``{path: shape}`` of a parameter tree (arrays or ``ShapeDtypeStruct``s), paths as tuples
    of key names (``('blocks_0', 'mlp', 'fc1', 'kernel')``)."""
    return {
        tuple(_key_name(k) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }


def state_shardings(state: Any, layout: Plan) -> Any:
    """A tree of ``NamedSharding`` for ``state`` (arrays or ``ShapeDtypeStruct``s): a leaf whose
    key path ends with a parameter's path and that has the parameter's shape is sharded like the
    parameter (the longest such path wins); every other leaf is replicated."""
    replicated = NamedSharding(layout.mesh, P())
    lengths = sorted({len(p) for p in layout.specs}, reverse=True)

    def one(path, leaf):
        keys = tuple(_key_name(k) for k in path)
        for n in lengths:
            if n <= len(keys):
                tail = keys[len(keys) - n :]
                if tail in layout.specs and layout.shapes[tail] == tuple(leaf.shape):
                    return layout.sharding(tail)
        return replicated

    return jax.tree_util.tree_map_with_path(one, state)


def place(tree: Any, shardings: Any) -> Any:
    """Put a tree of host values (the same on every process) onto the mesh with ``shardings``;
    each device receives only its slice, on one host or many."""

    def put(x, sharding):
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(put, tree, shardings)


def bytes_per_device(tree: Any) -> dict[Any, int]:
    """Bytes of ``tree``'s arrays held by each (addressable) device, read from the arrays' shards."""
    out: dict[Any, int] = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def layout_summary(layout: Plan, itemsize: int = 4) -> str:
    """One line: the mesh, and the parameters' size in total and on each device (per copy)."""
    mesh = layout.mesh
    total = per_device = 0
    for path, shape in layout.shapes.items():
        n = math.prod(shape) * itemsize
        split = math.prod(mesh.shape[a] for a in layout.specs[path] if a is not None)
        total += n
        per_device += n // split
    sizes = " ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)
    return (
        f"mesh {sizes}; parameters {total / 2**20:.2f} MiB, {per_device / 2**20:.2f} MiB per device "
        f"({100.0 * per_device / max(total, 1):.1f}%; the Adam moments and the EMA are laid out alike)"
    )
