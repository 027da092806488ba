"""Likelihood speed: diffusion_jax's on-device ODE solve against scipy's RK45 on the host.

    python scripts/benchmark_likelihood.py [--problems mixture digits] [--batch 64]
        [--rtol 1e-5] [--atol 1e-5] [--repeats 3]
        [--config configs/digits/edm.py --workdir runs/digits]

Both sides integrate the same probability-flow ODE with the same vector field and the same
Hutchinson probe (one Rademacher probe per example, fixed along the path), from t_min to T, then
add the prior term:

* ours: :func:`diffusion_jax.likelihood.log_likelihood`, Dormand-Prince 5(4) with a PI step
  controller inside one ``jax.jit`` (``lax.while_loop``); with the per-example error norm (each
  example its own step sizes, the default) and with one RMS norm over the batch (one step size
  for the batch, as scipy does);
* scipy: the way score_sde computes likelihoods: the batch flattened into one state,
  ``scipy.integrate.solve_ivp(method="RK45")``, each right-hand side one call of the jitted
  vector field + divergence, with the state copied host -> device -> host.

Problems:

* ``mixture``: a 10-component Gaussian mixture in 64 dimensions (the digits' 8x8) under the VP
  SDE with its exact score; the table also gives the error against the closed-form log-density;
* ``digits``: the trained main-job network (``--config`` / ``--workdir``, skipped when the
  workdir has no checkpoint) on dequantized digits (17 levels).

Reported per batch: median wall seconds over ``--repeats`` solves (after a warm-up, so without
compilation; ours' compile time is given separately), NFE (vector-field evaluations; scipy's
``nfev``), and the largest difference of log p between ours and scipy in nats per dimension.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.integrate

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _bench import median_seconds  # noqa: E402

from diffusion_jax import likelihood as likelihood_lib  # noqa: E402
from diffusion_jax.analytic import GaussianMixture  # noqa: E402
from diffusion_jax.sde import VPSDE  # noqa: E402


def ours(key, score_fn, sde, x, *, rtol, atol, error_norm, repeats):
    f = jax.jit(
        lambda k, x: likelihood_lib.log_likelihood(
            k,
            score_fn,
            sde,
            x,
            estimator="hutchinson_rademacher",
            num_probes=1,
            rtol=rtol,
            atol=atol,
            error_norm=error_norm,
        )
    )
    t0 = time.perf_counter()
    jax.block_until_ready(f(key, x))
    first = time.perf_counter() - t0
    seconds, (logp, info) = median_seconds(lambda: jax.block_until_ready(f(key, x)), repeats)
    assert bool(jnp.all(info.success)), "the solver did not reach T"
    return {"seconds": seconds, "compile_seconds": first - seconds, "nfe": int(info.nfe)}, np.asarray(logp)


def scipy_rk45(key, score_fn, sde, x, *, rtol, atol, repeats):
    """score_sde's way: one flattened state for the whole batch through scipy's RK45."""
    batch, shape = x.shape[0], x.shape
    k_probe, _ = jax.random.split(key)  # the probe log_likelihood draws from the same key
    probe = jax.random.rademacher(k_probe, (1,) + shape, x.dtype)[0]

    flow = sde.probability_flow(score_fn)

    @jax.jit
    def rhs(y, t):
        t = jnp.full((batch,), t, y.dtype)
        vy, jv = jax.jvp(lambda y: flow.vector_field(y, t), (y,), (probe,))
        return vy, jnp.sum((probe * jv).reshape(batch, -1), axis=1)

    def fun(t, state):
        y = jnp.asarray(state[:-batch].reshape(shape), x.dtype)
        vy, div = rhs(y, t)
        return np.concatenate([np.asarray(vy, np.float64).ravel(), np.asarray(div, np.float64)])

    init = np.concatenate([np.asarray(x, np.float64).ravel(), np.zeros(batch)])
    solve = lambda: scipy.integrate.solve_ivp(fun, (sde.t_min, sde.T), init, rtol=rtol, atol=atol, method="RK45")
    solve()  # compiles the vector field
    seconds, sol = median_seconds(solve, repeats)
    assert sol.success, sol.message
    z = jnp.asarray(sol.y[:-batch, -1].reshape(shape), x.dtype)
    logp = np.asarray(sde.prior_logp(z), np.float64) + sol.y[-batch:, -1]
    return {"seconds": seconds, "compile_seconds": None, "nfe": int(sol.nfev)}, logp


def mixture_problem(batch):
    rng = np.random.default_rng(0)
    k, d = 10, 64
    mix = GaussianMixture(
        weights=jnp.full((k,), 1.0 / k),
        means=jnp.asarray(rng.uniform(-0.8, 0.8, (k, 8, 8, 1)), jnp.float32),
        stds=jnp.asarray(rng.uniform(0.1, 0.3, (k,)), jnp.float32),
    )
    sde = VPSDE()
    x = mix.sample(jax.random.PRNGKey(1), batch)
    exact = np.asarray(mix.log_prob(x, jnp.full((batch,), sde.t_min), sde))
    return "mixture (VP, D=64, exact score)", mix.score_fn(sde), sde, x, exact, d


def digits_problem(batch, config_path, workdir):
    from sklearn.datasets import load_digits

    from diffusion_jax.builders.config import load_config
    from diffusion_jax.modes.load import load_params

    if not (pathlib.Path(workdir) / "checkpoints").exists():
        print(f"# digits: no checkpoint in {workdir}; train the main job first (skipped)", file=sys.stderr)
        return None
    config = load_config(config_path)
    exp, step, params = load_params(config, workdir)
    levels = jnp.asarray(load_digits().images[-batch:, :, :, None].astype(np.int32))
    disc = likelihood_lib.Discretization(num_levels=17, value_range=tuple(exp.data_info.value_range))
    x = disc.dequantize(jax.random.PRNGKey(2), levels, jnp.float32)
    return f"digits (main job, {config.training.sde}, step {step}, D=64)", exp.score_fn(params), exp.sde, x, None, 64


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", nargs="+", choices=["mixture", "digits"], default=["mixture", "digits"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config", default=str(ROOT / "configs" / "digits" / "edm.py"))
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "digits"))
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()

    print(
        f"# jax {jax.__version__}, {platform.machine()}, {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"batch {args.batch}, rtol {args.rtol:g}, atol {args.atol:g}, median of {args.repeats}"
    )
    print(
        "| problem | solver | step sizes | s / batch | NFE / batch | compile s | max abs(logp - scipy) / D | "
        "mean abs(logp - exact) / D |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    key = jax.random.PRNGKey(0)
    for name in args.problems:
        problem = (
            mixture_problem(args.batch) if name == "mixture" else digits_problem(args.batch, args.config, args.workdir)
        )
        if problem is None:
            continue
        title, score_fn, sde, x, exact, d = problem
        ref, ref_logp = scipy_rk45(key, score_fn, sde, x, rtol=args.rtol, atol=args.atol, repeats=args.repeats)
        results = [("scipy RK45 (host)", "one for the batch", ref, ref_logp)]
        for norm, label in (("per_sample", "per example"), ("rms", "one for the batch")):
            res, logp = ours(
                key, score_fn, sde, x, rtol=args.rtol, atol=args.atol, error_norm=norm, repeats=args.repeats
            )
            results.append(("diffusion_jax dopri5 (jit)", label, res, logp))
        for solver, steps, res, logp in results:
            diff = float(np.max(np.abs(logp - ref_logp))) / d
            err = float(np.mean(np.abs(logp - exact))) / d if exact is not None else None
            compile_s = "-" if res["compile_seconds"] is None else f"{res['compile_seconds']:.1f}"
            speedup = ref["seconds"] / res["seconds"]
            print(
                f"| {title} | {solver} | {steps} | {res['seconds']:.2f} ({speedup:.1f}x) | {res['nfe']} | {compile_s} | "  # noqa: E501
                f"{diff:.1e} | {'-' if err is None else f'{err:.1e}'} |",
                flush=True,
            )
            rows.append(
                dict(
                    problem=title,
                    solver=solver,
                    step_sizes=steps,
                    **res,
                    speedup=speedup,
                    max_abs_diff_per_dim=diff,
                    mean_abs_err_per_dim=err,
                )
            )
    if args.json:
        pathlib.Path(args.json).write_text("\n".join(json.dumps(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
