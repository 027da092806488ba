"""``diffusion-jax posthoc_ema``: EMAs of any length reconstructed from the snapshots of a run
(EDM2's post-hoc EMA, Karras et al. 2024, appendix C.2), and the choice of the average that
``sample``, ``eval`` and ``load`` use (``sampling.ema``).

A run with ``model.ema_sigma_rels`` and ``model.ema_snapshot_freq`` saves its power-function
EMAs every few steps (``<workdir>/ema_snapshots``). This mode solves, for each requested
``sigma_rel``, the least-squares weights that combine the snapshots taken up to a checkpoint
step into the EMA of that profile at that step
(:func:`diffusion_jax.training.ema.solve_posthoc_weights`), and writes it to
``<workdir>/posthoc_ema/sigma_rel_<S>/<step>``; ``--config.sampling.ema=sigma_rel:S`` then
samples or evaluates it. Several lengths are done in one pass over the snapshots: a sweep of
the EMA length needs no retraining.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from diffusion_jax.builders import config as config_lib
from diffusion_jax.builders.config import ConfigError
from diffusion_jax.builders.experiment import Experiment
from diffusion_jax.modes import setup
from diffusion_jax.training import ema as ema_lib
from diffusion_jax.training import ema_snapshots as snaps
from diffusion_jax.training import sharding as sharding_lib
from diffusion_jax.training.checkpoint import NoCheckpointError
from diffusion_jax.training.logging import progress_bar

__all__ = ["posthoc_ema", "chosen_params", "ema_tag"]


def _params_shardings(exp: Experiment):
    """``(shapes, shardings)`` of the network's parameters, laid out on the mesh as in training."""
    shapes = jax.eval_shape(exp.init_params, jax.random.PRNGKey(0))
    return shapes, sharding_lib.state_shardings(shapes, exp.layout(shapes))


def _params_template(exp: Experiment):
    """The parameters' shapes, dtypes and shardings: what a restore needs to read them."""
    shapes, shardings = _params_shardings(exp)
    return jax.tree_util.tree_map(
        lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes, shardings
    )


def _tracked_index(values: Sequence[float], value: float) -> int | None:
    for i, v in enumerate(values):
        if math.isclose(float(v), value, rel_tol=0.0, abs_tol=1e-12):
            return i
    return None


def ema_tag(config) -> str:
    """A file-name tag for ``sampling.ema`` ('' for the main EMA), e.g. ``sigma_rel_0p05`` (no
    dot, which ``Path.with_suffix`` would take for a suffix)."""
    kind, value = config_lib.ema_choice(config.sampling.ema)
    if kind == "main":
        return ""
    return kind if value is None else f"{kind}_{value!r}".replace(".", "p")


def chosen_params(config, exp: Experiment, workdir: pathlib.Path, step: int, state) -> Any:
    """The parameters ``sampling.ema`` picks from the restored ``state`` of checkpoint ``step``:
    the main EMA, the raw parameters, one of the extra rates, a tracked power EMA, or the
    reconstruction written by this mode. A ConfigError says what is missing and how to make it."""
    kind, value = config_lib.ema_choice(config.sampling.ema)
    if kind == "main":
        return state.ema_params
    if kind == "params":
        return state.params
    m = config.model
    assert value is not None
    if kind == "rate":
        if math.isclose(value, m.ema_rate, rel_tol=0.0, abs_tol=1e-12):
            return state.ema_params
        i = _tracked_index(m.ema_rates, value)
        if i is None:
            raise ConfigError(
                f"sampling.ema = 'rate:{value}': the run tracks the rates "
                f"{', '.join(map(str, (m.ema_rate, *m.ema_rates)))} (model.ema_rate and model.ema_rates)"
            )
        return state.emas.rates[i]
    i = _tracked_index(m.ema_sigma_rels, value)
    if i is not None:
        return state.emas.power[i]
    try:
        return snaps.read_posthoc(workdir, value, step, _params_template(exp))
    except NoCheckpointError:
        raise ConfigError(
            f"sampling.ema = 'sigma_rel:{value}': no EMA of that length at step {step}; the run tracks "
            f"sigma_rel {tuple(m.ema_sigma_rels) or 'none'}. Reconstruct it first: diffusion-jax posthoc_ema "
            f"--workdir {workdir} --sigma_rel {value} --step {step}"
        ) from None


def posthoc_ema(config, workdir, *, sigma_rels: Sequence[float], step: int | None = None) -> dict[float, dict]:
    """Reconstruct the EMAs of ``sigma_rels`` at checkpoint ``step`` (the newest by default) from
    the snapshots taken up to it, and write each to ``<workdir>/posthoc_ema`` (process 0 prints a
    table; ``posthoc_ema/report_<step>.json`` lists the weights). Returns, per sigma_rel, the
    report entry (path, gamma, relative profile residual, sum and extremes of the weights)."""
    run = setup.prepare(config, workdir, create=False, need_data=False)
    config, workdir, exp = run.config, run.workdir, run.exp
    m = config.model
    if not m.ema_sigma_rels:
        raise ConfigError(
            f"{workdir} was trained without power-function EMAs (model.ema_sigma_rels is empty), so there are "
            "no snapshots to reconstruct from; train with e.g. --config.model.ema_sigma_rels=0.05,0.1 "
            "--config.model.ema_snapshot_freq=..."
        )
    bad = [s for s in sigma_rels if not 0.0 < s <= ema_lib.SIGMA_REL_MAX]
    if bad or not sigma_rels:
        raise ConfigError(
            f"sigma_rel {bad or 'list is empty'}: each must be in (0, {ema_lib.SIGMA_REL_MAX:.4f}] (EDM2's "
            "relative standard deviation; 0.2887 = 12^-1/2 is a uniform average of all of training)"
        )
    all_steps = snaps.snapshot_steps(workdir)
    if not all_steps:
        raise ConfigError(f"no EMA snapshots in {workdir / snaps.SNAPSHOT_DIR}; train with model.ema_snapshot_freq > 0")
    if step is None:
        step = setup.checkpoint_steps(workdir)[-1]
    used = [s for s in all_steps if s <= step]
    if not used:
        raise ConfigError(f"no EMA snapshot at or before step {step}; the snapshots are at steps {all_steps}")
    if used[-1] != step:
        print(
            f"note: the newest snapshot before step {step} is at step {used[-1]}; the profiles of steps "
            f"{used[-1]}..{step} are approximated (see the residual)",
            flush=True,
        )
    gammas = [ema_lib.sigma_rel_to_gamma(s) for s in m.ema_sigma_rels]
    snap_t = np.repeat(np.asarray(used, np.float64), len(gammas))
    snap_g = np.tile(np.asarray(gammas, np.float64), len(used))
    targets = [float(s) for s in sigma_rels]
    target_g = np.asarray([ema_lib.sigma_rel_to_gamma(s) for s in targets])
    weights = ema_lib.solve_posthoc_weights(snap_t, snap_g, float(step), target_g)
    residual = ema_lib.profile_residual(snap_t, snap_g, weights, float(step), target_g)

    template = tuple(_params_template(exp) for _ in gammas)
    acc = None
    for k, s in enumerate(progress_bar(used, len(used), "combining snapshots")):
        trees, meta = snaps.read_snapshot(workdir, s, template)
        stored = [float(v) for v in meta.get("sigma_rels", [])]
        if stored and not np.allclose(stored, m.ema_sigma_rels):
            raise ConfigError(f"snapshot {s} holds sigma_rels {stored}, the config says {tuple(m.ema_sigma_rels)}")
        rows = weights[k * len(gammas) : (k + 1) * len(gammas)]
        acc = snaps.combine(rows, list(trees), acc)
    assert acc is not None
    report: dict[float, dict] = {}
    shapes, shardings = _params_shardings(exp)
    for j, sigma in enumerate(targets):
        params = jax.tree_util.tree_map(lambda a, ref: np.asarray(a, ref.dtype), acc[j], shapes)
        col = weights[:, j]
        entry: dict[str, Any] = {
            "sigma_rel": sigma,
            "gamma": float(target_g[j]),
            "step": int(step),
            "snapshots": len(used),
            "profile_residual": float(residual[j]),
            "weight_sum": float(col.sum()),
            "weight_min": float(col.min()),
            "weight_max": float(col.max()),
        }
        path = snaps.write_posthoc(workdir, sigma, int(step), sharding_lib.place(params, shardings), meta=entry)
        entry["path"] = str(path)
        report[sigma] = entry
    if run.primary:
        detail = {
            "step": int(step),
            "snapshot_steps": used,
            "snapshot_sigma_rels": list(m.ema_sigma_rels),
            "results": list(report.values()),
            "weights": {repr(s): weights[:, j].tolist() for j, s in enumerate(targets)},
        }
        setup.write_atomically(workdir / snaps.POSTHOC_DIR / f"report_{step:08d}.json", json.dumps(detail, indent=2))
        print(f"post-hoc EMA at step {step} from {len(used)} snapshots x {len(gammas)} profiles:", flush=True)
        print("  sigma_rel   gamma     profile residual   sum of weights   written to", flush=True)
        for e in report.values():
            print(
                f"  {e['sigma_rel']:<10.4g}  {e['gamma']:<8.3f}  {e['profile_residual']:<17.3e}  "
                f"{e['weight_sum']:<15.6f}  {e['path']}",
                flush=True,
            )
        print(f"use one with --config.sampling.ema=sigma_rel:S in sample / eval (e.g. S = {targets[0]!r})", flush=True)
    return report
