"""Sweep files: a base config, the factors varied as config overrides, and the points they make.

A sweep file is a Python file (``experiments/<name>/sweep.py``) whose ``get_sweep()`` returns a
:class:`Sweep`, the way a config file's ``get_config()`` returns a config::

    from diffusion_jax.sweeps import Sweep, levels, seeds, values, zipped

    def get_sweep():
        return Sweep(
            config="../../configs/digits/edm.py",          # relative to this file
            factors=(
                levels("sde", vp={"training.sde": "vpsde"}, edm={"training.sde": "edm"}),
                values("model.nf", (16, 32)),               # one key, several values
                zipped("lr", {"optim.lr": (1e-3, 2e-3), "optim.warmup": (0, 200)}),
                seeds(0, 1),                                # the factor averaged over in reports
            ),
            exclude=({"sde": "vp", "nf": "16"},),           # points left out
            overrides={"training.n_iters": 500},            # every point
        )

The points are the product of the factors' levels, in order, less the excluded ones. A point's
name joins ``factor-level`` pairs (``sde-vp__nf-16__lr-0.001-0__seed-0``); a level's label is
its value (``values``, ``zipped``, ``seeds``) or the name the sweep file gave it (``levels``), so
names are stable: the same overrides always give the same name and the same workdir.

``source=`` instead of ``config=`` makes each point an ``eval`` of an existing workdir's newest
checkpoint (no training); its overrides may then change only what evaluation may change
(``sampling``, ``eval``, ``seed``).

This module imports no JAX code; :func:`resolve` checks every point's overrides against the
config schema (and that each point's experiment builds) before anything runs.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import pathlib
import re
import runpy
from collections.abc import Mapping, Sequence
from typing import Any

from diffusion_jax.builders import config as config_lib
from diffusion_jax.builders.config import ConfigError

__all__ = [
    "Level",
    "Factor",
    "Sweep",
    "Point",
    "Plan",
    "values",
    "levels",
    "zipped",
    "seeds",
    "load_sweep",
    "resolve",
    "format_value",
    "SEED",
]

SEED = "seed"  # the factor that reports average over
_LABEL = re.compile(r"^[A-Za-z0-9._+-]+$")


def format_value(value: Any) -> str:
    """A value as an override's text (``--config.KEY=TEXT``), typed back by the schema."""
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _label(value: Any) -> str:
    """A level's label from its value: a short token safe in file names."""
    if isinstance(value, (tuple, list)):
        text = "-".join(_label(v) for v in value) or "empty"
    elif isinstance(value, float):
        text = repr(value)
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text) or "empty"


@dataclasses.dataclass(frozen=True)
class Level:
    """One level of a factor: its label and the config overrides it sets."""

    label: str
    overrides: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Factor:
    """A factor: a name and its levels, in order."""

    name: str
    levels: tuple[Level, ...]


def values(key: str, options: Sequence[Any], *, name: str | None = None) -> Factor:
    """One config key set to each of ``options``; the factor is named after the key's last part."""
    return Factor(name or key.rpartition(".")[2], tuple(Level(_label(v), {key: v}) for v in options))


def levels(name: str, named: Mapping[str, Mapping[str, Any]] | None = None, **kw: Mapping[str, Any]) -> Factor:
    """Named levels, each a set of overrides: ``levels("sde", vp={...}, edm={...})`` (or a dict,
    for labels that are not Python names)."""
    table = {**(named or {}), **kw}
    return Factor(name, tuple(Level(label, dict(ov)) for label, ov in table.items()))


def zipped(name: str, columns: Mapping[str, Sequence[Any]]) -> Factor:
    """Several keys varied together: level i sets every key to its i-th value."""
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise ConfigError(
            f"zipped factor {name!r}: the value lists have different lengths "
            f"({', '.join(f'{k}: {len(v)}' for k, v in columns.items())})"
        )
    n = lengths.pop() if lengths else 0
    out = []
    for i in range(n):
        ov = {k: v[i] for k, v in columns.items()}
        out.append(Level("-".join(_label(v) for v in ov.values()), ov))
    return Factor(name, tuple(out))


def seeds(*numbers: int) -> Factor:
    """The ``seed`` key over ``numbers``: the factor reports average over (mean +- std)."""
    return Factor(SEED, tuple(Level(str(s), {"seed": s}) for s in numbers))


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What a sweep file declares (see the module docstring).

    config: the base config file (relative to the sweep file), for sweeps that train.
    source: an existing workdir whose newest checkpoint each point evaluates (no training).
    factors: the factors; the points are the product of their levels.
    exclude: points left out, each a mapping ``factor name -> level label`` (a point matching
        every entry of one mapping is left out).
    overrides: config overrides of every point (a factor's level may override them).
    when: ``(levels, overrides)`` pairs: extra overrides of the points at those levels, applied
        last (e.g. what one parametrization needs on one SDE only).
    evaluate: after training, run ``eval`` on the final checkpoint (always, with ``source``).
    eval_overrides: overrides of the ``eval`` run only (``sampling``, ``eval`` and ``seed`` keys).
    name: the study's name in the storage; default: the sweep file's directory name.
    metrics: the columns of the report's table; default: those of :data:`report.DEFAULT_METRICS`
        that the points recorded.
    plot_metric, plot_factor: the default plot (a metric against a factor).
    """

    factors: tuple[Factor, ...]
    config: str | None = None
    source: str | None = None
    exclude: tuple[Mapping[str, str], ...] = ()
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    when: tuple[tuple[Mapping[str, str], Mapping[str, Any]], ...] = ()
    evaluate: bool = False
    eval_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    name: str | None = None
    metrics: tuple[str, ...] | None = None
    plot_metric: str | None = None
    plot_factor: str | None = None


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of a sweep: its stable name, the level of each factor and its overrides."""

    name: str
    levels: Mapping[str, str]
    overrides: Mapping[str, Any]

    def args(self) -> list[str]:
        """The overrides as command-line flags, in a fixed order."""
        return [f"--config.{k}={format_value(v)}" for k, v in sorted(self.overrides.items())]

    def group(self) -> tuple[tuple[str, str], ...]:
        """The levels of every factor but the seed: the points a report averages together."""
        return tuple((f, lv) for f, lv in self.levels.items() if f != SEED)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A loaded, checked sweep: the sweep, its file, the base config or source workdir, and the
    points in order."""

    sweep: Sweep
    path: pathlib.Path
    name: str
    points: tuple[Point, ...]
    config_path: pathlib.Path | None
    source: pathlib.Path | None
    final_step: int | None  # the source's newest checkpoint step (sweeps with source=)

    @property
    def factors(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.sweep.factors)

    def definition(self) -> dict[str, dict[str, str]]:
        """``point name -> {key: override text}``: what the storage keeps to recognise the sweep."""
        return {p.name: {k: format_value(v) for k, v in sorted(p.overrides.items())} for p in self.points}


def load_sweep(path: str | os.PathLike) -> Sweep:
    """``get_sweep()`` of the sweep file at ``path``; a ConfigError for a missing file, one
    without ``get_sweep``, one that raises, or a result that is not a :class:`Sweep`."""
    path = str(path)
    if not os.path.isfile(path):
        raise ConfigError(f"sweep file {path} does not exist")
    try:
        module = runpy.run_path(path)
    except ConfigError as e:
        raise ConfigError(f"sweep file {path}: {e}") from None
    except Exception as e:  # noqa: BLE001 (a user's file: any error is one message)
        raise ConfigError(f"sweep file {path} raised {type(e).__name__}: {e}") from None
    if "get_sweep" not in module:
        raise ConfigError(f"sweep file {path} defines no get_sweep()")
    try:
        sweep = module["get_sweep"]()
    except ConfigError as e:
        raise ConfigError(f"sweep file {path}: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"get_sweep() of {path} raised {type(e).__name__}: {e}") from None
    if not isinstance(sweep, Sweep):
        raise ConfigError(f"get_sweep() of {path} returned {type(sweep).__name__}, not a diffusion_jax.sweeps.Sweep")
    return sweep


def _check_shape(sweep: Sweep, where: str) -> list[str]:
    """Problems of the sweep's structure (names, labels, exclusions), before any config is read."""
    problems = []
    for field in ("factors", "exclude", "when"):
        if not isinstance(getattr(sweep, field), (tuple, list)):
            problems.append(
                f"{field}= must be a tuple, got {type(getattr(sweep, field)).__name__} "
                f"(one entry needs a trailing comma: {field}=(x,))"
            )
    for field in ("overrides", "eval_overrides"):
        if not isinstance(getattr(sweep, field), Mapping):
            problems.append(f"{field}= must be a dict of config key -> value")
    if problems:
        return [f"{where}: {p}" for p in problems]
    if (sweep.config is None) == (sweep.source is None):
        problems.append("set exactly one of config= (a base config to train) and source= (a workdir to evaluate)")
    if not sweep.factors:
        problems.append("factors= is empty; a sweep varies at least one factor")
    names = [f.name for f in sweep.factors if isinstance(f, Factor)]
    for f in sweep.factors:
        if not isinstance(f, Factor):
            problems.append(f"factors= holds {type(f).__name__}; use values(), levels(), zipped() or seeds()")
            continue
        if not _LABEL.match(f.name):
            problems.append(f"factor name {f.name!r} must be letters, digits and . _ + - only")
        if not f.levels:
            problems.append(f"factor {f.name!r} has no levels")
        labels = [lv.label for lv in f.levels]
        for lv in f.levels:
            if not _LABEL.match(lv.label):
                problems.append(f"factor {f.name!r}: level label {lv.label!r} must be letters, digits and . _ + - only")
        dupes = sorted({lb for lb in labels if labels.count(lb) > 1})
        if dupes:
            problems.append(f"factor {f.name!r} has repeated levels {', '.join(dupes)}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"factor names repeated: {', '.join(dupes)}; give one a name=")
    by_name = {f.name: f for f in sweep.factors if isinstance(f, Factor)}
    matches = [("exclude=", ex) for ex in sweep.exclude]
    for rule in sweep.when:
        if not (isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[1], Mapping)):
            problems.append(f"when= entry {rule!r} must be a pair (dict of factor -> level, dict of overrides)")
            continue
        matches.append(("when=", rule[0]))
    for what, ex in matches:
        if not isinstance(ex, Mapping) or not ex:
            problems.append(f"{what} entry {ex!r} must be a non-empty dict of factor name -> level label")
            continue
        for fname, label in ex.items():
            if fname not in by_name:
                problems.append(f"{what} names factor {fname!r}; the factors are {', '.join(by_name) or 'none'}")
            elif str(label) not in [lv.label for lv in by_name[fname].levels]:
                valid = ", ".join(lv.label for lv in by_name[fname].levels)
                problems.append(f"{what} names level {label!r} of factor {fname!r}; its levels are {valid}")
    if sweep.plot_factor is not None and sweep.plot_factor not in by_name:
        problems.append(f"plot_factor={sweep.plot_factor!r} is not a factor; the factors are {', '.join(by_name)}")
    return [f"{where}: {p}" for p in problems]


def _points(sweep: Sweep) -> list[Point]:
    out = []
    for combo in itertools.product(*(f.levels for f in sweep.factors)):
        chosen = {f.name: lv.label for f, lv in zip(sweep.factors, combo)}
        if any(all(chosen.get(k) == str(v) for k, v in ex.items()) for ex in sweep.exclude):
            continue
        overrides = dict(sweep.overrides)
        for lv in combo:
            overrides.update(lv.overrides)
        for match, extra in sweep.when:
            if all(chosen.get(k) == str(v) for k, v in match.items()):
                overrides.update(extra)
        name = "__".join(f"{f}-{lb}" for f, lb in chosen.items())
        out.append(Point(name, chosen, overrides))
    return out


def _conflicts(sweep: Sweep) -> list[str]:
    """Keys that two factors both set: the later would silently win."""
    owner: dict[str, str] = {}
    problems = []
    for f in sweep.factors:
        keys = {k for lv in f.levels for k in lv.overrides}
        for k in sorted(keys):
            if k in owner and owner[k] != f.name:
                problems.append(f"factors {owner[k]!r} and {f.name!r} both set {k}")
            owner.setdefault(k, f.name)
    return problems


def _with(config, overrides: Mapping[str, Any]):
    config = copy.deepcopy(config)
    config_lib.apply_overrides(config, [(k, format_value(v)) for k, v in overrides.items()])
    return config


def resolve(path: str | os.PathLike, *, build: bool = True) -> Plan:
    """Load the sweep file at ``path`` and check every point before anything runs: the file's
    structure, each point's overrides against the schema, and (``build``) that each point's
    experiment builds. One ConfigError lists the problems (at most ten points' worth)."""
    path = pathlib.Path(path).resolve()
    sweep = load_sweep(path)
    where = f"sweep file {path}"
    problems = _check_shape(sweep, where)
    if problems:
        raise ConfigError("\n".join(problems))
    points = _points(sweep)
    problems = [f"{where}: {p}" for p in _conflicts(sweep)]
    if not points:
        problems.append(f"{where}: every point is excluded")
    names = [p.name for p in points]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"{where}: points with the same name {', '.join(dupes)}")
    if problems:
        raise ConfigError("\n".join(problems))

    config_path = source = None
    final_step = None
    stored = None
    if sweep.config is not None:
        config_path = (path.parent / sweep.config).resolve()
        base = config_lib.load_config(str(config_path))
    else:
        source = (path.parent / str(sweep.source)).resolve()
        stored = config_lib.workdir_config(source)
        if stored is None:
            raise ConfigError(f"{where}: source {source} holds no config.py or config.json (train it first)")
        base = stored
        steps = sorted(int(p.name) for p in (source / "checkpoints").glob("*") if p.name.isdigit())
        if not steps:
            raise ConfigError(f"{where}: source {source} holds no checkpoint")
        final_step = steps[-1]

    bad = []
    for p in points:
        try:
            config = _with(base, p.overrides)
            if stored is not None:
                config_lib.check_mutable(stored, config, str(source))
            config_lib.validate_config(config, build=build)
            if sweep.eval_overrides:
                # eval starts from the point's stored config: the same rule as for any workdir.
                config_lib.check_mutable(config, _with(config, sweep.eval_overrides), f"point {p.name}")
                config_lib.validate_config(_with(config, sweep.eval_overrides), build=build)
        except ConfigError as e:
            bad.append(f"point {p.name}: {e}")
            if len(bad) >= 10:
                break
    if bad:
        raise ConfigError(f"{where}: " + "\n".join(bad))
    name = sweep.name or path.parent.name
    if not _LABEL.match(name):
        raise ConfigError(f"{where}: name {name!r} must be letters, digits and . _ + - only")
    return Plan(sweep, path, name, tuple(points), config_path, source, final_step)
