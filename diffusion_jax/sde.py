"""Stochastic differential equations for score-based diffusion.

Two levels of generality:

* :class:`SDE` -- the general interface ``dx = f(x, t) dt + g(t) dw`` (drift may be non-linear).
  Euler-Maruyama-style samplers need nothing more.
* :class:`LinearSDE` -- the family of linear Gaussian diffusions whose marginals are
  ``x_t = alpha(t) x_0 + sigma(t) eps``. Defining ``alpha(t)`` and ``sigma(t)`` fixes the SDE:
  ``f(t) = d log alpha / dt`` and ``g(t)^2 = d sigma^2/dt - 2 f(t) sigma^2``
  (Kingma et al. 2021, "Variational Diffusion Models", eq. 26-29; Song et al. 2021, eq. 29-31).

Capabilities are types: :class:`LinearSDE` has closed-form marginals (:func:`require_marginals`
asks for them), and :class:`DiscreteChain` adds score_sde's discrete SMLD / DDPM tables
(:class:`VESDE`, :class:`VPSDE`), which the ancestral predictor, reverse diffusion and score_sde's
discrete losses step through.

Named members: :class:`VESDE`, :class:`VPSDE`, :class:`SubVPSDE` (Song et al. 2021, with
score_sde's defaults), :class:`EDMSDE` (Karras et al. 2022, time is sigma),
:class:`CosineVPSDE` (Nichol & Dhariwal 2021) and :class:`RectifiedFlow`
(Liu et al. 2022; alpha = 1 - t, sigma = t).

Every SDE is a frozen pytree: floats are leaves, so SDEs pass through ``jit``, ``vmap`` and ``grad``.
Times ``t`` are scalars or arrays whose shape is a prefix of the data's shape (usually ``(B,)``
for data of shape ``(B, ...)``); nothing assumes images.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

__all__ = [
    "SDE",
    "LinearSDE",
    "DiscreteChain",
    "require_marginals",
    "VESDE",
    "VPSDE",
    "SubVPSDE",
    "EDMSDE",
    "CosineVPSDE",
    "RectifiedFlow",
    "GeneralSDE",
    "ReverseSDE",
    "ProbabilityFlowODE",
    "MarginalsUnavailableError",
    "SDES",
    "get_sde",
    "broadcast_to_data",
    "standard_normal_logp",
]


class MarginalsUnavailableError(TypeError):
    """Raised when an operation needs closed-form marginals that a general SDE does not have."""


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def broadcast_to_data(c: Array, x: Array) -> Array:
    """Reshape a per-example coefficient ``c`` (shape a prefix of ``x.shape``) to broadcast
    against ``x``: ``(B,) -> (B, 1, ..., 1)``. Scalars pass unchanged."""
    c = jnp.asarray(c)
    if c.ndim == 0:
        return c
    if c.shape != x.shape[: c.ndim]:
        raise ValueError(
            f"time/coefficient of shape {c.shape} does not match the leading dimensions of the "
            f"data of shape {x.shape}; expected a scalar or shape {x.shape[:1]}"
        )
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


def standard_normal_logp(z: Array, std: Array | float = 1.0, *, batch_ndim: int = 1) -> Array:
    """log N(z; 0, std^2 I), summed over every dimension after the first ``batch_ndim``."""
    z = jnp.asarray(z)
    axes = tuple(range(batch_ndim, z.ndim))
    d = math.prod(z.shape[batch_ndim:])
    std = jnp.asarray(std, z.dtype)
    return -0.5 * d * jnp.log(2 * jnp.pi * std**2) - 0.5 * jnp.sum(z**2, axis=axes) / std**2


def _concrete(value: Any) -> float | None:
    """The Python float of a parameter given as a Python or NumPy scalar, else None.

    Validation runs on the values users and configs pass (Python / NumPy numbers). JAX arrays
    are skipped: jax rebuilds pytrees through the constructor with tracers, placeholders and
    gradient cotangents (a cotangent VPSDE may well have beta_max < beta_min)."""
    if isinstance(value, jax.Array) or not isinstance(value, (int, float, np.generic, np.ndarray)):
        return None
    arr = np.asarray(value)
    if arr.ndim != 0:
        raise ValueError(f"SDE parameters must be scalars, got an array of shape {arr.shape}")
    return float(arr)


def _check(cls_name: str, condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"{cls_name}: {message}")


def _elementwise_derivative(fn: Callable[[Array], Array], t: Array) -> tuple[Array, Array]:
    """(fn(t), dfn/dt) for an elementwise function of t of any shape, by forward-mode autodiff."""
    t = jnp.asarray(t)
    return jax.jvp(fn, (t,), (jnp.ones_like(t),))


# --------------------------------------------------------------------------------------------
# General SDE
# --------------------------------------------------------------------------------------------


class SDE(flax.struct.PyTreeNode):
    """General SDE ``dx = f(x, t) dt + g(t) dw`` on ``[t_min, T]``.

    Subclasses implement :meth:`drift`, :meth:`diffusion`, :meth:`prior_sample`,
    :meth:`prior_logp` and set the time range. Methods that need the closed-form Gaussian
    marginals of a linear SDE raise :class:`MarginalsUnavailableError` here.
    """

    # Subclasses define ``T`` and ``t_min`` (fields, or properties derived from other fields).
    if TYPE_CHECKING:

        @property
        def T(self) -> float: ...  # noqa: N802 (score_sde's name)

        @property
        def t_min(self) -> float: ...

    def drift(self, x: Array, t: Array) -> Array:
        raise NotImplementedError

    def diffusion(self, t: Array) -> Array:
        """g(t), with the shape of ``t``."""
        raise NotImplementedError

    def diffusion_sq(self, t: Array) -> Array:
        """g(t)^2; linear SDEs compute it directly, without a square root."""
        return self.diffusion(t) ** 2

    def prior_sample(self, key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        raise NotImplementedError

    def prior_logp(self, z: Array) -> Array:
        """log density of the prior, summed over every non-batch dimension: shape ``(B,)``."""
        raise NotImplementedError

    @property
    def has_marginals(self) -> bool:
        return False

    def _no_marginals(self, what: str) -> NoReturn:
        raise MarginalsUnavailableError(
            f"{what} needs the closed-form marginals x_t = alpha(t) x_0 + sigma(t) eps, which "
            f"{type(self).__name__} (a general SDE) does not provide. Use a LinearSDE "
            f"(VESDE, VPSDE, SubVPSDE, EDMSDE, CosineVPSDE, RectifiedFlow) or an "
            f"Euler-Maruyama-style sampler."
        )

    def marginal(self, t: Array) -> tuple[Array, Array]:
        self._no_marginals("marginal()")

    def log_snr(self, t: Array) -> Array:
        self._no_marginals("log_snr()")

    def t_from_log_snr(self, log_snr: Array) -> Array:
        self._no_marginals("t_from_log_snr()")

    def discretize(self, x: Array, t: Array, dt: Array | None = None) -> tuple[Array, Array]:
        """One Euler-Maruyama increment: ``(f(x, t) dt, g(t) sqrt(|dt|))``. ``dt`` is a scalar or,
        like ``t``, per example (shape a prefix of ``x.shape``)."""
        if dt is None:
            raise ValueError(f"{type(self).__name__}.discretize needs the time step dt")
        return self.drift(x, t) * broadcast_to_data(dt, x), self.diffusion(t) * jnp.sqrt(jnp.abs(dt))

    def reverse(self, score_fn: ScoreFn, *, probability_flow: bool = False) -> ReverseSDE:
        """The reverse-time SDE (Anderson 1982; Song et al. 2021, eq. 6) or, with
        ``probability_flow=True``, the probability-flow ODE (eq. 13)."""
        return ReverseSDE(sde=self, score_fn=score_fn, probability_flow=probability_flow)

    def probability_flow(self, score_fn: ScoreFn) -> ProbabilityFlowODE:
        return ProbabilityFlowODE(sde=self, score_fn=score_fn)


class GeneralSDE(SDE):
    """An SDE given by functions: ``drift_fn(x, t)``, ``diffusion_fn(t)`` and a Gaussian prior
    ``N(prior_mean, prior_std^2 I)`` at time ``T``. The drift may be non-linear in x."""

    drift_fn: Callable[[Array, Array], Array] = flax.struct.field(pytree_node=False, default=None)
    diffusion_fn: Callable[[Array], Array] = flax.struct.field(pytree_node=False, default=None)
    prior_std: float = 1.0
    prior_mean: float = 0.0
    T: float = 1.0
    t_min: float = 1e-3

    def __post_init__(self):
        name = type(self).__name__
        _check(name, callable(self.drift_fn), "drift_fn must be a callable drift_fn(x, t)")
        _check(name, callable(self.diffusion_fn), "diffusion_fn must be a callable diffusion_fn(t)")
        std, T, t_min = _concrete(self.prior_std), _concrete(self.T), _concrete(self.t_min)
        if std is not None:
            _check(name, std > 0, f"prior_std must be > 0, got {std}")
        if T is not None and t_min is not None:
            _check(name, 0 <= t_min < T, f"need 0 <= t_min < T, got t_min={t_min}, T={T}")

    def drift(self, x, t):
        return self.drift_fn(x, jnp.asarray(t))

    def diffusion(self, t):
        return jnp.broadcast_to(self.diffusion_fn(jnp.asarray(t)), jnp.shape(t))

    def prior_sample(self, key, shape, dtype=jnp.float32):
        return self.prior_mean + self.prior_std * jax.random.normal(key, shape, dtype)

    def prior_logp(self, z):
        return standard_normal_logp(z - self.prior_mean, self.prior_std)


# --------------------------------------------------------------------------------------------
# Linear Gaussian diffusions
# --------------------------------------------------------------------------------------------


class LinearSDE(SDE):
    """``x_t = alpha(t) x_0 + sigma(t) eps``: subclasses define :meth:`alpha` and :meth:`sigma`.

    Everything else follows and has a generic implementation (autodiff for ``f`` and ``g``,
    bisection for the inverse log-SNR); named SDEs override with closed forms, which the tests
    check against the generic ones.
    """

    def alpha(self, t: Array) -> Array:
        raise NotImplementedError

    def sigma(self, t: Array) -> Array:
        raise NotImplementedError

    @property
    def has_marginals(self) -> bool:
        return True

    # -- marginals -------------------------------------------------------------------------
    def marginal(self, t: Array) -> tuple[Array, Array]:
        """``(alpha(t), sigma(t))`` with the shape of ``t``."""
        t = jnp.asarray(t)
        return self.alpha(t), self.sigma(t)

    def marginal_prob(self, x0: Array, t: Array) -> tuple[Array, Array]:
        """score_sde's form: mean ``alpha(t) x0`` (shape of x0) and std ``sigma(t)`` (shape of t)."""
        a, s = self.marginal(t)
        return broadcast_to_data(a, x0) * x0, s

    def perturb(self, x0: Array, t: Array, eps: Array) -> Array:
        a, s = self.marginal(t)
        return broadcast_to_data(a, x0) * x0 + broadcast_to_data(s, x0) * eps

    def marginal_derivatives(self, t: Array) -> tuple[Array, Array]:
        """``(d alpha/dt, d sigma/dt)``."""
        t = jnp.asarray(t)
        _, da = _elementwise_derivative(self.alpha, t)
        _, ds = _elementwise_derivative(self.sigma, t)
        return da, ds

    def log_snr(self, t: Array) -> Array:
        """``lambda(t) = log(alpha^2 / sigma^2)``, decreasing in t."""
        a, s = self.marginal(t)
        return 2.0 * (jnp.log(a) - jnp.log(s))

    def t_from_log_snr(self, log_snr: Array) -> Array:
        """Inverse of :meth:`log_snr`. Generic version: bisection on ``[0, T]`` (log-SNR is
        monotone); named SDEs override it with closed forms."""
        lam = jnp.asarray(log_snr)
        lo = jnp.zeros_like(lam)
        hi = jnp.full_like(lam, self.T)

        def body(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            go_right = self.log_snr(mid) > lam
            return jnp.where(go_right, mid, lo), jnp.where(go_right, hi, mid)

        lo, hi = jax.lax.fori_loop(0, 64, body, (lo, hi))
        return 0.5 * (lo + hi)

    def sigma_tilde(self, t: Array) -> Array:
        """Noise level of the rescaled variable ``x_t / alpha(t) = x_0 + (sigma/alpha) eps``;
        EDM's sigma for any member of the family."""
        a, s = self.marginal(t)
        return s / a

    # -- SDE coefficients --------------------------------------------------------------------
    def drift_coef(self, t: Array) -> Array:
        """f(t) = d log alpha / dt."""
        a, da = _elementwise_derivative(self.alpha, jnp.asarray(t))
        return da / a

    def diffusion_sq(self, t: Array) -> Array:
        """g(t)^2 = d sigma^2/dt - 2 f(t) sigma(t)^2."""
        t = jnp.asarray(t)
        s, ds = _elementwise_derivative(self.sigma, t)
        return 2.0 * s * ds - 2.0 * self.drift_coef(t) * s**2

    def diffusion(self, t: Array) -> Array:
        return jnp.sqrt(jnp.maximum(self.diffusion_sq(t), 0.0))

    def drift(self, x: Array, t: Array) -> Array:
        return broadcast_to_data(self.drift_coef(t), x) * x

    # -- prior -------------------------------------------------------------------------------
    def prior_std(self) -> Array:
        """Standard deviation of the Gaussian prior N(0, prior_std^2 I) at T."""
        return self.sigma(jnp.asarray(self.T))

    def prior_sample(self, key, shape, dtype=jnp.float32):
        return self.prior_std() * jax.random.normal(key, shape, dtype)

    def prior_logp(self, z):
        return standard_normal_logp(z, self.prior_std())

    # -- denoising distribution ----------------------------------------------------------------
    def conditional_score(self, x_t: Array, x0: Array, t: Array) -> Array:
        """grad log p_0t(x_t | x0) = -(x_t - alpha x0) / sigma^2."""
        a, s = self.marginal(t)
        return -(x_t - broadcast_to_data(a, x_t) * x0) / broadcast_to_data(s, x_t) ** 2


def require_marginals(sde: SDE, what: str) -> LinearSDE:
    """``sde`` as a :class:`LinearSDE`; for a general SDE, a :class:`MarginalsUnavailableError` saying
    that ``what`` (e.g. "the 'ddim' sampler") needs closed-form marginals."""
    if not isinstance(sde, LinearSDE):
        sde._no_marginals(what)
    return sde


class DiscreteChain(LinearSDE):
    """A linear SDE that also carries score_sde's discrete chain of ``N`` steps (SMLD for VE, DDPM
    for VP): what the ancestral predictor, reverse diffusion, the Langevin step scale and the
    discrete SMLD / DDPM losses step through. Subclasses define the field ``N`` and the methods
    below; samplers test for the capability with ``isinstance(sde, DiscreteChain)``."""

    if TYPE_CHECKING:
        N: int  # the number of steps of the chain, a field of each subclass

    def timestep(self, t: Array) -> Array:
        """Index into the table for continuous t (score_sde: ``(t (N-1) / T).long()``)."""
        raise NotImplementedError

    def ancestral_step(self, key: Array, x: Array, t: Array, score: Array) -> tuple[Array, Array]:
        """One ancestral sampling step of the chain at ``t``; returns ``(x, x_mean)``."""
        raise NotImplementedError

    def langevin_alpha(self, t: Array) -> Array:
        """score_sde's per-step scale of the Langevin step size."""
        raise NotImplementedError


def _check_time_range(name: str, t_min: float | None, T: float | None) -> None:
    if t_min is not None and T is not None:
        _check(name, 0 <= t_min < T, f"need 0 <= t_min < T, got t_min={t_min}, T={T}")


class VESDE(DiscreteChain):
    """Variance-exploding SDE (SMLD / NCSN; Song et al. 2021, eq. 30).

    ``sigma(t) = sigma_min (sigma_max/sigma_min)^t``, ``alpha = 1``; ``N`` is the number of
    discrete noise scales of the SMLD table. The prior is N(0, sigma_max^2 I).
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    N: int = flax.struct.field(pytree_node=False, default=1000)
    T: float = 1.0
    t_min: float = 1e-5

    def __post_init__(self):
        name = type(self).__name__
        lo, hi = _concrete(self.sigma_min), _concrete(self.sigma_max)
        if lo is not None and hi is not None:
            _check(name, 0 < lo < hi, f"need 0 < sigma_min < sigma_max, got {lo}, {hi}")
        _check(name, int(self.N) >= 1, f"N must be >= 1, got {self.N}")
        _check_time_range(name, _concrete(self.t_min), _concrete(self.T))

    def _log_ratio(self):
        return jnp.log(self.sigma_max) - jnp.log(self.sigma_min)

    def alpha(self, t):
        return jnp.ones_like(jnp.asarray(t))

    def sigma(self, t):
        return self.sigma_min * jnp.exp(jnp.asarray(t) * self._log_ratio())

    def drift_coef(self, t):
        return jnp.zeros_like(jnp.asarray(t))

    def diffusion_sq(self, t):
        return self.sigma(t) ** 2 * 2.0 * self._log_ratio()

    def log_snr(self, t):
        return -2.0 * (jnp.log(self.sigma_min) + jnp.asarray(t) * self._log_ratio())

    def t_from_log_snr(self, log_snr):
        return (-0.5 * jnp.asarray(log_snr) - jnp.log(self.sigma_min)) / self._log_ratio()

    def prior_std(self):
        return jnp.asarray(self.sigma_max)

    # -- score_sde's discrete SMLD form ----------------------------------------------------------
    def discrete_sigmas(self) -> Array:
        """The N geometric noise scales, increasing: ``exp(linspace(log sigma_min, log sigma_max, N))``."""
        return jnp.exp(jnp.linspace(jnp.log(self.sigma_min), jnp.log(self.sigma_max), self.N))

    def timestep(self, t: Array) -> Array:
        """Index into the discrete table for continuous t (score_sde: ``(t (N-1) / T).long()``)."""
        return (jnp.asarray(t) * (self.N - 1) / self.T).astype(jnp.int32)

    def _sigma_pair(self, t):
        sigmas = self.discrete_sigmas()
        i = self.timestep(t)
        sigma = sigmas[i]
        adjacent = jnp.where(i == 0, jnp.zeros_like(sigma), sigmas[jnp.maximum(i - 1, 0)])
        return sigma, adjacent

    def discretize(self, x, t, dt=None):
        """SMLD discretisation (score_sde ``VESDE.discretize``): ``x_{i+1} = x_i + sqrt(s_{i+1}^2 - s_i^2) z``.
        ``dt`` is ignored: the step is fixed by the table."""
        sigma, adjacent = self._sigma_pair(t)
        return jnp.zeros_like(x), jnp.sqrt(sigma**2 - adjacent**2)

    def ancestral_step(self, key, x, t, score):
        """One SMLD ancestral sampling step (Song et al. 2021, eq. 47). Returns ``(x, x_mean)``."""
        sigma, adjacent = self._sigma_pair(t)
        var_step = sigma**2 - adjacent**2
        x_mean = x + broadcast_to_data(var_step, x) * score
        std = jnp.sqrt(adjacent**2 * var_step / sigma**2)
        noise = jax.random.normal(key, x.shape, x.dtype)
        return x_mean + broadcast_to_data(std, x) * noise, x_mean

    def langevin_alpha(self, t):
        """Per-step scale of the annealed Langevin step size: 1 for VE (score_sde)."""
        return jnp.ones_like(jnp.asarray(t))


class _BetaLinearMixin:
    """Shared pieces of the VP and sub-VP SDEs: beta(t) = beta_min + t (beta_max - beta_min)."""

    if TYPE_CHECKING:  # fields of the SDEs that mix this in
        beta_min: float
        beta_max: float
        N: int
        T: float
        t_min: float

    def beta(self, t):
        return self.beta_min + jnp.asarray(t) * (self.beta_max - self.beta_min)

    def log_mean_coeff(self, t):
        t = jnp.asarray(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def _t_from_log_alpha_sq(self, log_a2):
        """Solve ``-0.5 (b1 - b0) t^2 - b0 t = log_a2`` for t >= 0 in a cancellation-free form."""
        b0, db = self.beta_min, self.beta_max - self.beta_min
        return -2.0 * log_a2 / (b0 + jnp.sqrt(b0**2 - 2.0 * db * log_a2))

    def _validate_beta(self):
        name = type(self).__name__
        b0, b1 = _concrete(self.beta_min), _concrete(self.beta_max)
        if b0 is not None:
            _check(name, b0 >= 0, f"beta_min must be >= 0, got {b0}")
        if b0 is not None and b1 is not None:
            _check(name, b1 >= b0 and b1 > 0, f"need 0 <= beta_min <= beta_max, beta_max > 0; got {b0}, {b1}")
        _check(name, int(self.N) >= 1, f"N must be >= 1, got {self.N}")
        _check_time_range(name, _concrete(self.t_min), _concrete(self.T))

    def drift_coef(self, t):
        return -0.5 * self.beta(t)

    def prior_std(self):
        # score_sde's prior for VP and sub-VP is exactly N(0, I).
        return jnp.asarray(1.0)


class VPSDE(_BetaLinearMixin, DiscreteChain):
    """Variance-preserving SDE (DDPM; Song et al. 2021, eq. 32) with linear beta(t).

    ``alpha(t) = exp(-t^2 (b1-b0)/4 - t b0/2)``, ``sigma = sqrt(1 - alpha^2)``. ``N`` is the number
    of DDPM steps of the discrete table (betas ``linspace(b0/N, b1/N, N)``).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    N: int = flax.struct.field(pytree_node=False, default=1000)
    T: float = 1.0
    t_min: float = 1e-3

    def __post_init__(self):
        self._validate_beta()

    def alpha(self, t):
        return jnp.exp(self.log_mean_coeff(t))

    def sigma(self, t):
        return jnp.sqrt(-jnp.expm1(2.0 * self.log_mean_coeff(t)))

    def diffusion_sq(self, t):
        return self.beta(t)

    def log_snr(self, t):
        lmc = self.log_mean_coeff(t)
        return 2.0 * lmc - jnp.log(-jnp.expm1(2.0 * lmc))

    def t_from_log_snr(self, log_snr):
        # alpha^2 = sigmoid(lambda) for a variance-preserving SDE.
        return self._t_from_log_alpha_sq(jax.nn.log_sigmoid(jnp.asarray(log_snr)))

    # -- score_sde's discrete DDPM form ------------------------------------------------------------
    def discrete_betas(self) -> Array:
        return jnp.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N)

    def alphas_cumprod(self) -> Array:
        return jnp.cumprod(1.0 - self.discrete_betas())

    def timestep(self, t: Array) -> Array:
        return (jnp.asarray(t) * (self.N - 1) / self.T).astype(jnp.int32)

    def discretize(self, x, t, dt=None):
        """DDPM discretisation (score_sde ``VPSDE.discretize``): ``x_{i+1} = sqrt(1-b_i) x_i + sqrt(b_i) z``.
        ``dt`` is ignored: the step is fixed by the table."""
        i = self.timestep(t)
        beta = self.discrete_betas()[i]
        f = broadcast_to_data(jnp.sqrt(1.0 - beta), x) * x - x
        return f, jnp.sqrt(beta)

    def ancestral_step(self, key, x, t, score):
        """One DDPM ancestral sampling step (Ho et al. 2020, Alg. 2, in score form). Returns ``(x, x_mean)``."""
        i = self.timestep(t)
        beta = self.discrete_betas()[i]
        x_mean = (x + broadcast_to_data(beta, x) * score) / broadcast_to_data(jnp.sqrt(1.0 - beta), x)
        noise = jax.random.normal(key, x.shape, x.dtype)
        return x_mean + broadcast_to_data(jnp.sqrt(beta), x) * noise, x_mean

    def langevin_alpha(self, t):
        """score_sde scales the Langevin step by the DDPM alpha_i = 1 - beta_i for VP."""
        return 1.0 - self.discrete_betas()[self.timestep(t)]


class SubVPSDE(_BetaLinearMixin, LinearSDE):
    """sub-VP SDE (Song et al. 2021, eq. 34): alpha as for VP, ``sigma = 1 - alpha^2``,
    ``g^2 = beta(t) (1 - exp(-2 b0 t - (b1-b0) t^2))``. Prior N(0, I)."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    N: int = flax.struct.field(pytree_node=False, default=1000)
    T: float = 1.0
    t_min: float = 1e-3

    def __post_init__(self):
        self._validate_beta()

    def alpha(self, t):
        return jnp.exp(self.log_mean_coeff(t))

    def sigma(self, t):
        return -jnp.expm1(2.0 * self.log_mean_coeff(t))

    def diffusion_sq(self, t):
        return self.beta(t) * (-jnp.expm1(4.0 * self.log_mean_coeff(t)))

    def log_snr(self, t):
        lmc = self.log_mean_coeff(t)
        return 2.0 * lmc - 2.0 * jnp.log(-jnp.expm1(2.0 * lmc))

    def t_from_log_snr(self, log_snr):
        # a = alpha^2 solves a / (1 - a)^2 = k = e^lambda; the root in (0, 1) is
        # a = 2k / (2k + 1 + sqrt(4k + 1)). Its log, written without overflow for either sign:
        lam = jnp.asarray(log_snr)
        lam_neg = jnp.minimum(lam, 0.0)
        k = jnp.exp(lam_neg)
        log_a_neg = jnp.log(2.0 * k) - jnp.log(2.0 * k + 1.0 + jnp.sqrt(4.0 * k + 1.0))
        u = jnp.exp(-jnp.maximum(lam, 0.0))
        log_a_pos = -jnp.log1p(0.5 * (u + jnp.sqrt(4.0 * u + u**2)))
        return self._t_from_log_alpha_sq(jnp.where(lam < 0, log_a_neg, log_a_pos))


class EDMSDE(LinearSDE):
    """Karras et al. (2022)'s choice: ``alpha = 1``, ``sigma(t) = t`` (time *is* the noise level),
    ``dx = sqrt(2 t) dw``. Time runs over ``[sigma_min, sigma_max]``; prior N(0, sigma_max^2 I)."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0

    def __post_init__(self):
        lo, hi = _concrete(self.sigma_min), _concrete(self.sigma_max)
        if lo is not None and hi is not None:
            _check(type(self).__name__, 0 < lo < hi, f"need 0 < sigma_min < sigma_max, got {lo}, {hi}")

    @property
    def T(self):
        return self.sigma_max

    @property
    def t_min(self):
        return self.sigma_min

    def alpha(self, t):
        return jnp.ones_like(jnp.asarray(t))

    def sigma(self, t):
        return jnp.asarray(t)

    def drift_coef(self, t):
        return jnp.zeros_like(jnp.asarray(t))

    def diffusion_sq(self, t):
        return 2.0 * jnp.asarray(t)

    def log_snr(self, t):
        return -2.0 * jnp.log(jnp.asarray(t))

    def t_from_log_snr(self, log_snr):
        return jnp.exp(-0.5 * jnp.asarray(log_snr))

    def prior_std(self):
        return jnp.asarray(self.sigma_max)


class CosineVPSDE(LinearSDE):
    """Variance-preserving SDE with the cosine schedule of Nichol & Dhariwal (2021):
    ``alpha(t) = cos(phi(t)) / cos(phi(0))``, ``phi(t) = (t + s)/(1 + s) pi/2``, ``sigma = sqrt(1 - alpha^2)``.

    ``alpha`` reaches 0 at t = 1, so the default end time is T = 0.9946, the value Lu et al.
    (2022, DPM-Solver) use for this schedule to avoid the singularity.
    """

    s: float = 0.008
    T: float = 0.9946
    t_min: float = 1e-3

    def __post_init__(self):
        name = type(self).__name__
        s = _concrete(self.s)
        if s is not None:
            _check(name, s > 0, f"s must be > 0, got {s}")
        T = _concrete(self.T)
        if T is not None:
            _check(name, T < 1.0, f"T must be < 1 (alpha(1) = 0), got {T}")
        _check_time_range(name, _concrete(self.t_min), T)

    def _phi(self, t):
        return (jnp.asarray(t) + self.s) / (1.0 + self.s) * (jnp.pi / 2)

    def alpha(self, t):
        return jnp.cos(self._phi(t)) / jnp.cos(self._phi(0.0))

    def _sigma_sq(self, t):
        # 1 - alpha^2 = (cos^2 phi0 - cos^2 phi) / cos^2 phi0 = sin(phi - phi0) sin(phi + phi0) / cos^2 phi0,
        # which keeps full relative precision as t -> 0 (no 1 - (1 - eps) cancellation).
        phi, phi0 = self._phi(t), self._phi(0.0)
        return jnp.sin(phi - phi0) * jnp.sin(phi + phi0) / jnp.cos(phi0) ** 2

    def sigma(self, t):
        return jnp.sqrt(self._sigma_sq(t))

    def drift_coef(self, t):
        return -jnp.tan(self._phi(t)) * (jnp.pi / 2) / (1.0 + self.s)

    def diffusion_sq(self, t):
        # VP: sigma^2 = 1 - alpha^2 gives g^2 = -2 f.
        return -2.0 * self.drift_coef(t)

    def log_snr(self, t):
        return 2.0 * jnp.log(self.alpha(t)) - jnp.log(self._sigma_sq(t))

    def t_from_log_snr(self, log_snr):
        # cos^2 phi = sigmoid(lambda) cos^2 phi0  =>  tan^2 phi = (sin^2 phi0 + e^-lambda) / cos^2 phi0.
        phi0 = self._phi(0.0)
        lam = jnp.asarray(log_snr)
        tan_phi = jnp.sqrt(jnp.sin(phi0) ** 2 + jnp.exp(-lam)) / jnp.cos(phi0)
        return jnp.arctan(tan_phi) * 2.0 * (1.0 + self.s) / jnp.pi - self.s

    def prior_std(self):
        return jnp.asarray(1.0)


class RectifiedFlow(LinearSDE):
    """Rectified flow / flow matching path (Liu et al. 2022; Lipman et al. 2022):
    ``alpha = 1 - t``, ``sigma = t``, so ``f = -1/(1-t)`` and ``g^2 = 2t/(1-t)``.

    The drift is singular at t = 1, so the default end time is T = 0.999 (prior N(0, T^2 I)).
    """

    T: float = 0.999
    t_min: float = 1e-3

    def __post_init__(self):
        name = type(self).__name__
        T = _concrete(self.T)
        if T is not None:
            _check(name, T < 1.0, f"T must be < 1 (alpha(1) = 0), got {T}")
        _check_time_range(name, _concrete(self.t_min), T)

    def alpha(self, t):
        return 1.0 - jnp.asarray(t)

    def sigma(self, t):
        return jnp.asarray(t)

    def drift_coef(self, t):
        return -1.0 / (1.0 - jnp.asarray(t))

    def diffusion_sq(self, t):
        t = jnp.asarray(t)
        return 2.0 * t / (1.0 - t)

    def log_snr(self, t):
        t = jnp.asarray(t)
        return 2.0 * (jnp.log1p(-t) - jnp.log(t))

    def t_from_log_snr(self, log_snr):
        return jax.nn.sigmoid(-0.5 * jnp.asarray(log_snr))


# --------------------------------------------------------------------------------------------
# Reverse-time SDE and probability-flow ODE
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReverseSDE:
    """Reverse-time SDE ``dx = [f(x,t) - g(t)^2 score(x,t)] dt + g(t) dw_bar`` (Anderson 1982),
    or the probability-flow ODE ``dx = [f - g^2 score / 2] dt`` when ``probability_flow``.

    Integrate from ``T`` down to ``t_min`` (negative dt).
    """

    sde: SDE
    score_fn: ScoreFn
    probability_flow: bool = False

    @property
    def T(self):
        return self.sde.T

    @property
    def t_min(self):
        return self.sde.t_min

    def drift(self, x: Array, t: Array) -> Array:
        return self.drift_from_score(x, t, self.score_fn(x, t))

    def drift_from_score(self, x: Array, t: Array, score: Array) -> Array:
        g2 = self.sde.diffusion_sq(t)
        scale = 0.5 if self.probability_flow else 1.0
        return self.sde.drift(x, t) - scale * broadcast_to_data(g2, x) * score

    def diffusion(self, t: Array) -> Array:
        g = self.sde.diffusion(t)
        return jnp.zeros_like(g) if self.probability_flow else g

    def discretize(self, x: Array, t: Array, dt: Array | None = None) -> tuple[Array, Array]:
        """Reverse of the forward discretisation (score_sde ``reverse().discretize``):
        ``rev_f = f - G^2 score (x 1/2 for the ODE)``, ``rev_G = G (0 for the ODE)``, where
        ``(f, G)`` is the forward SDE's discrete step at t."""
        f, G = self.sde.discretize(x, t, dt)
        score = self.score_fn(x, t)
        scale = 0.5 if self.probability_flow else 1.0
        rev_f = f - scale * broadcast_to_data(G**2, x) * score
        rev_G = jnp.zeros_like(G) if self.probability_flow else G
        return rev_f, rev_G


@dataclasses.dataclass(frozen=True)
class ProbabilityFlowODE:
    """``dx/dt = f(x, t) - g(t)^2 score(x, t) / 2`` (Song et al. 2021, eq. 13): a deterministic
    flow with the same marginals as the SDE. Its vector field is what the ODE samplers and the
    likelihood computation integrate."""

    sde: SDE
    score_fn: ScoreFn

    def __call__(self, x: Array, t: Array) -> Array:
        return self.vector_field(x, t)

    def vector_field(self, x: Array, t: Array) -> Array:
        g2 = self.sde.diffusion_sq(t)
        return self.sde.drift(x, t) - 0.5 * broadcast_to_data(g2, x) * self.score_fn(x, t)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

SDES: dict[str, type[SDE]] = {
    "vesde": VESDE,
    "vpsde": VPSDE,
    "subvpsde": SubVPSDE,
    "edm": EDMSDE,
    "cosine": CosineVPSDE,
    "rectified_flow": RectifiedFlow,
}


def get_sde(name: str, **kwargs) -> SDE:
    """Build a named SDE; unknown names or parameters raise an error listing what is allowed."""
    key = name.lower()
    if key not in SDES:
        raise ValueError(f"unknown SDE {name!r}; valid names: {', '.join(sorted(SDES))}")
    cls = SDES[key]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for SDE {name!r}; valid: {', '.join(sorted(fields))}")
    return cls(**kwargs)
