"""The sweep's report: each done point's final metrics as a CSV, the mean +- standard deviation
over seeds as a CSV and a Markdown table, PNG plots (a metric against a factor with error bars,
one line per level of the other factors; the learning curves overlaid) and a TensorBoard hparams
summary per point (TensorBoard's HParams view then compares the points).

Everything here reads the results recorded in the sweep's storage (``engine.PointStatus``), so a
report can be made on any machine that reaches the storage, whichever workers ran the points.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import pathlib
import shutil
from collections.abc import Sequence

import numpy as np

from diffusion_jax.builders.config import ConfigError
from diffusion_jax.sweeps.engine import PointStatus
from diffusion_jax.sweeps.spec import SEED, Plan

__all__ = ["DEFAULT_METRICS", "Group", "groups", "format_mean_std", "write_report"]

# The table's columns when the sweep file names none: the final training loss, the eval loss,
# test bits/dim, the sample-quality metrics and the sampler's network evaluations.
DEFAULT_METRICS = (
    "loss",
    "eval_loss",
    "bpd",
    "fid",
    "kid",
    "inception_score",
    "precision",
    "recall",
    "sampling_nfe",
)


@dataclasses.dataclass(frozen=True)
class Group:
    """The points that differ only in their seed, and each metric's values over them."""

    levels: tuple[tuple[str, str], ...]
    points: tuple[str, ...]
    values: dict[str, list[float]]

    def mean_std(self, metric: str) -> tuple[float, float, int]:
        """Mean, sample standard deviation (ddof 1; NaN for one seed) and count of ``metric``."""
        v = np.asarray([x for x in self.values.get(metric, []) if math.isfinite(x)], np.float64)
        if v.size == 0:
            return math.nan, math.nan, 0
        return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


def groups(plan: Plan, done: Sequence[PointStatus]) -> list[Group]:
    """Done points grouped by their levels of every factor but the seed, in the sweep's order."""
    out: dict[tuple, dict] = {}
    for s in done:
        result = s.result or {}
        g = out.setdefault(s.point.group(), {"points": [], "values": {}})
        g["points"].append(s.point.name)
        for k, v in result.get("metrics", {}).items():
            g["values"].setdefault(k, []).append(float(v))
    return [Group(k, tuple(v["points"]), v["values"]) for k, v in out.items()]


def _of(s: PointStatus) -> dict:
    return (s.result or {}).get("metrics", {})


def _sig(x: float, digits: int = 4) -> str:
    if not math.isfinite(x):
        return "nan" if math.isnan(x) else str(x)
    return f"{x:.{digits}g}"


def format_mean_std(mean: float, std: float, n: int) -> str:
    """``mean ± std`` with the std to 2 significant digits and the mean to the same decimal place;
    ``mean`` alone for one value, ``-`` for none."""
    if n == 0:
        return "-"
    if n == 1 or not math.isfinite(std):
        return _sig(mean)
    if std == 0:
        return f"{_sig(mean)} ± 0"
    decimals = max(0, 1 - int(math.floor(math.log10(abs(std)))))
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def _metrics(plan: Plan, done: Sequence[PointStatus]) -> list[str]:
    present = {k for s in done for k in (s.result or {}).get("metrics", {})}
    wanted = plan.sweep.metrics or DEFAULT_METRICS
    return [m for m in wanted if m in present]


def _markdown(plan: Plan, gs: list[Group], metrics: list[str]) -> str:
    factors = [f for f in plan.factors if f != SEED]
    head = ["| " + " | ".join([*factors, "seeds", *metrics]) + " |", "|" + "---|" * (len(factors) + 1 + len(metrics))]
    rows = []
    for g in gs:
        lv = dict(g.levels)
        cells = [lv.get(f, "") for f in factors] + [str(len(g.points))]
        cells += [format_mean_std(*g.mean_std(m)) for m in metrics]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(head + rows) + "\n"


def _write_csvs(plan: Plan, done: Sequence[PointStatus], gs: list[Group], out: pathlib.Path) -> None:
    all_metrics = sorted({k for s in done for k in (s.result or {}).get("metrics", {})})
    with (out / "points.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["point", *plan.factors, *all_metrics])
        for s in done:
            m = (s.result or {}).get("metrics", {})
            w.writerow([s.point.name, *(s.point.levels[f] for f in plan.factors), *(m.get(k, "") for k in all_metrics)])
    factors = [f for f in plan.factors if f != SEED]
    with (out / "summary.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*factors, "seeds", *(f"{m}_{s}" for m in all_metrics for s in ("mean", "std"))])
        for g in gs:
            lv = dict(g.levels)
            row: list = [lv.get(fa, "") for fa in factors] + [len(g.points)]
            for m in all_metrics:
                mean, std, n = g.mean_std(m)
                row += ["" if n == 0 else mean, "" if n < 2 else std]
            w.writerow(row)


def _numeric(labels: Sequence[str]) -> list[float] | None:
    try:
        return [float(x) for x in labels]
    except ValueError:
        return None


def spans_decades(values: Sequence[float], decades: int) -> bool:
    """Whether positive ``values`` (at least three) span ``decades`` powers of ten: then a plot
    draws them on a log axis."""
    return len(values) > 2 and min(values) > 0 and max(values) / min(values) >= 10**decades


def plot_metric(plan: Plan, gs: list[Group], metric: str, factor: str, path: pathlib.Path) -> None:
    """``metric`` (mean, error bars one std over seeds) against the levels of ``factor``, one
    line per combination of the other factors' levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [lv.label for f in plan.sweep.factors if f.name == factor for lv in f.levels]
    xs_num = _numeric(order)
    xs = xs_num if xs_num is not None else list(range(len(order)))
    lines: dict[tuple, dict[str, tuple[float, float]]] = {}
    for g in gs:
        lv = dict(g.levels)
        rest = tuple((f, v) for f, v in g.levels if f != factor)
        mean, std, n = g.mean_std(metric)
        if n:
            lines.setdefault(rest, {})[lv[factor]] = (mean, std if math.isfinite(std) else 0.0)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for rest, pts in lines.items():
        idx = [i for i, lb in enumerate(order) if lb in pts]
        ax.errorbar(
            [xs[i] for i in idx],
            [pts[order[i]][0] for i in idx],
            yerr=[pts[order[i]][1] for i in idx],
            marker="o",
            capsize=3,
            label=", ".join(f"{f}={v}" for f, v in rest) or metric,
        )
    if xs_num is None:
        ax.set_xticks(xs, order)
    elif spans_decades(xs, 1):
        ax.set_xscale("log")
    if spans_decades([m for pts in lines.values() for m, _ in pts.values()], 2):
        ax.set_yscale("log")  # e.g. FID from a failing sampler beside good ones
    ax.set_xlabel(factor)
    ax.set_ylabel(metric)
    ax.set_title(f"{plan.name}: {metric} against {factor} (mean ± std over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(plan: Plan, done: Sequence[PointStatus], path: pathlib.Path) -> bool:
    """The training-loss curves of every done point overlaid, one colour per group (seeds share
    a colour). False if no point recorded a curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    colours: dict[tuple, str] = {}
    drawn = False
    for s in done:
        curve = (s.result or {}).get("curve") or []
        if not curve:
            continue
        key = s.point.group()
        first = key not in colours
        colours.setdefault(key, f"C{len(colours) % 10}")
        steps, losses = zip(*curve)
        label = ", ".join(f"{f}={v}" for f, v in key) if first else None
        ax.plot(steps, losses, color=colours[key], alpha=0.8, linewidth=1.0, label=label)
        drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.set_title(f"{plan.name}: learning curves (one colour per group, one line per seed)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path)
    plt.close(fig)
    return drawn


def write_hparams(done: Sequence[PointStatus], out: pathlib.Path) -> None:
    """One TensorBoard run per point under ``out``: its factor levels as hparams and its metrics."""
    from diffusion_jax.training.logging import MetricWriter

    shutil.rmtree(out, ignore_errors=True)  # a report rewritten from scratch, not appended to
    for s in done:
        metrics = {
            f"sweep/{k}": float(v) for k, v in (s.result or {}).get("metrics", {}).items() if math.isfinite(float(v))
        }
        writer = MetricWriter(out / s.point.name, enabled=True)
        writer.write_hparams(dict(s.point.levels), metrics)
        writer.close()


def write_report(
    plan: Plan,
    points: Sequence[PointStatus],
    out: str | pathlib.Path,
    *,
    metric: str | None = None,
    factor: str | None = None,
) -> dict[str, pathlib.Path | str]:
    """Write ``points.csv``, ``summary.csv``, ``table.md``, the plots and the hparams summary
    into ``out``; returns the paths and the Markdown table (key ``"table"``)."""
    done = [s for s in points if s.state == "done"]
    if not done:
        raise ConfigError("no point of the sweep is done yet; nothing to report (see --status)")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gs = groups(plan, done)
    metrics = _metrics(plan, done)
    present = sorted({k for s in done for k in (s.result or {}).get("metrics", {})})
    metric = metric or plan.sweep.plot_metric or (metrics[0] if metrics else None)
    if metric is not None and metric not in present:
        raise ConfigError(f"--metric {metric!r} was not recorded by any done point; recorded: {', '.join(present)}")
    non_seed = [f for f in plan.factors if f != SEED]
    factor = factor or plan.sweep.plot_factor or (non_seed[0] if non_seed else plan.factors[0])
    if factor not in plan.factors:
        raise ConfigError(
            f"--factor {factor!r} is not a factor of the sweep; the factors are {', '.join(plan.factors)}"
        )
    table = _markdown(plan, gs, metrics)
    pending = [s.point.name for s in points if s.state != "done"]
    note = f"\n{len(done)} of {len(points)} points done" + (
        f"; not in the table: {', '.join(pending)}" if pending else ""
    )
    (out / "table.md").write_text(table + note + "\n")
    _write_csvs(plan, done, gs, out)
    paths: dict[str, pathlib.Path | str] = {
        "table": table,
        "table.md": out / "table.md",
        "points.csv": out / "points.csv",
        "summary.csv": out / "summary.csv",
    }
    if metric is not None:
        plot = out / f"{metric}_vs_{factor}.png"
        if factor == SEED:  # each seed on the x axis: one point per run, no averaging
            per_point = [
                Group(tuple(s.point.levels.items()), (s.point.name,), {k: [float(v)] for k, v in _of(s).items()})
                for s in done
            ]
            plot_metric(plan, per_point, metric, factor, plot)
        else:
            plot_metric(plan, gs, metric, factor, plot)
        paths["plot"] = plot
    curves = out / "learning_curves.png"
    if plot_curves(plan, done, curves):
        paths["curves"] = curves
    write_hparams(done, out / "tensorboard")
    paths["tensorboard"] = out / "tensorboard"
    return paths
