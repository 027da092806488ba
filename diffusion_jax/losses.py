"""Training objectives: denoising score matching with the weightings researchers compare.

Every objective of the family is a weighted regression of the eps error: for a prediction of
any kind, ``(kind error) = k(t) (eps error)`` (:func:`diffusion_jax.parametrization.error_scale`),
so a weighting is a function ``w(t)`` on the eps error and the loss is computed in the network's
own output space as ``w(t) / k(t)^2 ||prediction - target||^2``:

=================  ==========================================  ================================
weighting          w(t) on ||eps_hat - eps||^2                 meaning
=================  ==========================================  ================================
``sigma2``         1                                           lambda = sigma^2 on the score
                                                               error: score_sde's default
                                                               (Song et al. 2021, eq. 7)
``eps``            1                                           eps-MSE (Ho et al. 2020)
``likelihood``     g(t)^2 / sigma(t)^2                         lambda = g^2 (Song et al. 2021b,
                                                               maximum likelihood training)
``edm``            (sigma~^2 + sigma_data^2) / sigma_data^2    EDM's lambda on the x0 error
                                                               (Karras et al. 2022, eq. 8)
``v``              ((alpha^2 + sigma^2) / alpha)^2             v-MSE (Salimans & Ho 2022)
``x0``             sigma~^2                                    x0-MSE
``min_snr``        min(SNR, gamma) / SNR                       min-SNR-gamma (Hang et al. 2023)
=================  ==========================================  ================================

with ``sigma~ = sigma / alpha`` and ``SNR = 1 / sigma~^2``. Time samplers draw t for a batch
and an importance weight; losses are pure functions ``loss_fn(params, batch, key) -> (loss, aux)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from diffusion_jax import parametrization as param_lib
from diffusion_jax.parametrization import Parametrization
from diffusion_jax.sde import SDE, VESDE, VPSDE, LinearSDE, broadcast_to_data, require_marginals

Array = jax.Array
# Raw network: model_fn(params, x_in, c_noise, cond, key) -> out (shape of x_in). ``cond`` is the
# batch without its data entry (e.g. {"label": ...}); ``key`` drives dropout.
ModelFn = Callable[[Any, Array, Array, dict, Array], Array]
LossFn = Callable[[Any, dict, Array], tuple[Array, dict]]

__all__ = [
    "WEIGHTINGS",
    "TIME_SAMPLERS",
    "UniformTime",
    "LogNormalSigma",
    "LikelihoodImportanceTime",
    "get_weighting",
    "get_time_sampler",
    "dsm_loss_fn",
    "smld_loss_fn",
    "ddpm_loss_fn",
    "likelihood_bound",
]


# --------------------------------------------------------------------------------------------
# Weightings w(t) on the eps error
# --------------------------------------------------------------------------------------------


def _w_one(sde, t, **_):
    return jnp.ones_like(t)


def _w_likelihood(sde, t, **_):
    return sde.diffusion_sq(t) / sde.sigma(t) ** 2


def _w_edm(sde, t, *, sigma_data=0.5, **_):
    st = sde.sigma_tilde(t)
    return (st**2 + sigma_data**2) / sigma_data**2


def _w_v(sde, t, **_):
    a, s = sde.marginal(t)
    return ((a**2 + s**2) / a) ** 2


def _w_x0(sde, t, **_):
    return sde.sigma_tilde(t) ** 2


def _w_min_snr(sde, t, *, gamma=5.0, **_):
    snr = jnp.exp(sde.log_snr(t))
    return jnp.minimum(snr, gamma) / snr


WEIGHTINGS: dict[str, Callable[..., Array]] = {
    "sigma2": _w_one,
    "eps": _w_one,
    "likelihood": _w_likelihood,
    "edm": _w_edm,
    "v": _w_v,
    "x0": _w_x0,
    "min_snr": _w_min_snr,
}


def get_weighting(name: str) -> Callable[..., Array]:
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {name!r}; valid: {', '.join(WEIGHTINGS)}")
    return WEIGHTINGS[name]


# --------------------------------------------------------------------------------------------
# Time samplers: (key, batch_size, sde, dtype) -> (t, importance weight)
# --------------------------------------------------------------------------------------------


def _unit_uniform(key, batch_size, dtype, stratified):
    u = jax.random.uniform(key, (batch_size,), dtype)
    if stratified:
        # Low-discrepancy sampler (Kingma et al. 2021, Appendix I.1): one shared uniform offset,
        # points spread evenly over [0, 1).
        u = jnp.mod(u[0] + jnp.arange(batch_size, dtype=dtype) / batch_size, 1.0)
    return u


def _range(sampler, sde):
    lo = sde.t_min if sampler.t_min is None else sampler.t_min
    hi = sde.T if sampler.t_max is None else sampler.t_max
    return lo, hi


class UniformTime(flax.struct.PyTreeNode):
    """t ~ U[t_min, t_max] (defaults: the SDE's range); ``stratified`` spreads the batch evenly."""

    stratified: bool = flax.struct.field(pytree_node=False, default=False)
    t_min: float | None = None
    t_max: float | None = None

    def __call__(self, key, batch_size, sde, dtype=jnp.float32):
        lo, hi = _range(self, sde)
        u = _unit_uniform(key, batch_size, dtype, self.stratified)
        return lo + (hi - lo) * u, jnp.ones((batch_size,), dtype)


class LogNormalSigma(flax.struct.PyTreeNode):
    """EDM's training distribution: ln sigma~ ~ N(p_mean, p_std^2) (Karras et al. 2022, sec. 5),
    mapped to t through the inverse log-SNR. Weight 1: it defines the objective, it is not an
    importance sampler."""

    p_mean: float = -1.2
    p_std: float = 1.2
    stratified: bool = flax.struct.field(pytree_node=False, default=False)

    def __call__(self, key, batch_size, sde, dtype=jnp.float32):
        if self.stratified:
            u = _unit_uniform(key, batch_size, dtype, True)
            u = jnp.clip(u, 1e-6, 1.0 - 1e-6)
            n = jax.scipy.special.ndtri(u)
        else:
            n = jax.random.normal(key, (batch_size,), dtype)
        log_sigma = self.p_mean + self.p_std * n
        return sde.t_from_log_snr(-2.0 * log_sigma), jnp.ones((batch_size,), dtype)


class LikelihoodImportanceTime(flax.struct.PyTreeNode):
    """Importance sampling for the likelihood weighting (Song et al. 2021b, sec. 5).

    The proposal is p(t) proportional to g^2 / sigma^2. For the linear family
    ``g^2/sigma^2 = -d lambda/dt``, so p is *uniform in log-SNR*: t = lambda^{-1}(u), u uniform
    on [lambda(t_max), lambda(t_min)]. The returned weight ``1 / (p(t) (t_max - t_min))`` makes
    the weighted loss an unbiased estimate of the uniform-time loss.
    """

    stratified: bool = flax.struct.field(pytree_node=False, default=False)
    t_min: float | None = None
    t_max: float | None = None

    def __call__(self, key, batch_size, sde, dtype=jnp.float32):
        lo, hi = _range(self, sde)
        lam_hi, lam_lo = sde.log_snr(jnp.asarray(lo, dtype)), sde.log_snr(jnp.asarray(hi, dtype))
        u = _unit_uniform(key, batch_size, dtype, self.stratified)
        lam = lam_lo + (lam_hi - lam_lo) * u
        t = jnp.clip(sde.t_from_log_snr(lam), lo, hi)
        density = _w_likelihood(sde, t) / (lam_hi - lam_lo)
        return t, 1.0 / (density * (hi - lo))


TIME_SAMPLERS = {
    "uniform": lambda **kw: UniformTime(**kw),
    "stratified": lambda **kw: UniformTime(stratified=True, **kw),
    "lognormal": lambda **kw: LogNormalSigma(**kw),
    "importance": lambda **kw: LikelihoodImportanceTime(**kw),
}


def get_time_sampler(name: str, **kwargs):
    if name not in TIME_SAMPLERS:
        raise ValueError(f"unknown time sampler {name!r}; valid: {', '.join(TIME_SAMPLERS)}")
    return TIME_SAMPLERS[name](**kwargs)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def _sq(err: Array) -> Array:
    """Squared error, accumulated in at least float32 (bf16 networks)."""
    err = err.astype(jnp.promote_types(err.dtype, jnp.float32))
    return err * err


def _reduce(x: Array, reduce_mean: bool) -> Array:
    axes = tuple(range(1, x.ndim))
    return jnp.mean(x, axis=axes) if reduce_mean else jnp.sum(x, axis=axes)


def _batch_mean(per_example: Array, batch: dict) -> Array:
    """Mean over the batch; a ``mask`` entry (1 = real example, 0 = padding) excludes padding."""
    mask = batch.get("mask")
    if mask is None:
        return jnp.mean(per_example)
    mask = mask.astype(per_example.dtype)
    return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _split_batch(batch: dict, data_key: str):
    if data_key not in batch:
        raise KeyError(f"batch has no {data_key!r} entry; entries: {sorted(batch)}")
    x0 = batch[data_key]
    cond = {k: v for k, v in batch.items() if k not in (data_key, "mask")}
    return x0, cond


def dsm_loss_fn(
    model_fn: ModelFn,
    sde: SDE,
    parametrization: Parametrization,
    *,
    weighting: str = "sigma2",
    time_sampler=UniformTime(),
    reduce_mean: bool = False,
    sigma_data: float = 0.5,
    min_snr_gamma: float = 5.0,
    data_key: str = "image",
) -> LossFn:
    """Denoising score matching (Vincent 2011; Song et al. 2021, eq. 7) for a linear SDE.

    Per example: ``w(t) * importance(t) / k(t)^2 * reduce(||pred - target||^2)`` with ``w`` from
    :data:`WEIGHTINGS`, computed in the network's own prediction space. ``reduce_mean`` averages
    over data dimensions instead of summing (score_sde's ``training.reduce_mean``). The batch is
    averaged (over real examples if the batch carries a ``mask``).

    Returns ``loss_fn(params, batch, key) -> (loss, aux)``, aux = {"loss_per_example", "t"}.
    """
    sde = require_marginals(sde, "denoising score matching")
    w_fn = get_weighting(weighting)
    w_kwargs = {"sigma_data": sigma_data, "gamma": min_snr_gamma}
    kind = parametrization.kind

    def loss_fn(params, batch, key):
        x0, cond = _split_batch(batch, data_key)
        k_t, k_eps, k_model = jax.random.split(key, 3)
        t, importance = time_sampler(k_t, x0.shape[0], sde, jnp.promote_types(x0.dtype, jnp.float32))
        eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
        x_t = sde.perturb(x0, t, eps)
        x_in, c_noise = parametrization.network_inputs(sde, x_t, t)
        out = model_fn(params, x_in, c_noise, cond, k_model)
        pred = parametrization.prediction(sde, x_t, t, out)
        err = pred - param_lib.target(kind, sde, x0, eps, t)
        weight = w_fn(sde, t, **w_kwargs) * importance / param_lib.error_scale(kind, sde, t) ** 2
        per_example = weight * _reduce(_sq(err), reduce_mean)
        return _batch_mean(per_example, batch), {"loss_per_example": per_example, "t": t}

    return loss_fn


def smld_loss_fn(model_fn: ModelFn, sde: SDE, *, reduce_mean: bool = False, data_key: str = "image") -> LossFn:
    """score_sde's discrete SMLD (NCSN) loss: a random index i into the *decreasing* sigma table,
    ``x = x0 + sigma_i z``, loss ``sigma_i^2 ||s(x, i) + z / sigma_i||^2`` (Song & Ermon 2019)."""
    if not isinstance(sde, VESDE):
        raise TypeError(f"the SMLD loss needs a VESDE (discrete sigma table), got {type(sde).__name__}")

    def loss_fn(params, batch, key):
        x0, cond = _split_batch(batch, data_key)
        k_i, k_z, k_model = jax.random.split(key, 3)
        sigmas = sde.discrete_sigmas()[::-1]
        labels = jax.random.randint(k_i, (x0.shape[0],), 0, sigmas.shape[0])  # N noise scales
        sigma = sigmas[labels].astype(x0.dtype)
        z = jax.random.normal(k_z, x0.shape, x0.dtype)
        x = x0 + broadcast_to_data(sigma, x0) * z
        score = model_fn(params, x, labels, cond, k_model)
        err = broadcast_to_data(sigma, x0) * score + z
        per_example = _reduce(_sq(err), reduce_mean)
        return _batch_mean(per_example, batch), {"loss_per_example": per_example, "t": labels}

    return loss_fn


def ddpm_loss_fn(model_fn: ModelFn, sde: SDE, *, reduce_mean: bool = True, data_key: str = "image") -> LossFn:
    """score_sde's discrete DDPM loss (Ho et al. 2020, Alg. 1): a random step i,
    ``x = sqrt(abar_i) x0 + sqrt(1 - abar_i) z``, loss ``||eps(x, i) - z||^2``."""
    if not isinstance(sde, VPSDE):
        raise TypeError(f"the DDPM loss needs a VPSDE (discrete beta table), got {type(sde).__name__}")

    def loss_fn(params, batch, key):
        x0, cond = _split_batch(batch, data_key)
        k_i, k_z, k_model = jax.random.split(key, 3)
        abar = sde.alphas_cumprod()
        labels = jax.random.randint(k_i, (x0.shape[0],), 0, abar.shape[0])  # N steps
        a = jnp.sqrt(abar[labels]).astype(x0.dtype)
        s = jnp.sqrt(1.0 - abar[labels]).astype(x0.dtype)
        z = jax.random.normal(k_z, x0.shape, x0.dtype)
        x = broadcast_to_data(a, x0) * x0 + broadcast_to_data(s, x0) * z
        out = model_fn(params, x, labels, cond, k_model)
        per_example = _reduce(_sq(out - z), reduce_mean)
        return _batch_mean(per_example, batch), {"loss_per_example": per_example, "t": labels}

    return loss_fn


# --------------------------------------------------------------------------------------------
# Variational bound on the negative log-likelihood
# --------------------------------------------------------------------------------------------


def likelihood_bound(
    key: Array,
    score_fn: Callable[[Array, Array], Array],
    sde: LinearSDE,
    x0: Array,
    *,
    num_samples: int = 1024,
    t_min: float | None = None,
) -> tuple[Array, Array]:
    """Monte-Carlo upper bound on -log p(x0) in nats (Song et al. 2021b, Theorem 1 with the
    entropy terms of Huang et al. 2021), for each example of ``x0`` (shape ``(B, ...)``).

    ``-log p(x0) <= -E log pi(x_T) + 1/2 int_{t_min}^T E[g^2 (||s||^2 - 2 s . c)] dt - d log(alpha(T)/alpha(t_min))``

    where ``c = grad log p_0t(x_t | x0)`` and the last term is ``-int div f dt``; written this way
    the integrand has no 1/t singularity. [0, t_min] is ignored, as in score_sde. Returns
    ``(bound, standard_error)``, each of shape ``(B,)``.
    """
    sde = require_marginals(sde, "likelihood_bound")
    lo = sde.t_min if t_min is None else t_min
    hi = sde.T
    d = math.prod(x0.shape[1:])
    batch = x0.shape[0]

    def one(key):
        k_t, k_eps, k_T = jax.random.split(key, 3)
        t = lo + (hi - lo) * jax.random.uniform(k_t, (batch,), x0.dtype)
        eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
        x_t = sde.perturb(x0, t, eps)
        s = score_fn(x_t, t)
        c = sde.conditional_score(x_t, x0, t)
        axes = tuple(range(1, x0.ndim))
        integrand = sde.diffusion_sq(t) * jnp.sum(s * s - 2.0 * s * c, axis=axes)
        x_T = sde.perturb(x0, jnp.full((batch,), hi, x0.dtype), jax.random.normal(k_T, x0.shape, x0.dtype))
        return -sde.prior_logp(x_T) + 0.5 * (hi - lo) * integrand

    samples = jax.lax.map(one, jax.random.split(key, num_samples))  # (num_samples, B)
    a_hi, a_lo = sde.alpha(jnp.asarray(hi, x0.dtype)), sde.alpha(jnp.asarray(lo, x0.dtype))
    constant = -d * (jnp.log(a_hi) - jnp.log(a_lo))
    mean = jnp.mean(samples, axis=0) + constant
    stderr = jnp.std(samples, axis=0) / jnp.sqrt(num_samples)
    return mean, stderr
