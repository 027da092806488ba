"""Probability-flow ODE sampler with an adaptive Runge-Kutta solver, on device.

Integrates ``dx/dt = f(x, t) - g(t)^2 score(x, t) / 2`` (Song et al. 2021, eq. 13) from ``T`` to
``t_min`` with :func:`diffusion_jax.solvers.ode.odeint` -- the on-device replacement of
score_sde's host-side ``scipy.integrate.solve_ivp(method="RK45")``. Only drift, diffusion and
score are needed, so a general SDE works too (``denoise`` needs closed-form marginals).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from diffusion_jax.samplers.base import Model, NoiseSource, SampleInfo, Sampler, require_marginals
from diffusion_jax.sde import SDE
from diffusion_jax.solvers.ode import ERROR_NORMS, Dopri5, PIController, odeint

Array = jax.Array

__all__ = ["ProbabilityFlowSampler"]


class ProbabilityFlowSampler(Sampler):
    """Adaptive probability-flow ODE sampling.

    Fields:
      solver: ``Dopri5()`` or ``Tsit5()`` (:mod:`diffusion_jax.solvers.ode`).
      rtol, atol: tolerances of the error control.
      error_norm: ``"per_sample"`` (default: each sample has its own step sizes, so a sample's
        result does not depend on the rest of the batch), ``"max"`` or ``"rms"`` (score_sde's
        behaviour: one step size from the RMS over the batch).
      max_steps: bound on accepted + rejected steps; ``info.success`` is False if it is hit.
      controller: the PI step-size controller.
      denoise: finish with one Tweedie denoising step ``D(x, t_min)`` (score_sde's ``denoise``
        for the ODE sampler; +1 NFE).

    ``info.nfe`` counts score evaluations (each on the whole batch), including the two of the
    initial step-size selection.
    """

    solver: Any = Dopri5()
    rtol: float = 1e-5
    atol: float = 1e-5
    error_norm: str = flax.struct.field(pytree_node=False, default="per_sample")
    max_steps: int = flax.struct.field(pytree_node=False, default=4096)
    controller: PIController = PIController()

    name: ClassVar[str] = "ode"
    needs_marginals: ClassVar[bool] = False

    def __post_init__(self):
        if self.error_norm not in ERROR_NORMS:
            raise ValueError(f"unknown error_norm {self.error_norm!r}; valid: {', '.join(ERROR_NORMS)}")
        if int(self.max_steps) < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")

    def validate(self, sde: SDE) -> None:
        if self.denoise:
            require_marginals(sde, "ode with denoise=True")

    def run(self, model: Model, x: Array, noise: NoiseSource, *, return_trajectory: bool = False):
        if return_trajectory:
            raise ValueError(
                "the adaptive ODE sampler has no fixed grid to record a trajectory on; use return_trajectory=False"
            )
        sde = model.sde
        flow = sde.probability_flow(model.score)

        def vector_field(y, t):
            return flow(y, jnp.broadcast_to(t, y.shape[:1]))

        x, stats = odeint(
            vector_field,
            x,
            jnp.asarray(sde.T, x.dtype),
            jnp.asarray(sde.t_min, x.dtype),
            solver=self.solver,
            rtol=self.rtol,
            atol=self.atol,
            max_steps=self.max_steps,
            controller=self.controller,
            error_norm=self.error_norm,
        )
        nfe = stats.nfe
        if self.denoise:
            x = model.x0(x, sde.t_min)
            nfe = nfe + 1
        return x, SampleInfo(
            nfe=nfe, num_steps=stats.num_steps, num_rejected=stats.num_rejected, success=stats.success, trajectory=None
        )
