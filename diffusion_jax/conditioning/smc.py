"""Sequential Monte Carlo with twisting: the twisted diffusion sampler (TDS; Wu et al. 2023,
"Practical and asymptotically exact conditional sampling in diffusion models", Algorithm 1).

Target: the model's reverse chain conditioned on ``y``, ``p(x_{0:N} | y) ∝ p(x_N) prod_i
p(x_{i-1} | x_i) p(y | x_0)``. Each of ``num_particles`` particles follows the twisted proposal

``x_s ~ N(m(x_t) + c^2 grad log p~_t(y | x_t), c^2)``

where ``N(m(x_t), c^2)`` is the DDPM transition of the linear SDE (``m = alpha_s x0_hat +
sqrt(sigma_s^2 - c^2) eps_hat``, ``c^2 = sigma_s^2 (1 - e^{-2h})``, ``h`` the half log-SNR step; the
``ddpm`` sampler's kernel) and the twisting function is ``p~_t(y | x_t) = N(y; A(x0_hat(x_t)),
(sigma_y^2 + r_t^2) I)``, ``r_t^2 = v sigma~^2 / (v + sigma~^2)`` (the PiGDM variance for data of
variance ``v``). Incremental weights

``w = p(x_s | x_t) p~_s(y | x_s) / (q(x_s | x_t) p~_t(y | x_t))``, and ``p(y | x_{t_min})`` at the end,

make the weighted particles a consistent estimate of the target whatever the twist: as the
number of particles grows, a particle drawn by its final weight is a draw from ``p(x | y)`` of
the discretised chain (exact in the limit of particles, then of steps). Particles are resampled
(systematic resampling) when the effective sample size falls below ``ess_threshold * K``.

Each output sample (batch entry) is an independent SMC run with its own ``K`` particles; the
model sees batches of ``B * K``. NFE = num_steps (each on ``B K`` examples, with a
vector-Jacobian product). Works with non-linear operators; needs ``sigma_y > 0``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import jax.scipy.stats

from diffusion_jax.conditioning.base import marginal_b, require_noisy
from diffusion_jax.samplers.base import FixedGridSampler, fixed_info
from diffusion_jax.samplers.grids import LogSNRGrid
from diffusion_jax.sde import broadcast_to_data

Array = jax.Array

__all__ = ["TDS", "systematic_resample"]


def systematic_resample(log_w: Array, u: Array) -> Array:
    """Systematic resampling indices ``(K,)`` for log-weights ``(K,)`` and one uniform ``u``."""
    k = log_w.shape[0]
    w = jax.nn.softmax(log_w)
    cdf = jnp.cumsum(w)
    points = (u + jnp.arange(k, dtype=w.dtype)) / k
    return jnp.clip(jnp.searchsorted(cdf, points), 0, k - 1)


def _sum(v: Array) -> Array:
    return jnp.sum(v.reshape(v.shape[0], -1), axis=1)


class TDS(FixedGridSampler):
    """The twisted diffusion sampler (see the module docstring).

    Fields: ``operator``, ``y`` ``(B, ...)``, ``num_particles`` K, ``num_steps``, ``grid``
    (uniform in log-SNR by default), ``ess_threshold`` (resample when ESS < threshold K; 1:
    every step), ``data_var`` (v of the twist), ``denoise`` (return the data prediction of the
    selected particle, +1 NFE).
    """

    num_steps: int = flax.struct.field(pytree_node=False, default=100)
    grid: Any = LogSNRGrid()
    operator: Any = None
    y: Any = None
    num_particles: int = flax.struct.field(pytree_node=False, default=16)
    ess_threshold: float = 0.5
    data_var: float = 1.0

    name: ClassVar[str] = "tds"
    stochastic: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if int(self.num_particles) < 1:
            raise ValueError(f"TDS needs num_particles >= 1, got {self.num_particles}")
        require_noisy(self.operator, "TDS", "weights particles by p(y | x)")

    def run(self, model, x, noise, *, return_trajectory=False):
        sde = model.sde
        op = self.operator
        b, k = x.shape[0], int(self.num_particles)
        event = x.shape[1:]
        dtype = x.dtype
        ts = self.grid(sde, self.num_steps).astype(dtype)
        lam = 0.5 * sde.log_snr(ts).astype(dtype)
        y = jnp.repeat(self.y, k, axis=0)
        sy2 = jnp.asarray(op.sigma_y, dtype) ** 2

        def flat(v):
            return v.reshape((b * k,) + v.shape[2:])

        def groups(v):
            return v.reshape((b, k) + v.shape[1:])

        # Particles: the given x_T is particle 0; the others are fresh prior draws.
        prior_std = jnp.asarray(sde.prior_std(), dtype)
        extra = prior_std * noise.normal((3, 0), (b, k - 1) + event, dtype)
        xs = flat(jnp.concatenate([x[:, None], extra], axis=1))

        def twist(xp, t):
            """log p~_t(y | x), its gradient, and (x0_hat, eps_hat), from one evaluation."""

            def f(v):
                x0, eps = model.x0_eps(v, t)
                a, s = marginal_b(sde, t, v)
                st2 = (s / a) ** 2
                r2 = self.data_var * st2 / (self.data_var + st2)
                resid = y - op.forward(x0)
                var = sy2 + broadcast_to_data(r2.reshape(r2.shape[0], -1)[:, 0], resid)
                lp = -0.5 * _sum(resid**2 / var + jnp.log(var))
                return jnp.sum(lp), (lp, x0, eps)

            g, (lp, x0, eps) = jax.grad(f, has_aux=True)(xp)
            return lp, g, x0, eps

        def resample(i, log_w, *arrays):
            ess = 1.0 / jnp.sum(jax.nn.softmax(log_w, axis=1) ** 2, axis=1)  # (B,)
            u = jax.scipy.stats.norm.cdf(noise.normal((4, i), (b,), dtype))
            idx = jax.vmap(systematic_resample)(log_w, u)  # (B, K)
            do = ess < self.ess_threshold * k
            idx = jnp.where(do[:, None], idx, jnp.arange(k)[None])
            out = [
                flat(jnp.take_along_axis(groups(a), idx.reshape((b, k) + (1,) * (a.ndim - 1)), axis=1)) for a in arrays
            ]
            return jnp.where(do[:, None], 0.0, log_w), out

        def body(carry, i):
            xs, log_w, lp_prev, log_ratio = carry
            t = jnp.broadcast_to(ts[i], (b * k,))
            lp, g, x0, eps = twist(xs, t)
            log_w = log_w + groups(lp - lp_prev + log_ratio)
            log_w, (xs, g, x0, eps, lp) = resample(i, log_w, xs, g, x0, eps, lp)
            # DDPM transition to ts[i+1], shifted by c^2 grad log p~ (the twisted proposal).
            a_s, s_s = marginal_b(sde, ts[i + 1], xs)
            c2 = s_s**2 * -jnp.expm1(-2.0 * (lam[i + 1] - lam[i]))
            mean = a_s * x0 + jnp.sqrt(jnp.maximum(s_s**2 - c2, 0.0)) * eps
            shift = c2 * g
            z = flat(noise.normal((0, i), (b, k) + event, dtype))
            x_new = mean + shift + jnp.sqrt(c2) * z
            # log N(x_new; mean, c2) - log N(x_new; mean + shift, c2).
            log_ratio = -0.5 * _sum(((x_new - mean) ** 2 - (x_new - mean - shift) ** 2) / c2)
            return (x_new, log_w, lp, log_ratio), None

        zeros = jnp.zeros((b * k,), dtype)
        carry0 = (xs, jnp.zeros((b, k), dtype), zeros, zeros)
        (xs, log_w, lp_prev, log_ratio), _ = jax.lax.scan(body, carry0, jnp.arange(self.num_steps))
        # The exact likelihood at the end of the chain.
        lp = op.log_likelihood(y, xs)
        log_w = log_w + groups(lp - lp_prev + log_ratio)
        u = jax.scipy.stats.norm.cdf(noise.normal((5, 0), (b,), dtype))
        cdf = jnp.cumsum(jax.nn.softmax(log_w, axis=1), axis=1)
        pick = jnp.clip(jax.vmap(jnp.searchsorted)(cdf, u), 0, k - 1)
        out = jnp.take_along_axis(groups(xs), pick.reshape((b, 1) + (1,) * len(event)), axis=1)[:, 0]
        nfe = self.num_steps
        if self.denoise:
            out = model.x0(out, ts[-1])
            nfe += 1
        return out, fixed_info(nfe, self.num_steps)
