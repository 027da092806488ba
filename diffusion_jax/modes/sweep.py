"""``diffusion-jax sweep``: run, inspect and report an ablation sweep (:mod:`diffusion_jax.sweeps`).

``sweep --sweep FILE --workdir DIR`` runs points until none is left (any number of workers may run
the same command against one ``--storage``); ``--dry_run`` lists the points, ``--status`` says
what is done, running, failed and pending, ``--report`` writes the tables and plots."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

from diffusion_jax.builders.config import ConfigError
from diffusion_jax.sweeps import engine, spec
from diffusion_jax.sweeps import report as report_lib

__all__ = ["sweep", "SOME_FAILED"]

SOME_FAILED = 5  # exit status: the sweep ran to the end but some points failed


def sweep(
    path: str,
    workdir: str,
    *,
    storage: str | None = None,
    dry_run: bool = False,
    status: bool = False,
    report: bool = False,
    retry_failed: bool = False,
    heartbeat: int = 60,
    grace: int | None = None,
    metric: str | None = None,
    factor: str | None = None,
    say: Callable[[str], None] = print,
) -> int:
    """Do what the flags ask (see the module docstring); returns the exit status (0, or
    :data:`SOME_FAILED`). Bad sweep files and storages raise ConfigError; a signal raises
    :class:`engine.SweepStopped`."""
    plan = spec.resolve(path)
    url = storage or engine.default_storage(workdir)
    if dry_run:
        _print_points(plan, say)
        return 0
    if not pathlib.Path(workdir).is_dir() and (status or report) and storage is None:
        raise ConfigError(
            f"{workdir} holds no sweep yet (run 'diffusion-jax sweep --sweep {path} --workdir {workdir}')"
        )
    if not (status or report):
        pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    db = engine.open_storage(url, heartbeat=heartbeat, grace=grace)
    if status:
        _print_status(plan, engine.statuses(db, plan), url, say)
        return 0
    if report:
        out = pathlib.Path(workdir) / "report"
        paths = report_lib.write_report(plan, engine.statuses(db, plan), out, metric=metric, factor=factor)
        say(str(paths.pop("table")).rstrip())
        for what, p in paths.items():
            say(f"{what}: {p}")
        return 0
    say(f"sweep {plan.name}: {len(plan.points)} points, storage {url}")
    ran = engine.work(plan, workdir, db, retry_failed=retry_failed, say=say)
    final = engine.statuses(db, plan)
    counts = _counts(final)
    say(
        f"sweep {plan.name}: this worker ran {sum(map(len, ran.values()))} point(s); "
        + ", ".join(f"{n} {k}" for k, n in counts.items())
    )
    failed = [s for s in final if s.state == "failed"]
    if failed:
        say(
            "failed points (errors: --status; rerun with --retry_failed to try again): "
            + ", ".join(s.point.name for s in failed)
        )
        return SOME_FAILED
    return 0


def _counts(points: list[engine.PointStatus]) -> dict[str, int]:
    return {k: sum(s.state == k for s in points) for k in ("done", "running", "failed", "pending")}


def _print_points(plan: spec.Plan, say: Callable[[str], None]) -> None:
    what = (
        f"train from {plan.config_path}" if plan.source is None else f"evaluate step {plan.final_step} of {plan.source}"
    )
    evaluate = ", then eval" if plan.source is None and plan.sweep.evaluate else ""
    say(f"sweep {plan.name}: {len(plan.points)} points ({what}{evaluate})")
    for p in plan.points:
        say(f"{p.name}\n    {' '.join(p.args())}")
    if plan.sweep.eval_overrides:
        say(
            "eval of every point: "
            + " ".join(f"--config.{k}={spec.format_value(v)}" for k, v in sorted(plan.sweep.eval_overrides.items()))
        )


def _print_status(plan: spec.Plan, points: list[engine.PointStatus], url: str, say: Callable[[str], None]) -> None:
    counts = _counts(points)
    say(f"sweep {plan.name} ({url}): {len(points)} points: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    width = max(len(s.point.name) for s in points)
    for s in points:
        line = f"  {s.state:8s} {s.point.name.ljust(width)}"
        tries = len([a for a in s.attempts if a.outcome != engine.DUPLICATE])
        if s.state == "done":
            line += f"  {engine.brief((s.result or {}).get('metrics', {}))}"
        elif s.state == "running":
            a = [a for a in s.attempts if a.state == "RUNNING"][-1]
            line += f"  on {a.worker or '?'} since {a.started:%Y-%m-%d %H:%M:%S}" if a.started else ""
        elif s.state == "failed":
            line += "  " + (s.error or "").splitlines()[0] if s.error else ""
        if tries > 1:
            line += f"  ({tries} attempts)"
        say(line)
