"""Grain pipelines: sharded, shuffled, batched, preprocessed, with checkpointable state.

The pipelines run on batches of example *indices*: a Grain ``MapDataset`` over batch numbers
maps batch ``i`` to the indices it holds (a per-epoch permutation of this host's shard, drawn
from ``(seed, epoch)``), and a per-batch ``random_map`` then reads those examples
(``source.get_batch``) and applies the value maps with a generator seeded by
``(seed, shard_index, i)``. So shuffling and sharding never touch the data, the Python overhead
is paid once per batch rather than once per example, and every batch is a pure function of its
number: the iterator state is a position, and restoring it gives the identical continuation.

Sharding (multi-host data parallelism): host ``shard_index`` of ``shard_count`` reads the
examples ``shard_index, shard_index + shard_count, ...`` of the split and yields batches of
``batch_size / shard_count`` examples; a global batch is the concatenation over hosts. Strided
shards are disjoint, cover the split, and stay class-balanced when the examples are sorted by
class (image folders are). Defaults: ``jax.process_index()`` and ``jax.process_count()``.

Batches are dicts of NumPy arrays:

* ``'image'``: float32 ``(b, H, W, C)`` for images, ``(b, D)`` for toys;
* ``'label'``: int32 ``(b,)``, when the data set has labels;
* ``'mask'``: bool ``(b,)``, evaluation only: True for real examples, False for padding.

where ``b = batch_size // shard_count``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from diffusion_jax.data import transforms
from diffusion_jax.data.info import DataInfo
from diffusion_jax.data.sources import Source

__all__ = ["DataIterator", "Preprocess", "train_iterator", "eval_iterator", "resolve_shard"]

Batch = dict[str, np.ndarray]


def resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    """``(shard_index, shard_count)``, defaulting to this JAX process and the process count."""
    if shard_index is None or shard_count is None:
        import jax  # only when a default is needed: jax starts its backends on first query

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    for key, value in (("shard_index", shard_index), ("shard_count", shard_count)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{key} must be an integer, got {value!r}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index} and {shard_count}")
    return int(shard_index), int(shard_count)


def _per_host_batch(batch_size: int, shard_count: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size % shard_count:
        raise ValueError(
            f"the global batch_size {batch_size} is not divisible by the number of hosts "
            f"(shard_count={shard_count}); use a multiple of {shard_count}"
        )
    return batch_size // shard_count


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _seed(*parts: int) -> int:
    """A 32-bit seed mixing ``parts`` (so shards and uses get independent streams)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------
# Value maps
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Per-batch value map ``(batch, rng) -> batch``: requantise to ``num_levels``, random
    horizontal flip, levels to floats (``k / (L - 1)``, or ``(k + u) / L`` when dequantizing),
    then ``2 x - 1`` when ``centered``. Toys (``stored_levels=None``) pass through as float32.
    """

    stored_levels: int | None
    num_levels: int | None
    random_flip: bool = False
    centered: bool = False
    uniform_dequantization: bool = False

    def __call__(self, batch: Batch, rng: np.random.Generator) -> Batch:
        image = batch["image"]
        if self.stored_levels is None:
            image = image.astype(np.float32, copy=False)
        else:
            levels = self.num_levels
            assert levels is not None  # set with stored_levels (_make_preprocess)
            image = transforms.requantize(image, from_levels=self.stored_levels, to_levels=levels)
            if self.random_flip:
                image = transforms.random_flip_left_right(image, rng)
            if self.uniform_dequantization:
                image = transforms.dequantize(image, rng, num_levels=levels)
            else:
                image = transforms.levels_to_unit(image, num_levels=levels)
            if self.centered:
                image = transforms.center(image)
        return {**batch, "image": image}


def _make_preprocess(
    info: DataInfo,
    *,
    random_flip: bool,
    centered: bool,
    uniform_dequantization: bool,
    num_levels: int | None,
) -> tuple[Preprocess, DataInfo]:
    for key, value in (
        ("random_flip", random_flip),
        ("centered", centered),
        ("uniform_dequantization", uniform_dequantization),
    ):
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{key} must be True or False, got {value!r}")
    if info.num_levels is None:
        # Continuous toy data: none of the image value maps has a meaning.
        used = [
            k
            for k, v in (
                ("random_flip", random_flip),
                ("centered", centered),
                ("uniform_dequantization", uniform_dequantization),
            )
            if v
        ]
        if num_levels is not None:
            used.append(f"num_levels={num_levels}")
        if used:
            raise ValueError(
                f"{info.name} is a continuous toy distribution; {', '.join(used)} only apply to "
                f"images: set them to False / None"
            )
        return Preprocess(stored_levels=None, num_levels=None), info
    levels = info.num_levels if num_levels is None else num_levels
    is_int = isinstance(levels, (int, np.integer)) and not isinstance(levels, bool)
    if not is_int or not 2 <= levels <= info.num_levels:
        raise ValueError(
            f"num_levels must be an integer between 2 and {info.num_levels} (the levels of "
            f"{info.name}), got {num_levels!r}"
        )
    preprocess = Preprocess(
        stored_levels=info.num_levels,
        num_levels=int(levels),
        random_flip=bool(random_flip),
        centered=bool(centered),
        uniform_dequantization=bool(uniform_dequantization),
    )
    out_info = dataclasses.replace(
        info,
        num_levels=int(levels),
        value_range=(-1.0, 1.0) if centered else (0.0, 1.0),
        centered=bool(centered),
        uniform_dequantization=bool(uniform_dequantization),
    )
    return preprocess, out_info


class _ShuffledBatch:
    """Grain map: batch number -> the indices of that batch in the stream of epochs, each epoch
    a fresh permutation of ``own`` drawn from ``(seed, epoch)``. Batches run across epoch
    boundaries. Vectorised, so a batch costs one gather instead of ``batch_size`` Grain element
    lookups; a pure function of the batch number, so iterator states are plain positions."""

    def __init__(self, own: np.ndarray, *, batch_size: int, seed: int):
        self.own = own
        self.batch_size = batch_size
        self.seed = seed
        self._permutations: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # Grain's read threads share this object

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._permutations.get(epoch)
            if perm is None:
                perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.own))
                # A batch spans at most two epochs; keep the latest few (threads interleave).
                if len(self._permutations) >= 4:
                    del self._permutations[min(self._permutations)]
                self._permutations[epoch] = perm
            return perm

    def __call__(self, batch_number: int) -> np.ndarray:
        positions = batch_number * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(positions, len(self.own))
        out = np.empty(self.batch_size, np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self.own[self._permutation(int(epoch))[offsets[sel]]]
        return out

    def __getstate__(self):
        # The permutation cache is rebuilt on demand in worker processes.
        return {"own": self.own, "batch_size": self.batch_size, "seed": self.seed}

    def __setstate__(self, state: dict) -> None:
        _ShuffledBatch.__init__(self, state["own"], batch_size=state["batch_size"], seed=state["seed"])


@dataclasses.dataclass(frozen=True)
class _Slice:
    """Grain map: batch number -> the ``batch_size`` entries of ``indices`` it covers."""

    indices: np.ndarray
    batch_size: int

    def __call__(self, batch_number: int) -> np.ndarray:
        start = batch_number * self.batch_size
        return self.indices[start : start + self.batch_size]


@dataclasses.dataclass(frozen=True)
class _LoadBatch:
    """Grain random map: a batch of indices (``-1`` = padding) -> a preprocessed batch."""

    source: Any
    preprocess: Preprocess
    with_mask: bool

    def __call__(self, indices: np.ndarray, rng: np.random.Generator) -> Batch:
        indices = np.asarray(indices, np.int64)
        valid = indices >= 0
        batch = self.preprocess(self.source.get_batch(indices[valid]), rng)
        if not valid.all():
            # Padding rows are all zeros (image 0, label 0); only the mask tells them apart.
            padded = {}
            for key, value in batch.items():
                full = np.zeros((len(indices), *value.shape[1:]), value.dtype)
                full[valid] = value
                padded[key] = full
            batch = padded
        if self.with_mask:
            batch["mask"] = valid
        return batch


# --------------------------------------------------------------------------------------------
# Iterators
# --------------------------------------------------------------------------------------------


class DataIterator(Iterator[Batch]):
    """An iterator of batches with checkpointable position.

    ``get_state()`` returns a small JSON-serialisable dict; ``set_state(state)`` on an iterator
    built with the same data set, split, batch size, seed, shard and epochs resumes exactly
    there (a mismatch raises ValueError instead of silently reading other data).

    Attributes:
      info: :class:`DataInfo` of the data as yielded (value range, levels, sizes).
      batch_size: examples per batch on this host; ``global_batch_size`` over all hosts.
      num_batches: batches this iterator yields, or None when it repeats forever.
      shard_index, shard_count: this host's shard.
    """

    def __init__(
        self,
        dataset: grain.IterDataset,
        *,
        info: DataInfo,
        batch_size: int,
        global_batch_size: int,
        num_batches: int | None,
        shard_index: int,
        shard_count: int,
        fingerprint: str,
    ):
        self._iterator = iter(dataset)
        self.info = info
        self.batch_size = batch_size
        self.global_batch_size = global_batch_size
        self.num_batches = num_batches
        self.shard_index = shard_index
        self.shard_count = shard_count
        self._fingerprint = fingerprint

    def __next__(self) -> Batch:
        return next(self._iterator)

    def __iter__(self) -> DataIterator:
        return self

    def close(self) -> None:
        """Stop Grain's reading threads and worker processes (also on leaving a ``with``)."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> DataIterator:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._fingerprint, "grain": self._iterator.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "grain" not in state or "pipeline" not in state:
            raise ValueError(f"not a DataIterator state (expected keys 'pipeline', 'grain'): {state!r}")
        if state["pipeline"] != self._fingerprint:
            raise ValueError(
                "the saved data state belongs to a different pipeline, so its position would "
                f"point at other data:\n  saved:   {state['pipeline']}\n  current: {self._fingerprint}"
            )
        self._iterator.set_state(state["grain"])


def _allow_grain_flag_defaults() -> None:
    """Grain <= 0.2.18 reads an Abseil flag in its worker processes and fails with
    ``UnparsedFlagAccessError`` unless flags were parsed, which only ``absl.app`` programs do
    (google/grain#1355, fixed upstream by reading the default). Marking the flags parsed, when
    nothing parsed them yet, makes every flag read its default, as the fix does."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _to_iterator(
    dataset: grain.MapDataset,
    source: Source,
    *,
    num_threads: int | None,
    prefetch: int | None,
    num_workers: int,
) -> grain.IterDataset:
    if num_threads is None:
        # Decoding and resizing (Pillow releases the GIL) parallelise over threads; gathering
        # from memory is faster in the calling thread.
        num_threads = 0 if getattr(source, "in_memory", False) else min(8, os.cpu_count() or 1)
    if prefetch is None:
        prefetch = max(2, 2 * num_threads)
    for key, value in (("num_threads", num_threads), ("prefetch", prefetch), ("num_workers", num_workers)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    iter_ds = dataset.to_iter_dataset(read_options)
    if num_workers > 0:
        _allow_grain_flag_defaults()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter_ds


def train_iterator(
    source: Source,
    *,
    batch_size: int,
    seed: int = 0,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    random_flip: bool = False,
    centered: bool = False,
    uniform_dequantization: bool = False,
    num_levels: int | None = None,
    num_threads: int | None = None,
    prefetch: int | None = None,
    num_workers: int = 0,
) -> DataIterator:
    """Shuffled, repeated batches of this host's shard, full batches only.

    Args:
      source: a split opened with :func:`diffusion_jax.data.load`.
      batch_size: GLOBAL batch size; this host yields ``batch_size // shard_count`` examples
        per batch (must divide).
      seed: shuffling and augmentation seed; each epoch is reshuffled.
      num_epochs: passes over the shard; None repeats forever. With a finite count every host
        yields the same number of batches (that of the smallest shard), so steps stay in
        lock-step; batches run across epoch boundaries, the incomplete last one is dropped.
      shard_index, shard_count: see the module docstring.
      random_flip, centered, uniform_dequantization, num_levels: value maps, see
        :class:`Preprocess`; ``num_levels`` requantises to fewer levels (e.g. 32 for 5-bit).
      num_threads, prefetch: Grain read threads and batches read ahead. None: no threads for
        in-memory data (digits, toys), where the calling thread is fastest, else
        ``min(8, cpu_count)`` threads reading ``2 * num_threads`` batches ahead.
      num_workers: Grain worker processes (0: none).

    Returns:
      A :class:`DataIterator` of batch dicts (``'image'``, ``'label'`` when labelled).
    """
    shard_index, shard_count = resolve_shard(shard_index, shard_count)
    per_host = _per_host_batch(batch_size, shard_count)
    seed = _check_seed(seed)
    if num_epochs is not None and (
        isinstance(num_epochs, bool) or not isinstance(num_epochs, (int, np.integer)) or num_epochs < 1
    ):
        raise ValueError(f"num_epochs must be a positive integer or None, got {num_epochs!r}")
    n = len(source)
    if n < shard_count:
        raise ValueError(f"{source.info.name}: {n} examples cannot fill {shard_count} shards")
    preprocess, info = _make_preprocess(
        source.info,
        random_flip=random_flip,
        centered=centered,
        uniform_dequantization=uniform_dequantization,
        num_levels=num_levels,
    )
    own = np.arange(shard_index, n, shard_count)
    num_batches = None
    if num_epochs is not None:
        # Every host yields the batches of the smallest shard, n // shard_count examples per epoch.
        num_batches = (n // shard_count) * num_epochs // per_host
        if num_batches == 0:
            raise ValueError(
                f"{source.info.name}: {num_epochs} epoch(s) of {n // shard_count} examples per host "
                f"do not fill one batch of {per_host}"
            )
    length = sys.maxsize if num_batches is None else num_batches
    batches = _ShuffledBatch(own, batch_size=per_host, seed=_seed(seed, 0))
    dataset = grain.MapDataset.range(length).map(batches)
    dataset = dataset.random_map(_LoadBatch(source, preprocess, with_mask=False), seed=_seed(seed, 1, shard_index))
    fingerprint = (
        f"train {info.name} n={n} batch={batch_size} seed={seed} epochs={num_epochs} shard={shard_index}/{shard_count}"
    )
    return DataIterator(
        _to_iterator(dataset, source, num_threads=num_threads, prefetch=prefetch, num_workers=num_workers),
        info=info,
        batch_size=per_host,
        global_batch_size=batch_size,
        num_batches=num_batches,
        shard_index=shard_index,
        shard_count=shard_count,
        fingerprint=fingerprint,
    )


def eval_iterator(
    source: Source,
    *,
    batch_size: int,
    seed: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
    centered: bool = False,
    uniform_dequantization: bool = False,
    num_levels: int | None = None,
    num_threads: int | None = None,
    prefetch: int | None = None,
    num_workers: int = 0,
) -> DataIterator:
    """One pass over this host's shard, in order, every example exactly once.

    Every batch has the same shape: the last ones are padded with all-zero rows (image 0,
    label 0, also when centred) and every batch carries ``batch['mask']`` (bool ``(b,)``, False
    for padding), so a
    jitted evaluation step compiles once. All hosts yield the same number of batches,
    ``ceil(ceil(N / shard_count) / b)``, so multi-host evaluation stays in lock-step; sum
    per-example results weighted by the mask.

    ``seed`` drives the dequantization noise only (nothing is shuffled or flipped); use a new
    seed per repeat to average bits/dim over noise draws as score_sde does. Other arguments as
    in :func:`train_iterator`.
    """
    shard_index, shard_count = resolve_shard(shard_index, shard_count)
    per_host = _per_host_batch(batch_size, shard_count)
    seed = _check_seed(seed)
    preprocess, info = _make_preprocess(
        source.info,
        random_flip=False,
        centered=centered,
        uniform_dequantization=uniform_dequantization,
        num_levels=num_levels,
    )
    n = len(source)
    num_batches = math.ceil(math.ceil(n / shard_count) / per_host)
    own = np.arange(shard_index, n, shard_count)
    padded = np.full(num_batches * per_host, -1, np.int64)
    padded[: len(own)] = own
    dataset = grain.MapDataset.range(num_batches).map(_Slice(padded, batch_size=per_host))
    dataset = dataset.random_map(_LoadBatch(source, preprocess, with_mask=True), seed=_seed(seed, 2, shard_index))
    fingerprint = f"eval {info.name} n={n} batch={batch_size} seed={seed} shard={shard_index}/{shard_count}"
    return DataIterator(
        _to_iterator(dataset, source, num_threads=num_threads, prefetch=prefetch, num_workers=num_workers),
        info=info,
        batch_size=per_host,
        global_batch_size=batch_size,
        num_batches=num_batches,
        shard_index=shard_index,
        shard_count=shard_count,
        fingerprint=fingerprint,
    )
