"""Build data pipelines from a config: the only place that reads ``config.data``.

The keys, their types and defaults are in the schema (:mod:`diffusion_jax.builders.config`,
listed in ``docs/config.md``); a partial config takes the schema's defaults for the rest.
``config.training.batch_size`` and ``config.eval.batch_size`` are GLOBAL batch sizes; each host
yields ``batch_size // process_count`` examples per batch. ``data.shuffle_buffer`` is accepted for
score_sde configs and not used: each epoch is an exact permutation of the shard.

Toy distributions have no pixels: for them the image keys (``image_size``, ``num_channels``,
``random_flip``, ``centered``, ``uniform_dequantization``, ``num_levels``) are not read, so a
toy config may inherit an image config unchanged.
"""

from __future__ import annotations

from typing import Any

from diffusion_jax import data as data_lib
from diffusion_jax.builders.config import with_defaults
from diffusion_jax.data import datasets as datasets_lib

__all__ = ["build_data", "build_data_source", "build_data_info"]

_SPLITS = ("train", "eval")


def _is_toy(name: str) -> bool:
    key, _ = datasets_lib.canonical_name(name)
    return isinstance(datasets_lib.DATASETS[key], datasets_lib.ToyData)


def build_data_source(config, *, split: str) -> data_lib.Source:
    """Open ``split`` (``'train'`` or ``'eval'``) of ``config.data.dataset``; ``source.info``
    describes the data before the value maps (use :func:`build_data` for batches)."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    d = with_defaults(config).data
    name = d.dataset
    try:
        toy = _is_toy(name)
    except ValueError as error:
        raise ValueError(f"config.data.dataset: {error}") from None
    try:
        return data_lib.load(
            name,
            split=split,
            image_size=None if toy else d.image_size,
            num_channels=None if toy else d.num_channels,
            data_dir=d.data_dir or None,
            folder_path=d.folder_path or None,
            category=d.category or None,
            latent_dir=d.latent_dir or None,
            latent_captions=with_defaults(config).model.text_encoder != "none",
        )
    except ValueError as error:
        raise ValueError(f"config.data (dataset={name!r}): {error}") from None


def build_data(
    config,
    *,
    split: str,
    evaluation: bool | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_epochs: int | None = None,
    uniform_dequantization: bool | None = None,
    seed: int | None = None,
) -> data_lib.DataIterator:
    """The data iterator for ``split`` of ``config.data.dataset``.

    Args:
      config: an ml_collections ConfigDict (or any mapping-like config) with ``data`` and
        ``training.batch_size`` / ``eval.batch_size``.
      split: ``'train'`` or ``'eval'``: which split of the data set to read.
      evaluation: which pipeline: False for training (shuffled, flipped, repeated, full batches
        of ``training.batch_size``), True for evaluation (one ordered pass over every example,
        padded batches of ``eval.batch_size`` with a ``'mask'``). Default: ``split == 'eval'``.
        score_sde's ``eval.bpd_dataset = 'train'`` is ``split='train', evaluation=True``.
      shard_index, shard_count: this host's shard (default ``jax.process_index()`` /
        ``jax.process_count()``).
      num_epochs: training passes (None: forever).
      uniform_dequantization: overrides ``config.data.uniform_dequantization`` (score_sde's
        likelihood evaluation always dequantizes).
      seed: overrides the configured seed (e.g. one per bits/dim repeat).

    Returns:
      A :class:`diffusion_jax.data.DataIterator`; ``iterator.info`` is the :class:`DataInfo`.
    """
    evaluation = split == "eval" if evaluation is None else evaluation
    if not isinstance(evaluation, bool):
        raise ValueError(f"evaluation must be True, False or None, got {evaluation!r}")
    source = build_data_source(config, split=split)
    full = with_defaults(config)
    d = full.data
    toy = source.info.num_levels is None
    batch_key = "eval" if evaluation else "training"
    batch_size = full[batch_key].batch_size
    if seed is None:
        seed = d.seed if d.seed is not None else full.seed
    options: dict[str, Any] = {}
    if not toy:
        options.update(random_flip=d.random_flip, centered=d.centered, num_levels=d.num_levels)
        options["uniform_dequantization"] = (
            d.uniform_dequantization if uniform_dequantization is None else uniform_dequantization
        )
    num_threads, num_workers = d.num_threads, d.num_workers
    common = dict(
        batch_size=batch_size,
        seed=seed,
        shard_index=shard_index,
        shard_count=shard_count,
        num_threads=num_threads,
        num_workers=num_workers,
    )
    try:
        if evaluation:
            options.pop("random_flip", None)  # evaluation never flips
            return data_lib.eval_iterator(source, **common, **options)
        return data_lib.train_iterator(source, **common, num_epochs=num_epochs, **options)
    except ValueError as error:
        where = f"config.{batch_key}.batch_size" if "batch_size" in str(error) else "config.data"
        raise ValueError(f"{where} (dataset={d.dataset!r}): {error}") from None


def build_data_info(config, *, split: str = "eval") -> data_lib.DataInfo:
    """The :class:`DataInfo` of ``config.data`` as the pipeline yields it (levels, value range,
    centring), without building an iterator."""
    source = build_data_source(config, split=split)
    d = with_defaults(config).data
    if source.info.num_levels is None:
        return source.info
    # The pipeline's own description of its output (the value maps it applies).
    _, info = data_lib.pipeline._make_preprocess(
        source.info,
        random_flip=False,
        centered=d.centered,
        uniform_dequantization=d.uniform_dequantization,
        num_levels=d.num_levels,
    )
    return info
