"""Numerical solvers shared by samplers and likelihoods."""

from diffusion_jax.solvers import ode
from diffusion_jax.solvers.ode import (
    SOLVERS,
    Dopri5,
    ODEStats,
    PIController,
    Tsit5,
    get_solver,
    odeint,
    odeint_fixed,
)

__all__ = ["ode", "SOLVERS", "Dopri5", "Tsit5", "ODEStats", "PIController", "get_solver", "odeint", "odeint_fixed"]
