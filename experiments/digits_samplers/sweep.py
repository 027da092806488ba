"""diffusion-jax sweep --sweep experiments/digits_samplers/sweep.py --workdir runs/digits_samplers

Sample quality against the number of network evaluations (NFE, 4 to 50) for deterministic and
stochastic samplers, on the final checkpoint of the main job on EDM's SDE (no training): each
point is an `eval` of a copy of that checkpoint with one sampler at one NFE, 1,000 samples judged
by the digits detector against the train split (as the main job's eval does).

The source workdir: runs/digits_sigma (``diffusion-jax train --config configs/digits/edm_sigma.py
--workdir runs/digits_sigma``), or $DIGITS_MAIN_WORKDIR (any finished digits run).
"""

import os

from diffusion_jax.sweeps import Sweep, levels

NFE = (4, 8, 12, 24, 50)
# Network evaluations per step of each sampler (docs/samplers.md): Heun and EDM's stochastic
# sampler take two (the grid ends at sigma_min, so every step has its correction), the rest one.
DETERMINISTIC = {"heun": 2, "euler": 1, "ddim": 1, "dpmpp_2m": 1, "ipndm": 1, "unipc": 1}
STOCHASTIC = {"edm": 2, "sde_dpmpp_2m": 1, "ddpm": 1, "euler_maruyama": 1}
SAMPLERS = {**DETERMINISTIC, **STOCHASTIC}


def get_sweep():
    return Sweep(
        source=os.environ.get("DIGITS_MAIN_WORKDIR", "../../runs/digits_sigma"),
        factors=(
            levels("sampler", {name: {"sampling.method": name} for name in SAMPLERS}),
            levels("nfe", {str(n): {} for n in NFE}),
        ),
        # The step count that gives each NFE.
        when=tuple(
            ({"sampler": name, "nfe": str(n)}, {"sampling.num_steps": n // per})
            for name, per in SAMPLERS.items()
            for n in NFE
        ),
        overrides={"sampling.noise_removal": False},
        eval_overrides={
            "eval.enable_loss": False,
            "eval.enable_bpd": False,
            "eval.enable_sampling": True,
            "eval.enable_quality": True,
            "eval.num_samples": 1000,
        },
        metrics=("fid", "inception_score", "precision", "recall", "sampling_nfe"),
        plot_metric="fid",
        plot_factor="nfe",
    )
