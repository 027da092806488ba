"""``diffusion-jax sample``: samples of a checkpoint with ``config.sampling``, as ``.npz`` and PNG."""

from __future__ import annotations

import pathlib
import time

import jax
import numpy as np

from diffusion_jax.builders.sampler import build_sampler
from diffusion_jax.modes import setup

__all__ = ["sample"]


def sample(
    config, workdir, *, num_samples: int | None = None, out: str | None = None, step: int | None = None
) -> pathlib.Path:
    """Write ``num_samples`` samples of a checkpoint (newest by default) with ``config.sampling``:
    ``<out>.npz`` (values in the data's range) and ``<out>.png`` (a grid); process 0 writes.
    The data set need not be present: the config describes the samples."""
    run = setup.prepare(config, workdir, create=False, need_data=False)
    config, workdir, exp = run.config, run.workdir, run.exp
    setup.checkpoint_steps(workdir)
    got, state = setup.restore_state(config, exp, workdir, step)
    n = num_samples or config.eval.num_samples
    sampler = build_sampler(config, sde=exp.sde)
    t0 = time.perf_counter()
    x, sinfo = setup.sample_images(
        exp, state.ema_params, jax.random.PRNGKey(config.seed + got), n, sampler, labels=setup.class_labels(exp, n)
    )
    seconds = time.perf_counter() - t0
    out_path = pathlib.Path(out) if out else workdir / "samples" / f"samples_{got:08d}_{config.sampling.method}"
    if not run.primary:
        return out_path.with_suffix(".npz")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out_path.with_suffix(".npz"), samples=exp.to_data_range(x))
    setup.save_samples(exp, x, out_path.with_suffix(".png"))
    print(
        f"wrote {n} samples of checkpoint {got} ({config.sampling.method}, nfe={int(np.asarray(sinfo.nfe))}, "
        f"{seconds:.1f} s) to {out_path.with_suffix('.npz')} and .png",
        flush=True,
    )
    return out_path.with_suffix(".npz")
