"""The sampling entry point and the sampler registry."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import parametrization as param_lib
from diffusion_jax import sde as sde_lib
from diffusion_jax.samplers.base import THRESHOLDINGS, Model, NoiseSource, SampleInfo, Sampler
from diffusion_jax.samplers.fast import (
    DDIM,
    IPNDM,
    PLMS,
    DPMSolverPP,
    EDMSampler,
    Euler,
    SDEDPMSolverPP,
    UniPC,
)
from diffusion_jax.samplers.grids import get_grid
from diffusion_jax.samplers.ode import ProbabilityFlowSampler
from diffusion_jax.samplers.pc import (
    CORRECTORS,
    PREDICTORS,
    AncestralPredictor,
    EulerMaruyamaPredictor,
    LangevinCorrector,
    NoneCorrector,
    PCSampler,
    ReverseDiffusionPredictor,
)
from diffusion_jax.sde import SDE
from diffusion_jax.solvers.ode import get_solver

Array = jax.Array

__all__ = ["sample", "SAMPLERS", "get_sampler", "sampler_fields", "registry_markdown"]


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def _pc(
    *,
    predictor: str = "reverse_diffusion",
    corrector: str = "langevin",
    snr: float = 0.16,
    n_steps: int = 1,
    norm: str = "batch",
    num_steps: int = 1000,
    grid: Any = None,
    probability_flow: bool = False,
    denoise: bool = True,
) -> PCSampler:
    """score_sde's PC sampler from predictor and corrector names (defaults: reverse diffusion +
    Langevin, snr 0.16, one corrector step, as score_sde's VE configs)."""
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; valid names: {', '.join(PREDICTORS)}")
    if corrector not in CORRECTORS:
        raise ValueError(f"unknown corrector {corrector!r}; valid names: {', '.join(CORRECTORS)}")
    corr: Any
    if corrector == "langevin":
        corr = LangevinCorrector(snr=snr, n_steps=n_steps, norm=norm)
    elif corrector == "annealed_langevin":
        corr = CORRECTORS[corrector](snr=snr, n_steps=n_steps)
    else:
        corr = NoneCorrector()
    kw = {} if grid is None else {"grid": grid}
    return PCSampler(
        predictor=PREDICTORS[predictor](),
        corrector=corr,
        num_steps=num_steps,
        probability_flow=probability_flow,
        denoise=denoise,
        **kw,
    )


def _euler_maruyama(*, num_steps: int = 1000, grid: Any = None, denoise: bool = True) -> PCSampler:
    """Euler-Maruyama on the reverse SDE, no corrector (score_sde predictor "euler_maruyama")."""
    kw = {} if grid is None else {"grid": grid}
    return PCSampler(
        predictor=EulerMaruyamaPredictor(), corrector=NoneCorrector(), num_steps=num_steps, denoise=denoise, **kw
    )


def _reverse_diffusion(*, num_steps: int = 1000, grid: Any = None, denoise: bool = True) -> PCSampler:
    """Reverse diffusion predictor, no corrector."""
    kw = {} if grid is None else {"grid": grid}
    return PCSampler(
        predictor=ReverseDiffusionPredictor(), corrector=NoneCorrector(), num_steps=num_steps, denoise=denoise, **kw
    )


def _ancestral(*, num_steps: int = 1000, grid: Any = None, denoise: bool = True) -> PCSampler:
    """score_sde's ancestral sampling predictor on the SDE's discrete table, no corrector."""
    kw = {} if grid is None else {"grid": grid}
    return PCSampler(
        predictor=AncestralPredictor(), corrector=NoneCorrector(), num_steps=num_steps, denoise=denoise, **kw
    )


class _Preset:
    """A sampler class with some fields preset: ``defaults`` may be overridden, ``fixed`` may not."""

    def __init__(self, cls, doc: str, *, defaults: dict | None = None, fixed: dict | None = None):
        self.cls = cls
        self.defaults = dict(defaults or {})
        self.fixed = dict(fixed or {})
        self.__doc__ = doc

    @property
    def fields(self) -> set[str]:
        return {f.name for f in dataclasses.fields(self.cls)} - set(self.fixed)

    def __call__(self, **kwargs):
        return self.cls(**{**self.defaults, **kwargs, **self.fixed})


SAMPLERS: dict[str, Callable[..., Any]] = {
    # score_sde's predictor-corrector family
    "euler_maruyama": _euler_maruyama,
    "reverse_diffusion": _reverse_diffusion,
    "ancestral": _ancestral,
    "pc": _pc,
    # probability-flow ODE, adaptive
    "ode": ProbabilityFlowSampler,
    # fast deterministic
    "ddim": DDIM,
    "euler": Euler,
    "heun": EDMSampler,
    "plms": PLMS,
    "ipndm": IPNDM,
    "dpmpp_2m": _Preset(DPMSolverPP, "DPM-Solver++(2M)", fixed=dict(order=2, method="multistep")),
    "dpmpp_3m": _Preset(DPMSolverPP, "DPM-Solver++(3M)", fixed=dict(order=3, method="multistep")),
    "dpmpp_2s": _Preset(DPMSolverPP, "DPM-Solver++(2S)", fixed=dict(order=2, method="singlestep")),
    "unipc": UniPC,
    # fast stochastic
    "ddpm": _Preset(
        DDIM, "DDPM ancestral sampling for any linear SDE: DDIM with eta = 1", defaults=dict(eta=1.0, num_steps=1000)
    ),
    "sde_dpmpp_2m": SDEDPMSolverPP,
    # EDM's stochastic sampler (Algorithm 2) with the ImageNet-64 settings of Karras et al.
    # (2022), Table 5: S_churn = 40, S_tmin = 0.05, S_tmax = 50, S_noise = 1.003.
    "edm": _Preset(
        EDMSampler,
        "EDM's stochastic sampler",
        defaults=dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003, num_steps=256),
    ),
}


def _valid_arguments(ctor) -> set[str]:
    if isinstance(ctor, _Preset):
        return ctor.fields
    if inspect.isclass(ctor) and dataclasses.is_dataclass(ctor):
        return {f.name for f in dataclasses.fields(ctor)}
    return set(inspect.signature(ctor).parameters)


def _constructor(name_or_class: str | type[Sampler]) -> tuple[str, Callable[..., Sampler]]:
    if inspect.isclass(name_or_class):
        if not issubclass(name_or_class, Sampler):
            raise TypeError(f"{name_or_class.__name__} is not a subclass of diffusion_jax.samplers.Sampler")
        return name_or_class.name or name_or_class.__name__, name_or_class
    if name_or_class not in SAMPLERS:
        raise ValueError(f"unknown sampler {name_or_class!r}; valid names: {', '.join(SAMPLERS)}")
    return name_or_class, SAMPLERS[name_or_class]


def sampler_fields(name_or_class: str | type[Sampler]) -> set[str]:
    """The keyword arguments :func:`get_sampler` accepts for a sampler name or class."""
    return _valid_arguments(_constructor(name_or_class)[1])


def get_sampler(name: str | type[Sampler], **kwargs) -> Sampler:
    """Build a sampler by name (see :data:`SAMPLERS`) or from a :class:`Sampler` subclass (one
    defined outside the package too). String values are accepted for ``grid`` (a
    :data:`~diffusion_jax.samplers.grids.GRIDS` name), ``thresholding`` (``"static"`` /
    ``"dynamic"``) and ``solver`` (``"dopri5"`` / ``"tsit5"``). Unknown sampler names or keyword
    arguments raise an error listing the valid ones."""
    name, ctor = _constructor(name)
    fields = _valid_arguments(ctor)
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for sampler {name!r}; valid: {', '.join(sorted(fields))}")
    if isinstance(kwargs.get("grid"), str):
        kwargs["grid"] = get_grid(kwargs["grid"])
    if isinstance(kwargs.get("thresholding"), str):
        th = kwargs["thresholding"]
        if th not in THRESHOLDINGS:
            raise ValueError(f"unknown thresholding {th!r}; valid: {', '.join(THRESHOLDINGS)}")
        kwargs["thresholding"] = THRESHOLDINGS[th]()
    if isinstance(kwargs.get("solver"), str):
        kwargs["solver"] = get_solver(kwargs["solver"])
    return ctor(**kwargs)


def registry_markdown() -> str:
    """A Markdown table of every registered sampler with its default settings (docs/samplers.md)."""
    rows = [
        "| name | class | stochastic (defaults) | linear SDE only | fields (defaults) |",
        "|---|---|---|---|---|",
    ]
    for name in SAMPLERS:
        smp = get_sampler(name)
        ctor = SAMPLERS[name]
        if inspect.isfunction(ctor):  # a factory: its own arguments and defaults
            defaults = {p.name: p.default for p in inspect.signature(ctor).parameters.values()}
        else:
            defaults = {f.name: getattr(smp, f.name) for f in dataclasses.fields(smp) if f.name in sampler_fields(name)}
        fields = []
        for key, value in defaults.items():
            shown = type(value).__name__ + "()" if dataclasses.is_dataclass(value) else repr(value)
            fields.append(f"`{key}={shown}`")
        rows.append(
            f"| `{name}` | `{type(smp).__name__}` | {'yes' if smp.is_stochastic() else 'no'} | "
            f"{'yes' if smp.needs_marginals else 'no'} | {', '.join(fields)} |"
        )
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _is_array(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def _partition(fn):
    """Split a (possibly pytree) callable into array leaves, traced under jit, and the rest,
    which must be hashable and is static. A plain function is entirely static; a
    ``jax.tree_util.Partial`` or a flax struct holding parameters passes them as arguments, so
    new parameters do not trigger recompilation."""
    leaves, treedef = jax.tree_util.tree_flatten(fn)
    dynamic = [l if _is_array(l) else None for l in leaves]
    static = tuple(None if _is_array(l) else l for l in leaves)
    return dynamic, (treedef, static)


def _combine(dynamic, static):
    treedef, static_leaves = static
    leaves = [d if s is None else s for d, s in zip(dynamic, static_leaves)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _sample_impl(
    key, fn_dynamic, sde, sampler, x_init, *, fn_static, shape, dtype, per_sample_keys, return_trajectory, kind
):
    fn = _combine(fn_dynamic, fn_static)
    model = Model(fn, sde, kind=kind, thresholding=sampler.prediction_transform())
    noise = NoiseSource(key, shape[0], per_sample_keys)
    x = noise.prior(sde, shape, dtype) if x_init is None else x_init.astype(dtype)
    return sampler.run(model, x, noise, return_trajectory=return_trajectory)


_sample_jit = jax.jit(
    _sample_impl,
    static_argnames=("fn_static", "shape", "dtype", "per_sample_keys", "return_trajectory", "kind"),
)


def sample(
    key: Array,
    score_fn: Callable[[Array, Array], Array],
    sde: SDE,
    shape: tuple[int, ...],
    sampler: Sampler | str,
    *,
    x_init: Array | None = None,
    dtype: Any = None,
    per_sample_keys: bool = False,
    return_trajectory: bool = False,
    kind: str = "score",
    **sampler_kwargs: Any,
) -> tuple[Array, SampleInfo]:
    """Draw samples by solving the reverse-time dynamics of ``sde`` with ``sampler``.

    Args:
      key: a PRNG key.
      score_fn: ``fn(x, t)`` for ``x`` of shape ``shape`` = ``(B, ...)`` and ``t`` of shape ``(B,)``,
        returning the score (or the prediction named by ``kind``) with the shape of ``x``. A
        plain function is compiled in as a constant; pass a ``jax.tree_util.Partial`` (or any
        pytree callable) to pass network parameters as arguments instead.
      sde: the SDE; samplers that need closed-form marginals reject a general SDE.
      shape: the batch shape ``(B, ...)``; any data shape.
      sampler: a :class:`Sampler` (e.g. ``get_sampler("dpmpp_2m", num_steps=20)``), or a sampler
        name, built with ``sampler_kwargs`` (``sample(..., "dpmpp_2m", num_steps=20)``).
      x_init: optional start ``x_T`` of shape ``shape`` (default: drawn from the SDE's prior).
      dtype: data type of the samples (default ``x_init``'s, else float32).
      per_sample_keys: sample ``i`` draws its prior and all its noise from ``fold_in(key, i)``
        only, so it does not change with the batch size or device count.
      return_trajectory: fixed-grid samplers return the state after every step in
        ``info.trajectory`` (``(num_steps, B, ...)``).
      kind: what ``score_fn`` returns: ``"score"`` (default) or ``"eps"``, ``"x0"``, ``"v"``,
        ``"flow"`` (converted by :func:`diffusion_jax.parametrization.convert`).

    Returns:
      ``(samples, info)``: samples of shape ``shape``; :class:`SampleInfo` with the exact number of
      score evaluations ``info.nfe`` (a Python int; reading the counts waits for the samples).

    The whole sampler runs under one ``jax.jit``: fixed grids in ``lax.scan``, the adaptive ODE
    solver in ``lax.while_loop``; nothing returns to the host between steps.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) < 1 or shape[0] < 1:
        raise ValueError(f"shape must be (B, ...) with B >= 1, got {shape}")
    if kind not in param_lib.KINDS:
        raise ValueError(f"unknown prediction kind {kind!r}; valid: {', '.join(param_lib.KINDS)}")
    if isinstance(sampler, str):
        sampler = get_sampler(sampler, **sampler_kwargs)
    elif sampler_kwargs:
        raise TypeError(f"unexpected keyword argument(s) {sorted(sampler_kwargs)}: sampler options go with a name")
    if not isinstance(sampler, Sampler):
        raise TypeError(
            f"sampler must be a sampler object (see get_sampler; valid names: "
            f"{', '.join(SAMPLERS)}), got {type(sampler).__name__}"
        )
    if kind != "score":
        sde_lib.require_marginals(sde, f"a {kind!r} prediction function")
    sampler.validate(sde)
    if x_init is not None:
        x_init = jnp.asarray(x_init)
        if tuple(x_init.shape) != shape:
            raise ValueError(f"x_init has shape {x_init.shape}, expected {shape}")
    dt = jnp.dtype(dtype if dtype is not None else (x_init.dtype if x_init is not None else jnp.float32))
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"dtype must be floating point, got {dt}")
    fn_dynamic, fn_static = _partition(score_fn)
    x, info = _sample_jit(
        key,
        fn_dynamic,
        sde,
        sampler,
        x_init,
        fn_static=fn_static,
        shape=shape,
        dtype=dt,
        per_sample_keys=bool(per_sample_keys),
        return_trajectory=bool(return_trajectory),
        kind=kind,
    )
    return x, _host_counts(info)


def _host_counts(info: SampleInfo) -> SampleInfo:
    """Scalar counts as Python ints and ``success`` as a bool (per-sample step counts of the
    adaptive sampler stay arrays); inside a caller's ``jit`` the traced values are kept."""
    if isinstance(info.nfe, jax.core.Tracer):
        return info

    def host(v, cast):
        return cast(v) if np.ndim(v) == 0 else v

    return info._replace(
        nfe=host(info.nfe, int),
        num_steps=host(info.num_steps, int),
        num_rejected=host(info.num_rejected, int),
        success=host(info.success, bool),
    )
