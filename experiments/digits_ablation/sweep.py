"""diffusion-jax sweep --sweep experiments/digits_ablation/sweep.py --workdir runs/digits_ablation

Which SDE and which network output train the best digits? SDE (score_sde's VE and VP, EDM's
sigma-as-time) x network output (score_sde's native one for that SDE, or EDM's preconditioning)
x 2 seeds: 12 points, each configs/digits/edm_sigma.py (the main job on EDM's SDE, the main job
when this sweep ran) with only these factors changed.

Held fixed for every point: the network (DDPM++, 32 channels, 1.03M parameters), batch 128,
Adam at 2e-3 with 200 warm-up steps, EMA rate 0.999 with the EMA warm-up on, the data, the
step budget, and the sampler (EDM's Heun, 12 steps, 24 network evaluations). The loss weighting
and the training-time distribution go with the output, as each recipe prescribes: score_sde's
lambda(t) = sigma(t)^2 with uniform times for the native outputs, EDM's lambda(sigma) with
log-normal sigma for the preconditioned one.

Budget: 750 steps per point, half the main job's 1,500, so that the 12 points (with their eval)
fit in about an hour on 2 idle CPU cores; see README.md here for the timing it rests on.
"""

from diffusion_jax.sweeps import Sweep, levels, seeds

NATIVE_VE = {"model.scale_by_sigma": True, "model.embedding_type": "fourier", "model.fourier_scale": 16.0}


def get_sweep():
    return Sweep(
        config="../../configs/digits/edm_sigma.py",
        factors=(
            levels(
                "sde",
                ve={"training.sde": "vesde", "model.sigma_min": 0.01, "model.sigma_max": 50.0},
                vp={"training.sde": "vpsde", "model.beta_min": 0.1, "model.beta_max": 20.0},
                edm={"training.sde": "edm", "model.sigma_min": 0.002, "model.sigma_max": 80.0},
            ),
            levels(
                "output",
                # score_sde's convention for the SDE: VE outputs the score (the network divides by
                # sigma, Fourier features of log sigma), VP predicts eps (labels 999 t).
                native={
                    "model.output": "",
                    "model.noise_cond": "",
                    "training.weighting": "sigma2",
                    "training.time_sampler": "uniform",
                },
                edm={
                    "model.output": "edm",
                    "model.noise_cond": "edm",
                    "training.weighting": "edm",
                    "training.time_sampler": "lognormal",
                },
            ),
            seeds(0, 1),
        ),
        when=(
            ({"sde": "ve", "output": "native"}, NATIVE_VE),
            # score_sde has no EDM SDE; x_t = x_0 + t eps is its VE SDE with sigma = t, so the
            # native output is VE's (an empty model.output would mean EDM's preconditioning).
            ({"sde": "edm", "output": "native"}, {"model.output": "score", "model.noise_cond": "sigma", **NATIVE_VE}),
        ),
        overrides={
            "training.n_iters": 750,
            "training.snapshot_freq": 750,
            "training.snapshot_freq_for_preemption": 250,
            "training.snapshot_sampling": False,
            "model.ema_warmup": True,
        },
        evaluate=True,
        eval_overrides={
            "eval.enable_loss": False,  # losses of different weightings do not compare
            "eval.enable_bpd": True,
            "eval.bpd_max_examples": 100,
            "eval.num_samples": 500,
            "eval.fid_counts": (297, 500),
        },
        metrics=("bpd", "fid", "inception_score", "precision", "recall", "sampling_nfe", "loss"),
        plot_metric="fid",
        plot_factor="sde",
    )
