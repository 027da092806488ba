"""The training loop: typed pieces in, checkpoints / metrics / samples out.

Fault tolerance lives here: resume from the newest readable checkpoint, SIGTERM (and orbax's
multi-host preemption notice) saves before exiting, non-finite losses or gradients are caught at
the step they appear, and the metric history of a resumed run equals that of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from diffusion_jax.training.checkpoint import Checkpointer
from diffusion_jax.training.logging import MetricWriter, Progress
from diffusion_jax.training.step import shard_batch

__all__ = ["fit", "TrainingDiverged", "Preempted", "Interrupted", "RunSummary", "quit_on_interrupt"]

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient under ``nan_policy='stop'`` (or too many in a row)."""


class Preempted(RuntimeError):
    """The run saved a checkpoint and stopped on SIGTERM / a preemption notice."""


class Interrupted(Preempted):
    """The run saved a checkpoint and stopped on Ctrl-C (SIGINT)."""


def quit_on_interrupt() -> None:
    """From now on a Ctrl-C quits at once (after an interrupt was handled, while shutting down)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _quit_now)


def _quit_now(signum: int, frame: Any) -> None:
    """A second Ctrl-C: leave at once (no checkpoint, no atexit handlers, no traceback)."""
    os.write(2, b"second interrupt: quitting without a checkpoint; the last saved one is intact\n")
    os._exit(130)


@dataclasses.dataclass
class RunSummary:
    start_step: int
    final_step: int
    seconds: float
    steps_per_second: float
    nonfinite_steps: int
    last_metrics: dict


class _SignalFlag:
    """Records SIGTERM so the loop can checkpoint and stop between steps (one process).

    With several processes a checkpoint is a collective, so a signal seen by one process must
    not make it save alone: there JAX's preemption service (started by
    ``jax.distributed.initialize``) owns SIGTERM, tells every process, and
    ``Checkpointer.reached_preemption`` returns True on all of them at the same iteration.
    Installing a Python handler would replace the service's and hide the notice, so none is
    installed then (``install=False``).
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,), *, install: bool = True):
        self.signals = signals
        self.received: int | None = None
        # The handlers replaced on entry; None when one was not installed from Python.
        self._old: dict[signal.Signals, Any] = {}
        self.install = install

    def __enter__(self) -> _SignalFlag:
        if self.install and threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = signum
        if signum == signal.SIGINT:
            # Ctrl-C: finish the current step, save, stop; a second Ctrl-C quits at once.
            os.write(2, b"interrupt: saving a checkpoint after this step (Ctrl-C again quits at once)\n")
            signal.signal(signal.SIGINT, _quit_now)

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            if s == signal.SIGINT and self.received == signal.SIGINT:
                continue  # interrupted once: a second Ctrl-C while shutting down quits at once
            # None: the previous handler was not installed from Python (e.g. a C++ one);
            # Python cannot reinstate it, so fall back to the default action.
            signal.signal(s, signal.SIG_DFL if h is None else h)


def _python_sigterm_handler() -> bool:
    """Whether the loop handles SIGTERM itself: on one process, or when JAX's preemption service
    is off (``jax_enable_preemption_service``)."""
    # jax.config's flags are attributes created at run time, absent from its type stubs.
    return jax.process_count() == 1 or not jax.config.jax_enable_preemption_service  # type: ignore[attr-defined]


def _stack(batches: list[dict]) -> dict:
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def _crossed(prev: int, now: int, every: int) -> bool:
    """Whether a multiple of ``every`` lies in (prev, now]."""
    return every > 0 and now // every > prev // every


def fit(
    *,
    state: Any,
    step_fn: Callable[[Any, dict], tuple[Any, dict]],
    data_iter: Iterator[dict],
    mesh: Mesh,
    n_iters: int,
    n_jitted_steps: int = 1,
    checkpointer: Checkpointer | None = None,
    checkpoint_every: int = 0,
    writer: MetricWriter | None = None,
    log_freq: int = 50,
    eval_freq: int = 0,
    eval_fn: Callable[[Any, int], dict] | None = None,
    snapshot_freq: int = 0,
    snapshot_fn: Callable[[Any, int], None] | None = None,
    nan_policy: str = "skip",
    max_consecutive_nan: int = 20,
    meta: dict | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> tuple[Any, RunSummary]:
    """Run ``step_fn`` until ``state.step == n_iters``.

    ``step_fn(state, batches)`` is the jitted step of :func:`make_train_step`; batches are drawn
    ``n_jitted_steps`` at a time from ``data_iter`` (this process's share of each global batch).
    Checkpoints are saved every ``checkpoint_every`` steps, at the end, and on SIGTERM (or, with
    several processes, JAX's preemption notice). A non-finite step is logged and written to the
    metrics as a ``split='nonfinite'`` record with its step number and metrics.
    ``stop_after`` stops (with a checkpoint) after that many steps in this call, for tests and
    time-sliced jobs.
    """
    if nan_policy not in ("skip", "stop"):
        raise ValueError(f"nan_policy must be 'skip' or 'stop', got {nan_policy!r}")
    step = int(jax.device_get(state.step))
    start_step = step
    bar = Progress(n_iters, step, enabled=progress and jax.process_index() == 0)
    t_start = time.perf_counter()
    consecutive_nan = total_nan = 0
    last: dict[str, float] = {}
    saved = [step]  # the step of the newest checkpoint (resuming starts from one)

    def save(reason: str) -> None:
        if checkpointer is not None and saved[0] != step:
            checkpointer.save(step, state, data_iterator=data_iter, meta=meta)
            saved[0] = step
            log.info("checkpoint at step %d (%s)", step, reason)

    calls = 0  # loop iterations: the preemption protocol's counter (the same on every process)
    # SIGINT (Ctrl-C) saves like SIGTERM on one process; with several, a save is a collective
    # that one process cannot start alone, so there Ctrl-C keeps its default.
    handled = (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else (signal.SIGTERM,)
    with _SignalFlag(handled, install=_python_sigterm_handler()) as sig:
        while step < n_iters:
            if stop_after is not None and step - start_step >= stop_after:
                break
            k = min(n_jitted_steps, n_iters - step)
            batches = shard_batch(_stack([next(data_iter) for _ in range(k)]), mesh, leading_steps=True)
            prev = step
            state, metrics = step_fn(state, batches)
            calls += 1
            metrics = jax.device_get(metrics)
            step = int(jax.device_get(state.step))
            if calls == 1:
                # The first call compiles the step (or reads it from the compilation cache): its
                # own phase, kept out of the step rate and the ETA.
                if bar.enabled:
                    print(f"compiled the train step and ran {step - prev} step(s) in {bar.elapsed():.1f} s", flush=True)
                bar.restart(step)
            if checkpointer is not None:
                checkpointer.check_for_errors()  # a failed asynchronous save stops the run now
            bad = np.asarray(metrics["nonfinite"]).astype(bool)
            if bad.any():
                total_nan += int(bad.sum())
                consecutive_nan = consecutive_nan + int(bad.sum()) if bad[-1] else 0
                first = int(np.argmax(bad))
                detail = {name: float(np.asarray(v)[first]) for name, v in metrics.items() if name != "nonfinite"}
                msg = f"non-finite loss or gradient at step {prev + first + 1}: {detail}"
                if writer is not None:  # on the record, not only in the log
                    writer.write(prev + first + 1, detail, split="nonfinite")
                if nan_policy == "stop":
                    save("before stopping on a non-finite step")
                    if checkpointer is not None:
                        checkpointer.wait()
                    raise TrainingDiverged(msg + " (nan_policy='stop'; the update was not applied)")
                log.warning("%s; update skipped", msg)
                if consecutive_nan >= max_consecutive_nan:
                    save("before stopping after repeated non-finite steps")
                    if checkpointer is not None:
                        checkpointer.wait()
                    raise TrainingDiverged(f"{consecutive_nan} consecutive non-finite steps; last: {msg}")
            else:
                consecutive_nan = 0
            last = {name: float(np.asarray(v)[-1]) for name, v in metrics.items() if name != "nonfinite"}
            if _crossed(prev, step, log_freq) or step == n_iters:
                if writer is not None:
                    writer.write(step, last)
                bar.update(step, {"loss": last["loss"]})
            if eval_fn is not None and _crossed(prev, step, eval_freq):
                eval_metrics = eval_fn(state, step)
                if writer is not None and eval_metrics:
                    writer.write(step, eval_metrics, split="eval")
            if snapshot_fn is not None and _crossed(prev, step, snapshot_freq):
                snapshot_fn(state, step)
            preempted = sig.received is not None or (
                checkpointer is not None and checkpointer.reached_preemption(calls)
            )
            if _crossed(prev, step, checkpoint_every) or preempted:
                save("preemption" if preempted else "periodic")
            if preempted:
                if checkpointer is not None:
                    checkpointer.wait()
                if writer is not None:
                    writer.flush()
                if sig.received == signal.SIGINT:
                    raise Interrupted(f"interrupted at step {step}; checkpoint saved, rerun the same command to resume")
                raise Preempted(f"stopped at step {step} on a preemption signal; checkpoint saved, rerun to resume")
        if checkpointer is not None:
            save("end of run")
            checkpointer.wait()
    if writer is not None:
        writer.flush()
    seconds = time.perf_counter() - t_start
    summary = RunSummary(
        start_step, step, seconds, (step - start_step) / seconds if seconds > 0 else 0.0, total_nan, last
    )
    return state, summary
