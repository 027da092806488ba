"""Build a sampler from ``config.sampling``.

``sampling.method`` names a sampler of :data:`diffusion_jax.samplers.SAMPLERS`; the other keys
are passed on where that sampler takes them (score_sde's names: ``predictor``, ``corrector``,
``snr``, ``n_steps_each``, ``noise_removal``, ``probability_flow``; and ``num_steps``, ``grid``,
``rtol``/``atol``, ``eta``, the EDM churn settings, ``order``, ``thresholding``). Keys left at
None keep the sampler's own default.
"""

from __future__ import annotations

from diffusion_jax import samplers as samplers_lib
from diffusion_jax.builders.config import ConfigError
from diffusion_jax.sde import DiscreteChain

__all__ = ["build_sampler"]


def build_sampler(config, *, sde):
    s = config.sampling
    name = s.method
    accepted = samplers_lib.sampler_fields(name)
    num_steps = s.num_steps or (config.model.num_scales if isinstance(sde, DiscreteChain) else 1000)
    candidates = {
        "num_steps": num_steps,
        "predictor": s.predictor,
        "corrector": s.corrector,
        "snr": s.snr,
        "n_steps": s.n_steps_each,
        "probability_flow": s.probability_flow,
        "denoise": s.noise_removal,
        "rtol": s.rtol,
        "atol": s.atol,
        "solver": s.ode_solver,
        "eta": s.eta,
        "s_churn": s.s_churn,
        "s_tmin": s.s_tmin,
        "s_tmax": s.s_tmax,
        "s_noise": s.s_noise,
        "order": s.order,
    }
    if s.grid:
        candidates["grid"] = (
            samplers_lib.get_grid("karras", rho=s.rho) if s.grid == "karras" else samplers_lib.get_grid(s.grid)
        )
    if s.thresholding == "static":
        candidates["thresholding"] = samplers_lib.StaticClip()
    elif s.thresholding == "dynamic":
        candidates["thresholding"] = samplers_lib.DynamicThreshold(percentile=s.dynamic_threshold_p)
    if "thresholding" in candidates and "thresholding" not in accepted:
        raise ConfigError(f"sampling.thresholding: sampler {name!r} does not predict data, so it cannot threshold")
    kwargs = {k: v for k, v in candidates.items() if k in accepted and v is not None}
    try:
        sampler = samplers_lib.get_sampler(name, **kwargs)
        sampler.validate(sde)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.sampling (method {name!r}): {e}") from None
    return sampler
