"""Exponential moving averages of the parameters: several constant rates at once, and the
power-function EMA of EDM2 with its post-hoc reconstruction (Karras et al. 2024, "Analyzing
and Improving the Training Dynamics of Diffusion Models", sec. 3 and appendix C).

Power-function EMA. The average at step ``t`` weighs the parameters of step ``tau`` by the
profile ``p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)`` on ``[0, t]`` (EDM2 eq. 3). Its
standard deviation relative to ``t`` is

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))                     (EDM2 eq. 4)

(mean ``t (gamma+1)/(gamma+2)``, second moment ``t^2 (gamma+1)/(gamma+3)``), so one number
describes the length of the average as a fraction of training, whatever its duration. The
update ``ema_t = beta_t ema_{t-1} + (1 - beta_t) theta_t`` with

    beta_t = (1 - 1/t)^(gamma + 1),   t = 1, 2, ...                                  (EDM2 eq. 5)

gives ``theta_tau`` the weight ``(tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1)`` (the
product of the betas telescopes), which is exactly the integral of ``p_t`` over
``[tau - 1, tau]``: the discrete EMA *is* the continuous profile applied to the piecewise-
constant trajectory ``theta(s) = theta_ceil(s)``. The parameters before the first step get
weight 0 (``beta_1 = 0``).

Post-hoc reconstruction (EDM2 appendix C.2). Snapshots ``i`` of power EMAs with exponents
``gamma_i`` taken at steps ``t_i`` are averages with profiles ``p_i = p_{t_i}^{gamma_i}``. The
average with any other profile ``p_r`` is approximated by ``sum_i x_i snapshot_i`` where ``x``
minimises ``|| p_r - sum_i x_i p_i ||^2`` in ``L2([0, inf))``: the normal equations
``A x = b`` with ``A_ij = <p_i, p_j>`` and ``b_i = <p_i, p_r>``. For two power profiles (with
``t_a <= t_b``)

    <p_a, p_b> = int_0^{t_a} (ga+1)(gb+1) s^(ga+gb) / (t_a^(ga+1) t_b^(gb+1)) ds
               = (ga+1)(gb+1) / ((ga+gb+1) t_b) * (t_a / t_b)^gb,

written with the ratio ``t_a / t_b <= 1`` so that large exponents do not overflow. Because the
discrete EMAs equal the continuous profiles on the piecewise-constant trajectory, the error of
a reconstructed parameter is ``int (p_r - sum x_i p_i)(s) theta(s) ds``: zero when
``theta(s)`` lies in the span of the snapshot profiles, and at most
``|| p_r - sum x_i p_i || * || theta ||`` (Cauchy-Schwarz) in general;
:func:`profile_residual` gives the first factor.

Several constant rates. :class:`MultiEma` tracks, besides the run's main EMA
(``model.ema_rate``), one EMA per extra constant rate (with the same optional warm-up) and one
per power profile; its state is an :class:`EmaState` of parameter trees, updated in the
training step by :meth:`MultiEma.update` (an optax-style ``init`` / ``update`` pair).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "SIGMA_REL_MAX",
    "sigma_rel_to_gamma",
    "gamma_to_sigma_rel",
    "power_beta",
    "profile_dot",
    "solve_posthoc_weights",
    "profile_residual",
    "EmaState",
    "MultiEma",
    "constant_decay",
    "ema_step",
]

# sigma_rel of gamma = 0 (a uniform average over all of training). Longer profiles need
# gamma < 0, where sigma_rel(gamma) is no longer one-to-one; EDM2 uses gamma >= 0 as well.
SIGMA_REL_MAX = 12.0**-0.5


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the power profile with exponent ``gamma`` (EDM2 eq. 4)."""
    g = float(gamma)
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent ``gamma >= 0`` whose profile has relative std ``sigma_rel``, in
    ``(0, 12^-1/2]``: the largest real root of ``sigma^2 (g+2)^2 (g+3) = g + 1``, i.e. of
    ``g^3 + 7 g^2 + (16 - 1/sigma^2) g + (12 - 1/sigma^2) = 0``."""
    s = float(sigma_rel)
    if not 0.0 < s <= SIGMA_REL_MAX * (1 + 1e-12):
        raise ValueError(f"sigma_rel = {sigma_rel} is outside (0, {SIGMA_REL_MAX:.4f}] (12^-1/2: gamma = 0)")
    c = 1.0 / (s * s)
    roots = np.roots([1.0, 7.0, 16.0 - c, 12.0 - c])
    gamma = float(max(r.real for r in roots if abs(r.imag) < 1e-9 * max(1.0, abs(r.real))))
    # One Newton step on the relation itself polishes the root to float64 precision.
    f = lambda g: (g + 1.0) - s * s * (g + 2.0) ** 2 * (g + 3.0)  # noqa: E731
    df = lambda g: 1.0 - s * s * (2.0 * (g + 2.0) * (g + 3.0) + (g + 2.0) ** 2)  # noqa: E731
    d = df(gamma)
    if d != 0.0:
        gamma -= f(gamma) / d
    return max(gamma, 0.0)


def power_beta(step: jax.Array, gamma: float) -> jax.Array:
    """``beta_t = (1 - 1/t)^(gamma + 1)`` at step ``t >= 1`` (EDM2 eq. 5); 0 at ``t = 1``. In
    the default float type (float64 under ``jax.enable_x64``, for sharp tests)."""
    t = jnp.maximum(jnp.asarray(step).astype(float), 1.0)
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def constant_decay(step: jax.Array, rate: float, warmup: bool) -> jax.Array:
    """A constant EMA decay; with ``warmup``, ``min(rate, (1 + step) / (10 + step))`` (the decay
    of the main EMA, :func:`diffusion_jax.training.state.ema_decay`)."""
    decay = jnp.asarray(rate, float)  # float32, or float64 under jax.enable_x64
    if not warmup:
        return decay
    step = jnp.asarray(step).astype(decay.dtype)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_step(average: Any, params: Any, decay: jax.Array) -> Any:
    """``decay * average + (1 - decay) * params`` leaf by leaf (in the average's dtype)."""
    return jax.tree_util.tree_map(
        lambda e, p: e * decay.astype(e.dtype) + (1 - decay).astype(e.dtype) * p.astype(e.dtype), average, params
    )


def profile_dot(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """``<p_a, p_b>``, the L2 inner product of power profiles ending at ``t_a`` and ``t_b`` with
    exponents ``gamma_a``, ``gamma_b`` (closed form in the module docstring; broadcasts)."""
    t_a, g_a, t_b, g_b = (np.asarray(v, np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    a_first = t_a <= t_b
    t_max = np.maximum(t_a, t_b)
    ratio = np.minimum(t_a, t_b) / t_max
    exponent = np.where(a_first, g_b, g_a)  # the exponent of the profile that ends later
    return (g_a + 1.0) * (g_b + 1.0) / ((g_a + g_b + 1.0) * t_max) * ratio**exponent


def _gram(t: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    return profile_dot(t[:, None], gamma[:, None], t[None, :], gamma[None, :])


def solve_posthoc_weights(
    snapshot_steps: ArrayLike, snapshot_gammas: ArrayLike, target_step: ArrayLike, target_gamma: ArrayLike
) -> np.ndarray:
    """Weights ``x`` (shape ``[n_snapshots, n_targets]``) with ``sum_i x_i snapshot_i`` the best
    L2 approximation of each target profile (EDM2 appendix C.2), in float64.

    The Gram matrix of many snapshots is ill-conditioned (neighbouring profiles are nearly
    parallel); a least-squares solve through the SVD returns the minimum-norm solution where
    ``A`` is numerically singular instead of amplifying rounding errors."""
    t = np.asarray(snapshot_steps, np.float64).reshape(-1)
    g = np.asarray(snapshot_gammas, np.float64).reshape(-1)
    if t.shape != g.shape:
        raise ValueError(f"{t.size} snapshot steps but {g.size} exponents")
    if t.size == 0:
        raise ValueError("no snapshots to reconstruct from")
    if np.any(t <= 0):
        raise ValueError(f"snapshot steps must be >= 1, got {t.min()}")
    tr, gr = np.broadcast_arrays(np.asarray(target_step, np.float64).reshape(-1), np.asarray(target_gamma, np.float64))
    tr, gr = tr.reshape(-1), np.broadcast_to(gr, tr.shape).reshape(-1)
    a = _gram(t, g)
    b = profile_dot(t[:, None], g[:, None], tr[None, :], gr[None, :])
    x, *_ = np.linalg.lstsq(a, b, rcond=1e-13)
    return x


def profile_residual(
    snapshot_steps: ArrayLike,
    snapshot_gammas: ArrayLike,
    weights: ArrayLike,
    target_step: ArrayLike,
    target_gamma: ArrayLike,
) -> np.ndarray:
    """``|| p_r - sum_i x_i p_i || / || p_r ||`` per target: how far the reconstructed profile
    is from the one asked for (0: exact). With ``|| theta ||`` the L2 norm of a parameter's
    trajectory over ``[0, t]``, ``residual * || p_r || * || theta ||`` bounds the error of the
    reconstructed parameter."""
    t = np.asarray(snapshot_steps, np.float64).reshape(-1)
    g = np.asarray(snapshot_gammas, np.float64).reshape(-1)
    x = np.asarray(weights, np.float64).reshape(t.size, -1)
    tr, gr = np.broadcast_arrays(np.asarray(target_step, np.float64).reshape(-1), np.asarray(target_gamma, np.float64))
    tr, gr = tr.reshape(-1), np.broadcast_to(gr, tr.shape).reshape(-1)
    rr = profile_dot(tr, gr, tr, gr)
    b = profile_dot(t[:, None], g[:, None], tr[None, :], gr[None, :])
    sq = rr - 2.0 * np.sum(x * b, axis=0) + np.einsum("in,ij,jn->n", x, _gram(t, g), x)
    return np.sqrt(np.maximum(sq, 0.0) / rr)


class EmaState(NamedTuple):
    """The averages a :class:`MultiEma` tracks besides the main EMA: one parameter tree per
    constant rate (``rates``) and per power profile (``power``), in the spec's order."""

    rates: tuple[Any, ...]
    power: tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class MultiEma:
    """Extra EMAs of the parameters: constant ``rates`` (decay per step, with the main EMA's
    ``warmup`` rule) and power-function profiles of relative width ``sigma_rels`` (EDM2).

    ``init(params)`` starts every average at the parameters (a power EMA's start value gets
    weight 0 at the first step); ``update(state, params, step)`` advances them with the
    parameters after optimiser step ``step`` (1 for the first update)."""

    rates: tuple[float, ...] = ()
    sigma_rels: tuple[float, ...] = ()
    warmup: bool = False

    def __post_init__(self):
        for r in self.rates:
            if not 0.0 <= r < 1.0:
                raise ValueError(f"EMA rate {r} is outside [0, 1)")
        for s in self.sigma_rels:
            sigma_rel_to_gamma(s)  # raises for values out of range

    @property
    def gammas(self) -> tuple[float, ...]:
        return tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)

    def __bool__(self) -> bool:
        return bool(self.rates or self.sigma_rels)

    def init(self, params: Any) -> EmaState:
        copy = lambda: jax.tree_util.tree_map(jnp.copy, params)  # noqa: E731
        return EmaState(rates=tuple(copy() for _ in self.rates), power=tuple(copy() for _ in self.sigma_rels))

    def update(self, state: EmaState, params: Any, step: jax.Array) -> EmaState:
        """The averages after the update that made ``params``; ``step`` counts that update
        (the constant rates' warm-up reads ``step - 1``, as the main EMA reads the step before)."""
        step = jnp.asarray(step)
        rates = tuple(
            ema_step(avg, params, constant_decay(step - 1, r, self.warmup))
            for avg, r in zip(state.rates, self.rates, strict=True)
        )
        power = tuple(
            ema_step(avg, params, power_beta(step, g)) for avg, g in zip(state.power, self.gammas, strict=True)
        )
        return EmaState(rates=rates, power=power)
