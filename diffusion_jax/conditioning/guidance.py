"""Guidance as score-function wrappers: each is a pytree callable ``fn(x, t) -> score`` that
:func:`diffusion_jax.sample` takes in place of the unconditional score, with every sampler.

* :class:`ClassifierGuidance` (Dhariwal & Nichol 2021, Sec. 4; Song et al. 2021, eq. 14):
  ``s(x, t) + scale * grad_x log p(c | x_t)`` with a noise-conditional classifier
  ``classifier_fn(x, t) -> log p(c | x_t)`` of shape ``(B, num_classes)`` (log-probabilities;
  logits are normalised with ``log_softmax``). With the exact classifier and ``scale = 1`` this is
  the exact class-conditional score (Bayes' rule), so sampling reproduces the class.
* :class:`ClassifierFreeGuidance` (Ho & Salimans 2022, eq. 6), over a conditional score
  ``score_fn(x, t, label)``. Convention: ``w`` is the weight on the conditional score,

  ``s_w = s(x | u) + w (s(x | c) - s(x | u))``,

  so ``w = 1`` is the conditional model and ``w = 0`` the unconditional one. ``u`` is the null
  label, or a *negative label* that guidance moves away from. The library's
  ``Experiment.score_fn(..., guidance_scale=w')`` (builders/experiment.py) uses
  ``(1 + w') s(x|c) - w' s(x|null)``, i.e. ``w = 1 + w'``. ``interval = (t_lo, t_hi)`` applies the
  guidance only there and the conditional model elsewhere (Kynkäänniemi et al. 2024, "Applying
  guidance in a limited interval improves sample and distribution quality").

Both evaluate the wrapped function once per call: the guidance pair of classifier-free guidance
is one call on a batch of ``2B``; ``info.nfe`` counts calls of the wrapper.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from diffusion_jax import parametrization as param_lib
from diffusion_jax.sde import SDE, broadcast_to_data

Array = jax.Array

__all__ = ["ClassifierGuidance", "ClassifierFreeGuidance", "classifier_guidance", "classifier_free_guidance"]


class ClassifierGuidance(flax.struct.PyTreeNode):
    """``fn(x, t) = s(x, t) + scale grad_x log p(labels | x_t)``.

    Fields: ``score_fn(x, t)`` (a ``kind`` prediction, converted to the score with ``sde``),
    ``classifier_fn(x, t) -> (B, C)`` log-probabilities or logits, ``labels`` ``(B,)`` ints,
    ``scale`` (1: the exact conditional score for an exact classifier).
    """

    score_fn: Any
    classifier_fn: Any
    labels: Array
    sde: SDE
    scale: float = 1.0
    kind: str = flax.struct.field(pytree_node=False, default="score")

    def __call__(self, x: Array, t: Array) -> Array:
        out = self.score_fn(x, t)
        score = param_lib.convert(out, from_kind=self.kind, to_kind="score", sde=self.sde, x=x, t=t)

        def log_p(x):
            logits = self.classifier_fn(x, t)
            logp = jax.nn.log_softmax(logits, axis=-1)
            return jnp.sum(jnp.take_along_axis(logp, self.labels[:, None].astype(jnp.int32), axis=1))

        return score + self.scale * jax.grad(log_p)(x).astype(x.dtype)


class ClassifierFreeGuidance(flax.struct.PyTreeNode):
    """``fn(x, t) = s(x | u) + w (s(x | c) - s(x | u))`` inside ``interval``, ``s(x | c)`` outside.

    Fields: ``score_fn(x, t, labels)`` (a ``kind`` prediction of the conditional model),
    ``labels`` ``(B,)`` (the condition c; the null label for none), ``null_label``,
    ``negative_labels`` ``(B,)`` or None (then ``u`` is the null label), ``guidance`` ``w``,
    ``interval`` ``(t_lo, t_hi)`` or None (everywhere).
    """

    score_fn: Any
    labels: Array
    sde: SDE
    guidance: float = 1.0
    null_label: int = flax.struct.field(pytree_node=False, default=0)
    negative_labels: Array | None = None
    interval: tuple[float, float] | None = None
    kind: str = flax.struct.field(pytree_node=False, default="score")

    def __call__(self, x: Array, t: Array) -> Array:
        b = x.shape[0]
        cond = jnp.broadcast_to(jnp.asarray(self.labels), (b,))
        if self.negative_labels is None:
            other = jnp.full((b,), self.null_label, cond.dtype)
        else:
            other = jnp.broadcast_to(jnp.asarray(self.negative_labels), (b,)).astype(cond.dtype)
        # One call on 2B examples: the conditional and the reference (null or negative) scores.
        xx = jnp.concatenate([x, x])
        tt = jnp.concatenate([t, t])
        out = self.score_fn(xx, tt, jnp.concatenate([cond, other]))
        s = param_lib.convert(out, from_kind=self.kind, to_kind="score", sde=self.sde, x=xx, t=tt)
        s_c, s_u = s[:b], s[b:]
        w = jnp.asarray(self.guidance, x.dtype)
        if self.interval is not None:
            lo, hi = self.interval
            inside = (t >= lo) & (t <= hi)
            w = jnp.where(inside, w, jnp.ones_like(w))
            w = broadcast_to_data(jnp.broadcast_to(w, (b,)), x)
        return s_u + w * (s_c - s_u)


def classifier_guidance(
    score_fn: Callable, classifier_fn: Callable, labels: Array, sde: SDE, *, scale: float = 1.0, kind: str = "score"
) -> ClassifierGuidance:
    """A score function with classifier guidance (see :class:`ClassifierGuidance`)."""
    return ClassifierGuidance(
        score_fn=score_fn, classifier_fn=classifier_fn, labels=jnp.asarray(labels), sde=sde, scale=scale, kind=kind
    )


def classifier_free_guidance(
    score_fn: Callable,
    labels: Array,
    sde: SDE,
    *,
    guidance: float,
    null_label: int,
    negative_labels: Array | None = None,
    interval: tuple[float, float] | None = None,
    kind: str = "score",
) -> ClassifierFreeGuidance:
    """A score function with classifier-free guidance (see :class:`ClassifierFreeGuidance`);
    ``guidance`` is the weight ``w`` on the conditional score (1: the conditional model)."""
    if interval is not None and not interval[0] <= interval[1]:
        raise ValueError(f"interval must be (t_lo, t_hi) with t_lo <= t_hi, got {interval}")
    neg = None if negative_labels is None else jnp.asarray(negative_labels)
    return ClassifierFreeGuidance(
        score_fn=score_fn,
        labels=jnp.asarray(labels),
        sde=sde,
        guidance=guidance,
        null_label=int(null_label),
        negative_labels=neg,
        interval=None if interval is None else (float(interval[0]), float(interval[1])),
        kind=kind,
    )
