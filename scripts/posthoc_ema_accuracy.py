"""How well post-hoc EMA reconstructs an EMA that was not tracked, against the snapshot spacing.

    python scripts/posthoc_ema_accuracy.py [--steps 1000,4000] [--dim 40]

A toy run in float64 (noisy gradient descent on a quadratic, the trajectory of
tests/test_ema.py) tracks EDM2's pair of power-function EMAs (sigma_rel 0.05 and 0.10) and,
directly, the target profiles. For each snapshot spacing (a fraction of the run) the targets are
reconstructed at the end of the run from the snapshots alone
(diffusion_jax.training.ema.solve_posthoc_weights) and compared with the directly tracked EMA:
``||reconstructed - direct|| / ||direct||`` over the parameters, and the profile residual
``||p_r - sum x_i p_i|| / ||p_r||``. Prints a Markdown table.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.training import ema as E

TRACKED = (0.05, 0.10)
TARGETS = (0.02, 0.07, 0.15, 0.25)
SPACINGS = (0.0025, 0.005, 0.01, 0.02, 0.05, 0.1)


def trajectory(n_steps: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = np.diag(np.linspace(0.2, 2.0, dim))
    theta, out = rng.normal(size=dim) * 3, []
    for _ in range(n_steps):
        theta = theta - 0.02 * (a @ theta - 1.0) + 0.05 * rng.normal(size=dim)
        out.append(theta.copy())
    return np.asarray(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="1000,4000")
    parser.add_argument("--dim", type=int, default=40)
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)
    ema = E.MultiEma(sigma_rels=(*TRACKED, *TARGETS))
    gammas = [E.sigma_rel_to_gamma(s) for s in TRACKED]
    print("| steps | snapshot every | " + " | ".join(f"sigma_rel {s}: rel. error / residual" for s in TARGETS) + " |")
    print("|---|---|" + "---|" * len(TARGETS))
    for n in (int(v) for v in args.steps.split(",")):
        traj = trajectory(n, args.dim)

        def body(state, inp):
            state = ema.update(state, inp[0], inp[1])
            return state, state.power

        _, history = jax.lax.scan(body, ema.init(jnp.asarray(traj[0])), (jnp.asarray(traj), jnp.arange(1, n + 1)))
        history = [np.asarray(h) for h in history]
        for spacing in SPACINGS:
            every = max(1, round(spacing * n))
            steps = list(range(every, n + 1, every))
            if steps[-1] != n:
                steps.append(n)
            t = np.repeat(np.asarray(steps, np.float64), len(gammas))
            g = np.tile(gammas, len(steps))
            snaps = np.stack([history[k][s - 1] for s in steps for k in range(len(gammas))])
            cells = []
            for j, target in enumerate(TARGETS):
                g_r = E.sigma_rel_to_gamma(target)
                x = E.solve_posthoc_weights(t, g, n, g_r)
                residual = E.profile_residual(t, g, x, n, g_r)[0]
                direct = history[len(TRACKED) + j][n - 1]
                rel = np.linalg.norm(x[:, 0] @ snaps - direct) / np.linalg.norm(direct)
                cells.append(f"{rel:.1e} / {residual:.1e}")
            print(f"| {n} | {every} ({len(steps)} snapshots) | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
