"""Few-step samplers for the linear family ``x_t = alpha(t) x_0 + sigma(t) eps``.

Every sampler here talks to the SDE only through ``marginal(t)``, ``log_snr(t)`` and
``t_from_log_snr``, and to the model only through the data prediction ``D(x, t)`` (x0) or the
noise prediction ``eps(x, t)`` (:class:`~diffusion_jax.samplers.base.Model`), so one
implementation serves VE, VP, sub-VP, EDM, cosine and rectified flow. Two equivalent views of the
probability-flow ODE are used:

* **scaled form** (Karras et al. 2022, Sec. 3 and eq. 4): with ``x~ = x / alpha`` and
  ``sigma~ = sigma / alpha``, ``dx~ / dsigma~ = eps(x, t)`` (= ``(x~ - D) / sigma~``). Euler, Heun,
  PLMS and iPNDM step in this form; the DDIM step is its Euler step.
* **exponential-integrator form** (Lu et al. 2022a/b, eq. 3.4 / 4.3): with the half log-SNR
  ``lambda = log(alpha / sigma)`` and ``h = lambda_s - lambda_t``,
  ``x_s = (sigma_s / sigma_t) x_t + alpha_s int_0^h e^{u-h} D(lambda_t + u) du``. DPM-Solver++ and
  UniPC approximate ``D`` by polynomials in lambda and integrate them exactly, with
  ``I_n(h) = int_0^h e^{u-h} u^n du`` evaluated without cancellation (:func:`_phi`).

Grids come from :mod:`diffusion_jax.samplers.grids`; steps go from ``T`` to ``t_min`` and
``denoise=True`` adds one final evaluation returning ``D(x, t_min)`` (the step to sigma = 0 of
EDM / k-diffusion). ``thresholding`` (``StaticClip`` / ``DynamicThreshold``) clips every data
prediction the sampler uses.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers.base import FixedGridSampler, Model, NoiseSource, fixed_info
from diffusion_jax.samplers.grids import LogSNRGrid
from diffusion_jax.sde import SDE

Array = jax.Array

__all__ = [
    "DDIM",
    "Euler",
    "EDMSampler",
    "PLMS",
    "IPNDM",
    "DPMSolverPP",
    "SDEDPMSolverPP",
    "FastSampler",
    "UniPC",
    "ADAMS_BASHFORTH",
]

# Adams-Bashforth weights on (f_n, f_{n-1}, f_{n-2}, f_{n-3}) for uniform steps (Hairer, Norsett &
# Wanner, Sec. III.1, Table 1.1); used by PLMS and iPNDM.
ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _check_steps(name: str, num_steps: int, minimum: int = 1, why: str = "") -> None:
    if int(num_steps) < minimum:
        extra = f" ({why})" if why else ""
        raise ValueError(f"{name}: num_steps={num_steps} is too small; need >= {minimum}{extra}")


class GridPoint(NamedTuple):
    """One grid point: time, alpha, sigma, half log-SNR lambda = log(alpha / sigma), sigma~ = sigma / alpha."""

    t: Array
    alpha: Array
    sigma: Array
    lam: Array
    sigma_tilde: Array


class _GridCoefs:
    """Per grid point: t, alpha, sigma, half log-SNR lambda = log(alpha / sigma), sigma~."""

    def __init__(self, sde: SDE, ts: Array, dtype):
        ts = ts.astype(dtype)
        a, s = sde.marginal(ts)
        self.t = ts
        self.alpha = a.astype(dtype)
        self.sigma = s.astype(dtype)
        self.lam = (0.5 * sde.log_snr(ts)).astype(dtype)
        self.sigma_tilde = self.sigma / self.alpha

    def at(self, i) -> GridPoint:
        return GridPoint(self.t[i], self.alpha[i], self.sigma[i], self.lam[i], self.sigma_tilde[i])


def _phi(n_max: int, h: Array) -> list[Array]:
    """``psi_n(h) = I_n(h) / (n! h^(n+1)) = int_0^1 e^{-h (1-v)} v^n / n! dv`` for n = 0..n_max.

    For |h| >= 1/2 the recursion ``psi_n = (1/n! - psi_{n-1}) / h`` (from integrating by parts,
    ``I_n = h^n - n I_{n-1}``) is accurate; for small h it cancels catastrophically, so there the
    series ``psi_n = sum_j (-h)^j / (n + j + 1)!`` is used (24 terms: error < 0.5^24 / 24!).
    """
    small = jnp.abs(h) < 0.5
    hl = jnp.where(small, 1.0, h)
    hs = jnp.where(small, h, 0.0)
    rec = [-jnp.expm1(-hl) / hl]
    for n in range(1, n_max + 1):
        rec.append((1.0 / math.factorial(n) - rec[-1]) / hl)
    out = []
    for n in range(n_max + 1):
        ser = jnp.zeros_like(hs)
        for j in reversed(range(24)):  # Horner form of sum_j (-h)^j / (n+j+1)!
            ser = ser * (-hs) + 1.0 / math.factorial(n + j + 1)
        out.append(jnp.where(small, ser, rec[n]))
    return out


def _integrals(n_max: int, h: Array) -> list[Array]:
    """``I_n(h) = int_0^h e^{u-h} u^n du = n! h^(n+1) psi_n(h)``, n = 0..n_max."""
    psi = _phi(n_max, h)
    return [math.factorial(n) * h ** (n + 1) * psi[n] for n in range(n_max + 1)]


def _scaled_transfer(x, eps, a_t, st_t, a_s, st_s):
    """One Euler step of ``dx~/dsigma~ = eps`` from (t) to (s) in the scaled variables, returned
    unscaled: ``x_s = alpha_s (x_t / alpha_t + (sigma~_s - sigma~_t) eps)``. This is the DDIM step
    (Song et al. 2021a, eq. 13) and PNDM's transfer function phi (Liu et al. 2022, eq. 11)."""
    return a_s * (x / a_t + (st_s - st_t) * eps)


def _scan(body, carry, xs, return_trajectory: bool, get_x):
    def wrapped(c, inp):
        c = body(c, inp)
        return c, (get_x(c) if return_trajectory else None)

    return jax.lax.scan(wrapped, carry, xs)


def _finish(model: Model, x, coefs: _GridCoefs, denoise: bool, nfe: int, num_steps: int, traj):
    if denoise:
        x = model.x0(x, coefs.t[-1])
        nfe += 1
    return x, fixed_info(nfe, num_steps, traj)


def _concat_traj(first, rest):
    if first is None:
        return None
    return jnp.concatenate([first[None], rest], axis=0)


class FastSampler(FixedGridSampler):
    """Base of the few-step samplers of this module: a fixed grid (EDM's by default), closed-form
    marginals, and ``thresholding`` (a :class:`~diffusion_jax.samplers.base.StaticClip` /
    :class:`~diffusion_jax.samplers.base.DynamicThreshold` or None) applied to every data
    prediction. ``denoise=True`` adds one final evaluation returning ``D(x, t_min)``."""

    thresholding: Any = None

    def prediction_transform(self):
        return self.thresholding


# --------------------------------------------------------------------------------------------
# DDIM / DDPM
# --------------------------------------------------------------------------------------------


class DDIM(FastSampler):
    """DDIM (Song et al. 2021a, eq. 12) with stochasticity eta; ``eta = 1`` is DDPM ancestral
    sampling (the posterior q(x_s | x_t, x0) of Ho et al. 2020, eq. 6-7).

    ``x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z`` with
    ``c = eta sigma_s sqrt(1 - e^{-2h})``, ``h = lambda_s - lambda_t`` -- eq. 16 written for any
    linear SDE (for VP, ``sigma_s^2 (1 - e^{-2h}) = (1-abar_s)/(1-abar_t) (1 - abar_t/abar_s)``).
    With ``eta = 0`` this is the Euler step of the scaled probability-flow ODE.
    The default grid is EDM's (good for every SDE of the family); ``grid=UniformGrid()`` gives the
    DDIM paper's uniform spacing of VP time. NFE = num_steps (+1 with denoise).
    """

    eta: float = 0.0

    name: ClassVar[str] = "ddim"

    def is_stochastic(self) -> bool:
        return float(self.eta) != 0.0

    def run(self, model: Model, x, noise: NoiseSource, *, return_trajectory=False):
        c = _GridCoefs(model.sde, self.grid(model.sde, self.num_steps), x.dtype)

        def body(x, i):
            t, a_t, s_t, l_t, _ = c.at(i)
            _, a_s, s_s, l_s, _ = c.at(i + 1)
            raw = model.x0_eps(x, t)
            x0, eps = raw
            frac = -jnp.expm1(-2.0 * (l_s - l_t))  # 1 - e^{-2h}
            std = self.eta * s_s * jnp.sqrt(frac)
            dir_scale = s_s * jnp.sqrt(jnp.maximum(1.0 - self.eta**2 * frac, 0.0))
            z = noise.normal((0, i), x.shape, x.dtype)
            return a_s * x0 + dir_scale * eps + std * z

        x, traj = _scan(body, x, jnp.arange(self.num_steps), return_trajectory, lambda v: v)
        return _finish(model, x, c, self.denoise, self.num_steps, self.num_steps, traj)


# --------------------------------------------------------------------------------------------
# Karras-style samplers in the scaled form
# --------------------------------------------------------------------------------------------


class Euler(FastSampler):
    """Euler's method on ``dx~/dsigma~ = (x~ - D) / sigma~`` (Karras et al. 2022, eq. 4; the
    k-diffusion ``sample_euler``). NFE = num_steps (+1 with denoise)."""

    name: ClassVar[str] = "euler"

    def run(self, model: Model, x, noise: NoiseSource, *, return_trajectory=False):
        c = _GridCoefs(model.sde, self.grid(model.sde, self.num_steps), x.dtype)

        def body(x, i):
            t, a_t, _, _, st_t = c.at(i)
            _, a_s, _, _, st_s = c.at(i + 1)
            return _scaled_transfer(x, model.eps(x, t), a_t, st_t, a_s, st_s)

        x, traj = _scan(body, x, jnp.arange(self.num_steps), return_trajectory, lambda v: v)
        return _finish(model, x, c, self.denoise, self.num_steps, self.num_steps, traj)


class EDMSampler(FastSampler):
    """EDM's sampler (Karras et al. 2022, Algorithm 2; Algorithm 1 when ``s_churn = 0``): Heun's
    2nd-order method on the scaled ODE, with optional stochastic churn.

    At each step with ``s_tmin <= sigma~_i <= s_tmax``, noise is added to raise the level to
    ``sigma^ = (1 + gamma) sigma~_i``, ``gamma = min(s_churn / N, sqrt(2) - 1)``, with std
    ``s_noise sqrt(sigma^2 - sigma~_i^2)``; the time of ``sigma^`` is ``t_from_log_snr(-2 log sigma^)``.
    Then an Euler step to ``sigma~_{i+1}`` and the trapezoidal correction (Algorithm 2, lines
    5-8). The grid ends at t_min > 0, so every step has the correction: NFE = 2 num_steps
    (+1 with denoise).
    """

    num_steps: int = flax.struct.field(pytree_node=False, default=18)
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0

    name: ClassVar[str] = "heun"

    def is_stochastic(self) -> bool:
        return float(self.s_churn) > 0.0

    def run(self, model: Model, x, noise: NoiseSource, *, return_trajectory=False):
        sde = model.sde
        c = _GridCoefs(sde, self.grid(sde, self.num_steps), x.dtype)
        n = self.num_steps

        def body(x, i):
            t, a_t, _, _, st_t = c.at(i)
            t_s, a_s, _, _, st_s = c.at(i + 1)
            # Algorithm 2, lines 4-6: churn.
            in_range = (st_t >= self.s_tmin) & (st_t <= self.s_tmax)
            gamma = jnp.where(in_range, jnp.minimum(self.s_churn / n, math.sqrt(2.0) - 1.0), 0.0)
            gamma = gamma.astype(x.dtype)
            st_hat = st_t * (1.0 + gamma)
            churned = gamma > 0
            t_hat = jnp.where(churned, sde.t_from_log_snr(-2.0 * jnp.log(st_hat)).astype(x.dtype), t)
            a_hat = jnp.where(churned, sde.marginal(t_hat)[0].astype(x.dtype), a_t)
            z = noise.normal((0, i), x.shape, x.dtype)
            # sqrt(sigma^2 - sigma~_i^2) written as sigma~_i sqrt(gamma (2 + gamma)): exactly 0 when
            # gamma = 0 (the difference of squares can leave an FMA residual whose square root
            # is ~1e-3 relative in float32).
            xt_hat = x / a_t + self.s_noise * st_t * jnp.sqrt(gamma * (2.0 + gamma)) * z
            x_hat = a_hat * xt_hat
            # Lines 7-8: Euler step; lines 9-11: second-order correction.
            d = model.eps(x_hat, t_hat)
            x_e = _scaled_transfer(x_hat, d, a_hat, st_hat, a_s, st_s)
            d2 = model.eps(x_e, t_s)
            return _scaled_transfer(x_hat, 0.5 * (d + d2), a_hat, st_hat, a_s, st_s)

        x, traj = _scan(body, x, jnp.arange(n), return_trajectory, lambda v: v)
        return _finish(model, x, c, self.denoise, 2 * n, n, traj)


def _ab_table(num_steps: int, order: int, first: int = 0) -> np.ndarray:
    """Adams-Bashforth weights per step, zero-padded to ``(num_steps, 4)``; step i uses order
    ``min(order, i + 1 + first)`` (lower orders while the history fills)."""
    table = np.zeros((num_steps, 4))
    for i in range(num_steps):
        k = min(order, i + 1 + first)
        table[i, :k] = ADAMS_BASHFORTH[k]
    return table


def _ab_combine(weights, e, hist):
    """``w_0 e + sum_j w_{j+1} hist[j]`` with hist the previous eps, most recent first."""
    out = weights[0] * e
    for j in range(hist.shape[0]):
        out = out + weights[j + 1] * hist[j]
    return out


# Two-point Gauss-Legendre rule on [0, 1]: exact for the cubic interpolants of AB4.
_GL_NODES = (0.5 - 0.5 / math.sqrt(3.0), 0.5 + 0.5 / math.sqrt(3.0))


def _variable_ab_weights(order: Array, nodes: Array, target: Array) -> Array:
    """Variable-step Adams-Bashforth weights (Hairer, Norsett & Wanner III.5): the average over
    ``[nodes[0], target]`` of the Lagrange basis through the first ``order`` nodes (most recent
    first), so that ``sum_j w_j f(nodes[j])`` integrates the interpolant of f exactly. Shape (4,);
    unused entries are 0. With equal spacing these are the fixed weights of
    :data:`ADAMS_BASHFORTH`."""
    m = nodes.shape[0]
    active = jnp.arange(m) < order
    w = []
    for j in range(m):
        total: Any = 0.0
        for u in _GL_NODES:
            s = nodes[0] + (target - nodes[0]) * u
            basis: Any = 1.0
            for k in range(m):
                if k == j:
                    continue
                term = (s - nodes[k]) / jnp.where(active[k], nodes[j] - nodes[k], 1.0)
                basis = basis * jnp.where(active[k], term, 1.0)
            total = total + 0.5 * basis
        w.append(jnp.where(active[j], total, 0.0))
    return jnp.stack(w)


def _ab_step(x, e, hist, st_hist, w_fixed, order, a_t, st_t, a_s, st_s, variable_step):
    """One (pseudo) linear multistep step in the scaled form: ``eps' = sum_j w_j eps_{i-j}``,
    then the DDIM transfer with ``eps'``."""
    if variable_step:
        nodes = jnp.concatenate([st_t[None], st_hist])
        w = _variable_ab_weights(order, nodes, st_s)
    else:
        w = w_fixed
    return _scaled_transfer(x, _ab_combine(w, e, hist), a_t, st_t, a_s, st_s)


class IPNDM(FastSampler):
    """Improved PNDM (Zhang & Chen 2022, "Fast sampling of diffusion models with exponential
    integrator" (DEIS), Sec. 5 / App.): explicit Adams-Bashforth on the scaled ODE
    ``dx~/dsigma~ = eps``, starting with lower-order multistep steps (Euler, AB2, AB3) instead of
    PNDM's Runge-Kutta warm-up.

    ``variable_step=False`` uses the fixed weights of uniform steps, as published (on a
    non-uniform grid such as Karras' these are consistent only to second order);
    ``variable_step=True`` recomputes the weights from the actual sigma~ steps (the variable-step
    iPNDM of Zhou et al. 2024, "Fast ODE-based sampling for diffusion models in around 5 steps").
    NFE = num_steps (+1 with denoise).
    """

    num_steps: int = flax.struct.field(pytree_node=False, default=10)
    order: int = flax.struct.field(pytree_node=False, default=4)
    variable_step: bool = flax.struct.field(pytree_node=False, default=False)

    name: ClassVar[str] = "ipndm"

    def __post_init__(self):
        if int(self.order) not in ADAMS_BASHFORTH:
            raise ValueError(f"ipndm: order must be 1, 2, 3 or 4, got {self.order}")
        _check_steps(
            self.name,
            self.num_steps,
            self.order,
            f"a multistep method of order {self.order} needs at least that many steps",
        )

    def run(self, model: Model, x, noise: NoiseSource, *, return_trajectory=False):
        c = _GridCoefs(model.sde, self.grid(model.sde, self.num_steps), x.dtype)
        weights = jnp.asarray(_ab_table(self.num_steps, self.order), x.dtype)
        orders = jnp.asarray([min(self.order, i + 1) for i in range(self.num_steps)])

        def body(carry, inp):
            x, hist, st_hist = carry
            i, w, order = inp
            t, a_t, _, _, st_t = c.at(i)
            _, a_s, _, _, st_s = c.at(i + 1)
            e = model.eps(x, t)
            x = _ab_step(x, e, hist, st_hist, w, order, a_t, st_t, a_s, st_s, self.variable_step)
            hist = jnp.concatenate([e[None], hist[:-1]], axis=0)
            st_hist = jnp.concatenate([st_t[None], st_hist[:-1]])
            return x, hist, st_hist

        st0 = c.sigma_tilde[0]
        carry0 = (x, jnp.zeros((3,) + x.shape, x.dtype), st0 * (2.0 + jnp.arange(3, dtype=x.dtype)))
        (x, *_), traj = _scan(
            body, carry0, (jnp.arange(self.num_steps), weights, orders), return_trajectory, lambda cr: cr[0]
        )
        return _finish(model, x, c, self.denoise, self.num_steps, self.num_steps, traj)


class PLMS(FastSampler):
    """Pseudo linear multistep (PNDM; Liu et al. 2022, eq. 12): 4th-order Adams-Bashforth weights
    on the noise predictions with DDIM's transfer function. The first step is the pseudo improved
    Euler step (a Heun step in the scaled form, 2 evaluations); steps 2 and 3 use AB2 / AB3 while
    the history fills (the widely used "PLMS" variant of the latent-diffusion code, rather than
    PNDM's 3 pseudo Runge-Kutta steps of 4 evaluations). ``variable_step`` as for :class:`IPNDM`.
    NFE = num_steps + 1 (+1 with denoise).
    """

    variable_step: bool = flax.struct.field(pytree_node=False, default=False)

    name: ClassVar[str] = "plms"

    def __post_init__(self):
        _check_steps(self.name, self.num_steps, 4, "PLMS is a 4-step method")

    def run(self, model: Model, x, noise: NoiseSource, *, return_trajectory=False):
        c = _GridCoefs(model.sde, self.grid(model.sde, self.num_steps), x.dtype)
        t, a_t, _, _, st_t = c.at(0)
        t1, a_1, _, _, st_1 = c.at(1)
        # Step 1: pseudo improved Euler (Liu et al. 2022, eq. 13 with the two-stage average).
        e0 = model.eps(x, t)
        e1 = model.eps(_scaled_transfer(x, e0, a_t, st_t, a_1, st_1), t1)
        x = _scaled_transfer(x, 0.5 * (e0 + e1), a_t, st_t, a_1, st_1)
        x_first = x
        weights = jnp.asarray(_ab_table(self.num_steps - 1, 4, first=1), x.dtype)
        orders = jnp.asarray([min(4, i + 2) for i in range(self.num_steps - 1)])

        def body(carry, inp):
            x, hist, st_hist = carry
            i, w, order = inp
            t, a_t, _, _, st_t = c.at(i)
            _, a_s, _, _, st_s = c.at(i + 1)
            e = model.eps(x, t)
            x = _ab_step(x, e, hist, st_hist, w, order, a_t, st_t, a_s, st_s, self.variable_step)
            return (x, jnp.concatenate([e[None], hist[:-1]], axis=0), jnp.concatenate([st_t[None], st_hist[:-1]]))

        hist0 = jnp.concatenate([e0[None], jnp.zeros((2,) + x.shape, x.dtype)], axis=0)
        st_hist0 = jnp.stack([st_t, 2.0 * st_t, 3.0 * st_t])
        (x, *_), traj = _scan(
            body,
            (x, hist0, st_hist0),
            (jnp.arange(1, self.num_steps), weights, orders),
            return_trajectory,
            lambda cr: cr[0],
        )
        traj = _concat_traj(x_first if return_trajectory else None, traj)
        return _finish(model, x, c, self.denoise, self.num_steps + 1, self.num_steps, traj)


# --------------------------------------------------------------------------------------------
# Exponential integrators in the half log-SNR: DPM-Solver++, SDE-DPM-Solver++, UniPC
# --------------------------------------------------------------------------------------------


def _order_schedule(num_steps: int, order: int, lower_order_final: bool) -> np.ndarray:
    """Order of each step of a multistep method: ``min(order, i + 1)`` while the history fills
    and, with ``lower_order_final`` and fewer than 10 steps (DPM-Solver's rule, Lu et al. 2022b,
    Sec. 5 / official code), ``min(order, num_steps - i)`` at the end for stability."""
    orders = np.array([min(order, i + 1) for i in range(num_steps)])
    if lower_order_final and num_steps < 10:
        orders = np.minimum(orders, num_steps - np.arange(num_steps))
    return orders.astype(np.int32)


class DPMSolverPP(FastSampler):
    """DPM-Solver++ (Lu et al. 2022b, "DPM-Solver++: fast solver for guided sampling"), the
    data-prediction exponential integrator.

    * ``method="multistep"``, ``order=2`` -- DPM-Solver++(2M), Algorithm 2:
      ``x_s = (sigma_s/sigma_t) x_t + alpha_s (1 - e^{-h}) [(1 + 1/(2r)) D_t - 1/(2r) D_prev]``,
      ``r = h_prev / h``.
    * ``method="multistep"``, ``order=3`` -- DPM-Solver++(3M): the quadratic (Newton) interpolant
      of the last three data predictions in lambda, integrated exactly:
      ``x_s = (sigma_s/sigma_t) x_t + alpha_s [I_0 D_0 + I_1 D[0,1] + (I_2 + h_0 I_1) D[0,1,2]]``
      with divided differences ``D[...]`` in lambda and ``h_0 = lambda_t - lambda_prev``.
      Its first two steps are DDIM and 2M steps.
    * ``method="singlestep"``, ``order=2`` -- DPM-Solver++(2S), Algorithm 1 with r = 1/2: an
      intermediate point at the lambda midpoint (2 evaluations a step).

    The default grid is uniform in log-SNR, the setting of the paper's convergence theory.
    NFE: multistep num_steps, singlestep 2 num_steps (+1 with denoise).
    """

    num_steps: int = flax.struct.field(pytree_node=False, default=20)
    order: int = flax.struct.field(pytree_node=False, default=2)
    method: str = flax.struct.field(pytree_node=False, default="multistep")
    grid: Any = LogSNRGrid()
    lower_order_final: bool = flax.struct.field(pytree_node=False, default=True)

    name: ClassVar[str] = "dpm_solver++"

    def __post_init__(self):
        if self.method not in ("multistep", "singlestep"):
            raise ValueError(f"DPMSolverPP.method must be 'multistep' or 'singlestep', got {self.method!r}")
        if self.method == "multistep" and int(self.order) not in (1, 2, 3):
            raise ValueError(f"multistep DPM-Solver++ supports order 1, 2 or 3, got {self.order}")
        if self.method == "singlestep" and int(self.order) != 2:
            raise ValueError(f"singlestep DPM-Solver++ is implemented for order 2 (2S), got {self.order}")
        minimum = int(self.order) if self.method == "multistep" else 1
        _check_steps(
            f"DPM-Solver++({self.order}{self.method[0].upper()})",
            self.num_steps,
            minimum,
            f"a multistep method of order {self.order} needs at least {self.order} steps",
        )

    def run(self, model: Model, x, noise: NoiseSource, *, return_trajectory=False):
        if self.method == "singlestep":
            return self._run_2s(model, x, return_trajectory)
        c = _GridCoefs(model.sde, self.grid(model.sde, self.num_steps), x.dtype)
        orders = jnp.asarray(_order_schedule(self.num_steps, self.order, self.lower_order_final))

        def body(carry, inp):
            x, d_hist, l_hist = carry
            i, order = inp
            t, a_t, s_t, l_t, _ = c.at(i)
            _, a_s, s_s, l_s, _ = c.at(i + 1)
            d0 = model.x0(x, t)
            h = l_s - l_t
            i0, i1, i2 = _integrals(2, h)
            base = (s_s / s_t) * x + a_s * i0 * d0
            # 2M (Algorithm 2): D' - D_0 = (D_0 - D_1) / (2 r), r = h_0 / h.
            h0 = l_t - l_hist[0]
            corr2 = a_s * i0 * (h / (2.0 * h0)) * (d0 - d_hist[0])
            # 3M: exact integral of the Newton interpolant through (lambda_t, lambda_1, lambda_2).
            h1 = l_hist[0] - l_hist[1]
            dd01 = (d0 - d_hist[0]) / h0
            dd12 = (d_hist[0] - d_hist[1]) / h1
            dd012 = (dd01 - dd12) / (h0 + h1)
            corr3 = a_s * (i1 * dd01 + (i2 + h0 * i1) * dd012)
            x_new = jnp.where(order >= 3, base + corr3, jnp.where(order == 2, base + corr2, base))
            d_hist = jnp.stack([d0, d_hist[0]])
            l_hist = jnp.stack([l_t, l_hist[0]])
            return x_new, d_hist, l_hist

        # Placeholder history (never selected before it is filled); distinct lambdas keep the
        # divided differences finite.
        l0 = c.lam[0]
        carry0 = (x, jnp.zeros((2,) + x.shape, x.dtype), jnp.stack([l0 - 1.0, l0 - 2.0]))
        (x, _, _), traj = _scan(body, carry0, (jnp.arange(self.num_steps), orders), return_trajectory, lambda cr: cr[0])
        return _finish(model, x, c, self.denoise, self.num_steps, self.num_steps, traj)

    def _run_2s(self, model: Model, x, return_trajectory):
        sde = model.sde
        c = _GridCoefs(sde, self.grid(sde, self.num_steps), x.dtype)

        def body(x, i):
            t, a_t, s_t, l_t, _ = c.at(i)
            _, a_s, s_s, l_s, _ = c.at(i + 1)
            h = l_s - l_t
            # Intermediate time at lambda_t + h / 2 (the log-SNR is 2 lambda).
            t_m = sde.t_from_log_snr(2.0 * (l_t + 0.5 * h)).astype(x.dtype)
            a_m, s_m = (v.astype(x.dtype) for v in sde.marginal(t_m))
            d0 = model.x0(x, t)
            u = (s_m / s_t) * x - a_m * jnp.expm1(-0.5 * h) * d0
            d_m = model.x0(u, t_m)
            return (s_s / s_t) * x - a_s * jnp.expm1(-h) * d_m

        x, traj = _scan(body, x, jnp.arange(self.num_steps), return_trajectory, lambda v: v)
        return _finish(model, x, c, self.denoise, 2 * self.num_steps, self.num_steps, traj)


class SDEDPMSolverPP(FastSampler):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, Sec. 5 / App.), generalised with ``eta`` (the
    fraction of the reverse SDE's noise; ``eta = 0`` is the ODE solver, ``eta = 1`` the paper's):
    with ``k = 1 + eta``, the exact solution of the linear part gives

    ``x_s = (sigma_s / sigma_t) e^{-eta h} x_t + alpha_s (1 - e^{-k h}) D_t + [2nd order]
    + sigma_s sqrt(1 - e^{-2 eta h}) z``,

    with the second-order term ``alpha_s (1 - e^{-k h}) / 2 (D_t - D_prev) / r`` (``"midpoint"``,
    the paper's) or the exact integral of the linear interpolant
    ``alpha_s (h - (1 - e^{-k h}) / k) (D_t - D_prev) / h_prev`` (``"heun"``). NFE = num_steps.
    """

    num_steps: int = flax.struct.field(pytree_node=False, default=20)
    eta: float = 1.0
    solver_type: str = flax.struct.field(pytree_node=False, default="midpoint")
    grid: Any = LogSNRGrid()
    lower_order_final: bool = flax.struct.field(pytree_node=False, default=True)

    name: ClassVar[str] = "sde_dpmpp_2m"

    def is_stochastic(self) -> bool:
        return float(self.eta) != 0.0

    def __post_init__(self):
        if self.solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {self.solver_type!r}")
        _check_steps(self.name, self.num_steps, 2, "a 2-step multistep method")

    def run(self, model: Model, x, noise: NoiseSource, *, return_trajectory=False):
        c = _GridCoefs(model.sde, self.grid(model.sde, self.num_steps), x.dtype)
        orders = jnp.asarray(_order_schedule(self.num_steps, 2, self.lower_order_final))

        def body(carry, inp):
            x, d_prev, l_prev = carry
            i, order = inp
            t, a_t, s_t, l_t, _ = c.at(i)
            _, a_s, s_s, l_s, _ = c.at(i + 1)
            d0 = model.x0(x, t)
            h = l_s - l_t
            kh = (1.0 + self.eta) * h
            one_m = -jnp.expm1(-kh)  # 1 - e^{-k h}
            x_new = (s_s / s_t) * jnp.exp(-self.eta * h) * x + a_s * one_m * d0
            h_prev = l_t - l_prev
            if self.solver_type == "midpoint":
                second = a_s * 0.5 * one_m * (h / h_prev) * (d0 - d_prev)
            else:
                # h - (1 - e^{-kh}) / k = h (1 - psi_0(kh)), psi_0 = (1 - e^{-kh}) / (kh).
                second = a_s * h * (1.0 - _phi(0, kh)[0]) * (d0 - d_prev) / h_prev
            x_new = jnp.where(order >= 2, x_new + second, x_new)
            z = noise.normal((0, i), x.shape, x.dtype)
            x_new = x_new + s_s * jnp.sqrt(-jnp.expm1(-2.0 * self.eta * h)) * z
            return x_new, d0, l_t

        carry0 = (x, jnp.zeros_like(x), c.lam[0] - 1.0)
        (x, _, _), traj = _scan(body, carry0, (jnp.arange(self.num_steps), orders), return_trajectory, lambda cr: cr[0])
        return _finish(model, x, c, self.denoise, self.num_steps, self.num_steps, traj)


def _unipc_rho(r: Array, q: Array, h: Array, variant: str) -> tuple[Array, Array]:
    """Coefficients ``rho`` of UniPC (Zhao et al. 2023, Theorem 3.1 / eq. 8) for the points with
    ratios ``r`` (shape (m,), ``r_k = (lambda_k - lambda_s) / h``), of which the first ``q`` are
    used, and ``B(h)`` (``h`` for bh1, ``1 - e^{-h}`` for bh2).

    With ``q >= 2`` they solve ``sum_k rho_k r_k^(n-1) = I_n(h) / (h^n B(h))`` for n = 1..q, so
    that ``B(h) sum_k rho_k (D_k - D_s) / r_k`` integrates ``e^{u-h} (D - D_s)`` exactly for
    polynomials of degree q (B then cancels). With a single point the condition only needs to
    hold to O(h), and UniPC takes ``rho = 1/2``; this is where bh1 and bh2 differ (with bh2 the
    UniP-2 predictor is DPM-Solver++(2M)). Unused points get rho = 0."""
    m = r.shape[0]
    psi = _phi(m, h)
    big_b = h if variant == "bh1" else h * psi[0]
    rhs = jnp.stack([math.factorial(n) * h * psi[n] / big_b for n in range(1, m + 1)])
    n_idx = jnp.arange(m)[:, None]
    k_idx = jnp.arange(m)[None, :]
    active = (n_idx < q) & (k_idx < q)
    mat = jnp.where(active, r[None, :] ** n_idx, (n_idx == k_idx).astype(r.dtype))
    rhs = jnp.where(jnp.arange(m) < q, rhs, 0.0)
    rho = jnp.linalg.solve(mat, rhs)
    half = jnp.where(jnp.arange(m) == 0, 0.5, 0.0).astype(rho.dtype)
    return jnp.where(q == 1, half, rho), big_b


class UniPC(FastSampler):
    """UniPC (Zhao et al. 2023, "UniPC: a unified predictor-corrector framework"), data
    prediction, with the multistep predictor UniP-p and the corrector UniC-p (Algorithms 2-3).

    Step i from lambda_i to lambda_{i+1}: evaluate ``D_i = D(x_i, t_i)`` at the predicted point;
    correct ``x_i`` with UniC (the previous points plus ``D_i``; order of accuracy p + 1); predict
    ``x_{i+1}`` with UniP from ``D_i`` and the previous p - 1 points. The corrector reuses the
    evaluation the next predictor needs, so NFE = num_steps (+1 with denoise); the last
    prediction is not corrected. ``order`` p in 1..3; ``variant`` bh1 / bh2 chooses B(h).
    See :func:`_unipc_rho` for the coefficients.
    """

    num_steps: int = flax.struct.field(pytree_node=False, default=20)
    order: int = flax.struct.field(pytree_node=False, default=2)
    variant: str = flax.struct.field(pytree_node=False, default="bh2")
    grid: Any = LogSNRGrid()
    lower_order_final: bool = flax.struct.field(pytree_node=False, default=True)
    use_corrector: bool = flax.struct.field(pytree_node=False, default=True)

    name: ClassVar[str] = "unipc"

    def __post_init__(self):
        if int(self.order) not in (1, 2, 3):
            raise ValueError(f"UniPC order must be 1, 2 or 3, got {self.order}")
        if self.variant not in ("bh1", "bh2"):
            raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {self.variant!r}")
        _check_steps(
            self.name,
            self.num_steps,
            int(self.order),
            f"a multistep method of order {self.order} needs at least {self.order} steps",
        )

    def run(self, model: Model, x, noise: NoiseSource, *, return_trajectory=False):
        c = _GridCoefs(model.sde, self.grid(model.sde, self.num_steps), x.dtype)
        p = int(self.order)
        orders = jnp.asarray(_order_schedule(self.num_steps, p, self.lower_order_final))

        def update(x_s, d_s, l_s, s_s, a_t, s_t, l_t, pts_d, pts_l, q):
            """``(sigma_t/sigma_s) x_s + alpha_t [I_0 D_s + B sum_k rho_k (D_k - D_s) / r_k]`` over
            the first q points (pts_d: (m, ...), pts_l: (m,))."""
            h = l_t - l_s
            i0 = _integrals(0, h)[0]
            out = (s_t / s_s) * x_s + a_t * i0 * d_s
            if pts_d.shape[0] == 0:
                return out
            r = (pts_l - l_s) / h
            rho, big_b = _unipc_rho(r, q, h, self.variant)
            acc = jnp.zeros_like(x_s)
            for k in range(pts_d.shape[0]):
                acc = acc + rho[k] * (pts_d[k] - d_s) / r[k]
            return out + a_t * big_b * acc

        def body(carry, inp):
            x, x_prev, d_hist, l_hist, prev_order = carry
            i, order = inp
            t, a_t, s_t, l_t, _ = c.at(i)
            d_i = model.x0(x, t)
            if self.use_corrector:
                # UniC: from the previous state x_prev at lambda_hist[0] to lambda_t, with the new
                # evaluation (r = 1) and the prev_order - 1 older points.
                _, a_p, s_p, l_p, _ = c.at(jnp.maximum(i - 1, 0))
                pts_d = jnp.concatenate([d_i[None], d_hist[1:p]], axis=0)
                pts_l = jnp.concatenate([l_t[None], l_hist[1:p]], axis=0)
                x_c = update(x_prev, d_hist[0], l_hist[0], s_p, a_t, s_t, l_t, pts_d, pts_l, prev_order)
                x = jnp.where(i > 0, x_c, x)
            # UniP: from x at lambda_t to lambda_{i+1} with the order - 1 previous points.
            _, a_s, s_s, l_s, _ = c.at(i + 1)
            x_next = update(x, d_i, l_t, s_t, a_s, s_s, l_s, d_hist[: p - 1], l_hist[: p - 1], order - 1)
            d_hist = jnp.concatenate([d_i[None], d_hist[:-1]], axis=0)
            l_hist = jnp.concatenate([l_t[None], l_hist[:-1]], axis=0)
            return x_next, x, d_hist, l_hist, order

        l0 = c.lam[0]
        carry0 = (
            x,
            x,
            jnp.zeros((p,) + x.shape, x.dtype),
            l0 - 1.0 - jnp.arange(p, dtype=x.dtype),
            jnp.asarray(1, jnp.int32),
        )
        (x, *_), traj = _scan(body, carry0, (jnp.arange(self.num_steps), orders), return_trajectory, lambda cr: cr[0])
        return _finish(model, x, c, self.denoise, self.num_steps, self.num_steps, traj)
