"""Data: TFDS data sets without TensorFlow, image folders and toy distributions, through Grain.

    >>> from diffusion_jax import data
    >>> source = data.load("digits", split="train")  # prepares the digits on first use
    >>> it = data.train_iterator(source, batch_size=128, seed=0, centered=True)
    >>> batch = next(it)              # {'image': (128, 8, 8, 1) float32, 'label': (128,) int32}
    >>> state = it.get_state()         # save with the checkpoint ...
    >>> it.set_state(state)            # ... and resume at that position

Modules: :mod:`~diffusion_jax.data.datasets` (the ``DATASETS`` registry and :func:`load`),
:mod:`~diffusion_jax.data.pipeline` (Grain iterators), :mod:`~diffusion_jax.data.transforms`,
:mod:`~diffusion_jax.data.sources`, :mod:`~diffusion_jax.data.digits` (the embedded TFDS data
set), :mod:`~diffusion_jax.data.toys`. Nothing here imports model code.
"""

from diffusion_jax.data.datasets import (
    ALIASES,
    DATASETS,
    DatasetNotPreparedError,
    canonical_name,
    load,
)
from diffusion_jax.data.digits import DigitsBuilder, default_data_dir, prepare_digits
from diffusion_jax.data.info import DataInfo
from diffusion_jax.data.pipeline import (
    DataIterator,
    Preprocess,
    eval_iterator,
    resolve_shard,
    train_iterator,
)
from diffusion_jax.data.sources import (
    ArraySource,
    FolderSource,
    Source,
    TfdsSource,
    UnreadableImageError,
)
from diffusion_jax.data.toys import TOYS

__all__ = [
    "ALIASES",
    "DATASETS",
    "TOYS",
    "ArraySource",
    "DataInfo",
    "DataIterator",
    "DatasetNotPreparedError",
    "DigitsBuilder",
    "FolderSource",
    "Preprocess",
    "Source",
    "TfdsSource",
    "UnreadableImageError",
    "canonical_name",
    "default_data_dir",
    "eval_iterator",
    "load",
    "prepare_digits",
    "resolve_shard",
    "train_iterator",
]
