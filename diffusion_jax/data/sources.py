"""Random-access sources: a split of a data set, indexable by a batch of example numbers.

A source has ``info`` (:class:`DataInfo`), ``len(source)`` and ``get_batch(indices)``, which
returns a dict of stacked NumPy arrays for the examples ``indices`` (int array of shape ``(B,)``):

* ``'image'``: uint8 levels ``0..num_levels-1`` of shape ``(B, H, W, C)`` at the final image
  size (resizing and cropping happen here, per example), or float32 ``(B, D)`` for toys;
* ``'label'``: int32 ``(B,)``, only when the data set has labels.

Value maps (flip, dequantization, centring) are the pipeline's job. Sources hold no open
iterators, so they pickle into Grain worker processes.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import PIL.Image

from diffusion_jax.data import transforms
from diffusion_jax.data.info import DataInfo

__all__ = [
    "Source",
    "ArraySource",
    "TfdsSource",
    "FolderSource",
    "UnreadableImageError",
    "IMAGE_EXTENSIONS",
    "scan_image_folder",
]

Geometry = Callable[[np.ndarray], np.ndarray]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class UnreadableImageError(OSError):
    """An image file that Pillow cannot decode; the message names the file."""


class Source(Protocol):
    info: DataInfo
    in_memory: bool  # True when get_batch only gathers (reading threads would not help)

    def __len__(self) -> int: ...

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...


class ArraySource:
    """Examples held in memory: ``images`` (N, H, W, C) uint8 levels or (N, D) float32 vectors,
    ``labels`` (N,) int or None. Batches are gathered with one fancy-indexing call."""

    in_memory = True

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, *, info: DataInfo):
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if tuple(images.shape[1:]) != tuple(info.shape):
            raise ValueError(f"examples of shape {images.shape[1:]} do not match info.shape {info.shape}")
        self.images = images
        self.labels = None if labels is None else np.asarray(labels, np.int32)
        self.info = info

    def __len__(self) -> int:
        return len(self.images)

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        batch = {"image": self.images[indices]}
        if self.labels is not None:
            batch["label"] = self.labels[indices]
        return batch


def _stack(
    images: Sequence[np.ndarray], labels: Sequence[Any] | np.ndarray | None, shape: tuple[int, ...]
) -> dict[str, np.ndarray]:
    if images:
        image = np.stack(images)
    else:
        image = np.zeros((0, *shape), np.uint8)
    batch = {"image": image}
    if labels is not None:
        batch["label"] = np.asarray(labels, np.int32).reshape(len(images))
    return batch


class TfdsSource:
    """A split of a TFDS data set read through ``tfds.data_source`` (ArrayRecord files).

    ``records`` is the TFDS data source (or any sequence of feature dicts with ``'image'``
    uint8 (H, W, C) and, when ``has_labels``, ``'label'``); ``geometry`` crops / resizes one
    image to ``info.shape``.
    """

    in_memory = False

    def __init__(self, records, *, geometry: Geometry, has_labels: bool, info: DataInfo):
        self.records = records
        self.geometry = geometry
        self.has_labels = has_labels
        self.info = info

    def __len__(self) -> int:
        return len(self.records)

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        # One record at a time: decoding dominates, and Grain's threads already read batches in
        # parallel (``__getitems__`` is also not supported by tfds.testing.mock_data).
        records = [self.records[int(i)] for i in indices]
        images = []
        for record in records:
            image = self.geometry(np.asarray(record["image"]))
            if image.shape != self.info.shape:
                raise ValueError(
                    f"{self.info.name}: an image of shape {np.shape(record['image'])} became "
                    f"{image.shape} after cropping/resizing, expected {self.info.shape}"
                )
            images.append(image)
        labels = [record["label"] for record in records] if self.has_labels else None
        return _stack(images, labels, self.info.shape)

    def to_memory(self) -> ArraySource:
        """Decode every example once and keep them in memory (for small data sets)."""
        batch = self.get_batch(np.arange(len(self)))
        return ArraySource(batch["image"], batch.get("label"), info=self.info)


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


def _is_image(path: pathlib.Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def scan_image_folder(folder: str | os.PathLike) -> tuple[list[str], list[int] | None, list[str]]:
    """Image files of ``folder`` in a fixed (sorted) order.

    Either every image lies directly in ``folder`` (no labels), or in one level of class
    subfolders, whose sorted names give the labels 0..K-1. Files whose extension is not an image
    extension (:data:`IMAGE_EXTENSIONS`) and hidden files are not data; anything else that fails
    to decode raises :class:`UnreadableImageError` when read.

    Returns ``(paths, labels or None, class_names)``.
    """
    root = pathlib.Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"folder_path={os.fspath(folder)!r} is not a directory")
    top_images = sorted(p for p in root.iterdir() if _is_image(p))
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_dirs = [d for d in class_dirs if any(_is_image(p) for p in d.iterdir())]
    if top_images and class_dirs:
        raise ValueError(
            f"folder_path={os.fspath(root)!r} mixes images ({top_images[0].name}, ...) with class "
            f"subfolders ({class_dirs[0].name}/, ...); put every image in a class subfolder, or "
            f"all of them directly in the folder"
        )
    if top_images:
        return [os.fspath(p) for p in top_images], None, []
    if class_dirs:
        paths, labels = [], []
        for label, directory in enumerate(class_dirs):
            for p in sorted(q for q in directory.iterdir() if _is_image(q)):
                paths.append(os.fspath(p))
                labels.append(label)
        return paths, labels, [d.name for d in class_dirs]
    raise ValueError(
        f"folder_path={os.fspath(root)!r} contains no images (extensions "
        f"{', '.join(IMAGE_EXTENSIONS)}), neither directly nor in class subfolders"
    )


def read_image(path: str, *, channels: int) -> np.ndarray:
    """Decode one image file to uint8 (H, W, channels); :class:`UnreadableImageError` names the
    file when Pillow cannot read it."""
    try:
        with PIL.Image.open(path) as image:
            array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as error:
        raise UnreadableImageError(f"cannot read image file {path!r}: {error}") from error
    return array[..., None] if channels == 1 else array


class FolderSource:
    """Images of a folder, centre-cropped to a square and resized to ``info.shape``."""

    in_memory = False

    def __init__(self, paths: Sequence[str], labels: Sequence[int] | None, *, info: DataInfo):
        self.paths = list(paths)
        self.labels = None if labels is None else np.asarray(labels, np.int32)
        self.info = info

    def __len__(self) -> int:
        return len(self.paths)

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        size, _, channels = self.info.shape
        images = [transforms.crop_resize(read_image(self.paths[int(i)], channels=channels), size) for i in indices]
        labels = None if self.labels is None else self.labels[np.asarray(indices, np.int64)]
        return _stack(images, labels, self.info.shape)
