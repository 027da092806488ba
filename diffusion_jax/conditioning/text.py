"""Classifier-free guidance on text, with negative prompts.

For a network that reads a caption as its ``context``, token ids (e.g.
:class:`~diffusion_jax.models.text_conditioned.TextConditioned`) or precomputed embeddings
(:class:`~diffusion_jax.models.text_conditioned.EmbeddingConditioned`), the guided score is

    s_w(x, t | c, c_neg) = (1 + w) s(x, t | c) - w s(x, t | c_neg)

(Ho & Salimans 2022, eq. 6, with the unconditional model replaced by the negative prompt's: the
empty caption when there is none, which is the unconditional model the caption dropout
trained). ``w = 0`` is the conditional model alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

__all__ = ["text_guided_score"]


def _score(module, sde, parametrization, params, ids, negative_ids, guidance_scale, x, t):
    def net(context):
        return lambda x_in, c: module.apply({"params": params}, x_in, c, context=context, train=False)

    score = parametrization.apply(net(ids), sde, x, t, "score")
    if not guidance_scale:
        return score
    other = parametrization.apply(net(negative_ids), sde, x, t, "score")
    return (1.0 + guidance_scale) * score - guidance_scale * other


# One implementation object per (network, SDE, parametrization): the samplers compile their jit
# once per static function, and a fresh functools.partial per call would recompile every time.
_IMPLS: list[tuple[Any, Any, Any, Callable]] = []


def _impl(module, sde, parametrization) -> Callable:
    for m, s, p, fn in _IMPLS:
        if m is module and s is sde and p is parametrization:
            return fn
    fn = functools.partial(_score, module, sde, parametrization)
    _IMPLS.append((module, sde, parametrization, fn))
    return fn


def text_guided_score(module, sde, parametrization, params, ids, negative_ids, guidance_scale: float):
    """The guided score as a ``jax.tree_util.Partial`` (parameters, ids and the scale as
    arguments, so the samplers compile once). ``ids``, ``negative_ids``: the network's context for
    the prompt and for the negative prompt (or the empty caption / null token), one row per
    sample: token ids (B, L) or embeddings (B, L, D)."""
    impl = _impl(module, sde, parametrization)
    return jax.tree_util.Partial(impl, params, ids, negative_ids, float(guidance_scale))
