"""Accuracy of the posterior samplers against the exact posterior of a Gaussian mixture.

    python scripts/benchmark_posterior.py                      # the full table (VP SDE)
    python scripts/benchmark_posterior.py --budgets 20,100 --num_samples 2000 --sde edm

Prior: a Gaussian mixture with its exact noised score (``diffusion_jax.analytic``); measurement:
``y = A x + sigma_y n`` for inpainting, average-pool super-resolution and colorization, in 2-d
and in 24-d (``(2, 4, 3)`` "images"). The exact posterior is a Gaussian mixture
(``conditioning.mixture_posterior``). For each method, operator, dimension and NFE budget the
table gives the sliced 2-Wasserstein distance (256 projections) between ``num_samples``
samples and as many exact posterior draws; ``floor`` is the distance between two exact samples
of that size (the Monte-Carlo floor) and ``prior`` the distance from the prior to the posterior
(what ignoring ``y`` costs). TDS evaluates the network on K particles per sample (its cost is K
times its NFE).
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import conditioning as C
from diffusion_jax.analytic import GaussianMixture
from diffusion_jax.sde import SDES

MIXTURE_2D = GaussianMixture(
    weights=np.array([0.3, 0.4, 0.3]),
    means=np.array([[-1.5, 0.5], [1.0, 1.0], [0.5, -1.5]]),
    stds=np.array([0.3, 0.5, 0.4]),
)
EVENT_HD = (2, 4, 3)


def mixture_hd(seed: int = 0) -> GaussianMixture:
    rng = np.random.default_rng(seed)
    k = 4
    means = rng.normal(size=(k,) + EVENT_HD)
    stds = rng.uniform(0.3, 0.6, size=(k,) + EVENT_HD)
    return GaussianMixture(weights=np.full(k, 1.0 / k), means=means, stds=stds)


def problems(sigma_y: float):
    """(dimension label, prior, operator name, operator, true x) for every case."""
    hd = mixture_hd()
    out = [
        ("2", MIXTURE_2D, "inpaint", C.inpainting(np.array([1.0, 0.0]), sigma_y=sigma_y)),
        ("2", MIXTURE_2D, "sr", C.super_resolution((2,), 2, sigma_y=sigma_y)),
        ("2", MIXTURE_2D, "color", C.colorization(2, weights=(0.75, 0.25), sigma_y=sigma_y)),
        ("24", hd, "inpaint", C.inpainting(C.box_mask(EVENT_HD, (0, 2), (2, 2)), sigma_y=sigma_y)),
        ("24", hd, "sr", C.super_resolution(EVENT_HD, 2, sigma_y=sigma_y)),
        ("24", hd, "color", C.colorization(3, sigma_y=sigma_y)),
    ]
    return out


def measurement(prior: GaussianMixture, op, seed: int = 11):
    """A measurement of one draw of the prior (no batch axis)."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    x = prior.sample(k1, 1)
    return op.measure(k2, x)[0]


def sliced_wasserstein(a, b, num_projections: int = 256, seed: int = 0) -> float:
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    dirs = np.random.default_rng(seed).normal(size=(num_projections, a.shape[1]))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    pa, pb = np.sort(a @ dirs.T, axis=0), np.sort(b @ dirs.T, axis=0)
    return float(np.sqrt(np.mean((pa - pb) ** 2)))


def method_options(name: str, budget: int) -> dict | None:
    """Options that spend ``budget`` network evaluations (None: the budget is too small)."""
    if name == "ddrm":
        return dict(num_steps=budget - 1)
    if name in ("pigdm", "diffpir"):
        return dict(num_steps=budget)
    if name == "dps":
        return dict(num_steps=budget)
    if name == "daps":
        return dict(num_steps=budget // 5, ode_steps=4) if budget >= 10 else None
    if name == "replacement":
        return dict(num_steps=budget - 1)
    if name == "pc_projection":
        return dict(num_steps=budget // 2, predictor="euler_maruyama")
    if name == "tds":
        return dict(num_steps=budget, num_particles=16)
    raise ValueError(name)


METHOD_ORDER = ("pc_projection", "replacement", "dps", "pigdm", "ddrm", "diffpir", "daps", "tds")


@functools.cache
def _score_fn(prior_id: int, sde_name: str):
    prior = _PRIORS[prior_id]
    return prior.score_fn(SDES[sde_name]())


_PRIORS: dict[int, GaussianMixture] = {}


def run(args) -> list[str]:
    sde = SDES[args.sde]()
    budgets = [int(b) for b in args.budgets.split(",")]
    methods = args.methods.split(",") if args.methods else list(METHOD_ORDER)
    n = args.num_samples
    rows = []
    header = "| method | operator | d | " + " | ".join(f"NFE {b}" for b in budgets) + " | floor | prior |"
    rows.append(header)
    rows.append("|" + "---|" * (5 + len(budgets)))
    for dim, prior, op_name, op in problems(args.sigma_y):
        if args.dims and dim not in args.dims.split(","):
            continue
        _PRIORS[id(prior)] = prior
        score_fn = _score_fn(id(prior), args.sde)
        y1 = measurement(prior, op)
        post = C.mixture_posterior(prior, op, y1)
        exact = np.asarray(post.sample(jax.random.PRNGKey(1), n))
        floor = sliced_wasserstein(exact, post.sample(jax.random.PRNGKey(2), n))
        prior_swd = sliced_wasserstein(exact, prior.sample(jax.random.PRNGKey(3), n))
        y = jnp.broadcast_to(y1, (n,) + y1.shape)
        shape = (n,) + tuple(prior.event_shape)
        for name in methods:
            cells = []
            for b in budgets:
                opts = method_options(name, b)
                if opts is None:
                    cells.append("-")
                    continue
                t0 = time.time()
                x, info = C.solve(jax.random.PRNGKey(4), score_fn, sde, shape, op, y, method=name, **opts)
                x = np.asarray(x)
                swd = sliced_wasserstein(x, exact) if np.all(np.isfinite(x)) else float("nan")
                cells.append(f"{swd:.3f}")
                if args.verbose:
                    print(
                        f"  {name} {op_name} d={dim} budget {b}: nfe {int(info.nfe)} swd {swd:.4f} "
                        f"({time.time() - t0:.1f} s)"
                    )
            rows.append(f"| {name} | {op_name} | {dim} | " + " | ".join(cells) + f" | {floor:.3f} | {prior_swd:.3f} |")
            if args.verbose:
                print(rows[-1], flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="20,100,500", help="comma-separated NFE budgets")
    p.add_argument("--num_samples", type=int, default=4000)
    p.add_argument("--sigma_y", type=float, default=0.1)
    p.add_argument("--sde", default="vpsde", choices=sorted(SDES))
    p.add_argument("--methods", default="", help=f"comma-separated subset of {', '.join(METHOD_ORDER)}")
    p.add_argument("--dims", default="", help="comma-separated subset of 2,24")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    print("\n".join(run(args)))


if __name__ == "__main__":
    main()
