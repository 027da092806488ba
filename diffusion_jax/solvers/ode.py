"""Explicit Runge-Kutta integration of ODEs over arbitrary pytree states, on device.

:func:`odeint` integrates ``dy/dt = vector_field(y, t)`` from ``t0`` to ``t1`` (either
direction) with an embedded 5(4) pair and a PI step-size controller, entirely inside
``lax.while_loop``; :func:`odeint_fixed` takes fixed steps on a given time grid with the
higher-order weights of the same tableau (``lax.scan``).

Pairs (:data:`SOLVERS`), both FSAL ("first same as last": the last stage is the derivative at
the accepted point and is reused as the first stage of the next step, 6 evaluations a step):

* :class:`Dopri5` -- Dormand & Prince (1980), "A family of embedded Runge-Kutta formulae";
  Hairer, Norsett & Wanner, *Solving ODEs I*, Table II.5.2.
* :class:`Tsit5` -- Tsitouras (2011), "Runge-Kutta pairs of order 5(4) satisfying only the
  first column simplifying assumption", Comput. Math. Appl. 62, Table 1.

Step-size control (Hairer, Norsett & Wanner, *Solving ODEs I*, II.4; Soderlind 2002/2003,
"Automatic control and adaptive time-stepping"): the local error estimate
``err = dt * sum_i e_i k_i`` is scaled elementwise by ``atol + rtol * max(|y|, |y_new|)`` and
reduced to a ratio ``r`` by an error norm; a step is accepted when ``r <= 1`` and the next step is
``dt * clip(safety * r^(-(icoeff + pcoeff)/k) * r_prev^(pcoeff/k), factor_min, factor_max)``
with ``k = 5`` (order of the error estimate + 1). After a rejection the step only shrinks. The
first step follows Hairer's starting-step algorithm (II.4, "Starting step size") unless ``dt0``
is given.

Error norms: how one ratio per step (or one per sample) is formed from the state
================  ==============================================================================
``"rms"``         RMS of the scaled error over the whole state; one step size for all samples
                  (scipy / torchdiffeq / score_sde behaviour). Cheap, but a sample whose error is
                  much larger than the others' can be averaged away.
``"max"``         RMS per sample (over every leaf's non-batch elements), then the maximum over
                  samples; one step size, every sample meets the tolerance, the hardest sample
                  dictates the step for all.
``"per_sample"``  RMS per sample and an independent time, step size, controller memory and
                  accept/reject decision per sample: no sample dictates another's steps. The
                  vector field is then called with ``t`` of shape ``(B,)``. Each call still
                  evaluates the whole batch (finished samples take zero-length steps), so
                  ``nfe`` counts batched calls. This is the mode to use for likelihoods.
================  ==============================================================================

In ``"max"`` and ``"per_sample"`` modes every leaf of the state must have the batch as its
leading axis (e.g. ``(x, delta_logp)`` with shapes ``(B, ...)`` and ``(B,)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any
VectorField = Callable[[PyTree, Array], PyTree]

__all__ = [
    "ButcherTableau",
    "Dopri5",
    "Tsit5",
    "SOLVERS",
    "get_solver",
    "PIController",
    "ERROR_NORMS",
    "ODEStats",
    "odeint",
    "odeint_fixed",
]

ERROR_NORMS = ("rms", "max", "per_sample")


# --------------------------------------------------------------------------------------------
# Tableaux
# --------------------------------------------------------------------------------------------


class ButcherTableau(NamedTuple):
    """An explicit embedded Runge-Kutta pair.

    ``c`` (s,), ``a`` (s, s) strictly lower triangular, ``b`` (s,) the weights of the propagated
    solution (order ``order``), ``e`` (s,) the error weights ``b - b_hat`` (the embedded
    solution has order ``order - 1``). ``fsal``: ``a[-1] == b`` and ``c[-1] == 1``.
    """

    c: np.ndarray
    a: np.ndarray
    b: np.ndarray
    e: np.ndarray
    order: int
    fsal: bool


def _dopri5_tableau() -> ButcherTableau:
    # Dormand & Prince (1980); Hairer, Norsett & Wanner, Table II.5.2.
    c = np.array([0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1], dtype=np.float64)
    a = np.zeros((7, 7))
    a[1, :1] = [1 / 5]
    a[2, :2] = [3 / 40, 9 / 40]
    a[3, :3] = [44 / 45, -56 / 15, 32 / 9]
    a[4, :4] = [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729]
    a[5, :5] = [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656]
    a[6, :6] = [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]
    b = a[6].copy()
    b_hat = np.array([5179 / 57600, 0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40])
    return ButcherTableau(c=c, a=a, b=b, e=b - b_hat, order=5, fsal=True)


def _tsit5_tableau() -> ButcherTableau:
    # Tsitouras (2011), Table 1. The paper lists the error weights b - b_hat directly; they sum
    # to zero with the last one equal to -1/66.
    c = np.array([0, 0.161, 0.327, 0.9, 0.9800255409045097, 1, 1], dtype=np.float64)
    a = np.zeros((7, 7))
    a[1, :1] = [0.161]
    a[2, :2] = [-0.008480655492356989, 0.335480655492357]
    a[3, :3] = [2.897153057105493, -6.359448489975075, 4.3622954328695815]
    a[4, :4] = [5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525]
    a[5, :5] = [5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401, -0.028269050394068383]
    a[6, :6] = [0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081, 2.324710524099774]
    b = a[6].copy()
    e = np.array(
        [
            0.001780011052226,
            0.000816434459657,
            -0.007880878010262,
            0.144711007173263,
            -0.582357165452555,
            0.458082105929187,
            -1 / 66,
        ]
    )
    return ButcherTableau(c=c, a=a, b=b, e=e, order=5, fsal=True)


class Dopri5(flax.struct.PyTreeNode):
    """Dormand-Prince 5(4), FSAL, 6 evaluations per step."""

    def tableau(self) -> ButcherTableau:
        return _dopri5_tableau()


class Tsit5(flax.struct.PyTreeNode):
    """Tsitouras 5(4), FSAL, 6 evaluations per step (smaller error constants than Dopri5)."""

    def tableau(self) -> ButcherTableau:
        return _tsit5_tableau()


SOLVERS: dict[str, type[Dopri5 | Tsit5]] = {"dopri5": Dopri5, "tsit5": Tsit5}


def get_solver(name: str) -> Dopri5 | Tsit5:
    """A Runge-Kutta pair by name; an unknown name raises listing the valid ones."""
    if name not in SOLVERS:
        raise ValueError(f"unknown ODE solver {name!r}; valid names: {', '.join(SOLVERS)}")
    return SOLVERS[name]()


def _resolve_solver(solver: Any) -> Any:
    return get_solver(solver) if isinstance(solver, str) else solver


# --------------------------------------------------------------------------------------------
# Controller
# --------------------------------------------------------------------------------------------


class PIController(flax.struct.PyTreeNode):
    """PI step-size controller (Hairer, Norsett & Wanner II.4, eq. 4.13 with Gustafsson's
    PI form; Soderlind 2002). Defaults are those of Hairer's DOPRI5 code (alpha = 0.17,
    beta = 0.04 with k = 5, i.e. icoeff + pcoeff = 0.85 and pcoeff = 0.2)."""

    pcoeff: float = 0.2
    icoeff: float = 0.65
    safety: float = 0.9
    factor_min: float = 0.2
    factor_max: float = 10.0

    def factor(self, ratio: Array, ratio_prev: Array, accepted: Array, k: int) -> Array:
        """Multiplier of the step size, given the error ratio of this step and of the last
        accepted one (both floored at 1e-4 as in Hairer's code)."""
        r = jnp.maximum(ratio, 1e-4)
        r_prev = jnp.maximum(ratio_prev, 1e-4)
        pi = self.safety * r ** (-(self.icoeff + self.pcoeff) / k) * r_prev ** (self.pcoeff / k)
        # After a rejection use the elementary controller and never grow the step.
        shrink = jnp.minimum(1.0, self.safety * r ** (-1.0 / k))
        fac = jnp.where(accepted, pi, shrink)
        return jnp.clip(fac, self.factor_min, jnp.where(accepted, self.factor_max, 1.0))


# --------------------------------------------------------------------------------------------
# Pytree helpers
# --------------------------------------------------------------------------------------------


def _bc(c: Array, leaf: Array) -> Array:
    """A scalar or per-sample ``(B,)`` coefficient reshaped to broadcast against ``leaf``."""
    c = jnp.asarray(c)
    if c.ndim == 0:
        return c
    return c.reshape(c.shape + (1,) * (leaf.ndim - c.ndim))


def _combine(y: PyTree, dt: Array, coeffs: Iterable[float], ks: list[PyTree]) -> PyTree:
    """``y + dt * sum_j coeffs[j] k_j`` leafwise, skipping zero coefficients."""
    pairs = [(float(c), k) for c, k in zip(coeffs, ks) if c != 0.0]
    if not pairs:
        return y

    def leaf(y_leaf, *k_leaves):
        acc = sum(c * kl for (c, _), kl in zip(pairs, k_leaves))
        return y_leaf + _bc(dt, y_leaf).astype(y_leaf.dtype) * acc

    return jax.tree_util.tree_map(leaf, y, *[k for _, k in pairs])


def _sum_sq(tree: PyTree, per_sample: bool) -> tuple[Array | int, int]:
    """Sum of squares (whole state, or per sample over non-batch axes) and the element count
    (per sample, when ``per_sample``); the sum is ``0`` for a state without leaves."""
    leaves = jax.tree_util.tree_leaves(tree)
    if per_sample:
        total = sum(jnp.sum(jnp.reshape(l, (l.shape[0], -1)) ** 2, axis=1) for l in leaves)
        count = sum(math.prod(l.shape[1:]) for l in leaves)
    else:
        total = sum(jnp.sum(l**2) for l in leaves)
        count = sum(l.size for l in leaves)
    return total, count


def _error_ratio(err: PyTree, y0: PyTree, y1: PyTree, rtol: Array, atol: Array, mode: str) -> Array:
    scaled = jax.tree_util.tree_map(
        lambda e, a, b: e / (atol + rtol * jnp.maximum(jnp.abs(a), jnp.abs(b))), err, y0, y1
    )
    total, count = _sum_sq(scaled, per_sample=mode != "rms")
    ratio = jnp.sqrt(total / count)
    if mode == "max":
        ratio = jnp.max(ratio)
    # A non-finite estimate means the step blew up: reject it and shrink as much as allowed.
    return jnp.where(jnp.isfinite(ratio), ratio, jnp.inf)


def _scaled_norm(tree: PyTree, scale_tree: PyTree, mode: str) -> Array:
    scaled = jax.tree_util.tree_map(lambda v, s: v / s, tree, scale_tree)
    total, count = _sum_sq(scaled, per_sample=mode != "rms")
    n = jnp.sqrt(total / count)
    return jnp.max(n) if mode == "max" else n


def _batch_size(y0: PyTree) -> int:
    leaves = jax.tree_util.tree_leaves(y0)
    if any(l.ndim == 0 for l in leaves) or len({l.shape[0] for l in leaves}) != 1:
        shapes = [l.shape for l in leaves]
        raise ValueError(
            "error_norm='max' or 'per_sample' needs every leaf of the state to have the same "
            f"leading batch axis; got leaf shapes {shapes}"
        )
    return leaves[0].shape[0]


# --------------------------------------------------------------------------------------------
# Integration
# --------------------------------------------------------------------------------------------


class ODEStats(NamedTuple):
    """Statistics of an :func:`odeint` solve.

    ``nfe``: calls of the vector field (each on the whole state), scalar int32.
    ``num_steps`` / ``num_rejected``: accepted / rejected steps; shape ``(B,)`` with
    ``error_norm="per_sample"``, else scalar. ``success``: reached ``t1`` within ``max_steps``.
    """

    nfe: Array
    num_steps: Array
    num_rejected: Array
    success: Array


class _RKStep(NamedTuple):
    """One Runge-Kutta step: the propagated solution, the local error estimate
    ``dt * sum_i e_i k_i``, the derivative at ``y_new`` and the vector-field calls it took."""

    y_new: PyTree
    err: PyTree
    f_new: PyTree
    nfe: int


def _rk_stages(vector_field: VectorField, tab: ButcherTableau, y: PyTree, t: Array, dt: Array, f0: PyTree) -> _RKStep:
    """All stages of one step from ``y`` at ``t`` with ``f0 = vector_field(y, t)``."""
    ks = [f0]
    s = len(tab.c)
    for i in range(1, s):
        yi = _combine(y, dt, tab.a[i, :i], ks)
        ks.append(vector_field(yi, t + tab.c[i] * dt))
    if tab.fsal:
        y_new = _combine(y, dt, tab.a[-1, :-1], ks[:-1])
        f_new = ks[-1]
    else:  # pragma: no cover - both shipped pairs are FSAL
        y_new = _combine(y, dt, tab.b, ks)
        f_new = vector_field(y_new, t + dt)
    err = _combine(jax.tree_util.tree_map(jnp.zeros_like, y), dt, tab.e, ks)
    return _RKStep(y_new, err, f_new, s - 1)


class _AdaptiveState(NamedTuple):
    """The ``lax.while_loop`` carry of :func:`odeint`. ``t``, ``h``, ``r_prev``, ``done``,
    ``steps`` and ``rejected`` are scalars, or ``(B,)`` with ``error_norm="per_sample"``."""

    y: PyTree  # the state at t
    f: PyTree  # vector_field(y, t) (FSAL: the first stage of the next step)
    t: Array
    h: Array  # magnitude of the next step
    r_prev: Array  # error ratio of the last accepted step (the PI controller's memory)
    done: Array  # reached t1
    steps: Array  # accepted steps
    rejected: Array  # rejected steps
    nfe: Array  # vector-field calls
    iters: Array  # loop iterations (accepted + rejected steps), bounded by max_steps


def odeint(
    vector_field: VectorField,
    y0: PyTree,
    t0: float | Array,
    t1: float | Array,
    *,
    solver: Any = "dopri5",
    rtol: float | Array = 1e-5,
    atol: float | Array = 1e-5,
    dt0: float | Array | None = None,
    max_steps: int = 4096,
    controller: PIController = PIController(),
    error_norm: str = "rms",
) -> tuple[PyTree, ODEStats]:
    """Integrate ``dy/dt = vector_field(y, t)`` from ``t0`` to ``t1`` adaptively.

    Args:
      vector_field: ``f(y, t) -> dy/dt`` with the pytree structure and shapes of ``y``; ``t`` is a
        scalar, or ``(B,)`` with ``error_norm="per_sample"``.
      y0: the initial state, any pytree of arrays (e.g. ``(x, delta_logp)``).
      t0, t1: scalars; ``t1 < t0`` integrates backwards in time.
      solver: :class:`Dopri5` / :class:`Tsit5` or their names.
      rtol, atol: tolerances of the scaled error (see the module docstring).
      dt0: initial step magnitude; by default Hairer's starting-step algorithm (2 evaluations,
        the first reused as the first stage).
      max_steps: bound on loop iterations (accepted + rejected steps); if reached,
        ``stats.success`` is False and the state is wherever integration stopped.
      controller: the :class:`PIController`.
      error_norm: ``"rms"``, ``"max"`` or ``"per_sample"`` (module docstring).

    Returns:
      ``(y1, stats)``: the state at ``t1`` and :class:`ODEStats`.

    Extra state such as a log-density is integrated by putting it in the pytree:
    ``odeint(lambda s, t: (v(s[0], t), -div_v(s[0], t)), (x, jnp.zeros(B)), 0.0, 1.0,
    error_norm="per_sample")``; pass a fixed Hutchinson probe by closing over it.
    """
    if error_norm not in ERROR_NORMS:
        raise ValueError(f"unknown error_norm {error_norm!r}; valid: {', '.join(ERROR_NORMS)}")
    if int(max_steps) < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    tab = _resolve_solver(solver).tableau()
    k = tab.order  # the error estimate is of order order - 1: exponent 1 / order
    leaves = jax.tree_util.tree_leaves(y0)
    if not leaves:
        raise ValueError("odeint needs a non-empty state pytree")
    dtype = jnp.result_type(*leaves)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"the ODE state must be floating point, got {dtype}")
    per_sample = error_norm == "per_sample"
    t_shape = (_batch_size(y0),) if per_sample else ()
    if error_norm == "max":
        _batch_size(y0)

    t0 = jnp.broadcast_to(jnp.asarray(t0, dtype), t_shape)
    t1 = jnp.broadcast_to(jnp.asarray(t1, dtype), t_shape)
    direction = jnp.where(t1 >= t0, 1.0, -1.0).astype(dtype)
    span = jnp.abs(t1 - t0)
    rtol = jnp.asarray(rtol, dtype)
    atol = jnp.asarray(atol, dtype)

    f0 = vector_field(y0, t0)
    nfe0 = 1
    if dt0 is None:
        # Hairer, Norsett & Wanner II.4, "Starting step size" (algorithm steps a-f).
        scale = jax.tree_util.tree_map(lambda v: atol + rtol * jnp.abs(v), y0)
        d0 = _scaled_norm(y0, scale, error_norm)
        d1 = _scaled_norm(f0, scale, error_norm)
        h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / jnp.maximum(d1, 1e-30))
        h0 = jnp.minimum(h0, span)
        y1 = _combine(y0, direction * h0, [1.0], [f0])
        f1 = vector_field(y1, t0 + direction * h0)
        diff = jax.tree_util.tree_map(lambda a, b: a - b, f1, f0)
        d2 = _scaled_norm(diff, scale, error_norm) / h0
        dmax = jnp.maximum(d1, d2)
        h1 = jnp.where(
            dmax <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3), (0.01 / jnp.maximum(dmax, 1e-30)) ** (1.0 / (k + 1))
        )
        h = jnp.minimum(100 * h0, h1)
        nfe0 += 1
    else:
        h = jnp.broadcast_to(jnp.abs(jnp.asarray(dt0, dtype)), t_shape)
    h = jnp.minimum(h, span).astype(dtype)

    zeros_i = jnp.zeros(t_shape, jnp.int32)
    init = _AdaptiveState(
        y=y0,
        f=f0,
        t=t0,
        h=h,
        r_prev=jnp.ones(t_shape, dtype),
        done=span <= 0,
        steps=zeros_i,
        rejected=zeros_i,
        nfe=jnp.asarray(nfe0, jnp.int32),
        iters=jnp.asarray(0, jnp.int32),
    )

    def cond(s: _AdaptiveState) -> Array:
        return (~jnp.all(s.done)) & (s.iters < max_steps)

    def body(s: _AdaptiveState) -> _AdaptiveState:
        t, h, done = s.t, s.h, s.done
        # Do not step past t1: the last step lands on t1 exactly.
        last = h >= jnp.abs(t1 - t)
        h_step = jnp.where(last, jnp.abs(t1 - t), h)
        h_step = jnp.where(done, 0.0, h_step)
        dt = direction * h_step
        y_new, err, f_new, n = _rk_stages(vector_field, tab, s.y, t, dt, s.f)
        ratio = _error_ratio(err, s.y, y_new, rtol, atol, error_norm)
        accept = (ratio <= 1.0) & ~done
        fac = controller.factor(ratio, s.r_prev, accept, k)
        h_new = jnp.where(done, h, h_step * fac)
        t_new = jnp.where(accept, jnp.where(last, t1, t + dt), t)
        take = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(_bc(accept, a), a, b), new, old)
        return _AdaptiveState(
            y=take(y_new, s.y),
            f=take(f_new, s.f),
            t=t_new,
            h=h_new,
            r_prev=jnp.where(accept, jnp.maximum(ratio, 1e-4), s.r_prev),
            done=done | (accept & last),
            steps=s.steps + accept.astype(jnp.int32),
            rejected=s.rejected + ((~accept) & ~done).astype(jnp.int32),
            nfe=s.nfe + n,
            iters=s.iters + 1,
        )

    out = jax.lax.while_loop(cond, body, init)
    stats = ODEStats(nfe=out.nfe, num_steps=out.steps, num_rejected=out.rejected, success=jnp.all(out.done))
    return out.y, stats


def odeint_fixed(vector_field: VectorField, y0: PyTree, ts: Array, *, solver: Any = "dopri5") -> tuple[PyTree, Array]:
    """Fixed steps of the propagated (higher-order) solution of ``solver`` over the grid ``ts``
    (shape ``(N+1,)``, increasing or decreasing; ``t`` passed to the vector field is scalar).

    Returns ``(y(ts[-1]), nfe)``; with an FSAL pair ``nfe = 1 + 6 N``.
    """
    tab = _resolve_solver(solver).tableau()
    ts = jnp.asarray(ts)
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"ts must be a 1-D grid of at least 2 times, got shape {ts.shape}")
    f0 = vector_field(y0, ts[0])

    def step(carry, tt):
        y, f = carry
        t, t_next = tt
        rk = _rk_stages(vector_field, tab, y, t, t_next - t, f)
        return (rk.y_new, rk.f_new), None

    (y, _), _ = jax.lax.scan(step, (y0, f0), (ts[:-1], ts[1:]))
    n = ts.shape[0] - 1
    return y, jnp.asarray(1 + (len(tab.c) - 1) * n, jnp.int32)
