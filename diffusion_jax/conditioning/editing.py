"""Editing and replacement methods, as wrappers around existing samplers.

* :class:`SDEdit` (Meng et al. 2022, Sec. 3): noise a reference image to ``t0 = t_min + strength
  (T - t_min)`` and run any fixed-grid sampler from there (its grid family laid over
  ``[t_min, t0]``). The reference is the sampler's starting state (``x_init``).
* :class:`Replacement` (Lugmayr et al. 2022, "RePaint", Algorithm 1; with ``resample = 1`` the
  plain replacement of Song et al. 2021, App. I.2): after each step of the wrapped sampler the
  observed spectral coordinates are replaced by the measurement noised to the new level; with
  ``resample = U`` each step is repeated ``U`` times, going back by the forward transition
  ``x_t = (alpha_t / alpha_s) x_s + sqrt(sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2) z`` in between
  (RePaint's jump length 1). Multistep samplers take their first-order step each time.
* :class:`PCProjection` -- score_sde's inpainter and colorizer (``controllable_generation.py``):
  a projection after each corrector and each predictor update. Two corrections: the start is the
  prior with the known part noised to ``T`` (score_sde starts from the clean known part plus
  prior noise elsewhere, a state off the model's distribution at ``T``), and after the predictor
  the known part is noised to the level of ``t_next`` (score_sde uses ``t``).

The replacement methods need an :class:`~diffusion_jax.conditioning.operators.SVDOperator`;
the projection (:func:`~diffusion_jax.conditioning.base.project`) acts on the operator's spectral
coordinates, so a mask gives inpainting and the channel mean colorization. A noisy measurement
is used only in the coordinates where it is less noisy than the state (``alpha sigma_y / s_i
<= sigma(t)``, DDRM's rule), so small singular values (blur) do not amplify the noise.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from diffusion_jax.conditioning.base import SubNoise, marginal_b, project, require_svd, run_between, step_once
from diffusion_jax.samplers.base import FixedGridSampler, Sampler, fixed_info
from diffusion_jax.samplers.grids import KarrasGrid, ScoreSDEGrid
from diffusion_jax.samplers.pc import LangevinCorrector, ReverseDiffusionPredictor
from diffusion_jax.sde import DiscreteChain

Array = jax.Array

__all__ = ["SDEdit", "Replacement", "PCProjection"]


class SDEdit(Sampler):
    """SDEdit: ``x_init`` (the reference) noised to ``t0``, then ``sampler`` from ``t0``.
    ``strength`` in ``(0, 1]``; 1 ignores the reference. NFE as ``sampler``."""

    sampler: Any = None
    strength: float = 0.5

    name: ClassVar[str] = "sdedit"
    stochastic: ClassVar[bool] = True

    def __post_init__(self):
        if not isinstance(self.sampler, FixedGridSampler):
            raise TypeError("SDEdit needs sampler=, a fixed-grid sampler (e.g. get_sampler('dpmpp_2m'))")
        st = self.strength
        if isinstance(st, (int, float)) and not 0.0 < float(st) <= 1.0:
            raise ValueError(f"SDEdit strength must be in (0, 1], got {st}")

    def validate(self, sde):
        super().validate(sde)
        self.sampler.validate(sde)

    def run(self, model, x, noise, *, return_trajectory=False):
        sde = model.sde
        t_min = jnp.asarray(sde.t_min, x.dtype)
        t0 = t_min + jnp.asarray(self.strength, x.dtype) * (jnp.asarray(sde.T, x.dtype) - t_min)
        a, s = marginal_b(sde, t0, x)
        x = a * x + s * noise.normal((1, 0), x.shape, x.dtype)
        return run_between(self.sampler, model, x, t0, t_min, SubNoise(noise, (0,)), denoise=self.sampler.denoise)


class Replacement(FixedGridSampler):
    """RePaint-style replacement around ``sampler`` (stepped one grid step at a time on this
    sampler's ``grid`` with ``num_steps``); ``resample`` = RePaint's U. Starts from the prior with
    the known part noised to ``T``. ``denoise`` ends with the data prediction, its known part set
    to the measurement. NFE = num_steps * resample * (the sampler's NFE per step) (+1)."""

    grid: Any = KarrasGrid()
    operator: Any = None
    y: Any = None
    sampler: Any = None
    resample: int = flax.struct.field(pytree_node=False, default=1)

    name: ClassVar[str] = "replacement"
    stochastic: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        require_svd(self.operator, "replacement")
        if not isinstance(self.sampler, FixedGridSampler):
            raise TypeError("Replacement needs sampler=, a fixed-grid sampler (e.g. get_sampler('ddpm'))")
        if int(self.resample) < 1:
            raise ValueError(f"resample must be >= 1, got {self.resample}")

    def validate(self, sde):
        super().validate(sde)

    def run(self, model, x, noise, *, return_trajectory=False):
        sde = model.sde
        op = self.operator
        ts = self.grid(sde, self.num_steps).astype(x.dtype)

        def proj(x, t, j):
            a, s = marginal_b(sde, t, x)
            return project(op, self.y, x, a, s, noise.normal(j, x.shape, x.dtype))

        x = proj(x, ts[0], (3, 0))

        def body(x, i):
            t, t_next = ts[i], ts[i + 1]

            def round_(carry, u):
                x, _ = carry
                x1, info = step_once(self.sampler, model, x, t, t_next, SubNoise(noise, (0, i, u)))
                x1 = proj(x1, t_next, (1, i, u))
                # Back to t with the forward transition (used unless this was the last round).
                a_t, s_t = marginal_b(sde, t, x1)
                a_s, s_s = marginal_b(sde, t_next, x1)
                ratio = a_t / a_s
                std = jnp.sqrt(jnp.maximum(s_t**2 - (ratio * s_s) ** 2, 0.0))
                x_back = ratio * x1 + std * noise.normal((2, i, u), x.shape, x.dtype)
                return (jnp.where(u < self.resample - 1, x_back, x1), info.nfe), None

            (x, nfe), _ = jax.lax.scan(round_, (x, jnp.zeros((), jnp.int32)), jnp.arange(self.resample))
            return x, (nfe * self.resample, x if return_trajectory else None)

        x, (nfes, traj) = jax.lax.scan(body, x, jnp.arange(self.num_steps))
        nfe = jnp.sum(nfes)
        if self.denoise:
            zero = jnp.zeros((), x.dtype)
            x = project(op, self.y, model.x0(x, ts[-1]), 1.0, zero, jnp.zeros_like(x))
            nfe = nfe + 1
        return x, fixed_info(0, self.num_steps, traj)._replace(nfe=nfe.astype(jnp.int32))


class PCProjection(FixedGridSampler):
    """score_sde's predictor-corrector inpainter / colorizer with a correct start (see the module
    docstring). ``predictor`` and ``corrector`` are the objects of
    :mod:`diffusion_jax.samplers.pc`; defaults as score_sde's VE configs (reverse diffusion +
    Langevin, snr 0.16). ``denoise`` returns the last predictor mean (score_sde's
    noise removal). NFE = num_steps * (predictor + corrector evaluations)."""

    denoise: bool = flax.struct.field(pytree_node=False, default=True)
    num_steps: int = flax.struct.field(pytree_node=False, default=1000)
    grid: Any = ScoreSDEGrid()
    operator: Any = None
    y: Any = None
    predictor: Any = ReverseDiffusionPredictor()
    corrector: Any = LangevinCorrector(snr=0.16)

    name: ClassVar[str] = "pc_projection"
    stochastic: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        require_svd(self.operator, "pc_projection")

    def validate(self, sde):
        super().validate(sde)
        table = sde.N if isinstance(sde, DiscreteChain) else None
        if self.predictor.uses_table and table is not None and int(table) != self.num_steps:
            raise ValueError(
                f"{type(self.predictor).__name__} steps through {type(sde).__name__}'s table of N={table} "
                f"steps; use num_steps={table}, or predictor=EulerMaruyamaPredictor() for other step counts"
            )

    def run(self, model, x, noise, *, return_trajectory=False):
        sde = model.sde
        op = self.operator
        ts = self.grid(sde, self.num_steps).astype(x.dtype)

        def proj(x, x_mean, t, j):
            a, s = marginal_b(sde, t, x)
            z = noise.normal(j, x.shape, x.dtype)
            zero = jnp.zeros_like(s)
            return project(op, self.y, x, a, s, z), project(op, self.y, x_mean, a, zero, z, level=s)

        x, _ = proj(x, x, ts[0], (3, 0))

        def body(carry, i):
            x, _ = carry
            t = jnp.broadcast_to(ts[i], x.shape[:1])
            t_next = jnp.broadcast_to(ts[i + 1], x.shape[:1])
            x, x_mean = self.corrector.update(model, x, t, noise, (0, i))
            x, x_mean = proj(x, x_mean, t, (2, i, 0))
            x, x_mean = self.predictor.update(model, x, t, t_next, noise, (1, i))
            x, x_mean = proj(x, x_mean, t_next, (2, i, 1))
            return (x, x_mean), (x if return_trajectory else None)

        (x, x_mean), traj = jax.lax.scan(body, (x, x), jnp.arange(self.num_steps))
        nfe = self.num_steps * (self.predictor.nfe + self.corrector.nfe)
        return (x_mean if self.denoise else x), fixed_info(nfe, self.num_steps, traj)
