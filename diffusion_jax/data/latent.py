"""Latent data sets: a data set encoded once by an autoencoder (``diffusion-jax encode``), read
back through the same Grain pipelines as any other data set (``data.dataset = 'latent'``,
``data.latent_dir = DIR``).

Layout of ``DIR``:

* ``latents.json``: the format tag, the record layout, the latent shape, the split sizes, the
  scale factor, the number of classes, the value range of the scaled train latents, and the
  autoencoder that wrote them (workdir, checkpoint step, parameter fingerprint, configuration);
* ``<split>.array_record-<i>-of-<n>``: ArrayRecord files (one per writing process, ``split`` is
  ``train`` or ``eval``), one record per example: a little-endian structured array row with
  fields ``index`` (int64, the example's position in the split), ``label`` (int32, -1 without
  labels), ``latent`` (float32 ``(h, w, c)``, unscaled: as the encoder gave it) and, for a set
  written with captions (``data.captions``), ``context``: either int32 ``(L,)``, the caption's
  token ids, or, for a set written with a frozen text encoder (``encode --text_encoder DIR``),
  float32 ``(L, D)``, the encoder's last hidden states of the caption at its first ``L``
  positions (``L``: the longest caption's token count, ``D``: the encoder's width).

``latents.json``'s ``captions`` entry (None without captions) holds the captioner's ``name``, the
context length ``max_length`` (``L``), the class thresholds ``ink_edges`` and either the word
``tokenizer`` (token ids) or ``embedding``: ``{"encoder": "clip", "path", "fingerprint",
"hidden_size"}``, the text encoder's directory, the fingerprint of its parameters and ``D``.

Sources hold the files, not the data; batches are read with one ``__getitems__`` call and
decoded with one ``np.frombuffer``. The pipeline sees ``image = scale_factor * latent``
(float32; ``num_levels=None``, like the toy distributions, so no image value map applies). The
records of a split come file by file; the ``index`` field of each gives its example's position.
Nothing here imports model code: checking the autoencoder is the builders' job.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from diffusion_jax.data.info import DataInfo

__all__ = [
    "FORMAT",
    "METADATA",
    "LatentSource",
    "LatentData",
    "record_dtype",
    "context_shape",
    "shard_path",
    "write_shard",
    "read_metadata",
    "write_metadata",
]

FORMAT = "diffusion_jax.latents/1"
METADATA = "latents.json"
SPLITS = ("train", "eval")


def record_dtype(latent_shape: Sequence[int], context_length: int = 0, context_dim: int = 0) -> np.dtype:
    """The little-endian row layout of one record: with ``context_length`` > 0, a ``context``
    field holding the caption's token ids (int32 ``(L,)``) or, with ``context_dim`` > 0, its
    embeddings (float32 ``(L, D)``)."""
    fields: list[tuple[Any, ...]] = [
        ("index", "<i8"),
        ("label", "<i4"),
        ("latent", "<f4", tuple(int(s) for s in latent_shape)),
    ]
    if context_length and context_dim:
        fields.append(("context", "<f4", (int(context_length), int(context_dim))))
    elif context_length:
        fields.append(("context", "<i4", (int(context_length),)))
    return np.dtype(fields)


def context_shape(meta: dict[str, Any]) -> tuple[int, int]:
    """``(L, D)`` of a latent set's ``context`` field from its metadata: ``(0, 0)`` without
    captions, ``(L, 0)`` for token ids, ``(L, D)`` for embeddings."""
    captions = meta.get("captions") or {}
    embedding = captions.get("embedding") or {}
    return int(captions.get("max_length", 0)), int(embedding.get("hidden_size", 0))


def shard_path(directory: str | os.PathLike, split: str, shard_index: int, shard_count: int) -> pathlib.Path:
    return pathlib.Path(directory) / f"{split}.array_record-{shard_index:05d}-of-{shard_count:05d}"


def write_shard(
    path: str | os.PathLike,
    *,
    indices: np.ndarray,
    labels: np.ndarray | None,
    latents: np.ndarray,
    context: np.ndarray | None = None,
) -> int:
    """Write one ArrayRecord file of records (one per example); returns the number written.
    ``context``: ``(N, L)`` token ids or ``(N, L, D)`` embeddings, or None."""
    from array_record.python.array_record_module import ArrayRecordWriter  # noqa: PLC0415

    length = 0 if context is None else context.shape[1]
    dim = context.shape[2] if context is not None and context.ndim == 3 else 0
    rows = np.zeros(len(indices), record_dtype(latents.shape[1:], length, dim))
    if context is not None:
        rows["context"] = context
    rows["index"] = indices
    rows["label"] = -1 if labels is None else labels
    rows["latent"] = latents
    tmp = pathlib.Path(f"{os.fspath(path)}.tmp{os.getpid()}")
    writer = ArrayRecordWriter(os.fspath(tmp), "group_size:1")
    try:
        for row in rows:
            writer.write(row.tobytes())
    finally:
        writer.close()
    os.replace(tmp, path)
    return len(rows)


def write_metadata(directory: str | os.PathLike, meta: dict[str, Any]) -> None:
    path = pathlib.Path(directory) / METADATA
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(dict(meta, format=FORMAT), indent=2))
    os.replace(tmp, path)


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a latent data set; a missing or foreign directory raises
    FileNotFoundError / ValueError naming it and the command that writes one."""
    if not directory:
        raise ValueError("dataset 'latent' needs data.latent_dir (a directory written by `diffusion-jax encode`)")
    path = pathlib.Path(directory).expanduser() / METADATA
    if not path.is_file():
        raise FileNotFoundError(
            f"latent_dir={os.fspath(directory)!r} holds no {METADATA}: write a latent data set there with "
            "`diffusion-jax encode --workdir AUTOENCODER_WORKDIR --out DIR`"
        )
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}; encode the data again")
    return meta


class LatentSource:
    """One split of a latent data set (the :class:`~diffusion_jax.data.sources.Source`
    protocol): ``get_batch`` returns ``image`` (scaled latents, float32), ``label`` and, with
    ``with_context``, ``context`` (int32 token ids ``(B, L)``, or float32 embeddings
    ``(B, L, D)`` when ``context_dim`` > 0)."""

    in_memory = False

    def __init__(
        self,
        paths: Sequence[str],
        *,
        latent_shape: Sequence[int],
        scale_factor: float,
        info: DataInfo,
        context_length: int = 0,
        context_dim: int = 0,
        with_context: bool = False,
    ):
        from array_record.python.array_record_data_source import ArrayRecordDataSource  # noqa: PLC0415

        self.paths = list(paths)
        self.records = ArrayRecordDataSource(self.paths)
        self.dtype = record_dtype(latent_shape, context_length, context_dim)
        self.context_dtype = np.float32 if context_dim else np.int32
        self.with_context = with_context and context_length > 0
        self.scale_factor = float(scale_factor)
        self.info = info

    def __len__(self) -> int:
        return len(self.records)

    def read(self, indices: np.ndarray) -> np.ndarray:
        """The raw records ``indices`` as a structured array (fields index, label, latent)."""
        raw = self.records.__getitems__([int(i) for i in indices])
        return np.frombuffer(b"".join(raw), self.dtype)

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        rows = self.read(indices)
        batch = {"image": (rows["latent"] * np.float32(self.scale_factor)).astype(np.float32)}
        if self.info.num_classes is not None:
            batch["label"] = rows["label"].astype(np.int32)
        if self.with_context:  # the caption's token ids or embeddings, for text-conditioned networks
            batch["context"] = rows["context"].astype(self.context_dtype)
        return batch


@dataclasses.dataclass(frozen=True)
class LatentData:
    """The ``latent`` entry of :data:`diffusion_jax.data.DATASETS`: opens ``options.latent_dir``."""

    def load(self, *, split: str, options: Any) -> LatentSource:  # options: datasets.LoadOptions
        if split not in SPLITS:
            raise ValueError(f"latent: split must be one of {SPLITS}, got {split!r}")
        directory = pathlib.Path(options.latent_dir or "").expanduser()
        meta = read_metadata(options.latent_dir)
        shape = tuple(int(s) for s in meta["latent_shape"])
        h, w, c = shape
        for key, want, got in (("image_size", h, options.image_size), ("num_channels", c, options.num_channels)):
            if got is not None and got != want:
                raise ValueError(
                    f"latent data set {os.fspath(directory)} holds {h}x{w}x{c} latents, but {key}={got}; set "
                    f"data.{key} to {want} or None"
                )
        sizes = meta["sizes"]
        files = sorted(directory.glob(f"{split}.array_record-*"))
        files = [f for f in files if ".tmp" not in f.name]
        count = sum(1 for _ in files)
        if not files:
            raise FileNotFoundError(f"latent data set {os.fspath(directory)} has no {split} records")
        lo, hi = meta["value_range"]
        info = DataInfo(
            name="latent",
            shape=shape,
            num_levels=None,
            num_classes=meta.get("num_classes"),
            value_range=(float(lo), float(hi)),
            train_size=int(sizes["train"]),
            eval_size=int(sizes["eval"]),
            train_split=meta.get("train_split", "train"),
            eval_split=meta.get("eval_split", "test"),
        )
        length, dim = context_shape(meta)
        source = LatentSource(
            [os.fspath(f) for f in files],
            latent_shape=shape,
            scale_factor=meta["scale_factor"],
            info=info,
            context_length=length,
            context_dim=dim,
            with_context=bool(options.latent_captions),
        )
        if len(source) != int(sizes[split]):
            raise ValueError(
                f"latent data set {os.fspath(directory)}: {split} has {len(source)} records in {count} file(s), but "
                f"{METADATA} records {sizes[split]}; encode the data again"
            )
        return source
