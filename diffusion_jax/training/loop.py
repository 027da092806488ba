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
from collections.abc import Callable, Iterator, Sequence
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


class _Grouping:
    """How many steps the next call runs, and which program runs it.

    Plain: ``n`` steps per call (fewer for a remainder at the end). In the background mode the
    loop starts at once with one step per call while the ``n``-step program (``step_fn`` traced
    for ``n`` steps) is compiled, or read from the compilation cache, in a thread; from the first
    step that is a multiple of ``n`` after it is ready, calls run ``n`` steps, and a remainder of
    fewer than ``n`` steps runs one step per call. Every grouping takes the same steps (the same
    batches and keys, bit-identical losses), so the switch changes only the speed: start-up is
    that of the small one-step program, throughput that of the ``n``-step one.
    """

    def __init__(self, step_fn: Callable, n: int, background: bool):
        self.step_fn, self.n = step_fn, n
        self.background = background and n > 1 and hasattr(step_fn, "lower")
        self.thread: threading.Thread | None = None
        self.result: list[Any] = []  # [compiled] or [exception] once the thread is done
        self.announced = False

    def steps(self, step: int, n_iters: int) -> int:
        if not self.background:
            return min(self.n, n_iters - step)
        ready = bool(self.result) and not isinstance(self.result[0], BaseException)
        return self.n if ready and step % self.n == 0 and n_iters - step >= self.n else 1

    def call(self, state: Any, batches: dict, k: int) -> tuple[Any, dict]:
        if self.background and k == self.n:
            return self.result[0](state, batches)
        return self.step_fn(state, batches)

    def start(self, state: Any, batches: dict) -> None:
        """Compile the ``n``-step program for ``state`` and batches like ``batches`` (one step)."""
        if not self.background or self.thread is not None:
            return

        def spec(a, lead=None):
            shape = a.shape if lead is None else (lead, *a.shape[1:])
            return jax.ShapeDtypeStruct(shape, a.dtype, sharding=a.sharding)

        state_spec = jax.tree_util.tree_map(spec, state)
        batch_spec = jax.tree_util.tree_map(lambda a: spec(a, self.n), batches)
        t0 = time.perf_counter()

        def compile_n() -> None:
            try:
                compiled = self.step_fn.lower(state_spec, batch_spec).compile()  # type: ignore[attr-defined]
                self.seconds = time.perf_counter() - t0
                self.result.append(compiled)
            except BaseException as e:  # reported by the loop, in the main thread
                self.result.append(e)

        self.thread = threading.Thread(target=compile_n, name="compile-train-step")
        self.thread.start()

    def check(self) -> str | None:
        """Raises what the compilation raised; a line to print when the program is ready."""
        if self.result and isinstance(self.result[0], BaseException):
            raise self.result[0]
        if self.result and not self.announced:
            self.announced = True
            return f"compiled the {self.n}-step train step in the background in {self.seconds:.1f} s"
        return None

    def close(self) -> None:
        """Waits for a compilation still running (it cannot be stopped)."""
        if self.thread is not None and self.thread.is_alive():
            if jax.process_index() == 0:
                print("waiting for the background compilation to end (Ctrl-C again quits at once)", flush=True)
            self.thread.join()


def _python_sigterm_handler() -> bool:
    """Whether the loop handles SIGTERM itself: on one process, or when JAX's preemption service
    is off (``jax_enable_preemption_service``)."""
    # jax.config's flags are attributes created at run time, absent from its type stubs.
    return jax.process_count() == 1 or not jax.config.jax_enable_preemption_service  # type: ignore[attr-defined]


# Background compilation only for runs at least this long: a shorter run would end before the
# program is ready and then wait for it.
_BACKGROUND_MIN_STEPS = 200


def _stack(batches: list[dict]) -> dict:
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


class _Lookahead:
    """The training iterator, read ahead: the next call's batches are drawn and sent to the devices
    while the current call runs. Its state (what a checkpoint saves) is the position after the
    batches the loop has consumed, before those drawn ahead, so a resumed run reads exactly the
    batches an uninterrupted one would."""

    def __init__(self, iterator: Iterator[dict], mesh: Mesh):
        self.iterator = iterator
        self.mesh = mesh
        self.ahead: list[tuple[Any, dict]] = []  # (iterator state before the batch, batch)
        self.prepared: tuple[int, dict] | None = None  # (count, the first `count` batches on device)

    def _position(self) -> Any:
        get_state = getattr(self.iterator, "get_state", None)
        return get_state() if get_state is not None else None

    def prefetch(self, k: int) -> None:
        """Draw the next ``k`` batches and start their transfer to the devices (an iterator that
        ends first raises StopIteration only when the loop takes the batches it lacks)."""
        try:
            while len(self.ahead) < k:
                self.ahead.append((self._position(), next(self.iterator)))
        except StopIteration:
            return
        self.prepared = (k, self._device([b for _, b in self.ahead[:k]]))

    def _device(self, batches: list[dict]) -> dict:
        return shard_batch(_stack(batches), self.mesh, leading_steps=True)

    def take(self, k: int) -> dict:
        """The next ``k`` batches, stacked and on the devices."""
        prepared, self.prepared = self.prepared, None
        while len(self.ahead) < k:
            self.ahead.append((self._position(), next(self.iterator)))
        batches = [b for _, b in self.ahead[:k]]
        del self.ahead[:k]
        if prepared is not None and prepared[0] == k:
            return prepared[1]
        return self._device(batches)

    def get_state(self) -> Any:
        return self.ahead[0][0] if self.ahead else self.iterator.get_state()  # type: ignore[attr-defined]

    def set_state(self, state: Any) -> None:
        self.ahead, self.prepared = [], None
        self.iterator.set_state(state)  # type: ignore[attr-defined]


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
    hooks: Sequence[tuple[int, Callable[[Any, int], None]]] = (),
    background_compile: bool = False,
) -> tuple[Any, RunSummary]:
    """Run ``step_fn`` until ``state.step == n_iters``.

    ``step_fn(state, batches)`` is the jitted step of :func:`make_train_step`; batches are drawn
    ``n_jitted_steps`` at a time from ``data_iter`` (this process's share of each global batch).
    Checkpoints are saved every ``checkpoint_every`` steps, at the end, and on SIGTERM (or, with
    several processes, JAX's preemption notice). A non-finite step is logged and written to the
    metrics as a ``split='nonfinite'`` record with its step number and metrics.
    ``stop_after`` stops (with a checkpoint) after that many steps in this call, for tests and
    time-sliced jobs. ``hooks``: ``(every, fn)`` pairs; ``fn(state, step)`` runs when a multiple
    of ``every`` is crossed, before that step's checkpoint (e.g. the EMA snapshots).
    ``background_compile`` (one process only): start with one step per call and switch to
    ``n_jitted_steps`` per call once that program is compiled in a thread (see ``_Grouping``).
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
            checkpointer.save(step, state, data_iterator=batches_in, meta=meta)
            saved[0] = step
            log.info("checkpoint at step %d (%s)", step, reason)

    batches_in = _Lookahead(data_iter, mesh)
    grouping = _Grouping(step_fn, n_jitted_steps, background_compile and jax.process_count() == 1)
    calls = 0  # loop iterations: the preemption protocol's counter (the same on every process)
    # SIGINT (Ctrl-C) saves like SIGTERM on one process; with several, a save is a collective
    # that one process cannot start alone, so there Ctrl-C keeps its default.
    handled = (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else (signal.SIGTERM,)
    try:
        with _SignalFlag(handled, install=_python_sigterm_handler()) as sig:
            while step < n_iters:
                if stop_after is not None and step - start_step >= stop_after:
                    break
                k = grouping.steps(step, n_iters)
                batches = batches_in.take(k)
                prev = step
                state, metrics = grouping.call(state, batches, k)  # runs asynchronously
                calls += 1
                if calls == 1 and n_iters - step >= _BACKGROUND_MIN_STEPS:
                    grouping.start(state, batches)
                # While the step runs: draw the next call's batches, if a next call is expected.
                ahead = grouping.steps(step + k, n_iters)
                if ahead > 0 and step + k < n_iters and (stop_after is None or step + k - start_step < stop_after):
                    batches_in.prefetch(ahead)
                metrics = jax.device_get(metrics)
                step = int(jax.device_get(state.step))
                if calls == 1:
                    # The first call compiles the step (or reads it from the compilation cache): its
                    # own phase, kept out of the step rate and the ETA.
                    if bar.enabled:
                        print(
                            f"compiled the train step and ran {step - prev} step(s) in {bar.elapsed():.1f} s",
                            flush=True,
                        )
                    bar.restart(step)
                line = grouping.check()
                if line and bar.enabled:
                    print(line, flush=True)
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
                for every, hook in hooks:
                    if _crossed(prev, step, every):
                        hook(state, step)
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
                        raise Interrupted(
                            f"interrupted at step {step}; checkpoint saved, rerun the same command to resume"
                        )
                    raise Preempted(f"stopped at step {step} on a preemption signal; checkpoint saved, rerun to resume")
            if checkpointer is not None:
                save("end of run")
                checkpointer.wait()
    finally:
        grouping.close()
    if writer is not None:
        writer.flush()
    seconds = time.perf_counter() - t_start
    summary = RunSummary(
        start_step, step, seconds, (step - start_step) / seconds if seconds > 0 else 0.0, total_nan, last
    )
    return state, summary
