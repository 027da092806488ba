"""Error versus NFE of every deterministic sampler on Gaussian-mixture problems with exact scores.

    PYTHONPATH=. python scripts/benchmark_samplers.py [--batch 1000] [--nfe 5,10,20,50]

For each problem the probability-flow ODE of the EDM SDE (sigma in [0.002, 80]) is solved from
the same prior noise by every sampler at each NFE budget (the largest step count whose NFE fits
the budget), in float64. The error is the RMS distance of the final samples (at sigma = 0.002,
no final denoising step) to a reference solution of the same ODE: Dopri5 at rtol = atol = 1e-10
(its own distance to rtol = atol = 1e-12 is printed). Wall time per sample is the time of one
compiled call divided by the batch size (the compile is excluded).

If torch and k-diffusion are importable, k-diffusion's samplers are run on the same problem
(float64, the same noise, the same exact denoiser written in torch), on the Karras and the
log-SNR ("exponential") sigma grids ending at sigma_min (no appended 0). Neither is a dependency
of the library; the import is guarded. When k-diffusion's package ``__init__`` cannot be imported
(its training dependencies are missing), ``k_diffusion/sampling.py`` is loaded on its own with a
minimal ``utils`` providing the one helper it uses.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

from diffusion_jax import samplers as S  # noqa: E402
from diffusion_jax.analytic import GaussianMixture  # noqa: E402
from diffusion_jax.sde import EDMSDE  # noqa: E402

# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------


def problems() -> dict[str, GaussianMixture]:
    rng = np.random.default_rng(0)
    k, d = 8, 16
    mix16 = GaussianMixture(
        weights=rng.dirichlet(np.full(k, 2.0)),
        means=rng.normal(scale=1.5, size=(k, d)),
        stds=rng.uniform(0.2, 0.6, size=k),
    )
    mix2 = GaussianMixture(
        weights=np.array([0.3, 0.4, 0.3]),
        means=np.array([[-1.5, 0.5], [1.0, 1.0], [0.5, -1.5]]),
        stds=np.array([0.3, 0.5, 0.4]),
    )
    return {"2-D mixture (K=3)": mix2, "16-D mixture (K=8)": mix16}


# --------------------------------------------------------------------------------------------
# Our samplers: (label, build(nfe) -> sampler or None)
# --------------------------------------------------------------------------------------------


def _fixed(cls_fn, evals_per_step=1, extra=0, min_steps=1):
    def build(nfe):
        n = (nfe - extra) // evals_per_step
        return cls_fn(n) if n >= min_steps else None

    return build


KARRAS, LOG_SNR = S.KarrasGrid(), S.LogSNRGrid()

# Every multistep sampler on both standard grids (EDM's rho = 7 and uniform log-SNR), the same
# two grids k-diffusion's samplers get below; the rest on their default grid.
OURS = [
    ("euler (karras)", _fixed(lambda n: S.Euler(num_steps=n))),
    ("ddim (karras)", _fixed(lambda n: S.DDIM(num_steps=n))),
    ("heun (karras)", _fixed(lambda n: S.EDMSampler(num_steps=n), 2)),
    ("dpmpp_2s (log_snr)", _fixed(lambda n: S.DPMSolverPP(num_steps=n, method="singlestep"), 2)),
    ("ipndm variable-step (karras)", _fixed(lambda n: S.IPNDM(num_steps=n, variable_step=True), 1, 0, 4)),
]
for _g, _gn in [(KARRAS, "karras"), (LOG_SNR, "log_snr")]:
    OURS += [
        (f"plms ({_gn})", _fixed(lambda n, g=_g: S.PLMS(num_steps=n, grid=g), 1, 1, 4)),
        (f"ipndm ({_gn})", _fixed(lambda n, g=_g: S.IPNDM(num_steps=n, grid=g), 1, 0, 4)),
        (f"dpmpp_2m ({_gn})", _fixed(lambda n, g=_g: S.DPMSolverPP(num_steps=n, order=2, grid=g), 1, 0, 2)),
        (f"dpmpp_3m ({_gn})", _fixed(lambda n, g=_g: S.DPMSolverPP(num_steps=n, order=3, grid=g), 1, 0, 3)),
        (f"unipc-2 bh2 ({_gn})", _fixed(lambda n, g=_g: S.UniPC(num_steps=n, order=2, grid=g), 1, 0, 2)),
        (f"unipc-3 bh2 ({_gn})", _fixed(lambda n, g=_g: S.UniPC(num_steps=n, order=3, grid=g), 1, 0, 3)),
    ]


def run_ours(mix, sde, x_T, ref, nfes):
    score = mix.score_fn(sde)
    rows = []
    for label, build in OURS:
        row = {}
        for nfe in nfes:
            smp = build(nfe)
            if smp is None:
                continue
            fn = lambda smp=smp: S.sample(jax.random.PRNGKey(0), score, sde, x_T.shape, smp, x_init=x_T)
            x, info = fn()
            jax.block_until_ready(x)
            t0 = time.perf_counter()
            x, info = fn()
            jax.block_until_ready(x)
            wall = (time.perf_counter() - t0) / x_T.shape[0]
            row[nfe] = (rms(x, ref), int(info.nfe), wall)
        rows.append((label, row))
    return rows


def run_adaptive(mix, sde, x_T, ref, tols):
    score = mix.score_fn(sde)
    out = []
    for tol in tols:
        for name in ["dopri5", "tsit5"]:
            smp = S.get_sampler("ode", solver=name, rtol=tol, atol=tol)
            x, info = S.sample(jax.random.PRNGKey(0), score, sde, x_T.shape, smp, x_init=x_T)
            out.append((f"ode {name} rtol=atol={tol:g}", rms(x, ref), int(info.nfe)))
    return out


def rms(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def reference(mix, sde, x_T, tol):
    smp = S.ProbabilityFlowSampler(rtol=tol, atol=tol, max_steps=1_000_000)
    x, info = S.sample(jax.random.PRNGKey(0), mix.score_fn(sde), sde, x_T.shape, smp, x_init=x_T)
    assert bool(info.success)
    return np.asarray(x)


# --------------------------------------------------------------------------------------------
# k-diffusion (optional)
# --------------------------------------------------------------------------------------------


def load_k_diffusion():
    """``(torch, k_diffusion.sampling)`` or None when torch / k-diffusion are not installed."""
    try:
        import torch
    except ImportError:
        return None
    try:
        return torch, importlib.import_module("k_diffusion.sampling")
    except ImportError:
        pass
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    # The package __init__ imports k-diffusion's training stack; sampling.py needs only
    # utils.append_dims from it.
    for name in [n for n in sys.modules if n == "k_diffusion" or n.startswith("k_diffusion.")]:
        del sys.modules[name]
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    pkg.utils = utils
    sys.modules["k_diffusion"] = pkg
    sys.modules["k_diffusion.utils"] = utils
    try:
        return torch, importlib.import_module("k_diffusion.sampling")
    except ImportError:
        return None


def torch_denoiser(torch, mix: GaussianMixture):
    """The exact denoiser D(x, sigma) = E[x0 | x] of the mixture (EDM SDE: alpha = 1)."""
    w = torch.tensor(np.asarray(mix.weights), dtype=torch.float64)
    mu = torch.tensor(np.asarray(mix.means), dtype=torch.float64)  # (K, d)
    s2 = torch.tensor(np.asarray(mix.stds), dtype=torch.float64) ** 2  # (K,)
    d = mu.shape[1]

    def model(x, sigma):
        v = s2[None, :] + sigma[:, None] ** 2  # (B, K)
        diff = x[:, None, :] - mu[None]  # (B, K, d)
        logp = torch.log(w)[None] - 0.5 * (diff**2).sum(-1) / v - 0.5 * d * torch.log(v)
        r = torch.softmax(logp, dim=1)
        post = mu[None] + (s2[None, :] / v)[..., None] * diff
        return (r[..., None] * post).sum(1)

    return model


def run_k_diffusion(kd, mix, x_T, ref, nfes, sig_min, sig_max):
    torch, ks = kd
    torch.set_num_threads(2)
    model = torch_denoiser(torch, mix)
    x0 = torch.tensor(np.asarray(x_T), dtype=torch.float64)

    # n steps: n + 1 noise levels from sigma_max to sigma_min (k-diffusion appends a 0, dropped).
    def karras(n):
        return ks.get_sigmas_karras(n + 1, sig_min, sig_max, rho=7.0, device="cpu")[:-1].double()

    def expo(n):
        return ks.get_sigmas_exponential(n + 1, sig_min, sig_max, device="cpu")[:-1].double()

    def counted(fn):
        calls = [0]

        def m(x, s):
            calls[0] += 1
            return model(x, s)

        return m, calls

    samplers = []
    for gname, grid in [("karras", karras), ("exponential", expo)]:
        samplers += [
            (f"k: euler ({gname})", 1, 1, lambda m, s, x: ks.sample_euler(m, x, s, disable=True), grid),
            (f"k: heun ({gname})", 2, 1, lambda m, s, x: ks.sample_heun(m, x, s, disable=True), grid),
            (f"k: dpm_2 ({gname})", 2, 1, lambda m, s, x: ks.sample_dpm_2(m, x, s, disable=True), grid),
            (f"k: lms order 4 ({gname})", 1, 4, lambda m, s, x: ks.sample_lms(m, x, s, disable=True), grid),
            (
                f"k: dpmpp_2s eta=0 ({gname})",
                2,
                1,
                lambda m, s, x: ks.sample_dpmpp_2s_ancestral(m, x, s, eta=0.0, disable=True),
                grid,
            ),
            (f"k: dpmpp_2m ({gname})", 1, 2, lambda m, s, x: ks.sample_dpmpp_2m(m, x, s, disable=True), grid),
            (
                f"k: dpmpp_3m_sde eta=0 ({gname})",
                1,
                3,
                lambda m, s, x: ks.sample_dpmpp_3m_sde(m, x, s, eta=0.0, disable=True),
                grid,
            ),
        ]
    rows = []
    for label, per_step, min_steps, call, grid in samplers:
        row = {}
        for nfe in nfes:
            n = nfe // per_step
            if n < min_steps:
                continue
            m, calls = counted(model)
            t0 = time.perf_counter()
            x = call(m, grid(n), x0.clone())
            wall = (time.perf_counter() - t0) / x0.shape[0]
            row[nfe] = (rms(x.numpy(), ref), calls[0], wall)
        rows.append((label, row))
    # DPM-Solver-fast: the NFE budget is its own argument.
    row = {}
    for nfe in nfes:
        if nfe < 3:
            continue
        m, calls = counted(model)
        t0 = time.perf_counter()
        x = ks.sample_dpm_fast(m, x0.clone(), sig_min, sig_max, nfe, disable=True)
        row[nfe] = (rms(x.numpy(), ref), calls[0], (time.perf_counter() - t0) / x0.shape[0])
    rows.append(("k: dpm_fast", row))
    return rows


def third_order_check(kd, mix, sde, batch=200, ns=(40, 80, 160, 320, 640)):
    """Empirical order of DPM-Solver++(3M): ours, and k-diffusion's ``sample_dpmpp_3m_sde`` at
    eta = 0, on the log-SNR grid against a tol-1e-12 reference (2-D mixture, float64)."""
    torch, ks = kd
    x_T = sde.prior_sample(jax.random.PRNGKey(1), (batch, mix.event_shape[0]), jnp.float64)
    ref = reference(mix, sde, x_T, 1e-12)
    model = torch_denoiser(torch, mix)
    ours, theirs = [], []
    for n in ns:
        x, _ = S.sample(
            jax.random.PRNGKey(0), mix.score_fn(sde), sde, x_T.shape, S.DPMSolverPP(order=3, num_steps=n), x_init=x_T
        )
        ours.append(rms(x, ref))
        sig = ks.get_sigmas_exponential(n + 1, float(sde.sigma_min), float(sde.sigma_max))[:-1].double()
        xk = ks.sample_dpmpp_3m_sde(model, torch.tensor(np.asarray(x_T)), sig, eta=0.0, disable=True)
        theirs.append(rms(xk.numpy(), ref))
    lines = ["| steps | " + " | ".join(str(n) for n in ns) + " | order (last doubling) |", "|" + "---|" * (len(ns) + 2)]
    for label, errs in [("ours: dpmpp_3m (log_snr)", ours), ("k: dpmpp_3m_sde eta=0 (exponential)", theirs)]:
        order = np.log2(errs[-2] / errs[-1])
        lines.append(f"| {label} | " + " | ".join(f"{e:.2e}" for e in errs) + f" | {order:.2f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def table(rows, nfes, title):
    head = f"| {title} | " + " | ".join(f"NFE {n}" for n in nfes) + " | wall / sample |"
    lines = [head, "|" + "---|" * (len(nfes) + 2)]
    for label, row in rows:
        cells = []
        for n in nfes:
            if n in row:
                err, used, _ = row[n]
                cells.append(f"{err:.2e}" + ("" if used == n else f" ({used})"))
            else:
                cells.append("-")
        walls = [row[n][2] for n in nfes if n in row]
        wall = f"{1e6 * walls[-1]:.1f} us @ NFE {max(row)}" if walls else "-"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {wall} |")
    return "\n".join(lines)


def best(rows, nfes, ours: bool):
    """Per NFE budget, the smallest error among our rows (or k-diffusion's) within the budget."""
    out = {}
    for n in nfes:
        cands = [
            (row[n][0], label) for label, row in rows if n in row and label.startswith("k: ") != ours and row[n][1] <= n
        ]
        out[n] = min(cands) if cands else None
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--nfe", type=str, default="5,10,20,50")
    args = parser.parse_args(argv)
    nfes = [int(v) for v in args.nfe.split(",")]
    sde = EDMSDE()
    kd = load_k_diffusion()
    print(f"devices: {jax.devices()}; k-diffusion: {'yes' if kd else 'not installed'}")
    for name, mix in problems().items():
        d = mix.event_shape[0]
        x_T = sde.prior_sample(jax.random.PRNGKey(1), (args.batch, d), jnp.float64)
        ref = reference(mix, sde, x_T, 1e-10)
        ref_check = reference(mix, sde, x_T, 1e-12)
        print(f"\n### {name}, EDM SDE, {args.batch} samples, float64")
        print(f"reference (Dopri5, tol 1e-10) vs tol 1e-12: RMS {rms(ref, ref_check):.1e}\n")
        rows = run_ours(mix, sde, x_T, ref, nfes)
        if kd:
            rows += run_k_diffusion(kd, mix, x_T, ref, nfes, float(sde.sigma_min), float(sde.sigma_max))
        print(
            "RMS error to the reference (a number in parentheses is the NFE actually used when "
            "the budget is not a multiple of the evaluations per step)\n"
        )
        print(table(rows, nfes, "sampler"))
        ours, theirs = best(rows, nfes, ours=True), best(rows, nfes, ours=False)
        print("\n| NFE | best of ours | best of k-diffusion |\n|---|---|---|")
        for n in nfes:
            o = f"{ours[n][0]:.2e} ({ours[n][1]})" if ours[n] else "-"
            t = f"{theirs[n][0]:.2e} ({theirs[n][1]})" if theirs[n] else "-"
            print(f"| {n} | {o} | {t} |")
        print("\n| adaptive | RMS error | NFE |\n|---|---|---|")
        for label, err, used in run_adaptive(mix, sde, x_T, ref, [1e-3, 1e-5]):
            print(f"| {label} | {err:.2e} | {used} |")
    if kd:
        print("\n### Convergence order of the third-order multistep solvers (2-D mixture, 200 samples)\n")
        print(third_order_check(kd, problems()["2-D mixture (K=3)"], sde))


if __name__ == "__main__":
    main()
