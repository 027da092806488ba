"""Build data pipelines from a config: the only place that reads ``config.data``.

Keys read (score_sde's names first, then ours; every optional key has its default here, once):

``config.data``
  ``dataset``                 name in :data:`diffusion_jax.data.DATASETS` (required;
                              case-insensitive, score_sde's ``CIFAR10``/``SVHN``/``CELEBA``/``LSUN``)
  ``image_size``              output side in pixels (default: the data set's own)
  ``random_flip``             random horizontal flips in training (default False)
  ``centered``                values in [-1, 1] instead of [0, 1] (default False)
  ``uniform_dequantization``  ``(k + u) / L`` instead of ``k / (L - 1)`` (default False)
  ``num_channels``            checked against the data set; 1 or 3 for folders (default: the data's)
  ``category``                LSUN category, e.g. ``'bedroom'`` (LSUN only)
  ``data_dir``                TFDS data directory (default ``$DIFFUSION_JAX_DATA_DIR``, else TFDS's)
  ``folder_path``             image folder (``dataset='folder'`` only)
  ``num_levels``              requantise to fewer grey levels, e.g. 32 (default: the data's own)
  ``seed``                    shuffling / augmentation seed (default: ``config.seed``, else 0)
  ``num_threads``             Grain read threads (default: automatic, see ``train_iterator``)
  ``num_workers``             Grain worker processes (default 0)
  ``shuffle_buffer``          accepted for score_sde configs and not used: each epoch is an exact
                              permutation of the shard, as if the buffer were infinite

``config.training.batch_size`` and ``config.eval.batch_size`` are GLOBAL batch sizes; each host
yields ``batch_size // process_count`` examples per batch.

Toy distributions have no pixels: for them the image keys (``image_size``, ``num_channels``,
``random_flip``, ``centered``, ``uniform_dequantization``, ``num_levels``) are not read, so a
toy config may inherit an image config unchanged.
"""

from __future__ import annotations

from typing import Any

from diffusion_jax import data as data_lib
from diffusion_jax.data import datasets as datasets_lib

__all__ = ["build_data", "build_data_source", "DATA_DEFAULTS"]

# The optional keys of config.data and their defaults.
DATA_DEFAULTS: dict[str, Any] = {
    "image_size": None,
    "random_flip": False,
    "centered": False,
    "uniform_dequantization": False,
    "num_channels": None,
    "category": None,
    "data_dir": None,
    "folder_path": None,
    "num_levels": None,
    "seed": None,
    "num_threads": None,
    "num_workers": 0,
    "shuffle_buffer": None,
    # score_sde's FFHQ / CelebA-HQ TFRecords; those data sets are not supported (they need
    # TensorFlow), so only an empty value is accepted.
    "tfrecords_path": None,
}
_SPLITS = ("train", "eval")


def _data_dict(config) -> dict[str, Any]:
    if "data" not in config:
        raise ValueError("config.data is missing; it needs at least config.data.dataset")
    values = dict(config.data)
    unknown = sorted(set(values) - set(DATA_DEFAULTS) - {"dataset"})
    if unknown:
        raise ValueError(
            f"unknown key(s) config.data.{', config.data.'.join(unknown)}; valid: dataset, {', '.join(DATA_DEFAULTS)}"
        )
    if "dataset" not in values:
        raise ValueError(f"config.data.dataset is required; valid: {', '.join(data_lib.DATASETS)}")
    if values.get("tfrecords_path"):
        raise ValueError(
            "config.data.tfrecords_path: TFRecord data sets (score_sde's FFHQ / CelebA-HQ) need "
            "TensorFlow and are not supported; use an image folder (dataset='folder', "
            "folder_path=...) instead"
        )
    return {**DATA_DEFAULTS, **values}


def _check_bool(d: dict[str, Any], key: str) -> bool:
    if not isinstance(d[key], bool):
        raise ValueError(f"config.data.{key} must be True or False, got {d[key]!r}")
    return d[key]


def _check_int(value: Any, key: str, *, minimum: int, optional: bool) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or None" if optional else "")
        raise ValueError(f"{key} must be {allowed}, got {value!r}")
    return value


def _is_toy(name: str) -> bool:
    key, _ = datasets_lib.canonical_name(name)
    return isinstance(datasets_lib.DATASETS[key], datasets_lib.ToyData)


def _seed(config, d: dict[str, Any]) -> int:
    seed = d["seed"] if d["seed"] is not None else config.get("seed", 0)
    return _check_int(seed, "config.data.seed (or config.seed)", minimum=0, optional=False)


def build_data_source(config, *, split: str) -> data_lib.Source:
    """Open ``split`` (``'train'`` or ``'eval'``) of ``config.data.dataset``; ``source.info``
    describes the data before the value maps (use :func:`build_data` for batches)."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    d = _data_dict(config)
    name = d["dataset"]
    try:
        toy = _is_toy(name)
    except ValueError as error:
        raise ValueError(f"config.data.dataset: {error}") from None
    if not toy:
        _check_int(d["image_size"], "config.data.image_size", minimum=1, optional=True)
        _check_int(d["num_channels"], "config.data.num_channels", minimum=1, optional=True)
    for key in ("category", "data_dir", "folder_path"):
        if d[key] is not None and not isinstance(d[key], str):
            raise ValueError(f"config.data.{key} must be a string or None, got {d[key]!r}")
    try:
        return data_lib.load(
            name,
            split=split,
            image_size=None if toy else d["image_size"],
            num_channels=None if toy else d["num_channels"],
            data_dir=d["data_dir"] or None,
            folder_path=d["folder_path"] or None,
            category=d["category"] or None,
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
    d = _data_dict(config)
    toy = source.info.num_levels is None
    batch_key = "eval" if evaluation else "training"
    if batch_key not in config or "batch_size" not in config[batch_key]:
        raise ValueError(f"config.{batch_key}.batch_size (the global batch size) is required")
    batch_size = _check_int(config[batch_key].batch_size, f"config.{batch_key}.batch_size", minimum=1, optional=False)
    seed = _seed(config, d) if seed is None else _check_int(seed, "seed", minimum=0, optional=False)
    options: dict[str, Any] = {}
    if not toy:
        for key in ("random_flip", "centered", "uniform_dequantization"):
            options[key] = _check_bool(d, key)
        if uniform_dequantization is not None:
            options["uniform_dequantization"] = uniform_dequantization
        options["num_levels"] = _check_int(d["num_levels"], "config.data.num_levels", minimum=2, optional=True)
    num_threads = _check_int(d["num_threads"], "config.data.num_threads", minimum=0, optional=True)
    num_workers = _check_int(d["num_workers"], "config.data.num_workers", minimum=0, optional=False)
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
        raise ValueError(f"{where} (dataset={d['dataset']!r}): {error}") from None
