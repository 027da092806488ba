"""The sweep runner: one Optuna trial per point, in an Optuna storage that any number of workers
share.

The storage (an SQLite file by default, or any SQLAlchemy URL such as PostgreSQL) holds one
study per sweep. The worker that creates the study enqueues one waiting trial per point (Optuna's
``enqueue_trial``); every worker then takes waiting trials one at a time. What makes this safe:

* Taking a point is Optuna's own WAITING -> RUNNING transition, which succeeds for one worker
  only (a row lock on PostgreSQL; on SQLite every transaction here is ``BEGIN IMMEDIATE``, so
  read-check-write is serialised).
* A worker records a heartbeat while its point runs (Optuna's heartbeat); a point whose worker
  died (SIGKILL, a lost machine) is failed by ``optuna.storages.fail_stale_trials`` once the
  heartbeat is older than the grace period, and a new trial is enqueued for it. The point keeps
  its workdir, so the new attempt resumes from its newest checkpoint.
* After taking a trial a worker checks that no other trial of the same point is running or
  complete; if one is (two workers re-enqueued the same lost point at once), it withdraws. So
  no point runs on two workers at once and none runs again once done.

Each point runs as its own ``diffusion-jax train`` (and ``eval``) subprocess in
``<workdir>/points/<name>``, so preemption, resume and every fault path of ``train`` apply. A
point that fails (any exit status but 0, 130, 143) is recorded with its exit status and the end
of its log, and the worker goes on with the next point. Ctrl-C (SIGINT) or SIGTERM stops the
running point the way ``train`` stops (checkpoint saved); the point is put back for the next run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from diffusion_jax.builders.config import ConfigError
from diffusion_jax.sweeps.spec import Plan, Point, format_value

__all__ = [
    "Attempt",
    "PointStatus",
    "SweepStopped",
    "default_storage",
    "open_storage",
    "open_study",
    "statuses",
    "work",
    "record_result",
    "point_workdir",
]

# Outcomes a worker records on a trial (user attribute "outcome"); a failed trial without one
# was failed by the heartbeat check: its worker died.
DONE, ERROR, INTERRUPTED, DUPLICATE = "done", "error", "interrupted", "duplicate"
_DEFINITION = "diffusion_jax.points"  # study system attribute: the sweep's points and overrides
_LOG_TAIL = 2000


class SweepStopped(Exception):
    """A signal stopped the sweep; ``status`` is the exit status (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def default_storage(workdir: str | os.PathLike) -> str:
    return f"sqlite:///{pathlib.Path(workdir).resolve() / 'sweep.db'}"


def point_workdir(workdir: str | os.PathLike, point: Point | str) -> pathlib.Path:
    return pathlib.Path(workdir) / "points" / (point if isinstance(point, str) else point.name)


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def open_storage(url: str, *, heartbeat: int = 60, grace: int | None = None):
    """An Optuna RDB storage at ``url`` with heartbeats every ``heartbeat`` seconds; a trial
    whose heartbeat is older than ``grace`` (default 3 heartbeats) counts as lost. A URL that
    SQLAlchemy cannot open is a ConfigError."""
    import optuna

    _quiet_optuna()
    kwargs: dict[str, Any] = {}
    sqlite = url.startswith("sqlite")
    if sqlite:
        kwargs["connect_args"] = {"timeout": 120}  # wait for another worker's transaction
    for attempt in range(5):
        try:
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs=kwargs, heartbeat_interval=heartbeat, grace_period=grace or 3 * heartbeat
            )
            break
        except Exception as e:  # noqa: BLE001 (drivers raise their own types; all mean "cannot open")
            # Workers that start together race to create the tables; the loser retries.
            racing = any(m in str(e) for m in ("already exists", "locked", "UNIQUE constraint", "duplicate key"))
            if attempt == 4 or not racing:
                raise ConfigError(
                    f"cannot open the sweep storage {url}: {type(e).__name__}: {_first_line(e)}"
                ) from None
            time.sleep(0.2 + random.random())
    if sqlite:
        _serialise_sqlite(storage.engine)
    return storage


def _serialise_sqlite(engine) -> None:
    """Make every SQLite transaction ``BEGIN IMMEDIATE``: pysqlite otherwise starts a transaction
    only at the first write, so Optuna's read-then-update of a trial's state would not be atomic
    across processes (SQLAlchemy's documented recipe for serialisable SQLite)."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners existed


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def open_study(storage, plan: Plan, *, create: bool):
    """The sweep's study, created with one enqueued trial per point if it does not exist (and
    ``create``). A study made from a different sweep file (a point's overrides changed) is a
    ConfigError; points added to the file since are enqueued. None if absent and not ``create``."""
    import optuna

    definition = plan.definition()
    try:
        study = optuna.load_study(study_name=plan.name, storage=storage)
    except KeyError:
        if not create:
            return None
        try:
            study = optuna.create_study(study_name=plan.name, storage=storage, direction="minimize")
        except optuna.exceptions.DuplicatedStudyError:  # another worker created it just now
            study = optuna.load_study(study_name=plan.name, storage=storage)
        else:
            for p in plan.points:
                study.enqueue_trial({"point": p.name}, user_attrs={"point": p.name})
            storage.set_study_system_attr(study._study_id, _DEFINITION, definition)
            return study
    stored = _wait_for_definition(storage, study._study_id)
    if stored is not None:
        changed = sorted(n for n in set(stored) & set(definition) if stored[n] != definition[n])
        if changed:
            raise ConfigError(
                f"the study {plan.name!r} in the storage was made from another version of {plan.path}: the "
                f"overrides of {', '.join(changed[:5])} differ. Use a new --workdir (or --storage), or "
                "give the changed sweep its own name= in the sweep file."
            )
        if create and set(definition) - set(stored):
            storage.set_study_system_attr(study._study_id, _DEFINITION, {**stored, **definition})
    return study


def _wait_for_definition(storage, study_id: int, timeout: float = 30.0) -> dict | None:
    """The stored definition; a worker that created the study a moment ago writes it after
    enqueueing the points, so wait a little for it."""
    t0 = time.monotonic()
    while True:
        attrs = storage.get_study_system_attrs(study_id)
        if _DEFINITION in attrs:
            return attrs[_DEFINITION]
        if time.monotonic() - t0 > timeout:
            return None  # its creator stopped while enqueueing: _reconcile enqueues what is missing
        time.sleep(0.5)


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One trial of a point."""

    number: int
    state: str  # WAITING, RUNNING, COMPLETE, FAIL
    outcome: str | None
    worker: str | None
    started: datetime.datetime | None
    user_attrs: dict


@dataclasses.dataclass(frozen=True)
class PointStatus:
    """What the storage knows of a point: done, running, failed or pending, and its attempts."""

    point: Point
    state: str
    attempts: tuple[Attempt, ...]

    @property
    def result(self) -> dict | None:
        """The user attributes of the complete attempt (metrics, curve, seconds), if done."""
        done = [a for a in self.attempts if a.state == "COMPLETE"]
        return done[-1].user_attrs if done else None

    @property
    def error(self) -> str | None:
        failed = [a for a in self.attempts if a.outcome == ERROR]
        return failed[-1].user_attrs.get("error") if failed else None


def _attempts(storage, study_id: int) -> dict[str, list[Attempt]]:
    out: dict[str, list[Attempt]] = {}
    for t in storage.get_all_trials(study_id, deepcopy=False):
        name = t.user_attrs.get("point") or t.params.get("point")
        if name is None:
            continue
        out.setdefault(name, []).append(
            Attempt(
                t.number,
                t.state.name,
                t.user_attrs.get("outcome"),
                t.user_attrs.get("worker"),
                t.datetime_start,
                dict(t.user_attrs),
            )
        )
    for v in out.values():
        v.sort(key=lambda a: a.number)
    return out


def _state(attempts: list[Attempt]) -> str:
    states = {a.state for a in attempts}
    if "COMPLETE" in states:
        return "done"
    if "RUNNING" in states:
        return "running"
    if "WAITING" in states:
        return "pending"
    failed = [a for a in attempts if a.state == "FAIL" and a.outcome != DUPLICATE]
    if failed and failed[-1].outcome == ERROR:
        return "failed"
    return "pending"


def statuses(storage, plan: Plan) -> list[PointStatus]:
    """Every point of the plan with its state (points not in the storage yet are pending)."""
    study = open_study(storage, plan, create=False)
    found = _attempts(storage, study._study_id) if study is not None else {}
    return [PointStatus(p, _state(found.get(p.name, [])), tuple(found.get(p.name, []))) for p in plan.points]


def _reconcile(study, storage, plan: Plan, retry: set[str]) -> None:
    """Enqueue a trial for each point that has none waiting, running or complete and whose last
    attempt was lost (its worker died), interrupted, withdrawn, or never enqueued; and for the
    failed points named in ``retry``."""
    found = _attempts(storage, study._study_id)
    for p in plan.points:
        attempts = found.get(p.name, [])
        state = _state(attempts)
        if state in ("done", "running") or any(a.state == "WAITING" for a in attempts):
            continue
        if state == "failed":
            if p.name not in retry:
                continue
            retry.discard(p.name)
        study.enqueue_trial({"point": p.name}, user_attrs={"point": p.name})


def _claim(storage, study_id: int, order: dict[str, int]) -> tuple[int, int, str] | None:
    """Take a waiting trial, the first point in the sweep file's order (a retaken point before the
    points not started yet): ``(trial_id, number, point)``, or None if none is left."""
    from optuna.trial import TrialState

    waiting = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,))
    waiting.sort(key=lambda t: (order.get(t.user_attrs.get("point"), len(order)), t.number))
    for t in waiting:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
            storage.record_heartbeat(trial_id)
            return trial_id, t.number, t.user_attrs.get("point") or t.params["point"]
    return None


def _finish(storage, trial_id: int, outcome: str, attrs: dict | None = None, value: float | None = None) -> None:
    from optuna.trial import TrialState

    for k, v in {**(attrs or {}), "outcome": outcome}.items():
        storage.set_trial_user_attr(trial_id, k, v)
    if outcome == DONE:
        storage.set_trial_state_values(trial_id, state=TrialState.COMPLETE, values=None if value is None else [value])
    else:
        storage.set_trial_state_values(trial_id, state=TrialState.FAIL)


@contextlib.contextmanager
def _heartbeat(storage, trial_id: int, every: float, signals: _Signals) -> Iterator[None]:
    """Record the trial's heartbeat every ``every`` seconds while the point runs. If the trial was
    failed meanwhile (no heartbeat reached the storage for the grace period, so another worker
    may retake the point), stop the point's command: two runs must not share a workdir."""
    from optuna.trial import TrialState

    stop = threading.Event()

    def beat():
        while not stop.wait(every):
            with contextlib.suppress(Exception):  # a missed beat is retried; the grace period allows it
                if storage.get_trial(trial_id).state != TrialState.RUNNING:
                    signals.lost = True
                    signals.stop_child(signal.SIGTERM)
                    return
                storage.record_heartbeat(trial_id)

    thread = threading.Thread(target=beat, name="sweep-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class _Signals:
    """While a point's command runs, SIGINT and SIGTERM go to that command (which saves a
    checkpoint and exits 130 / 143, or quits at once on a second Ctrl-C); between points they
    stop the sweep at once."""

    def __init__(self):
        self.received: int | None = None
        self.child: subprocess.Popen | None = None
        self.lost = False  # the running point's trial was failed by another worker's heartbeat check
        self._old: dict[int, Any] = {}

    def stop_child(self, sig: int) -> None:
        child = self.child
        if child is not None and child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, sig)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, sig, _frame):
        first = self.received is None
        self.received = self.received or sig
        if self.child is not None and self.child.poll() is None:
            self.stop_child(sig)
        elif first:
            raise SweepStopped(_stop_message(sig), _exit_status(sig))

    def check(self) -> None:
        if self.received is not None:
            raise SweepStopped(_stop_message(self.received), _exit_status(self.received))


def _exit_status(sig: int) -> int:
    return 130 if sig == signal.SIGINT else 143


def _stop_message(sig: int) -> str:
    what = "interrupted" if sig == signal.SIGINT else "stopped by SIGTERM"
    return f"{what}; finished points are kept, a stopped point resumes from its checkpoint when the sweep is rerun"


def _die_with_parent() -> Callable[[], None] | None:
    """What the child runs before ``exec`` (Linux): ask for SIGTERM when the sweep worker dies, so
    that a killed worker leaves no orphaned run behind (``train`` saves a checkpoint on SIGTERM).
    libc is loaded here, in the parent: between fork and exec the child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def arm() -> None:
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the worker died before the call
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def _command(mode: str, workdir: pathlib.Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "diffusion_jax", mode, f"--workdir={workdir}", *args]


def _run_logged(cmd: list[str], log: pathlib.Path, signals: _Signals) -> int:
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent()
        )
        signals.child = proc
        try:
            while True:
                try:
                    return proc.wait()
                except SweepStopped:  # pragma: no cover (the handler forwards while a child runs)
                    continue
        finally:
            signals.child = None


def _tail(path: pathlib.Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-_LOG_TAIL:]


def _newest_checkpoint(workdir: pathlib.Path) -> int | None:
    steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
    return max(steps) if steps else None


def _prepare_source(plan: Plan, work: pathlib.Path) -> None:
    """A point of a source sweep evaluates a copy of the source's config and newest checkpoint
    (eval writes into its workdir, and the source stays untouched)."""
    assert plan.source is not None and plan.final_step is not None
    target = work / "checkpoints" / str(plan.final_step)
    if target.exists():
        return
    work.mkdir(parents=True, exist_ok=True)
    for name in ("config.py", "config.json"):
        if (plan.source / name).exists():
            shutil.copy2(plan.source / name, work / name)
    tmp = work / "checkpoints" / f".{plan.final_step}.copying"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(plan.source / "checkpoints" / str(plan.final_step), tmp)
    os.replace(tmp, target)


def collect(work: pathlib.Path, *, curve_points: int = 200) -> dict:
    """A finished point's results from its workdir: the final training metrics (``summary.json``),
    the newest ``eval/results_<step>.json`` and the training-loss curve (``metrics.jsonl``,
    thinned to at most ``curve_points`` points)."""
    metrics: dict[str, float] = {}
    summary = work / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        numbers = {**s.get("last_metrics", {}), "steps_per_second": s.get("steps_per_second")}
        for k, v in numbers.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                metrics[k] = float(v)
    history = work / "metrics.jsonl"
    records = []
    if history.exists():
        for line in history.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a kill
    train = [r for r in records if r.get("split") == "train"]
    if train:  # a rerun that trained no step leaves no last_metrics in summary.json
        for k, v in train[-1].items():
            if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool):
                metrics.setdefault(k, float(v))
    results = sorted((work / "eval").glob("results_*.json"))
    if results:
        r = json.loads(results[-1].read_text())
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                metrics[k] = float(v)
        metrics["eval_step"] = float(r.get("step", 0))
    curve = [[r["step"], r["loss"]] for r in train if isinstance(r.get("loss"), (int, float))]
    if len(curve) > curve_points:
        stride = -(-len(curve) // curve_points)
        curve = curve[::stride] + ([curve[-1]] if (len(curve) - 1) % stride else [])
    return {"metrics": metrics, "curve": curve}


def record_result(study, point: str, result: dict, value: float) -> None:
    """Store a finished point's result (``{"metrics": ..., "curve": ...}``) as a complete trial
    with objective ``value``: how results of points run outside the sweep are imported."""
    import optuna

    attrs = {"point": point, "outcome": DONE, **result}
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=value, user_attrs=attrs))


def _objective(plan: Plan, result: dict) -> tuple[float, str]:
    """The trial's value (Optuna needs one for a complete trial): the sweep's plot metric, else
    the final training loss, else the eval loss, else the point's wall time; and its name."""
    metrics = result.get("metrics", {})
    for name in (plan.sweep.plot_metric or "loss", "loss", "eval_loss"):
        v = metrics.get(name)
        if isinstance(v, float) and math.isfinite(v):
            return v, name
    return float(sum(result.get("seconds", {}).values())), "seconds"


def _run_point(
    plan: Plan, point: Point, workdir: pathlib.Path, signals: _Signals, log: pathlib.Path
) -> tuple[str, dict]:
    """Train (and evaluate) one point; ``(outcome, attributes)``."""
    work = point_workdir(workdir, point)
    seconds: dict[str, float] = {}
    steps: list[tuple[str, list[str]]] = []
    if plan.source is None:
        assert plan.config_path is not None
        steps.append(("train", _command("train", work, f"--config={plan.config_path}", *point.args())))
    else:
        _prepare_source(plan, work)
    if plan.source is not None or plan.sweep.evaluate:
        steps.append(("eval", []))  # its arguments depend on the checkpoint train left
    for mode, cmd in steps:
        if mode == "eval":
            step = _newest_checkpoint(work)
            if step is None:
                return ERROR, {"error": f"no checkpoint in {work} to evaluate"}
            extra = [f"--config.{k}={format_value(v)}" for k, v in sorted(plan.sweep.eval_overrides.items())]
            args = point.args() if plan.source is not None else []
            cmd = _command("eval", work, f"--config.eval.begin_ckpt={step}", *args, *extra)
        t0 = time.perf_counter()
        status = _run_logged(cmd, log, signals)
        seconds[mode] = time.perf_counter() - t0
        if signals.received is not None or status in (130, 143, -signal.SIGTERM, -signal.SIGINT):
            return INTERRUPTED, {"error": f"{mode} stopped (exit status {status})"}
        if status != 0:
            tail = _tail(log)
            cause = next((line for line in reversed(tail.splitlines()) if line.strip()), "")
            return ERROR, {
                "error": f"{mode} exited with status {status}: {cause.strip()[:300]}\nlog {log}, its end:\n{tail}",
                "exit_status": status,
            }
    result = collect(work)
    result["seconds"] = seconds
    return DONE, result


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def work(
    plan: Plan,
    workdir: str | os.PathLike,
    storage,
    *,
    retry_failed: bool = False,
    say: Callable[[str], None] = print,
) -> dict[str, list[str]]:
    """Run points of the sweep until none is left: take a waiting point, run it, record it;
    wait while other workers' points run (to take over any whose worker dies). Returns the
    names this worker ran, by outcome. Raises :class:`SweepStopped` on SIGINT / SIGTERM."""
    import optuna

    workdir = pathlib.Path(workdir)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    study = open_study(storage, plan, create=True)
    study_id = study._study_id
    by_name = {p.name: p for p in plan.points}
    order = {p.name: i for i, p in enumerate(plan.points)}
    retry = {s.point.name for s in statuses(storage, plan) if s.state == "failed"} if retry_failed else set()
    ran: dict[str, list[str]] = {DONE: [], ERROR: [], INTERRUPTED: []}
    every = storage.get_heartbeat_interval() or 60
    with _Signals() as signals:
        while True:
            signals.check()
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # another worker was first
                optuna.storages.fail_stale_trials(study)
            _reconcile(study, storage, plan, retry)
            claimed = _claim(storage, study_id, order)
            if claimed is None:
                running = [s.point.name for s in statuses(storage, plan) if s.state == "running"]
                if not running:
                    break
                # Wait: the points left run elsewhere; take over any whose worker dies.
                time.sleep(min(every, 5.0) * (0.5 + random.random()))
                continue
            trial_id, number, name = claimed
            point = by_name.get(name)
            others = [a for a in _attempts(storage, study_id).get(name, []) if a.number != number]
            if point is None or any(a.state in ("RUNNING", "COMPLETE") for a in others):
                _finish(storage, trial_id, DUPLICATE, {"worker": _worker_id()})
                time.sleep(random.random())  # two workers withdrew the same point: do not collide again
                continue
            log = workdir / "logs" / f"{name}.trial{number}.log"
            storage.set_trial_user_attr(trial_id, "worker", _worker_id())
            storage.set_trial_user_attr(trial_id, "log", str(log))
            resumed = _newest_checkpoint(point_workdir(workdir, point)) if plan.source is None else None
            resumes = f", resumes from step {resumed}" if resumed else ""
            say(f"point {name}: started (trial {number}{resumes}; log {log})")
            t0 = time.perf_counter()
            signals.lost = False
            with _heartbeat(storage, trial_id, every, signals):
                outcome, attrs = _run_point(plan, point, workdir, signals, log)
            value = None
            if outcome == DONE:
                value, attrs["objective"] = _objective(plan, attrs)
            try:
                _finish(storage, trial_id, outcome, attrs, value)
            except optuna.exceptions.UpdateFinishedTrialError:
                say(
                    f"point {name}: its heartbeat did not reach the storage for the grace period, so the point "
                    "was handed to another worker; this run of it is not recorded"
                )
                continue
            ran[outcome].append(name)
            if outcome == DONE:
                say(f"point {name}: done in {time.perf_counter() - t0:.1f} s {brief(attrs['metrics'])}")
            elif outcome == ERROR:
                say(f"point {name}: FAILED ({attrs['error'].splitlines()[0]}); the sweep goes on")
            signals.check()
    return ran


def brief(metrics: dict) -> str:
    shown = [f"{k} {metrics[k]:.4g}" for k in ("loss", "bpd", "fid", "inception_score") if k in metrics]
    return f"({', '.join(shown)})" if shown else ""
