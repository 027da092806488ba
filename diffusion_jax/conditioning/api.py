"""The method registry and entry points that the command line can call.

``METHODS`` is a literal name-to-constructor table; each constructor takes the operator, the
measurement and typed keyword options and returns a :class:`~diffusion_jax.samplers.Sampler`.
:func:`get_method` checks names and options; :func:`solve` samples with one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax.conditioning.editing import PCProjection, Replacement, SDEdit
from diffusion_jax.conditioning.operators import Operator
from diffusion_jax.conditioning.posterior import DAPS, DDRM, DiffPIRGuidance, DPSGuidance, Guided, PiGDMGuidance
from diffusion_jax.conditioning.smc import TDS
from diffusion_jax.samplers import api as sampler_api
from diffusion_jax.samplers.base import SampleInfo, Sampler
from diffusion_jax.samplers.grids import get_grid
from diffusion_jax.samplers.pc import PREDICTORS, LangevinCorrector, NoneCorrector
from diffusion_jax.sde import SDE

Array = jax.Array

__all__ = ["METHODS", "get_method", "solve", "sdedit"]


def _grid(grid):
    return get_grid(grid) if isinstance(grid, str) else grid


def _inner(sampler: str | Sampler, options: dict) -> Sampler:
    return sampler_api.get_sampler(sampler, **options) if isinstance(sampler, str) else sampler


def _dps(operator, y, *, scale: float = 1.0, sampler: str | Sampler = "ddpm", num_steps: int = 100, **sampler_options):
    """DPS (Chung et al. 2023) on ``sampler`` (DDPM ancestral steps, as the paper)."""
    inner = _inner(sampler, dict(num_steps=num_steps, **sampler_options))
    return Guided(sampler=inner, guidance=DPSGuidance(operator=operator, y=y, scale=scale))


def _pigdm(
    operator,
    y,
    *,
    scale: float = 1.0,
    data_var: float = 1.0,
    sampler: str | Sampler = "ddim",
    num_steps: int = 50,
    **sampler_options,
):
    """PiGDM (Song et al. 2023) on ``sampler`` (DDIM, as the paper)."""
    inner = _inner(sampler, dict(num_steps=num_steps, **sampler_options))
    return Guided(sampler=inner, guidance=PiGDMGuidance(operator=operator, y=y, scale=scale, data_var=data_var))


def _diffpir(
    operator, y, *, lam: float = 7.0, sampler: str | Sampler = "ddim", num_steps: int = 50, eta: float = 0.5, **opts
):
    """DiffPIR (Zhu et al. 2023): proximal data prediction on DDIM with stochasticity ``eta``."""
    options = dict(num_steps=num_steps, **opts)
    if isinstance(sampler, str) and sampler == "ddim":
        options["eta"] = eta
    return Guided(sampler=_inner(sampler, options), guidance=DiffPIRGuidance(operator=operator, y=y, lam=lam))


def _ddrm(operator, y, *, num_steps: int = 20, eta: float = 0.85, eta_b: float = 1.0, grid="karras", denoise=True):
    """DDRM (Kawar et al. 2022)."""
    return DDRM(operator=operator, y=y, num_steps=num_steps, eta=eta, eta_b=eta_b, grid=_grid(grid), denoise=denoise)


def _daps(
    operator,
    y,
    *,
    num_steps: int = 50,
    ode_steps: int = 4,
    ode_sampler: str = "euler",
    r_scale: float = 1.0,
    data_var: float = 1.0,
    exact_x0_step: bool = False,
    langevin_steps: int = 50,
    lr: float = 0.1,
    grid="karras",
):
    """DAPS (Zhang et al. 2024)."""
    ode = sampler_api.get_sampler(ode_sampler, num_steps=ode_steps, denoise=True)
    return DAPS(
        operator=operator,
        y=y,
        num_steps=num_steps,
        ode=ode,
        r_scale=r_scale,
        data_var=data_var,
        exact_x0_step=exact_x0_step,
        langevin_steps=langevin_steps,
        lr=lr,
        grid=_grid(grid),
    )


def _tds(
    operator,
    y,
    *,
    num_particles: int = 16,
    num_steps: int = 100,
    ess_threshold: float = 0.5,
    data_var: float = 1.0,
    grid="log_snr",
    denoise: bool = False,
):
    """The twisted diffusion sampler (Wu et al. 2023), asymptotically exact in the particles."""
    return TDS(
        operator=operator,
        y=y,
        num_particles=num_particles,
        num_steps=num_steps,
        ess_threshold=ess_threshold,
        data_var=data_var,
        grid=_grid(grid),
        denoise=denoise,
    )


def _replacement(
    operator, y, *, sampler: str | Sampler = "ddpm", num_steps: int = 50, resample: int = 1, grid="karras", denoise=True
):
    """Replacement / RePaint (Lugmayr et al. 2022) around ``sampler`` (DDPM steps by default)."""
    inner = _inner(sampler, {})
    return Replacement(
        operator=operator, y=y, sampler=inner, num_steps=num_steps, resample=resample, grid=_grid(grid), denoise=denoise
    )


def _pc_projection(
    operator,
    y,
    *,
    num_steps: int = 1000,
    predictor: str = "reverse_diffusion",
    corrector: str = "langevin",
    snr: float = 0.16,
    n_steps: int = 1,
    grid="score_sde",
    denoise: bool = True,
):
    """score_sde's PC inpainter / colorizer (a mask / the channel mean), with a correct start."""
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; valid names: {', '.join(PREDICTORS)}")
    if corrector not in ("langevin", "none"):
        raise ValueError(f"unknown corrector {corrector!r}; valid names: langevin, none")
    corr: Any = LangevinCorrector(snr=snr, n_steps=n_steps) if corrector == "langevin" else NoneCorrector()
    return PCProjection(
        operator=operator,
        y=y,
        num_steps=num_steps,
        predictor=PREDICTORS[predictor](),
        corrector=corr,
        grid=_grid(grid),
        denoise=denoise,
    )


METHODS: dict[str, Callable[..., Sampler]] = {
    "pc_projection": _pc_projection,
    "replacement": _replacement,
    "dps": _dps,
    "pigdm": _pigdm,
    "ddrm": _ddrm,
    "diffpir": _diffpir,
    "daps": _daps,
    "tds": _tds,
}


def get_method(name: str, operator: Operator, y: Array, **options: Any) -> Sampler:
    """A posterior sampler by name (:data:`METHODS`) for ``operator`` and measurement ``y``
    ``(B, ...)``. Unknown names or options raise listing the valid ones. Methods built on a
    sampler (dps, pigdm, diffpir, replacement) pass further options to it."""
    if name not in METHODS:
        raise ValueError(f"unknown conditioning method {name!r}; valid names: {', '.join(METHODS)}")
    ctor = METHODS[name]
    params = inspect.signature(ctor).parameters
    takes_more = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    valid = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(options) - valid)
    if unknown and not takes_more:
        raise ValueError(f"unknown option(s) {unknown} for method {name!r}; valid: {', '.join(sorted(valid))}")
    if not isinstance(operator, Operator):
        raise TypeError(f"operator must be a diffusion_jax.conditioning Operator, got {type(operator).__name__}")
    return ctor(operator, jnp.asarray(y), **options)


def solve(
    key: Array,
    score_fn: Callable,
    sde: SDE,
    shape: tuple[int, ...],
    operator: Operator,
    y: Array,
    method: str | Sampler = "ddrm",
    *,
    kind: str = "score",
    per_sample_keys: bool = False,
    dtype: Any = None,
    **options: Any,
) -> tuple[Array, SampleInfo]:
    """Sample ``p(x | y)`` for ``y = A(x) + sigma_y n``: ``shape`` is the data batch shape
    ``(B, ...)`` and ``y`` has one measurement per sample. ``method`` is a :data:`METHODS` name
    (with ``options``) or a conditional sampler. Returns ``diffusion_jax.sample``'s
    ``(samples, info)``."""
    y = jnp.asarray(y)
    if y.shape[0] != shape[0]:
        raise ValueError(f"y has batch size {y.shape[0]}, the samples {shape[0]}: give one measurement per sample")
    sampler = get_method(method, operator, y, **options) if isinstance(method, str) else method
    return sampler_api.sample(
        key, score_fn, sde, shape, sampler, kind=kind, per_sample_keys=per_sample_keys, dtype=dtype
    )


def sdedit(
    key: Array,
    score_fn: Callable,
    sde: SDE,
    reference: Array,
    sampler: str | Sampler = "dpmpp_2m",
    *,
    strength: float = 0.5,
    kind: str = "score",
    per_sample_keys: bool = False,
    **sampler_options: Any,
) -> tuple[Array, SampleInfo]:
    """SDEdit (Meng et al. 2022): ``reference`` ``(B, ...)`` noised to ``strength`` of the time
    range, then denoised by ``sampler``."""
    inner = _inner(sampler, sampler_options)
    reference = jnp.asarray(reference)
    return sampler_api.sample(
        key,
        score_fn,
        sde,
        reference.shape,
        SDEdit(sampler=inner, strength=strength),
        x_init=reference,
        kind=kind,
        per_sample_keys=per_sample_keys,
    )
