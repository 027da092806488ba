"""Bits/dim over a whole data split, from ``config.eval`` (the ``eval`` mode's likelihood).

Every example of the split is evaluated once (padded batches carry a mask; nothing is dropped,
unlike score_sde), batches are sharded over the device mesh, and each example gets its own ODE
step sizes. Discrete data are dequantized with the data's own number of levels; continuous
(toy) data report the negative log-likelihood in nats per dimension instead.
"""

from __future__ import annotations

import math
import time

import jax

from diffusion_jax import likelihood as likelihood_lib
from diffusion_jax.training.logging import progress_bar
from diffusion_jax.training.step import shard_batch

__all__ = ["evaluate_bpd"]


def evaluate_bpd(config, exp, params, *, step: int = 0) -> dict:
    """Mean bits/dim (or nats/dim) of ``params`` over ``eval.bpd_dataset``, with ``bpd_*`` keys."""
    from diffusion_jax.builders.data import build_data

    e = config.eval
    split = "eval" if e.bpd_dataset == "test" else "train"
    t0 = time.perf_counter()
    with build_data(config, split=split, evaluation=True, uniform_dequantization=False) as it:
        info = it.info
        conditional = exp.null_label is not None
        total = it.num_batches or 0
        if e.bpd_max_examples:
            total = min(total, math.ceil(e.bpd_max_examples / config.eval.batch_size))
        result = likelihood_lib.evaluate_dataset(
            jax.random.PRNGKey(config.seed + step),
            lambda labels: exp.score_fn(params, class_labels=labels if conditional else None),
            exp.sde,
            progress_bar(it, total, f"bits/dim, step {step}"),
            num_levels=info.num_levels,
            value_range=tuple(info.value_range),
            num_draws=e.bpd_dequantization_draws,
            max_examples=e.bpd_max_examples,
            place=lambda b: shard_batch(b, exp.mesh),
            estimator=e.bpd_estimator,
            num_probes=e.bpd_num_probes,
            rtol=e.bpd_rtol,
            atol=e.bpd_atol,
        )
    out = {f"bpd_{k}" if not k.startswith(("bpd", "nll")) else k: v for k, v in result.items()}
    out.update(bpd_split=e.bpd_dataset, bpd_num_levels=info.num_levels, bpd_seconds=time.perf_counter() - t0)
    return out
