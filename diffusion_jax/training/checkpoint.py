"""Checkpoints with orbax: a frequent preemption checkpoint and a sparser kept series in one
manager, asynchronous saves, and a restore that falls back past a corrupt newest checkpoint.

Layout of ``<workdir>/checkpoints/<step>/``: ``state`` (the TrainState pytree), ``data`` (the
data iterator position of every process, written by grain's orbax handler) and ``meta`` (JSON:
step, config digest). Saves go to a temporary directory that orbax renames when complete, so a
run killed mid-save leaves the previous checkpoints intact.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "NoCheckpointError"]

log = logging.getLogger(__name__)


class NoCheckpointError(FileNotFoundError):
    pass


class _IteratorState:
    """Presents any iterator with ``get_state()`` / ``set_state()`` (a JSON-serialisable state,
    or bytes) to grain's orbax handler, which writes one file per process."""

    def __init__(self, iterator):
        self.iterator = iterator

    def get_state(self) -> bytes:
        state = self.iterator.get_state()
        return state if isinstance(state, bytes) else json.dumps({"json": state}).encode()

    def set_state(self, state: bytes) -> None:
        try:
            decoded = json.loads(state.decode())
        except (UnicodeDecodeError, ValueError):
            decoded = None
        self.iterator.set_state(decoded["json"] if isinstance(decoded, dict) and "json" in decoded else state)

    def start_prefetch(self) -> None:
        start = getattr(self.iterator, "start_prefetch", None)
        if start is not None:
            start()


class Checkpointer:
    """Saves every ``save_every`` steps (the preemption checkpoint, keeping the newest
    ``max_to_keep``) and keeps every multiple of ``keep_period`` for good (score_sde's
    ``snapshot_freq_for_preemption`` and ``snapshot_freq``)."""

    def __init__(self, directory: str | pathlib.Path, *, keep_period: int | None = None,
                 max_to_keep: int = 2, async_save: bool = True, read_only: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            keep_period=keep_period,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
        )
        self._handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=self._handlers)

    # -- saving ------------------------------------------------------------------------------
    def save(self, step: int, state: Any, *, data_iterator=None, meta: dict | None = None, force: bool = True) -> bool:
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(dict(meta or {}, step=int(step)))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_IteratorState(data_iterator))
        return self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def reached_preemption(self, step: int) -> bool:
        """orbax's multi-host preemption notice (all processes agree on the step to stop at)."""
        try:
            return bool(self.manager.reached_preemption(int(step)))
        except Exception:  # no preemption service (single process without jax.distributed)
            return False

    # -- restoring -----------------------------------------------------------------------------
    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def restore(self, template_state: Any, *, data_iterator=None, step: int | None = None):
        """Restore ``(step, state, meta)`` (and the data iterator in place).

        With ``step=None`` the newest checkpoint is tried first; if it cannot be read (partial,
        corrupt, or written by an incompatible model) the next older one is tried, with a warning
        naming what was wrong. Raises :class:`NoCheckpointError` when none can be restored.
        """
        steps = self.steps() if step is None else [step]
        if not steps:
            raise NoCheckpointError(f"no checkpoint in {self.directory}")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template_state)
        errors = []
        for s in reversed(steps):
            items = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(_IteratorState(data_iterator))
            try:
                restored = self.manager.restore(s, args=ocp.args.Composite(**items))
            except Exception as e:  # orbax raises many types for unreadable checkpoints
                msg = f"checkpoint {self.directory / str(s)} could not be restored: {type(e).__name__}: {str(e)[:500]}"
                log.warning("%s; trying an older one", msg)
                errors.append(msg)
                continue
            if errors:
                log.warning("resumed from checkpoint %d after skipping %d unreadable newer one(s)", s, len(errors))
            return s, restored["state"], restored["meta"], errors
        raise NoCheckpointError("no checkpoint could be restored:\n  " + "\n  ".join(errors))
