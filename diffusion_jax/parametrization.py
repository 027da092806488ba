"""Network parametrizations: what a network predicts and how it is conditioned on noise.

For the linear family ``x_t = alpha x_0 + sigma eps`` every prediction is an affine function of
the others given ``(x_t, t)``:

==========  ==========================================================  =====================
kind        definition                                                  source
==========  ==========================================================  =====================
``score``   grad log p_t(x) = -eps / sigma                              Song et al. 2021
``eps``     the noise eps                                               Ho et al. 2020
``x0``      the clean data x_0 (a denoiser)                             Karras et al. 2022
``v``       alpha eps - sigma x_0                                       Salimans & Ho 2022
``flow``    dx_t/dt along the straight path = alpha' x_0 + sigma' eps   Lipman et al. 2022
==========  ==========================================================  =====================

:func:`convert` maps between them (through eps). :class:`Parametrization` wraps a raw network
``net(x_in, c_noise) -> out``: it chooses the network input scaling and noise label
(:data:`NOISE_CONDITIONINGS`, including score_sde's exact conventions) and turns the raw output
into a prediction, including EDM's preconditioned form
``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)`` (Karras et al. 2022, eq. 7 and Table 1),
which applies to any SDE of the family through ``x / alpha`` and ``sigma / alpha``.
Networks know nothing of SDEs; samplers and losses talk to networks only through this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from diffusion_jax.sde import SDE, LinearSDE, broadcast_to_data, require_marginals

Array = jax.Array

KINDS = ("score", "eps", "x0", "v", "flow")

__all__ = [
    "KINDS",
    "OUTPUTS",
    "NOISE_CONDITIONINGS",
    "Parametrization",
    "convert",
    "to_eps",
    "from_eps",
    "target",
    "error_scale",
    "score_sde_parametrization",
    "edm_parametrization",
]


def _require_linear(sde: SDE, what: str) -> LinearSDE:
    """``sde`` as a :class:`LinearSDE` (closed-form marginals), or the error naming ``what``."""
    return require_marginals(sde, what)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown prediction kind {kind!r}; valid kinds: {', '.join(KINDS)}")


def _coefs(sde: SDE, x: Array, t: Array, *, derivatives: bool = False):
    sde = _require_linear(sde, "converting between parametrizations")
    a, s = sde.marginal(t)
    out = [broadcast_to_data(a, x), broadcast_to_data(s, x)]
    if derivatives:
        da, ds = sde.marginal_derivatives(t)
        out += [broadcast_to_data(da, x), broadcast_to_data(ds, x)]
    return out


def to_eps(kind: str, value: Array, sde: SDE, x: Array, t: Array) -> Array:
    """The eps-prediction equivalent to ``value`` (a ``kind`` prediction at ``(x, t)``)."""
    _check_kind(kind)
    if kind == "eps":
        return value
    if kind == "flow":
        a, s, da, ds = _coefs(sde, x, t, derivatives=True)
        # u = a' x0 + s' eps and x = a x0 + s eps  =>  eps = (a u - a' x) / (a s' - a' s).
        return (a * value - da * x) / (a * ds - da * s)
    a, s = _coefs(sde, x, t)
    if kind == "score":
        return -s * value
    if kind == "x0":
        return (x - a * value) / s
    # v = a eps - s x0 and x = a x0 + s eps  =>  eps = (s x + a v) / (a^2 + s^2).
    return (s * x + a * value) / (a**2 + s**2)


def from_eps(kind: str, eps: Array, sde: SDE, x: Array, t: Array) -> Array:
    """The ``kind`` prediction equivalent to the eps-prediction ``eps`` at ``(x, t)``."""
    _check_kind(kind)
    if kind == "eps":
        return eps
    if kind == "flow":
        a, s, da, ds = _coefs(sde, x, t, derivatives=True)
        return da * (x - s * eps) / a + ds * eps
    a, s = _coefs(sde, x, t)
    if kind == "score":
        return -eps / s
    if kind == "x0":
        return (x - s * eps) / a
    return ((a**2 + s**2) * eps - s * x) / a


def convert(value: Array, *, from_kind: str, to_kind: str, sde: SDE, x: Array, t: Array) -> Array:
    """Convert a prediction at ``(x, t)`` between kinds (see the module docstring).

    ``x`` has shape ``(B, ...)``; ``t`` is a scalar or ``(B,)``. Direct formulas are used where
    going through eps would lose precision (score <-> x0 at small sigma).
    """
    _check_kind(from_kind)
    _check_kind(to_kind)
    if from_kind == to_kind:
        return value
    if {from_kind, to_kind} == {"score", "x0"}:
        # Tweedie: x0 = (x + sigma^2 score) / alpha, without dividing and multiplying by sigma.
        a, s = _coefs(sde, x, t)
        if from_kind == "score":
            return (x + s**2 * value) / a
        return -(x - a * value) / s**2
    return from_eps(to_kind, to_eps(from_kind, value, sde, x, t), sde, x, t)


def target(kind: str, sde: SDE, x0: Array, eps: Array, t: Array) -> Array:
    """The exact regression target of a ``kind`` prediction for ``x_t = alpha x0 + sigma eps``."""
    _check_kind(kind)
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "score":
        _, s = _coefs(sde, x0, t)
        return -eps / s
    if kind == "v":
        a, s = _coefs(sde, x0, t)
        return a * eps - s * x0
    _, _, da, ds = _coefs(sde, x0, t, derivatives=True)
    return da * x0 + ds * eps


def error_scale(kind: str, sde: SDE, t: Array) -> Array:
    """k(t) with ``(kind error) = k(t) * (eps error)`` for predictions at the same ``(x, t)``;
    the error of every kind is a multiple of the eps error (the conversions are affine).
    Shape of ``t``."""
    _check_kind(kind)
    sde = _require_linear(sde, "error_scale")
    a, s = sde.marginal(t)
    if kind == "eps":
        return jnp.ones_like(s)
    if kind == "score":
        return -1.0 / s
    if kind == "x0":
        return -s / a
    if kind == "v":
        return (a**2 + s**2) / a
    da, ds = sde.marginal_derivatives(t)
    return ds - da * s / a


# --------------------------------------------------------------------------------------------
# Noise conditioning: the label a network receives for time t
# --------------------------------------------------------------------------------------------


def _time(p, sde, t):
    return t


def _time_999(p, sde, t):
    # score_sde, VP / sub-VP continuous models: labels = 999 t.
    return 999.0 * t


def _sigma(p, sde, t):
    # score_sde, VE continuous models: labels = sigma(t) (NCSN++ takes log sigma internally).
    return _require_linear(sde, "sigma noise conditioning").sigma(t)


def _discrete_vp(p, sde, t):
    # score_sde, VP discrete (DDPM) models at sampling time: labels = t (N - 1), not rounded.
    return t * (p.num_scales - 1)


def _discrete_ve(p, sde, t):
    # score_sde, VE discrete (SMLD / NCSNv2): index into the decreasing sigma table,
    # round((T - t) / T (N - 1)).
    return jnp.round((sde.T - t) / sde.T * (p.num_scales - 1)).astype(jnp.int32)


def _edm(p, sde, t):
    # EDM: c_noise = ln(sigma) / 4 (Karras et al. 2022, Table 1), sigma of x / alpha.
    return 0.25 * jnp.log(_require_linear(sde, "EDM noise conditioning").sigma_tilde(t))


def _log_snr(p, sde, t):
    return _require_linear(sde, "log-SNR noise conditioning").log_snr(t)


NOISE_CONDITIONINGS: dict[str, Callable] = {
    "time": _time,
    "time_999": _time_999,
    "sigma": _sigma,
    "discrete_vp": _discrete_vp,
    "discrete_ve": _discrete_ve,
    "edm": _edm,
    "log_snr": _log_snr,
}

OUTPUTS = KINDS + ("edm",)


class _EDMCoefs(NamedTuple):
    """EDM's preconditioning (Karras et al. 2022, Table 1): ``D = c_skip x + c_out F(c_in x)``."""

    c_skip: Array
    c_out: Array
    c_in: Array


class Parametrization(flax.struct.PyTreeNode):
    """How a raw network ``net(x_in, c_noise) -> out`` (shape of x) is used.

    Attributes:
      output: what ``out`` is: one of :data:`KINDS`, or ``"edm"`` for EDM's preconditioned
        network (``out = F``; the prediction is the denoiser ``D = c_skip x~ + c_out F``, an x0
        prediction, with ``x~ = x / alpha`` and EDM's sigma = sigma / alpha).
      noise_cond: the noise label fed to the network; see :data:`NOISE_CONDITIONINGS`.
      input_scaling: ``"none"`` or ``"edm"`` (``x_in = c_in x~``). ``output="edm"`` implies it.
      sigma_data: EDM's data standard deviation.
      num_scales: N of score_sde's discrete tables (for the discrete noise conditionings).
    """

    output: str = flax.struct.field(pytree_node=False, default="eps")
    noise_cond: str = flax.struct.field(pytree_node=False, default="time")
    input_scaling: str = flax.struct.field(pytree_node=False, default="none")
    sigma_data: float = 0.5
    num_scales: int = flax.struct.field(pytree_node=False, default=1000)

    def __post_init__(self):
        if self.output not in OUTPUTS:
            raise ValueError(f"unknown network output {self.output!r}; valid: {', '.join(OUTPUTS)}")
        if self.noise_cond not in NOISE_CONDITIONINGS:
            raise ValueError(f"unknown noise conditioning {self.noise_cond!r}; valid: {', '.join(NOISE_CONDITIONINGS)}")
        if self.input_scaling not in ("none", "edm"):
            raise ValueError(f"unknown input scaling {self.input_scaling!r}; valid: none, edm")

    @property
    def kind(self) -> str:
        """The prediction kind the wrapped network produces after post-processing."""
        return "x0" if self.output == "edm" else self.output

    # -- EDM preconditioning ----------------------------------------------------------------
    def _edm_coefs(self, sde: SDE, t: Array) -> _EDMCoefs:
        """(c_skip, c_out, c_in) of Karras et al. (2022), Table 1, for sigma~ = sigma / alpha."""
        st = _require_linear(sde, "EDM preconditioning").sigma_tilde(t)
        sd = self.sigma_data
        denom = st**2 + sd**2
        return _EDMCoefs(c_skip=sd**2 / denom, c_out=st * sd / jnp.sqrt(denom), c_in=1.0 / jnp.sqrt(denom))

    def network_inputs(self, sde: SDE, x: Array, t: Array) -> tuple[Array, Array]:
        """``(x_in, c_noise)``: what the network is called with for data ``x`` at time ``t``."""
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
        c_noise = NOISE_CONDITIONINGS[self.noise_cond](self, sde, t)
        if self.output == "edm" or self.input_scaling == "edm":
            a, _ = sde.marginal(t)
            c_in = self._edm_coefs(sde, t).c_in
            x = x * broadcast_to_data(c_in / a, x)
        return x, c_noise

    def prediction(self, sde: SDE, x: Array, t: Array, out: Array) -> Array:
        """The ``self.kind`` prediction from the raw output ``out`` of the network."""
        if out.shape != x.shape:
            raise ValueError(f"network output shape {out.shape} differs from the data shape {x.shape}")
        if self.output != "edm":
            return out
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
        a, _ = sde.marginal(t)
        coefs = self._edm_coefs(sde, t)
        return broadcast_to_data(coefs.c_skip / a, x) * x + broadcast_to_data(coefs.c_out, x) * out

    def apply(
        self, net: Callable[[Array, Array], Array], sde: SDE, x: Array, t: Array, kind: str | None = None
    ) -> Array:
        """Call ``net`` at ``(x, t)`` and return a prediction of ``kind`` (default: native)."""
        x_in, c_noise = self.network_inputs(sde, x, t)
        pred = self.prediction(sde, x, t, net(x_in, c_noise))
        if kind is None or kind == self.kind:
            return pred
        return convert(pred, from_kind=self.kind, to_kind=kind, sde=sde, x=x, t=t)

    def score_fn(self, net: Callable[[Array, Array], Array], sde: SDE) -> Callable[[Array, Array], Array]:
        """``score_fn(x, t)`` for samplers and likelihoods."""
        return lambda x, t: self.apply(net, sde, x, t, "score")


# score_sde's conventions, keyed by (SDE name, continuous): what the network output is and what
# label it receives (score_sde models/utils.py get_score_fn).
_SCORE_SDE = {
    ("vpsde", True): ("eps", "time_999"),
    ("subvpsde", True): ("eps", "time_999"),
    ("vpsde", False): ("eps", "discrete_vp"),
    ("subvpsde", False): ("eps", "discrete_vp"),
    ("vesde", True): ("score", "sigma"),
    ("vesde", False): ("score", "discrete_ve"),
}


def score_sde_parametrization(sde_name: str, *, continuous: bool, num_scales: int = 1000) -> Parametrization:
    """score_sde's parametrization for its SDEs: VP / sub-VP networks predict eps (score =
    -out / sigma) with labels 999 t (continuous) or t (N - 1) (discrete); VE networks output the
    score directly (scaled by 1/sigma inside the network) with labels sigma(t) or the
    rounded index into the decreasing sigma table."""
    key = (sde_name.lower(), bool(continuous))
    if key not in _SCORE_SDE:
        valid = sorted({k[0] for k in _SCORE_SDE})
        raise ValueError(f"score_sde has no convention for SDE {sde_name!r}; valid: {', '.join(valid)}")
    output, cond = _SCORE_SDE[key]
    return Parametrization(output=output, noise_cond=cond, num_scales=num_scales)


def edm_parametrization(sigma_data: float = 0.5) -> Parametrization:
    """EDM's preconditioned denoiser with c_noise = ln(sigma) / 4."""
    return Parametrization(output="edm", noise_cond="edm", input_scaling="edm", sigma_data=sigma_data)
