"""Snapshots of the power-function EMAs during training, and the EMAs reconstructed from them.

``<workdir>/ema_snapshots/<step>/`` holds the power EMAs of ``model.ema_sigma_rels`` at that
step (``state``: a tuple of parameter trees, in the config's order; ``meta``: the step, the
sigma_rels and their exponents). Every snapshot is kept: post-hoc reconstruction
(:func:`diffusion_jax.training.ema.solve_posthoc_weights`) combines all of them.
``<workdir>/posthoc_ema/sigma_rel_<S>/<step>/`` holds a reconstructed EMA (``state``: one
parameter tree; ``meta``: the weights and the profile residual), which ``sample``, ``eval`` and
``load`` read with ``sampling.ema = 'sigma_rel:S'``. Both use :class:`Checkpointer`, so
writes are atomic and asynchronous and their failures surface like a checkpoint's.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from diffusion_jax.training.checkpoint import Checkpointer, NoCheckpointError
from diffusion_jax.training.ema import sigma_rel_to_gamma

__all__ = [
    "SNAPSHOT_DIR",
    "POSTHOC_DIR",
    "Snapshotter",
    "snapshot_steps",
    "read_snapshot",
    "posthoc_path",
    "write_posthoc",
    "read_posthoc",
    "combine",
]

SNAPSHOT_DIR = "ema_snapshots"
POSTHOC_DIR = "posthoc_ema"


class Snapshotter:
    """``snapshotter(state, step)`` saves ``state.emas.power`` as snapshot ``step`` (once: a step
    already saved, e.g. redone after a resume from an older checkpoint, is left as it is; the
    resumed run computes the same values). Close it to wait for the last write.

    ``before_save`` runs before each save. Across several processes, orbax cannot have two
    asynchronous saves in flight at once (they share one barrier name), so the training command
    saves snapshots synchronously there, after waiting for the training checkpoint in flight."""

    def __init__(
        self,
        workdir: str | pathlib.Path,
        sigma_rels: tuple[float, ...],
        *,
        async_save: bool = True,
        before_save: Callable[[], None] | None = None,
    ):
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.before_save = before_save
        self.checkpointer = Checkpointer(
            pathlib.Path(workdir) / SNAPSHOT_DIR, keep_period=1, max_to_keep=1, async_save=async_save
        )
        self._saved = set(self.checkpointer.steps())

    def __call__(self, state: Any, step: int) -> None:
        step = int(step)
        if step in self._saved or step <= 0:
            return
        meta = {"sigma_rels": list(self.sigma_rels), "gammas": [sigma_rel_to_gamma(s) for s in self.sigma_rels]}
        if self.before_save is not None:
            self.before_save()
        self.checkpointer.save(step, tuple(state.emas.power), meta=meta)
        self._saved.add(step)

    def close(self) -> None:
        self.checkpointer.close()


def snapshot_steps(workdir: str | pathlib.Path) -> list[int]:
    """The steps of the saved snapshots (empty when there are none)."""
    directory = pathlib.Path(workdir) / SNAPSHOT_DIR
    if not directory.is_dir():
        return []
    ck = Checkpointer(directory, read_only=True)
    try:
        return ck.steps()
    finally:
        ck.close()


def read_snapshot(workdir: str | pathlib.Path, step: int, template: tuple[Any, ...]) -> tuple[tuple[Any, ...], dict]:
    """``(power EMAs, meta)`` of snapshot ``step``; ``template`` gives their structure, shapes and
    dtypes (one parameter tree per sigma_rel)."""
    ck = Checkpointer(pathlib.Path(workdir) / SNAPSHOT_DIR, read_only=True)
    try:
        restored = ck.restore(template, step=step)
    finally:
        ck.close()
    return tuple(restored.state), restored.meta


def posthoc_path(workdir: str | pathlib.Path, sigma_rel: float) -> pathlib.Path:
    """The directory of the reconstructions of ``sigma_rel`` (one checkpoint per step)."""
    return pathlib.Path(workdir) / POSTHOC_DIR / f"sigma_rel_{float(sigma_rel)!r}"


def write_posthoc(workdir: str | pathlib.Path, sigma_rel: float, step: int, params: Any, meta: dict) -> pathlib.Path:
    """Save a reconstructed EMA (replacing one of the same sigma_rel and step)."""
    path = posthoc_path(workdir, sigma_rel)
    ck = Checkpointer(path, keep_period=1, max_to_keep=1, async_save=False)
    try:
        if step in ck.steps():
            ck.manager.delete(step)
        ck.save(step, params, meta=meta)
        ck.wait()
    finally:
        ck.close()
    return path / str(step)


def read_posthoc(workdir: str | pathlib.Path, sigma_rel: float, step: int, template: Any) -> Any:
    """The reconstructed EMA of ``sigma_rel`` at ``step``; :class:`NoCheckpointError` when none
    was written."""
    path = posthoc_path(workdir, sigma_rel)
    if not (path / str(step)).is_dir():
        raise NoCheckpointError(f"no reconstruction in {path / str(step)}")
    ck = Checkpointer(path, read_only=True)
    try:
        return ck.restore(template, step=step).state
    finally:
        ck.close()


def combine(weights: np.ndarray, trees: list[Any], into: list[Any] | None) -> list[Any]:
    """``into[j] += sum_i weights[i, j] trees[i]`` in float64 on the host (``into`` None: start
    from zero); how the reconstruction adds one snapshot at a time."""
    host = [jax.tree_util.tree_map(lambda a: np.asarray(jax.device_get(a), np.float64), t) for t in trees]
    if into is None:
        into = [jax.tree_util.tree_map(np.zeros_like, host[0]) for _ in range(weights.shape[1])]
    out = []
    for j, acc in enumerate(into):
        for i, tree in enumerate(host):
            acc = jax.tree_util.tree_map(lambda a, b, w=float(weights[i, j]): a + w * b, acc, tree)
        out.append(acc)
    return out
