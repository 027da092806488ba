"""Checkpoints with orbax: a frequent preemption checkpoint and a sparser kept series in one
manager, asynchronous saves, and a restore that falls back past a corrupt newest checkpoint.

Layout of ``<workdir>/checkpoints/<step>/``: ``state`` (the TrainState pytree), ``data`` (the
data iterator position of every process, written by grain's orbax handler) and ``meta`` (JSON:
step, config digest). Saves go to a temporary directory that orbax renames when complete, so a
run killed mid-save leaves the previous checkpoints intact; the leftover temporary directory is
removed when the next run opens the manager. A newest checkpoint that cannot be read is moved
to ``<workdir>/checkpoints_unreadable/`` once an older one restored, so the resumed run can save
that step again and the evidence is kept.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import pathlib
import shutil
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "Restored", "NoCheckpointError", "CheckpointSaveError"]

log = logging.getLogger(__name__)


class NoCheckpointError(FileNotFoundError):
    pass


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, I/O error); the message names the step,
    the cause, and the checkpoints that are still intact."""

    def __init__(self, message: str, *, step: int, disk_full: bool, intact: list[int]):
        super().__init__(message)
        self.step, self.disk_full, self.intact = step, disk_full, intact


def _is_disk_full(error: BaseException | None) -> bool:
    """ENOSPC anywhere in the exception chain. Orbax writes arrays through TensorStore, which
    reports it as ``ValueError: RESOURCE_EXHAUSTED ... No space left on device [os_error_code='28']``
    rather than as an ``OSError``."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        text = str(error)
        if "No space left on device" in text or "os_error_code='28'" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def _first_line(error: BaseException, limit: int = 300) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text[:limit]}"


class Restored(NamedTuple):
    """What :meth:`Checkpointer.restore` returns (it unpacks like the tuple
    ``(step, state, meta, errors)``).

    ``step``: the step of the checkpoint restored. ``state``: the state pytree, with the
    structure, shapes and dtypes of the template. ``meta``: the JSON saved with it (``step``,
    and what the caller passed to :meth:`Checkpointer.save`). ``errors``: one message per newer
    checkpoint that could not be read and was skipped (empty when the newest one restored).
    """

    step: int
    state: Any
    meta: dict[str, Any]
    errors: list[str]


class _IteratorState:
    """Presents any iterator with ``get_state()`` / ``set_state()`` (a JSON-serialisable state,
    or bytes) to grain's orbax handler, which writes one file per process."""

    def __init__(self, iterator: Any):
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


def _all_processes_agree(ok: bool) -> bool:
    """Whether ``ok`` holds on every process (a collective; trivially ``ok`` on one process).
    Every process must resume from the same step, even if only one of them failed to read its
    part of a checkpoint (e.g. its own data-iterator file)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


class Checkpointer:
    """Saves every ``save_every`` steps (the preemption checkpoint, keeping the newest
    ``max_to_keep``) and keeps every multiple of ``keep_period`` for good (score_sde's
    ``snapshot_freq_for_preemption`` and ``snapshot_freq``).

    Errors of asynchronous saves surface at the next :meth:`save`, :meth:`check_for_errors`,
    :meth:`wait` or :meth:`close` as :class:`CheckpointSaveError`, naming the step that failed.
    """

    def __init__(
        self,
        directory: str | pathlib.Path,
        *,
        keep_period: int | None = None,
        max_to_keep: int = 2,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = pathlib.Path(directory).absolute()
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            keep_period=keep_period,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            # Temporary directories of saves cut short (a kill mid-save) are removed on start.
            cleanup_tmp_directories=not read_only,
        )
        self._handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=self._handlers)
        self._pending: int | None = None  # step of the save that may still be running
        self._failed = False

    # -- saving ------------------------------------------------------------------------------
    def save(
        self, step: int, state: Any, *, data_iterator: Any = None, meta: dict | None = None, force: bool = True
    ) -> bool:
        self.wait()  # report a failed previous save under its own step
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(dict(meta or {}, step=int(step)))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_IteratorState(data_iterator))
        self._pending = int(step)
        with self._reporting(int(step)):
            return self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)

    def wait(self) -> None:
        """Block until the save in flight is written; raise :class:`CheckpointSaveError` if it failed."""
        with self._reporting(self._pending):
            self.manager.wait_until_finished()
        self._pending = None

    def check_for_errors(self) -> None:
        """Raise :class:`CheckpointSaveError` now if an asynchronous save already failed (cheap:
        it does not wait for a save in flight)."""
        with self._reporting(self._pending):
            self.manager.check_for_errors()

    def close(self) -> None:
        if self._failed:
            try:  # the failure was reported already; release the manager's threads quietly
                self.manager.close()
            except Exception as e:  # noqa: BLE001
                log.debug("closing the checkpoint manager after a failed save: %s", e)
            return
        with self._reporting(self._pending):
            self.manager.close()

    @contextlib.contextmanager
    def _reporting(self, step: int | None) -> Iterator[None]:
        """Turn any exception of an orbax save or wait into :class:`CheckpointSaveError`."""
        try:
            yield
        except CheckpointSaveError:
            raise
        except Exception as e:  # orbax / TensorStore raise ValueError, OSError, RuntimeError...
            raise self._fail(step, e) from e

    def _fail(self, step: int | None, error: BaseException) -> CheckpointSaveError:
        self._failed = True
        disk_full = _is_disk_full(error)
        if step is not None and jax.process_index() == 0:
            # Free the space of the partial save at once (a full disk needs it more than the
            # next start does).
            for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)
        try:
            intact = [s for s in self.steps() if s != step]
        except Exception:  # noqa: BLE001 (listing may fail on the same broken disk)
            intact = []
        what = f"checkpoint {step}" if step is not None else "a checkpoint"
        cause = "the disk is full (No space left on device)" if disk_full else _first_line(error)
        if intact:
            kept = (
                f"The checkpoints already saved are intact (steps {', '.join(map(str, intact))}); "
                f"{'free some space, then ' if disk_full else ''}rerun the same command to resume "
                f"from step {intact[-1]}"
            )
        else:
            kept = "No earlier checkpoint exists; " + ("free some space, then " if disk_full else "") + "rerun"
        return CheckpointSaveError(
            f"could not write {what} in {self.directory}: {cause}. {kept}.",
            step=-1 if step is None else step,
            disk_full=disk_full,
            intact=intact,
        )

    def reached_preemption(self, counter: int) -> bool:
        """orbax's multi-host preemption notice: True on every process at the same call.

        ``counter`` must go up by exactly one per call and be the same on every process (the
        JAX preemption sync protocol stops all processes at the fastest one's counter + 1), so
        pass the number of loop iterations, not the optimizer step (which advances by
        ``n_jitted_steps`` and stalls on skipped non-finite steps)."""
        try:
            return bool(self.manager.reached_preemption(int(counter)))
        except Exception:  # no preemption service (single process without jax.distributed)
            return False

    # -- restoring -----------------------------------------------------------------------------
    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def restore(self, template_state: Any, *, data_iterator: Any = None, step: int | None = None) -> Restored:
        """Restore the state, as a :class:`Restored` ``(step, state, meta, errors)`` (and the data
        iterator in place).

        With ``step=None`` the newest checkpoint is tried first; if it cannot be read (partial,
        corrupt, or written by an incompatible model) the next older one is tried, with a warning
        naming what was wrong (also returned in ``errors``), and the unreadable ones are moved to
        ``<directory>_unreadable/``. Raises :class:`NoCheckpointError` when none can be restored.
        """
        steps = self.steps() if step is None else [step]
        if not steps:
            raise NoCheckpointError(f"no checkpoint in {self.directory}")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template_state)
        errors: list[str] = []
        unreadable: list[int] = []
        for s in reversed(steps):
            items = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(_IteratorState(data_iterator))
            restored, error = None, None
            try:
                restored = self.manager.restore(s, args=ocp.args.Composite(**items))
            except Exception as e:  # orbax raises many types for unreadable checkpoints
                error = e
            if not _all_processes_agree(error is None):
                where = (
                    ""
                    if jax.process_count() == 1
                    else (" on this process" if error is not None else " on another process")
                )
                reason = _first_line(error, 500) if error is not None else "see that process's log"
                msg = f"checkpoint {self.directory / str(s)} could not be restored{where}: {reason}"
                log.warning("%s; trying an older one", msg)
                errors.append(msg)
                unreadable.append(s)
                continue
            assert restored is not None  # this process read it (error is None)
            if unreadable:
                log.warning("resumed from checkpoint %d after skipping %d unreadable newer one(s)", s, len(unreadable))
                self._quarantine(unreadable)
            return Restored(step=s, state=restored["state"], meta=restored["meta"], errors=errors)
        raise NoCheckpointError("no checkpoint could be restored:\n  " + "\n  ".join(errors))

    def _quarantine(self, steps: list[int]) -> None:
        """Move unreadable checkpoints aside (process 0; the others wait), so the resumed run can
        write those steps again and the files stay available for inspection."""
        if self.read_only:
            return
        if jax.process_index() == 0:
            dest_root = self.directory.parent / f"{self.directory.name}_unreadable"
            dest_root.mkdir(parents=True, exist_ok=True)
            for s in steps:
                dest = dest_root / f"{s}-{time.strftime('%Y%m%d-%H%M%S')}"
                shutil.move(str(self.directory / str(s)), str(dest))
                log.warning("moved the unreadable checkpoint %d to %s", s, dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("diffusion_jax_checkpoint_quarantine")
        self.manager.reload()
