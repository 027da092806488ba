"""The registry of data sets and :func:`load`, which opens one split as a :class:`Source`.

``DATASETS`` is one literal table from lower-case name to a spec object; :func:`load` looks a
name up (case-insensitively, with score_sde's spellings ``CIFAR10``, ``SVHN``, ``CELEBA``,
``LSUN`` as aliases) and calls the spec's ``load``. An unknown name raises a ValueError listing
the valid ones.

TFDS data sets are read with ``tfds.data_source`` from ArrayRecord files, which needs no
TensorFlow; they must have been prepared in that format (see :class:`DatasetNotPreparedError`).
The embedded ``digits`` data set prepares itself on first use.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Any, Protocol

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from diffusion_jax.data import digits as digits_lib
from diffusion_jax.data import toys as toys_lib
from diffusion_jax.data import transforms
from diffusion_jax.data.info import DataInfo
from diffusion_jax.data.latent import LatentData
from diffusion_jax.data.sources import (
    ArraySource,
    FolderSource,
    Source,
    TfdsSource,
    UnreadableImageError,
    scan_image_folder,
)

__all__ = [
    "DATASETS",
    "ALIASES",
    "DatasetNotPreparedError",
    "LoadOptions",
    "TfdsImages",
    "Digits",
    "ImageFolder",
    "ToyData",
    "canonical_name",
    "load",
]

# 8-bit images; TFDS data sets whose metadata records another count (the digits) override it.
_DEFAULT_LEVELS = 256
_ROLES = ("train", "eval")


class DatasetNotPreparedError(FileNotFoundError):
    """A TFDS data set is not available as ArrayRecord files in ``data_dir``."""


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """Everything :func:`load` may pass to a spec; each spec reads the fields it needs.

    ``image_size``: side of the square output images (None: the data set's own size);
    ``data_dir``: TFDS data directory (None: ``$DIFFUSION_JAX_DATA_DIR``, else TFDS's default);
    ``folder_path``: image folder of the ``folder`` data set; ``category``: LSUN category;
    ``num_channels``: 1 or 3 (None: the data set's own; a folder defaults to 3);
    ``latent_dir``: the directory of the ``latent`` data set (``diffusion-jax encode``);
    ``latent_captions``: whether its batches carry the captions' token ids or embeddings (``context``).
    """

    image_size: int | None = None
    data_dir: str | None = None
    folder_path: str | None = None
    category: str | None = None
    num_channels: int | None = None
    latent_dir: str | None = None
    latent_captions: bool = False

    @property
    def resolved_data_dir(self) -> str:
        if not self.data_dir:
            return digits_lib.default_data_dir()
        return os.fspath(pathlib.Path(self.data_dir).expanduser())


class Spec(Protocol):
    def load(self, *, split: str, options: LoadOptions) -> Source: ...


# --------------------------------------------------------------------------------------------
# Geometry: per-example crop / resize to the output size (score_sde's datasets.py choices)
# --------------------------------------------------------------------------------------------


def _resize(image: np.ndarray, *, size: int, max_level: int) -> np.ndarray:
    # CIFAR-10, SVHN, MNIST: tf.image.resize(..., antialias=True), bilinear (a no-op at the
    # native size).
    return transforms.resize(image, size, method="bilinear", max_level=max_level)


def _celeba(image: np.ndarray, *, size: int, max_level: int) -> np.ndarray:
    # score_sde: central_crop(140) of the 218x178 aligned faces, then resize_small(size).
    cropped = transforms.center_crop(image, 140)
    return transforms.resize_small(cropped, size, method="bilinear", max_level=max_level)


def _lsun(image: np.ndarray, *, size: int, max_level: int) -> np.ndarray:
    # score_sde: resize_small then central_crop at 128; crop_resize (bicubic) otherwise.
    if size == 128:
        small = transforms.resize_small(image, size, method="bilinear", max_level=max_level)
        return transforms.center_crop(small, size)
    return transforms.crop_resize(image, size, method="bicubic", max_level=max_level)


_GEOMETRIES = {"resize": _resize, "celeba": _celeba, "lsun": _lsun}


def _check_image_size(image_size: int | None, default: int | None, name: str) -> int:
    size = default if image_size is None else image_size
    if size is None:
        raise ValueError(f"{name}: image_size is required (the images have no common size)")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"{name}: image_size must be a positive integer, got {size!r}")
    return int(size)


def _check_channels(num_channels: int | None, channels: int, name: str) -> None:
    if num_channels is not None and num_channels != channels:
        raise ValueError(
            f"{name} has {channels} channel(s) but num_channels={num_channels}; set num_channels to {channels}"
        )


def _split_names(split: str, train_split: str, eval_split: str) -> str:
    """'train' / 'eval' name the data set's roles; any other string is a TFDS split."""
    return {"train": train_split, "eval": eval_split}.get(split, split)


def _prepare_hint(tfds_name: str, data_dir: str) -> str:
    base = tfds_name.split("/")[0]
    return (
        f"Prepare it once on a machine with internet access and TensorFlow (TFDS encodes the "
        f"images with TensorFlow while preparing; reading needs neither):\n"
        f"    tfds build {tfds_name} --data_dir=<dir> --file_format=array_record\n"
        f"and copy <dir>/{base} into {data_dir}, or point data_dir (config.data.data_dir) at "
        f"<dir>. A copy prepared as TFRecord converts in place with\n"
        f"    tfds convert_format --dataset_dir={data_dir}/{base} --out_file_format=array_record"
    )


def _prepared_formats(tfds_name: str, data_dir: str) -> set[str]:
    """File formats ('array_record', 'tfrecord', ...) of prepared versions of ``tfds_name``."""
    formats = set()
    prefix = tfds_name.split("/")[0] + "-"
    for info_file in pathlib.Path(data_dir, tfds_name).glob("**/dataset_info.json"):
        for f in info_file.parent.iterdir():
            # Shards are named <name>-<split>.<format>-<index>-of-<count>.
            if f.name.startswith(prefix) and "." in f.name:
                formats.add(f.name.rsplit(".", 1)[1].split("-")[0])
    return formats


def _open_tfds(tfds_name: str, splits: dict[str, str], data_dir: str) -> dict[str, Any]:
    """``tfds.data_source`` for several splits at once, with an actionable error when the data
    set is not prepared as ArrayRecord in ``data_dir``."""
    try:
        return tfds.data_source(tfds_name, split=splits, data_dir=data_dir, download=False)
    except Exception:
        formats = _prepared_formats(tfds_name, data_dir)
        if "array_record" in formats:
            raise  # prepared correctly: the problem is something else (e.g. a bad split name)
        if formats:
            found = f"it is prepared there as {', '.join(sorted(formats))}, which needs TensorFlow to read"
        else:
            found = f"no prepared copy is in data_dir={data_dir!r}"
        raise DatasetNotPreparedError(
            f"TFDS data set {tfds_name!r} is read from ArrayRecord files, but {found}.\n"
            f"{_prepare_hint(tfds_name, data_dir)}"
        ) from None  # TFDS's own error would blame a TFRecord default the user never chose


def _num_levels(records) -> int:
    info = getattr(records, "dataset_info", None)
    metadata = getattr(info, "metadata", None)
    if isinstance(metadata, dict) and "num_levels" in metadata:
        return int(metadata["num_levels"])
    return _DEFAULT_LEVELS


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TfdsImages:
    """An image data set registered in TFDS, read from ArrayRecord files.

    ``image_size`` is the default output size; ``geometry`` one of ``'resize'``, ``'celeba'``,
    ``'lsun'`` (score_sde's preprocessing); LSUN needs a ``category`` (a TFDS config).
    """

    tfds_name: str
    train_split: str
    eval_split: str
    image_size: int | None
    channels: int
    geometry: str
    num_classes: int | None
    needs_category: bool = False

    def _full_name(self, category: str | None) -> str:
        if not self.needs_category:
            return self.tfds_name
        if not category:
            raise ValueError(
                f"{self.tfds_name}: a category is required (config.data.category or the name "
                f"'{self.tfds_name}/<category>'); valid: {', '.join(_lsun_categories())}"
            )
        if category not in _lsun_categories():
            raise ValueError(f"{self.tfds_name}: unknown category {category!r}; valid: {', '.join(_lsun_categories())}")
        return f"{self.tfds_name}/{category}"

    def load(self, *, split: str, options: LoadOptions) -> TfdsSource:
        name = self._full_name(options.category)
        size = _check_image_size(options.image_size, self.image_size, name)
        _check_channels(options.num_channels, self.channels, name)
        data_dir = options.resolved_data_dir
        chosen = _split_names(split, self.train_split, self.eval_split)
        records = _open_tfds(name, {"train": self.train_split, "eval": self.eval_split, "chosen": chosen}, data_dir)
        levels = _num_levels(records["chosen"])
        info = DataInfo(
            name=name,
            shape=(size, size, self.channels),
            num_levels=levels,
            num_classes=self.num_classes,
            value_range=(0.0, 1.0),
            train_size=len(records["train"]),
            eval_size=len(records["eval"]),
            train_split=self.train_split,
            eval_split=self.eval_split,
        )
        geometry = functools.partial(_GEOMETRIES[self.geometry], size=size, max_level=levels - 1)
        has_labels = self.num_classes is not None
        return TfdsSource(records["chosen"], geometry=geometry, has_labels=has_labels, info=info)


@functools.cache
def _lsun_categories() -> tuple[str, ...]:
    return tuple(config.name for config in tfds.builder_cls("lsun").BUILDER_CONFIGS)


@dataclasses.dataclass(frozen=True)
class Digits:
    """scikit-learn's 8x8 digits (17 grey levels), prepared on first use into ``data_dir`` and
    held in memory (1,797 x 64 bytes)."""

    def load(self, *, split: str, options: LoadOptions) -> Source:
        size = _check_image_size(options.image_size, 8, "digits")
        _check_channels(options.num_channels, 1, "digits")
        data_dir = digits_lib.prepare_digits(options.resolved_data_dir)
        spec = TfdsImages("digits", "train", "test", 8, 1, "resize", num_classes=10)
        options = dataclasses.replace(options, image_size=size, data_dir=data_dir)
        return spec.load(split=split, options=options).to_memory()


def _is_grey(image: PIL.Image.Image) -> bool:
    """Whether an opened image has one channel of values (a palette of greys counts)."""
    if image.mode in ("1", "L", "LA", "I", "I;16", "F"):
        return True
    if image.mode == "P":
        palette = image.getpalette() or []
        return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3))
    return False


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    """A folder of images (``folder_path``), optionally in class subfolders that give labels.

    The folder has a single split: ``'train'`` and ``'eval'`` both read every image. Every file
    header is checked when the folder is opened, so an unreadable file fails at once with its
    name rather than hours into training.
    """

    def load(self, *, split: str, options: LoadOptions) -> Source:
        if split not in _ROLES:
            raise ValueError(f"folder: split must be one of {_ROLES}, got {split!r}")
        if not options.folder_path:
            raise ValueError("folder: folder_path is required (config.data.folder_path)")
        size = _check_image_size(options.image_size, None, "folder")
        if options.num_channels not in (None, 1, 3):
            raise ValueError(f"folder: num_channels must be 1 or 3, got {options.num_channels!r}")
        paths, labels, classes = scan_image_folder(options.folder_path)
        colour = None  # the first colour image, if any
        for path in paths:
            try:
                with PIL.Image.open(path) as image:  # opening parses the header only
                    if colour is None and not _is_grey(image):
                        colour = path
            except (OSError, ValueError, SyntaxError) as error:
                raise UnreadableImageError(f"cannot read image file {path!r}: {error}") from error
        channels = 1 if colour is None else 3
        if options.num_channels is not None and options.num_channels != channels:
            what = f"colour images (e.g. {colour})" if colour else "only greyscale images"
            raise ValueError(
                f"folder: {options.folder_path} holds {what}, so {channels} channel(s), but num_channels="
                f"{options.num_channels}; set num_channels to {channels}, or to None to take it from the images"
            )
        info = DataInfo(
            name="folder",
            shape=(size, size, channels),
            num_levels=_DEFAULT_LEVELS,
            num_classes=len(classes) if labels is not None else None,
            value_range=(0.0, 1.0),
            train_size=len(paths),
            eval_size=len(paths),
            train_split="all",
            eval_split="all",
        )
        return FolderSource(paths, labels, info=info)


@dataclasses.dataclass(frozen=True)
class ToyData:
    """A low-dimensional toy distribution from :data:`diffusion_jax.data.toys.TOYS`."""

    toy: str

    def load(self, *, split: str, options: LoadOptions) -> Source:
        if split not in _ROLES:
            raise ValueError(f"{self.toy}: split must be one of {_ROLES}, got {split!r}")
        if options.image_size is not None or options.num_channels is not None:
            raise ValueError(
                f"{self.toy} is a {toys_lib.TOYS[self.toy].dim}-D toy distribution: image_size and "
                f"num_channels do not apply (got image_size={options.image_size}, "
                f"num_channels={options.num_channels})"
            )
        x, labels = toys_lib.toy_sample(self.toy, train=split == "train")
        train_x, _ = toys_lib.toy_sample(self.toy, train=True) if split != "train" else (x, labels)
        info = DataInfo(
            name=self.toy,
            shape=(toys_lib.TOYS[self.toy].dim,),
            num_levels=None,
            num_classes=toys_lib.TOYS[self.toy].num_classes,
            value_range=(float(train_x.min()), float(train_x.max())),
            train_size=toys_lib.TOY_TRAIN_SIZE,
            eval_size=toys_lib.TOY_EVAL_SIZE,
            train_split="train",
            eval_split="eval",
        )
        return ArraySource(x, labels, info=info)


DATASETS: dict[str, Spec] = {
    "digits": Digits(),
    "cifar10": TfdsImages("cifar10", "train", "test", 32, 3, "resize", num_classes=10),
    "svhn_cropped": TfdsImages("svhn_cropped", "train", "test", 32, 3, "resize", num_classes=10),
    "celeb_a": TfdsImages("celeb_a", "train", "validation", 64, 3, "celeba", num_classes=None),
    "lsun": TfdsImages("lsun", "train", "validation", 256, 3, "lsun", num_classes=None, needs_category=True),
    "mnist": TfdsImages("mnist", "train", "test", 28, 1, "resize", num_classes=10),
    "fashion_mnist": TfdsImages("fashion_mnist", "train", "test", 28, 1, "resize", num_classes=10),
    "folder": ImageFolder(),
    "gaussian_mixture": ToyData("gaussian_mixture"),
    "checkerboard": ToyData("checkerboard"),
    "swiss_roll": ToyData("swiss_roll"),
    "two_moons": ToyData("two_moons"),
    "latent": LatentData(),
}

# score_sde's spellings (compared lower-case).
ALIASES = {"svhn": "svhn_cropped", "celeba": "celeb_a"}


def canonical_name(name: str) -> tuple[str, str | None]:
    """``(registry key, category)`` for a user-facing name: case-insensitive, aliases resolved,
    ``'lsun/bedroom'`` split into ``('lsun', 'bedroom')``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset must be a non-empty string, got {name!r}")
    key, _, category = name.strip().lower().partition("/")
    key = ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; valid: {', '.join(DATASETS)} (case-insensitive; aliases: "
            f"{', '.join(f'{a} -> {k}' for a, k in ALIASES.items())}; LSUN as 'lsun/<category>')"
        )
    if category and not getattr(DATASETS[key], "needs_category", False):
        raise ValueError(f"dataset {name!r}: only lsun takes a '/<category>' suffix")
    return key, category or None


def load(
    name: str,
    *,
    split: str = "train",
    image_size: int | None = None,
    data_dir: str | os.PathLike | None = None,
    folder_path: str | os.PathLike | None = None,
    category: str | None = None,
    num_channels: int | None = None,
    latent_dir: str | os.PathLike | None = None,
    latent_captions: bool = False,
) -> Source:
    """Open one split of data set ``name`` as a :class:`Source` (``source.info`` describes it).

    Args:
      name: a key of :data:`DATASETS` (case-insensitive; ``'CIFAR10'``, ``'SVHN'``,
        ``'CELEBA'``, ``'LSUN'`` accepted; ``'lsun/<category>'`` too).
      split: ``'train'`` or ``'eval'`` (the data set's evaluation split: ``test`` for CIFAR-10,
        SVHN, MNIST and the digits, ``validation`` for CelebA and LSUN); TFDS data sets also take
        any TFDS split string (``'test'``, ``'train[:10%]'``).
      image_size, data_dir, folder_path, category, num_channels, latent_dir, latent_captions: see
        :class:`LoadOptions`.
    """
    key, name_category = canonical_name(name)
    if name_category and category and name_category != category.lower():
        raise ValueError(f"dataset {name!r} names category {name_category!r} but category={category!r}")
    options = LoadOptions(
        image_size=image_size,
        data_dir=None if data_dir is None else os.fspath(data_dir),
        folder_path=None if folder_path is None else os.fspath(folder_path),
        category=name_category or (category.lower() if category else None),
        num_channels=num_channels,
        latent_dir=None if latent_dir is None else os.fspath(latent_dir),
        latent_captions=latent_captions,
    )
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be 'train', 'eval' or a TFDS split name, got {split!r}")
    return DATASETS[key].load(split=split, options=options)
