"""Exact log-likelihoods and bits/dim through the probability-flow ODE, on device.

For ``dx/dt = v(x, t)`` (the probability-flow ODE, Song et al. 2021, eq. 13) the instantaneous
change of variables (Chen et al. 2018, Thm. 1) gives

    log p_{t_min}(x) = log p_T(x_T) + int_{t_min}^T div v(x_t, t) dt,

with ``x_T`` the ODE solution started at ``x`` (Song et al. 2021, eq. 39). The ODE and the
divergence integral are solved together by the adaptive Runge-Kutta solver of
:mod:`diffusion_jax.solvers.ode` with a per-sample error norm, so every example gets its own
step sizes; the divergence is exact (``d`` Jacobian-vector products) or the Hutchinson-Skilling
estimate ``E[e^T (dv/dx) e]`` with Rademacher or Gaussian probes fixed along the path.

Bits per dimension of discrete data (``L`` levels in a value range ``[lo, hi]``) use uniform
dequantization ``x = lo + (hi - lo) (k + u) / L``: ``-log2 P(k) <= E_u[-log2 p(x)] - D log2((hi - lo)/L)``
(Theis et al. 2016), so the offset follows from the data scaling instead of an 8-bit constant.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from diffusion_jax.sde import SDE, require_marginals
from diffusion_jax.solvers.ode import odeint

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

ESTIMATORS = ("hutchinson_rademacher", "hutchinson_gaussian", "exact")
TRUNCATIONS = ("ignore", "perturb")

__all__ = [
    "ESTIMATORS",
    "TRUNCATIONS",
    "LikelihoodInfo",
    "Discretization",
    "log_likelihood",
    "bits_per_dim",
    "divergence_fn",
    "evaluate_dataset",
]


class LikelihoodInfo(NamedTuple):
    """Per-example details of :func:`log_likelihood` (shapes ``(B,)`` unless noted).

    ``nfe``: vector-field evaluations of the solve (scalar; each evaluates the score once, plus
    one Jacobian-vector product per probe or per dimension). ``num_steps``: accepted steps per
    example. ``prior_logp``: log p_T(x_T). ``delta_logp``: the divergence integral (mean over
    probes). ``logp_probes``: ``(B, P)`` the estimate of each probe. ``stderr``: standard error
    of the mean over probes (0 with one probe or the exact divergence). ``success``: whether the
    solver reached T within ``max_steps``. ``z``: ``x_T``.
    """

    nfe: Array
    num_steps: Array
    prior_logp: Array
    delta_logp: Array
    logp_probes: Array
    stderr: Array
    success: Array
    z: Array


def divergence_fn(
    vector_field: Callable[[Array, Array], Array], *, estimator: str, probes: Array | None = None
) -> Callable[[Array, Array], tuple[Array, Array]]:
    """``f(x, t) -> (v(x, t), div)`` where ``div`` has shape ``(B, P)`` (``P = 1`` for exact).

    Hutchinson: ``div_p = sum(e_p * (dv/dx) e_p)`` for each fixed probe ``e_p`` of shape of x;
    the primal is computed once and only the tangents are batched over probes.
    Exact: the trace of the per-example Jacobian from ``D`` JVPs with basis vectors.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown divergence estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")

    def per_probe(x, t, e):
        v, jv = jax.jvp(lambda y: vector_field(y, t), (x,), (e,))
        return v, jnp.sum((e * jv).reshape(x.shape[0], -1), axis=1)

    if estimator != "exact":

        def fn(x, t):
            v, div = jax.vmap(lambda e: per_probe(x, t, e), out_axes=(None, 1))(probes)
            return v, div

        return fn

    def exact(x, t):
        b = x.shape[0]
        d = math.prod(x.shape[1:])
        basis = jnp.eye(d, dtype=x.dtype).reshape((d, 1) + x.shape[1:])
        basis = jnp.broadcast_to(basis, (d,) + x.shape)
        v, div = jax.vmap(lambda e: per_probe(x, t, e), out_axes=(None, 1))(basis)
        return v, jnp.sum(div, axis=1, keepdims=True).reshape(b, 1)

    return exact


def _check_score_shape(score_fn: ScoreFn, x: Array) -> None:
    """The score of a batch must have the batch's shape: a clear message instead of an error deep
    inside the solver when, e.g., one unbatched image is passed."""
    t = jax.ShapeDtypeStruct(x.shape[:1], jnp.float32)
    try:
        out = jax.eval_shape(score_fn, jax.ShapeDtypeStruct(x.shape, x.dtype), t)
    except Exception as e:  # noqa: BLE001 (the network's own error, reported with the shapes)
        raise ValueError(
            f"the score function fails on x of shape {x.shape} (a batch of {x.shape[0]} example(s) of shape "
            f"{x.shape[1:]}): {type(e).__name__}: {str(e)[:300]}. Is x batched (B, ...)? For one example pass x[None]"
        ) from None
    if out.shape != x.shape:
        raise ValueError(
            f"the score function returns shape {out.shape} for x of shape {x.shape}; is x batched (B, ...)?"
            " For one example pass x[None]"
        )


def log_likelihood(
    key: Array,
    score_fn: ScoreFn,
    sde: SDE,
    x: Array,
    *,
    estimator: str = "hutchinson_rademacher",
    num_probes: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    solver: str = "dopri5",
    error_norm: str = "per_sample",
    max_steps: int = 4096,
    t_min: float | None = None,
    truncation: str = "ignore",
    prior_logp: Callable[[Array], Array] | None = None,
) -> tuple[Array, LikelihoodInfo]:
    """log p(x) in nats for each example of ``x`` (shape ``(B, ...)``).

    Args:
      key: PRNG key for the Hutchinson probes (and the noise of ``truncation='perturb'``).
      score_fn: ``score_fn(x, t) -> score`` (a network through the parametrization, or exact).
      sde: any SDE with marginals (the prior is ``sde.prior_logp`` at ``T``).
      estimator: ``"hutchinson_rademacher"``, ``"hutchinson_gaussian"`` or ``"exact"``.
      num_probes: Hutchinson probes, each fixed along the whole path; the log-likelihood is the
        mean over probes and ``info.stderr`` its standard error.
      rtol, atol, solver, error_norm, max_steps: of :func:`diffusion_jax.solvers.ode.odeint`;
        ``error_norm="per_sample"`` gives each example its own step sizes.
      t_min: start of the integration (default ``sde.t_min``).
      truncation: ``"ignore"`` treats ``x`` as a sample at ``t_min`` (score_sde, which ignores
        ``[0, t_min]``); ``"perturb"`` evaluates the variational bound
        ``E[log p_{t_min}(alpha x + sigma e)] + D log alpha(t_min)``, whose decoder
        ``N(x; x_t / alpha, sigma^2 / alpha^2)`` inverts the forward perturbation, a lower bound
        on log p(x) of the model extended to t = 0.
      prior_logp: ``log p_T(z) -> (B,)``; default ``sde.prior_logp`` (the model's prior).

    Returns:
      ``(logp, info)`` with ``logp`` of shape ``(B,)`` and :class:`LikelihoodInfo`.
    """
    sde = require_marginals(sde, "log_likelihood (the prior and the probability-flow ODE of a linear SDE)")
    if truncation not in TRUNCATIONS:
        raise ValueError(f"unknown truncation {truncation!r}; valid: {', '.join(TRUNCATIONS)}")
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x must be a batch of shape (B, ...), got shape {x.shape}; for one example pass x[None]")
    _check_score_shape(score_fn, x)
    batch = x.shape[0]
    d = math.prod(x.shape[1:])
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    x = x.astype(dtype)
    t0 = sde.t_min if t_min is None else t_min
    k_probe, k_noise = jax.random.split(key)
    correction = jnp.zeros((batch,), dtype)
    if truncation == "perturb":
        t0_arr = jnp.full((batch,), t0, dtype)
        x = sde.perturb(x, t0_arr, jax.random.normal(k_noise, x.shape, dtype))
        correction = correction + d * jnp.log(sde.alpha(t0_arr))

    probes: Array | None = None
    if estimator == "hutchinson_rademacher":
        probes = jax.random.rademacher(k_probe, (num_probes,) + x.shape, dtype)
    elif estimator == "hutchinson_gaussian":
        probes = jax.random.normal(k_probe, (num_probes,) + x.shape, dtype)

    flow = sde.probability_flow(score_fn)

    def v_field(y, t):
        return flow.vector_field(y, jnp.broadcast_to(t, (batch,))).astype(y.dtype)

    div = divergence_fn(v_field, estimator=estimator, probes=probes)

    def ode(state, t):
        y, _ = state
        v, dv = div(y, t)
        return v, dv.astype(y.dtype)

    n_div = 1 if estimator == "exact" else num_probes
    y0 = (x, jnp.zeros((batch, n_div), dtype))
    (z, delta), stats = odeint(
        ode, y0, t0, sde.T, solver=solver, rtol=rtol, atol=atol, error_norm=error_norm, max_steps=max_steps
    )
    prior = (sde.prior_logp if prior_logp is None else prior_logp)(z)
    logp_probes = prior[:, None] + delta + correction[:, None]
    logp = jnp.mean(logp_probes, axis=1)
    if n_div > 1:
        stderr = jnp.std(logp_probes, axis=1, ddof=1) / math.sqrt(n_div)
    else:
        stderr = jnp.zeros_like(logp)
    num_steps = jnp.broadcast_to(stats.num_steps, (batch,))
    success = jnp.broadcast_to(stats.success, (batch,))
    return logp, LikelihoodInfo(stats.nfe, num_steps, prior, jnp.mean(delta, axis=1), logp_probes, stderr, success, z)


class Discretization(flax.struct.PyTreeNode):
    """Discrete data of ``num_levels`` levels per dimension shown to the model in
    ``value_range``: level ``k`` dequantizes to ``lo + (hi - lo) (k + u) / L``, ``u ~ U[0, 1)``
    (score_sde's ``(255 x + u) / 256`` for 8-bit data, then centred)."""

    num_levels: int = flax.struct.field(pytree_node=False, default=256)
    value_range: tuple[float, float] = flax.struct.field(pytree_node=False, default=(0.0, 1.0))

    def __post_init__(self):
        if int(self.num_levels) < 2:
            raise ValueError(f"num_levels must be >= 2, got {self.num_levels}")
        lo, hi = self.value_range
        if not lo < hi:
            raise ValueError(f"value_range must satisfy low < high, got {self.value_range}")

    @property
    def bin_width(self) -> float:
        lo, hi = self.value_range
        return (hi - lo) / self.num_levels

    @property
    def offset_bits(self) -> float:
        """-log2(bin width): the bits per dimension added to -log2 p(x) / D."""
        return -math.log2(self.bin_width)

    def dequantize(self, key: Array, levels: Array, dtype=None) -> Array:
        lo, _ = self.value_range
        dtype = dtype or jax.dtypes.canonicalize_dtype(jnp.float64)  # float64 only under x64
        u = jax.random.uniform(key, levels.shape, dtype)
        return lo + self.bin_width * (levels.astype(dtype) + u)

    def levels_from_grid(self, x: Array) -> Array:
        """Levels of data on the grid ``lo + (hi - lo) k / (L - 1)`` (the pipeline without
        dequantization)."""
        lo, hi = self.value_range
        k = jnp.round((x - lo) / (hi - lo) * (self.num_levels - 1))
        return jnp.clip(k, 0, self.num_levels - 1).astype(jnp.int32)


def bits_per_dim(
    key: Array,
    score_fn: ScoreFn,
    sde: SDE,
    levels: Array,
    *,
    discretization: Discretization,
    num_draws: int = 1,
    **kwargs,
) -> tuple[Array, LikelihoodInfo]:
    """Bits per dimension of discrete data ``levels`` (integers in ``[0, L)``, shape ``(B, ...)``):
    ``E_u[-log p(dequantize(k, u))] / (D ln 2) + log2(L / (hi - lo))``, averaged over ``num_draws``
    dequantization draws (each an upper bound; the average reduces its variance).

    Extra ``kwargs`` go to :func:`log_likelihood`. Returns ``(bpd (B,), info of the last draw)``.
    """
    if num_draws < 1:
        raise ValueError(f"num_draws must be >= 1, got {num_draws}")
    d = math.prod(levels.shape[1:])

    def one(key):
        k_deq, k_ll = jax.random.split(key)
        x = discretization.dequantize(k_deq, levels)
        logp, info = log_likelihood(k_ll, score_fn, sde, x, **kwargs)
        return -logp / (d * math.log(2.0)) + discretization.offset_bits, info

    bpds, infos = jax.lax.map(one, jax.random.split(key, num_draws))
    last = jax.tree_util.tree_map(lambda a: a[-1], infos)
    return jnp.mean(bpds, axis=0), last


def evaluate_dataset(
    key: Array,
    score_fn_for: Callable[[Array | None], ScoreFn],
    sde: SDE,
    batches: Iterable[dict],
    *,
    num_levels: int | None,
    value_range: Sequence[float] = (0.0, 1.0),
    num_draws: int = 1,
    max_examples: int = 0,
    place: Callable[[dict], dict] = lambda b: b,
    **kwargs,
) -> dict:
    """Bits/dim (``num_levels`` given) or nats/dim (continuous data) over every example of
    ``batches``, an iterable of ``{"image", "mask"?, "label"?}`` dicts of data on the pipeline's
    grid (not dequantized). Padding rows (``mask`` False) are excluded, nothing is dropped.

    ``score_fn_for(labels)`` returns the score function (labels are the batch's, or None);
    ``place`` puts a batch on devices (e.g. sharded over a mesh). Returns a dict with the mean,
    its standard error over examples, the example count, the mean NFE per batch and the number of
    examples whose ODE solve did not reach T.
    """
    import numpy as np

    discrete = num_levels is not None
    disc = None
    if num_levels is not None:
        lo, hi = value_range
        disc = Discretization(num_levels=num_levels, value_range=(lo, hi))

    def per_batch(key, x, labels):
        score_fn = score_fn_for(labels)
        if disc is not None:
            values, info = bits_per_dim(
                key, score_fn, sde, disc.levels_from_grid(x), discretization=disc, num_draws=num_draws, **kwargs
            )
        else:
            logp, info = log_likelihood(key, score_fn, sde, x, **kwargs)
            values = -logp / math.prod(x.shape[1:])
        return values, info.nfe, info.success

    fn = jax.jit(per_batch)
    values_all, nfes, failures = [], [], 0
    for i, batch in enumerate(batches):
        batch = place(batch)
        values, nfe, success = fn(jax.random.fold_in(key, i), batch["image"], batch.get("label"))
        values, success = np.asarray(jax.device_get(values)), np.asarray(jax.device_get(success))
        mask = (
            np.ones(values.shape, bool)
            if "mask" not in batch
            else np.asarray(jax.device_get(batch["mask"])).astype(bool)
        )
        values_all.append(values[mask])
        failures += int(np.sum(~success[mask]))
        nfes.append(int(nfe))
        if max_examples and sum(v.size for v in values_all) >= max_examples:
            break
    values = np.concatenate(values_all) if values_all else np.zeros((0,))
    if max_examples:
        values = values[:max_examples]
    if values.size == 0:
        raise ValueError("no examples to evaluate")
    name = "bpd" if discrete else "nll_nats_per_dim"
    return {
        name: float(values.mean()),
        f"{name}_stderr": float(values.std() / math.sqrt(values.size)),
        "examples": int(values.size),
        "mean_nfe": float(np.mean(nfes)),
        "solver_failures": failures,
    }
