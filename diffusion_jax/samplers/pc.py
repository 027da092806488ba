"""score_sde's predictor-corrector samplers (Song et al. 2021, Sec. 4.2 and Algorithms 2-3).

A step at grid time ``t`` (towards ``t_next``) runs the corrector, then the predictor, as
score_sde does. Predictors (:data:`PREDICTORS`):

=====================  ======================================================================
``euler_maruyama``     Euler-Maruyama on the reverse SDE (eq. 6), or Euler on the probability-flow
                       ODE (eq. 13) with ``probability_flow=True``; needs only drift and diffusion,
                       so it accepts a general SDE
``reverse_diffusion``  reverse diffusion (App. E, eq. 45): the reverse of the SDE's own forward
                       discretisation ``SDE.discretize`` (the discrete SMLD / DDPM tables for VE /
                       VP, Euler-Maruyama increments for the other SDEs)
``ancestral``          ancestral sampling (App. F, eq. 47 for VE, DDPM for VP): the SDE's
                       ``ancestral_step`` on its discrete table
``none``               no predictor (corrector-only sampling)
=====================  ======================================================================

Correctors (:data:`CORRECTORS`): ``langevin`` -- Langevin dynamics with the step size set by a
target signal-to-noise ratio (Algorithms 4-5: ``eps = 2 alpha (snr ||z|| / ||score||)^2``);
``annealed_langevin`` -- the NCSN step size ``eps = 2 alpha (snr sigma(t))^2`` (Song & Ermon
2019); ``none``. ``alpha`` is the SDE's ``langevin_alpha(t)`` where it defines one (the DDPM
``1 - beta_i`` for VP, 1 for VE) and 1 otherwise.

The single-step updates (``Predictor.update``, ``Corrector.update`` and :func:`pc_step`) are
public so that conditional samplers (inpainting, colorization) can interleave them with their
own projections.

NFE: score_sde reports ``N (n_steps + 1)`` whatever the predictor and corrector; the count here
is the true one, ``N (n_steps [corrector != none] + [predictor != none])``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from diffusion_jax.samplers.base import FixedGridSampler, Model, NoiseSource, fixed_info, require_marginals
from diffusion_jax.samplers.grids import ScoreSDEGrid
from diffusion_jax.sde import SDE, DiscreteChain, broadcast_to_data

Array = jax.Array

__all__ = [
    "EulerMaruyamaPredictor",
    "ReverseDiffusionPredictor",
    "AncestralPredictor",
    "NonePredictor",
    "LangevinCorrector",
    "AnnealedLangevinCorrector",
    "NoneCorrector",
    "PREDICTORS",
    "CORRECTORS",
    "PCSampler",
    "pc_step",
]


# --------------------------------------------------------------------------------------------
# Predictors: update(model, x, t, t_next, noise, j, *, probability_flow) -> (x, x_mean)
# ``t`` and ``t_next`` have shape (B,); ``noise`` is a NoiseSource and ``j`` a draw index (a
# tuple of ints). Correctors: update(model, x, t, noise, j) -> (x, x_mean).
# --------------------------------------------------------------------------------------------


class EulerMaruyamaPredictor(flax.struct.PyTreeNode):
    """``x_mean = x + [f - g^2 s (1/2 for the ODE)] dt``, ``x = x_mean + g sqrt(-dt) z``, dt < 0."""

    nfe: ClassVar[int] = 1
    needs_marginals: ClassVar[bool] = False
    uses_table: ClassVar[bool] = False
    has_probability_flow: ClassVar[bool] = True

    def update(self, model: Model, x, t, t_next, noise: NoiseSource, j, *, probability_flow=False):
        sde = model.sde
        rsde = sde.reverse(model.score, probability_flow=probability_flow)
        dt = broadcast_to_data(t_next - t, x)
        x_mean = x + rsde.drift(x, t) * dt
        if probability_flow:
            return x_mean, x_mean
        g = broadcast_to_data(sde.diffusion(t), x)
        z = noise.normal(j, x.shape, x.dtype)
        return x_mean + g * jnp.sqrt(-dt) * z, x_mean


class ReverseDiffusionPredictor(flax.struct.PyTreeNode):
    """``x_mean = x - [f_i - G_i^2 s]``, ``x = x_mean + G_i z`` with ``(f_i, G_i)`` the forward
    discretisation of the SDE at t (score_sde ``ReverseDiffusionPredictor``)."""

    nfe: ClassVar[int] = 1
    needs_marginals: ClassVar[bool] = False
    uses_table: ClassVar[bool] = True
    has_probability_flow: ClassVar[bool] = True

    def update(self, model: Model, x, t, t_next, noise: NoiseSource, j, *, probability_flow=False):
        rsde = model.sde.reverse(model.score, probability_flow=probability_flow)
        # The forward increment over [t_next, t]; the VE / VP tables ignore it.
        f, G = rsde.discretize(x, t, t - t_next)
        x_mean = x - f
        if probability_flow:
            return x_mean, x_mean
        z = noise.normal(j, x.shape, x.dtype)
        return x_mean + broadcast_to_data(G, x) * z, x_mean


class AncestralPredictor(flax.struct.PyTreeNode):
    """The SDE's own ancestral step on its discrete table (``SDE.ancestral_step``: SMLD for
    VE, DDPM for VP). Use with the uniform grid and ``num_steps == sde.N``, as score_sde does."""

    nfe: ClassVar[int] = 1
    needs_marginals: ClassVar[bool] = False
    uses_table: ClassVar[bool] = True
    has_probability_flow: ClassVar[bool] = False

    def update(self, model: Model, x, t, t_next, noise: NoiseSource, j, *, probability_flow=False):
        if probability_flow:
            raise ValueError(
                "the ancestral predictor has no probability-flow form (score_sde "
                "asserts the same); use euler_maruyama or reverse_diffusion"
            )
        sde = model.sde
        if not isinstance(sde, DiscreteChain):
            raise ValueError(
                f"the ancestral predictor needs an SDE with a discrete ancestral table "
                f"(ancestral_step), such as VESDE or VPSDE; {type(sde).__name__} has none. "
                f"Use the 'ddpm' sampler for ancestral sampling on any SDE of the linear family."
            )
        score = model.score(x, t)
        return noise.keyed(lambda k, xx, tt, ss: sde.ancestral_step(k, xx, tt, ss), j, x, t, score)


class NonePredictor(flax.struct.PyTreeNode):
    """No predictor: the state is left unchanged (no score evaluation)."""

    nfe: ClassVar[int] = 0
    needs_marginals: ClassVar[bool] = False
    uses_table: ClassVar[bool] = False
    has_probability_flow: ClassVar[bool] = True

    def update(self, model, x, t, t_next, noise, j, *, probability_flow=False):
        return x, x


def _langevin_alpha(sde: SDE, t: Array) -> Array:
    # score_sde scales the Langevin step by the DDPM alpha_i for VP and 1 for VE; SDEs without a
    # discrete table use 1.
    if isinstance(sde, DiscreteChain):
        return sde.langevin_alpha(t).astype(t.dtype)
    return jnp.ones_like(t)


def _norm_per_sample(v: Array) -> Array:
    return jnp.sqrt(jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=1))


class LangevinCorrector(flax.struct.PyTreeNode):
    """Langevin MCMC with a signal-to-noise step size (Song et al. 2021, Algorithms 4-5).

    ``norm="batch"`` averages ``||score||`` and ``||z||`` over the batch as score_sde does (the
    step then depends on the other samples); ``norm="per_sample"`` uses each sample's own norms,
    which keeps samples independent of the batch (needed for per-sample reproducibility).
    """

    snr: float = 0.16
    n_steps: int = flax.struct.field(pytree_node=False, default=1)
    norm: str = flax.struct.field(pytree_node=False, default="batch")
    needs_marginals: ClassVar[bool] = False

    def __post_init__(self):
        if int(self.n_steps) < 1:
            raise ValueError(f"LangevinCorrector.n_steps must be >= 1, got {self.n_steps}")
        if self.norm not in ("batch", "per_sample"):
            raise ValueError(f"LangevinCorrector.norm must be 'batch' or 'per_sample', got {self.norm!r}")

    @property
    def nfe(self) -> int:
        return int(self.n_steps)

    def update(self, model: Model, x, t, noise: NoiseSource, j):
        alpha = _langevin_alpha(model.sde, t)
        x_mean = x
        for i in range(self.n_steps):
            grad = model.score(x, t)
            z = noise.normal(j + (i,), x.shape, x.dtype)
            g_norm, z_norm = _norm_per_sample(grad), _norm_per_sample(z)
            if self.norm == "batch":
                g_norm, z_norm = jnp.mean(g_norm), jnp.mean(z_norm)
            step = 2.0 * alpha * (self.snr * z_norm / g_norm) ** 2
            step = broadcast_to_data(jnp.broadcast_to(step, t.shape), x)
            x_mean = x + step * grad
            x = x_mean + jnp.sqrt(2.0 * step) * z
        return x, x_mean


class AnnealedLangevinCorrector(flax.struct.PyTreeNode):
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) with step
    ``eps = 2 alpha (snr sigma(t))^2``; needs the marginal std, so a linear SDE."""

    snr: float = 0.16
    n_steps: int = flax.struct.field(pytree_node=False, default=1)
    needs_marginals: ClassVar[bool] = True

    def __post_init__(self):
        if int(self.n_steps) < 1:
            raise ValueError(f"AnnealedLangevinCorrector.n_steps must be >= 1, got {self.n_steps}")

    @property
    def nfe(self) -> int:
        return int(self.n_steps)

    def update(self, model: Model, x, t, noise: NoiseSource, j):
        alpha = _langevin_alpha(model.sde, t)
        _, std = model.sde.marginal(t)
        step = broadcast_to_data(2.0 * alpha * (self.snr * std) ** 2, x)
        x_mean = x
        for i in range(self.n_steps):
            grad = model.score(x, t)
            z = noise.normal(j + (i,), x.shape, x.dtype)
            x_mean = x + step * grad
            x = x_mean + jnp.sqrt(2.0 * step) * z
        return x, x_mean


class NoneCorrector(flax.struct.PyTreeNode):
    """No corrector (no score evaluation)."""

    nfe: ClassVar[int] = 0
    needs_marginals: ClassVar[bool] = False

    def update(self, model, x, t, noise, j):
        return x, x


PREDICTORS = {
    "euler_maruyama": EulerMaruyamaPredictor,
    "reverse_diffusion": ReverseDiffusionPredictor,
    "ancestral": AncestralPredictor,
    "none": NonePredictor,
}

CORRECTORS = {
    "langevin": LangevinCorrector,
    "annealed_langevin": AnnealedLangevinCorrector,
    "none": NoneCorrector,
}


def pc_step(
    predictor,
    corrector,
    model: Model,
    x: Array,
    t: Array,
    t_next: Array,
    noise: NoiseSource,
    step: Array | int,
    *,
    probability_flow: bool = False,
):
    """One predictor-corrector step at time ``t`` (corrector first, then predictor, as in
    score_sde). ``x``: ``(B, ...)``; ``t``, ``t_next``: ``(B,)``. Noise draws are indexed by
    ``step`` so that every step sees fresh noise. Returns ``(x, x_mean)``."""
    # Noise draws (0, step, i) for the corrector's i-th Langevin step, (1, step) for the predictor.
    x, x_mean = corrector.update(model, x, t, noise, (0, step))
    x, x_mean = predictor.update(model, x, t, t_next, noise, (1, step), probability_flow=probability_flow)
    return x, x_mean


class PCSampler(FixedGridSampler):
    """Predictor-corrector sampling on a fixed grid (score_sde ``get_pc_sampler``).

    Fields:
      predictor, corrector: objects from :data:`PREDICTORS` / :data:`CORRECTORS`.
      num_steps: number of grid steps N (score_sde: ``sde.N``).
      grid: time grid (default :class:`ScoreSDEGrid`, score_sde's time points).
      probability_flow: integrate the probability-flow ODE with the predictor instead of the
        reverse SDE (the corrector still adds noise).
      denoise: return the last predictor's mean instead of its noisy output (score_sde's
        ``denoise=True`` / noise removal: the final step adds no noise; no extra evaluation).
    """

    denoise: bool = flax.struct.field(pytree_node=False, default=True)
    num_steps: int = flax.struct.field(pytree_node=False, default=1000)
    grid: Any = ScoreSDEGrid()
    predictor: Any = EulerMaruyamaPredictor()
    corrector: Any = NoneCorrector()
    probability_flow: bool = flax.struct.field(pytree_node=False, default=False)

    name: ClassVar[str] = "pc"
    needs_marginals: ClassVar[bool] = False

    def is_stochastic(self) -> bool:
        noisy_predictor = self.predictor.nfe > 0 and not self.probability_flow
        return noisy_predictor or self.corrector.nfe > 0

    def __post_init__(self):
        super().__post_init__()
        if self.probability_flow and not self.predictor.has_probability_flow:
            raise ValueError(
                "the ancestral predictor has no probability-flow form; use "
                "euler_maruyama or reverse_diffusion with probability_flow=True"
            )

    def validate(self, sde: SDE) -> None:
        for part in (self.predictor, self.corrector):
            if part.needs_marginals:
                require_marginals(sde, f"pc with {type(part).__name__}")
        # SDEs with a discrete ancestral table (VE / VP) step by one table entry per evaluation:
        # the grid must have as many steps as the table, as in score_sde (num_steps = sde.N).
        table_size = sde.N if isinstance(sde, DiscreteChain) else None
        if self.predictor.uses_table and table_size is not None and int(table_size) != self.num_steps:
            raise ValueError(
                f"{type(self.predictor).__name__} steps through {type(sde).__name__}'s discrete table "
                f"of N={table_size} steps; use num_steps={table_size} or build the SDE with "
                f"N={self.num_steps} (score_sde sets both to the same N)"
            )

    def num_evaluations(self) -> int:
        return self.num_steps * (self.predictor.nfe + self.corrector.nfe)

    def run(self, model: Model, x: Array, noise: NoiseSource, *, return_trajectory: bool = False):
        ts = self.grid(model.sde, self.num_steps).astype(x.dtype)

        def body(carry, inp):
            x, _ = carry
            i, t, t_next = inp
            tb = jnp.broadcast_to(t, x.shape[:1])
            tnb = jnp.broadcast_to(t_next, x.shape[:1])
            x, x_mean = pc_step(
                self.predictor, self.corrector, model, x, tb, tnb, noise, i, probability_flow=self.probability_flow
            )
            return (x, x_mean), (x if return_trajectory else None)

        idx = jnp.arange(self.num_steps)
        (x, x_mean), traj = jax.lax.scan(body, (x, x), (idx, ts[:-1], ts[1:]))
        out = x_mean if self.denoise else x
        return out, fixed_info(self.num_evaluations(), self.num_steps, traj)
