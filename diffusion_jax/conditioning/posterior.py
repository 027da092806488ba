"""Posterior samplers for inverse problems ``y = A(x) + sigma_y n`` with an unconditional model.

Every method is a :class:`~diffusion_jax.samplers.Sampler`, so :func:`diffusion_jax.sample`
runs it (``jit``, exact ``info.nfe``, per-sample keys); the measurement ``y`` (shape
``(B, ...)``, one per sample) is a field, passed to ``jit`` as an argument.

* :class:`Guided` wraps any sampler and replaces the model by a guided one
  (:class:`Guidance`): **DPS** (Chung et al. 2023, eq. 16 and Algorithm 1), **PiGDM** (Song et
  al. 2023, eq. 7-8) add an approximate ``grad log p(y | x_t)`` to the score; **DiffPIR** (Zhu
  et al. 2023, eq. 12-13) replaces the data prediction by its proximal step towards the
  measurement.
* :class:`DDRM` (Kawar et al. 2022, eq. 7-8): the variational posterior in the operator's
  spectral coordinates, its own update over the model's data prediction.
* :class:`DAPS` (Zhang et al. 2024, Algorithm 1): decoupled annealing -- an inner sampler
  solves the probability-flow ODE from ``x_t`` to an estimate of ``x_0``, a Gaussian (or
  Langevin) step samples ``p(x_0 | x_t, y)``, and the result is noised to the next level.

All work for every SDE of the linear family through ``marginal(t)`` (they step in the scaled
variable ``x / alpha`` with noise level ``sigma~ = sigma / alpha`` where they need one) and
refuse a general SDE.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from diffusion_jax import parametrization as param_lib
from diffusion_jax.conditioning.base import SubNoise, marginal_b, require_noisy, require_svd, run_between
from diffusion_jax.conditioning.operators import Operator, SVDOperator
from diffusion_jax.samplers.base import FixedGridSampler, Model, Sampler, fixed_info
from diffusion_jax.samplers.fast import Euler
from diffusion_jax.samplers.grids import KarrasGrid
from diffusion_jax.sde import SDE, broadcast_to_data

Array = jax.Array

__all__ = ["Guidance", "DPSGuidance", "PiGDMGuidance", "DiffPIRGuidance", "Guided", "DDRM", "DAPS"]


def _per_sample_norm(v: Array) -> Array:
    return jnp.sqrt(jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=1))


def _x0_vjp(model: Model, x: Array, t: Array):
    """``x0(x, t)`` and the pullback of its Jacobian (one model evaluation)."""
    return jax.vjp(lambda v: model.x0(v, t), x)


def _score_from_x0(sde: SDE, x0: Array, x: Array, t: Array) -> Array:
    return param_lib.convert(x0, from_kind="x0", to_kind="score", sde=sde, x=x, t=t)


def _sigma_tilde_sq(sde: SDE, t: Array, x: Array) -> Array:
    a, s = marginal_b(sde, t, x)
    return (s / a) ** 2


class Guidance(flax.struct.PyTreeNode, abc.ABC):
    """A measurement-guided model: :meth:`score` returns the guided score at ``(x, t)`` using the
    unconditional ``model`` (one evaluation, possibly with a vector-Jacobian product)."""

    operator: Operator
    y: Array

    name: ClassVar[str] = ""
    needs_svd: ClassVar[bool] = False

    @abc.abstractmethod
    def score(self, model: Model, x: Array, t: Array) -> Array: ...


class DPSGuidance(Guidance):
    """Diffusion posterior sampling (Chung et al. 2023): ``p(y | x_t) ~ p(y | x0_hat(x_t))``, with
    the paper's normalised step (Algorithm 1, ``zeta_i = zeta' / ||y - A(x0_hat)||``) written as a
    score term: ``s(x_t) - scale grad_{x_t} ||y - A(x0_hat)||^2 / ||y - A(x0_hat)||``. Works for
    non-linear ``A``; ``sigma_y`` enters only through the choice of ``scale``."""

    scale: float = 1.0
    name: ClassVar[str] = "dps"

    def score(self, model, x, t):
        x0, pull = _x0_vjp(model, x, t)
        r, pull_a = jax.vjp(self.operator.forward, x0)
        r = self.y - r
        norm = broadcast_to_data(jnp.maximum(_per_sample_norm(r), 1e-12), r)
        # grad ||r||^2 / ||r|| = -2 J^T A'^T r / ||r||.
        (g0,) = pull_a(-2.0 * r / norm)
        (g,) = pull(g0)
        return _score_from_x0(model.sde, x0, x, t) - self.scale * g


class PiGDMGuidance(Guidance):
    """Pseudoinverse-guided diffusion (Song et al. 2023, eq. 7-8): ``p(x_0 | x_t) ~
    N(x0_hat, r_t^2 I)`` gives ``p(y | x_t) ~ N(A x0_hat, r_t^2 A A^T + sigma_y^2 I)`` and the score
    term ``J^T A^T (r_t^2 A A^T + sigma_y^2 I)^{-1} (y - A x0_hat)`` (``J = d x0_hat / d x_t``),
    evaluated through the SVD. ``r_t^2 = v sigma~^2 / (v + sigma~^2)``, the posterior variance of
    data of variance ``v = data_var`` (the paper: ``v = 1``)."""

    scale: float = 1.0
    data_var: float = 1.0
    name: ClassVar[str] = "pigdm"
    needs_svd: ClassVar[bool] = True

    def score(self, model, x, t):
        op = require_svd(self.operator, "PiGDM")
        x0, pull = _x0_vjp(model, x, t)
        st2 = _sigma_tilde_sq(model.sde, t, x)
        r2 = self.data_var * st2 / (self.data_var + st2)
        ybar_u = op.ut(self.y)
        s = jnp.broadcast_to(op.singular_values(x), x.shape).astype(x.dtype)
        resid = ybar_u - s * op.vt(x0)
        denom = r2 * s**2 + jnp.asarray(self.operator.sigma_y, x.dtype) ** 2
        h = op.v(jnp.where(s > 0, s * resid / jnp.where(s > 0, denom, 1.0), 0.0))
        (g,) = pull(h)
        return _score_from_x0(model.sde, x0, x, t) + self.scale * g


class DiffPIRGuidance(Guidance):
    """DiffPIR (Zhu et al. 2023, eq. 12-13): the data prediction is replaced by the solution of
    ``min ||y - A x||^2 + rho_t ||x - x0_hat||^2``, ``rho_t = lam sigma_y^2 / sigma~_t^2`` (closed
    form through the SVD); the sampler's noise prediction is then derived from it, as the paper's
    ``eps_hat``. ``lam`` is the paper's lambda (its default 7 for noisy problems)."""

    lam: float = 7.0
    name: ClassVar[str] = "diffpir"
    needs_svd: ClassVar[bool] = True

    def score(self, model, x, t):
        op = require_svd(self.operator, "DiffPIR")
        x0 = model.x0(x, t)
        st2 = _sigma_tilde_sq(model.sde, t, x)
        rho = self.lam * jnp.asarray(self.operator.sigma_y, x.dtype) ** 2 / st2
        s = jnp.broadcast_to(op.singular_values(x), x.shape).astype(x.dtype)
        x0bar = op.vt(x0)
        prox = (s * op.ut(self.y) + rho * x0bar) / jnp.where(s > 0, s**2 + rho, 1.0)
        x0_new = op.v(jnp.where(s > 0, prox, x0bar))
        return _score_from_x0(model.sde, x0_new, x, t)


class Guided(Sampler):
    """``sampler`` run on the model guided by ``guidance``; NFE as ``sampler`` (each evaluation of
    DPS / PiGDM also takes one vector-Jacobian product through the network)."""

    sampler: Any = None
    guidance: Any = None

    name: ClassVar[str] = "guided"

    def __post_init__(self):
        if not isinstance(self.sampler, Sampler) or not isinstance(self.guidance, Guidance):
            raise TypeError("Guided needs sampler= (a Sampler) and guidance= (a Guidance)")
        if self.guidance.needs_svd:
            require_svd(self.guidance.operator, self.guidance.name)

    def validate(self, sde):
        super().validate(sde)
        self.sampler.validate(sde)

    def is_stochastic(self):
        return self.sampler.is_stochastic()

    def prediction_transform(self):
        return self.sampler.prediction_transform()

    def run(self, model, x, noise, *, return_trajectory=False):
        guided = Model(
            lambda v, t: self.guidance.score(model, v, t), model.sde, kind="score", thresholding=model.thresholding
        )
        return self.sampler.run(guided, x, noise, return_trajectory=return_trajectory)


# --------------------------------------------------------------------------------------------
# DDRM
# --------------------------------------------------------------------------------------------


def _ddrm_update(xbar, x0bar, ybar, s, sy, st_t, st_s, z, eta, eta_b):
    """Kawar et al. 2022, eq. 7-8, in spectral coordinates, from noise level ``st_t`` to ``st_s``
    (of ``x / alpha``). ``sy`` is ``sigma_y / s`` where observed."""
    obs = s > 0
    c = jnp.sqrt(1.0 - eta**2)
    unobs = x0bar + c * st_s * (xbar - x0bar) / st_t + eta * st_s * z
    sy_safe = jnp.where(obs & (sy > 0), sy, 1.0)
    below = x0bar + c * st_s * (ybar - x0bar) / sy_safe + eta * st_s * z
    above = (1.0 - eta_b) * x0bar + eta_b * ybar + jnp.sqrt(jnp.maximum(st_s**2 - (eta_b * sy) ** 2, 0.0)) * z
    return jnp.where(obs, jnp.where(st_s < sy, below, above), unobs)


class DDRM(FixedGridSampler):
    """Denoising diffusion restoration models (Kawar et al. 2022). In the spectral coordinates of
    ``A = U S V^T`` and the scaled variable ``x / alpha`` (noise level ``sigma~``), with
    ``ybar = S^+ U^T y`` and ``sigma_y / s_i``:

    * unobserved (``s_i = 0``): ``x0 + sqrt(1 - eta^2) sigma~_s (xbar - x0) / sigma~_t + eta sigma~_s z``;
    * ``sigma~_s < sigma_y / s_i``: ``x0 + sqrt(1 - eta^2) sigma~_s (ybar - x0) / (sigma_y / s_i)
      + eta sigma~_s z``;
    * otherwise: ``(1 - eta_b) x0 + eta_b ybar + sqrt(sigma~_s^2 - eta_b^2 sigma_y^2 / s_i^2) z``.

    The start is eq. 7 at ``T`` (the prior, with the observed coordinates centred on ``ybar``).
    ``denoise`` ends with the update to ``sigma~ = 0``. Paper defaults: eta = 0.85, eta_b = 1.
    NFE = num_steps (+1 with denoise).
    """

    denoise: bool = flax.struct.field(pytree_node=False, default=True)
    num_steps: int = flax.struct.field(pytree_node=False, default=20)
    operator: Any = None
    y: Any = None
    eta: float = 0.85
    eta_b: float = 1.0

    name: ClassVar[str] = "ddrm"
    stochastic: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        require_svd(self.operator, "DDRM")

    def run(self, model, x, noise, *, return_trajectory=False):
        sde = model.sde
        op: SVDOperator = self.operator
        ts = self.grid(sde, self.num_steps).astype(x.dtype)
        a_all, s_all = sde.marginal(ts)
        st_all = (s_all / a_all).astype(x.dtype)
        ybar, s = op.spectral_measurement(self.y, x)
        sy = jnp.where(s > 0, jnp.asarray(op.sigma_y, x.dtype) / jnp.where(s > 0, s, 1.0), 0.0)
        # Eq. 7 at T: observed coordinates start at ybar + sqrt(sigma~_T^2 - sigma_y^2/s^2) z.
        xbar = op.vt(x / a_all[0].astype(x.dtype))
        z0 = noise.normal((1, 0), x.shape, x.dtype)
        start = ybar + jnp.sqrt(jnp.maximum(st_all[0] ** 2 - sy**2, 0.0)) * z0
        xbar = jnp.where((s > 0) & (st_all[0] >= sy), start, xbar)

        def body(xbar, i):
            t = ts[i]
            x0bar = op.vt(model.x0(a_all[i].astype(x.dtype) * op.v(xbar), t))
            z = noise.normal((0, i), x.shape, x.dtype)
            xbar = _ddrm_update(xbar, x0bar, ybar, s, sy, st_all[i], st_all[i + 1], z, self.eta, self.eta_b)
            return xbar, (a_all[i + 1].astype(x.dtype) * op.v(xbar) if return_trajectory else None)

        xbar, traj = jax.lax.scan(body, xbar, jnp.arange(self.num_steps))
        nfe = self.num_steps
        if self.denoise:
            x0bar = op.vt(model.x0(a_all[-1].astype(x.dtype) * op.v(xbar), ts[-1]))
            zero = jnp.zeros((), x.dtype)
            xbar = _ddrm_update(xbar, x0bar, ybar, s, sy, st_all[-1], zero, zero * xbar, self.eta, self.eta_b)
            return op.v(xbar), fixed_info(nfe + 1, self.num_steps, traj)
        return a_all[-1].astype(x.dtype) * op.v(xbar), fixed_info(nfe, self.num_steps, traj)


# --------------------------------------------------------------------------------------------
# DAPS
# --------------------------------------------------------------------------------------------


class DAPS(FixedGridSampler):
    """Decoupled annealing posterior sampling (Zhang et al. 2024, Algorithm 1). For each annealing
    time ``t_i`` of the grid:

    1. ``x0_hat``: the probability-flow ODE from ``x_{t_i}`` to ``t_min`` with ``ode`` (any
       fixed-grid sampler, its grid family laid over ``[t_min, t_i]``, ending with the data
       prediction);
    2. ``x0 ~ p(x0 | x_{t_i}, y)`` with ``p(x0 | x_t) ~ N(x0_hat, r_t^2 I)``,
       ``r_t^2 = r_scale^2 v sigma~^2 / (v + sigma~^2)``, the posterior variance of data of variance
       ``v = data_var`` (``data_var = inf`` is the paper's ``r_t = sigma_t``; with the exact step
       below, that over-disperses the unobserved directions, which the paper's short Langevin
       chains never reach): ``langevin_steps`` Langevin steps (the paper's, the default) of size
       ``lr / (1 / r_t^2 + 1 / sigma_y^2)`` on ``log N(x0; x0_hat, r_t^2) + log p(y | x0)``,
       starting at ``x0_hat``; or, with ``exact_x0_step`` and an :class:`SVDOperator` with ``sigma_y > 0``,
       an exact draw of the Gaussian product (the limit of a long Langevin chain);
    3. ``x_{t_{i+1}} = alpha x0 + sigma z``. The last ``x0`` is returned.

    NFE = num_steps * (the ODE sampler's NFE, e.g. ``ode.num_steps + 1`` for Euler).
    """

    num_steps: int = flax.struct.field(pytree_node=False, default=50)
    grid: Any = KarrasGrid()
    operator: Any = None
    y: Any = None
    ode: Any = Euler(num_steps=4, denoise=True)
    r_scale: float = 1.0
    data_var: float = 1.0
    exact_x0_step: bool = flax.struct.field(pytree_node=False, default=False)
    langevin_steps: int = flax.struct.field(pytree_node=False, default=50)
    lr: float = 0.1

    name: ClassVar[str] = "daps"
    stochastic: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.ode, FixedGridSampler):
            raise TypeError(f"DAPS.ode must be a fixed-grid sampler, got {type(self.ode).__name__}")
        if self.exact_x0_step:
            require_svd(self.operator, "DAPS with exact_x0_step=True (use exact_x0_step=False for Langevin)")
        require_noisy(self.operator, "DAPS", "samples x0 from N(x0_hat, r_t^2) p(y | x0)")

    def _x0_step(self, x0hat, r2, noise, i):
        op = self.operator
        sy2 = jnp.asarray(op.sigma_y, x0hat.dtype) ** 2
        if self.exact_x0_step:
            # N(x0; x0_hat, r^2) N(y; A x0, sigma_y^2), per spectral coordinate.
            s = jnp.broadcast_to(op.singular_values(x0hat), x0hat.shape).astype(x0hat.dtype)
            prec = 1.0 / r2 + s**2 / sy2
            mean = (op.vt(x0hat) / r2 + s * op.ut(self.y) / sy2) / prec
            z = noise.normal((2, i), x0hat.shape, x0hat.dtype)
            return op.v(mean + z / jnp.sqrt(prec))
        step = self.lr / (1.0 / r2 + 1.0 / sy2)

        def langevin(x0, k):
            g = jax.grad(lambda v: jnp.sum(op.log_likelihood(self.y, v)))(x0) - (x0 - x0hat) / r2
            z = noise.normal((2, i, k), x0.shape, x0.dtype)
            return x0 + step * g + jnp.sqrt(2.0 * step) * z, None

        x0, _ = jax.lax.scan(langevin, x0hat, jnp.arange(self.langevin_steps))
        return x0

    def run(self, model, x, noise, *, return_trajectory=False):
        sde = model.sde
        ts = self.grid(sde, self.num_steps).astype(x.dtype)
        t_end = jnp.asarray(sde.t_min, x.dtype)

        def body(carry, i):
            x, _ = carry
            t = ts[i]
            x0hat, info = run_between(self.ode, model, x, t, t_end, SubNoise(noise, (3, i)), denoise=True)
            st2 = _sigma_tilde_sq(sde, t, x)
            r2 = self.r_scale**2 * jnp.where(jnp.isinf(self.data_var), st2, self.data_var * st2 / (self.data_var + st2))
            x0 = self._x0_step(x0hat, r2, noise, i)
            a, s = marginal_b(sde, ts[i + 1], x)
            x_next = a * x0 + s * noise.normal((0, i), x.shape, x.dtype)
            return (x_next, x0), (x0 if return_trajectory else None, info.nfe)

        (_, x0), (traj, nfes) = jax.lax.scan(body, (x, x), jnp.arange(self.num_steps))
        return x0, fixed_info(0, self.num_steps, traj)._replace(nfe=jnp.sum(nfes).astype(jnp.int32))
