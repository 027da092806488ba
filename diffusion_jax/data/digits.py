"""The embedded default data set: scikit-learn's handwritten digits as a TFDS data set.

scikit-learn ships the 1,797 8x8 images of the UCI "optical recognition of handwritten digits"
test set (Alpaydin & Kaynak 1998) with its wheel, so this data set needs no download. Each pixel
counts the "on" cells of a 4x4 block of the original 32x32 bitmap: integer values 0..16, i.e.
17 grey levels, not 256. The images are stored unchanged as uint8 0..16 (a grey-level PNG per
image) so that ``num_levels = 17`` stays true; the pipeline maps them to [0, 1] by ``k / 16``.

The builder is a real :class:`tfds.core.GeneratorBasedBuilder`; :func:`prepare_digits` writes it
once as ArrayRecord files (``file_format='array_record'``), which TFDS can write and read without
TensorFlow, into ``<data_dir>/digits/1.0.0``, and :func:`diffusion_jax.data.load` reads it back
with ``tfds.data_source``. Splits are deterministic: the first 1,500 images are ``train``, the
last 297 ``test`` (scikit-learn's order is fixed).
"""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core import registered

__all__ = ["DigitsBuilder", "prepare_digits", "NUM_LEVELS", "NUM_TRAIN", "NUM_TEST", "default_data_dir"]

NUM_LEVELS = 17
NUM_TRAIN = 1500
NUM_TEST = 297
_TOTAL = NUM_TRAIN + NUM_TEST


def default_data_dir() -> str:
    """``$DIFFUSION_JAX_DATA_DIR`` if set, else TFDS's own default (``$TFDS_DATA_DIR`` or
    ``~/tensorflow_datasets``)."""
    return os.environ.get("DIFFUSION_JAX_DATA_DIR") or os.fspath(tfds.core.constants.DATA_DIR)


def _png(levels: np.ndarray) -> bytes:
    """PNG bytes of a (8, 8) uint8 image. TFDS encodes NumPy images with TensorFlow, so the
    builder hands it encoded bytes instead (Pillow), which it stores as they are."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(levels, mode="L").save(buffer, format="png")
    return buffer.getvalue()


# Defined without adding it to TFDS's global registry: the prepared files describe themselves
# (dataset_info.json, features.json), and ``tfds.data_source('digits', data_dir=...)`` reads them
# back through TFDS's read-only builder, exactly like a data set prepared elsewhere.
with registered.skip_registration():

    class DigitsBuilder(tfds.core.GeneratorBasedBuilder):
        """scikit-learn's 8x8 handwritten digits: ``image`` uint8 (8, 8, 1) in 0..16, ``label`` 0..9."""

        name = "digits"
        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "First release: 1,500 train / 297 test, pixels 0..16 (17 levels)."}

        def _info(self) -> tfds.core.DatasetInfo:
            return tfds.core.DatasetInfo(
                builder=self,
                description=(
                    "scikit-learn's copy of the UCI optical recognition of handwritten digits test "
                    "set: 1,797 8x8 grey images with integer pixels 0..16 (17 levels) and labels "
                    "0..9. Split: first 1,500 train, last 297 test."
                ),
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
                        "label": tfds.features.ClassLabel(num_classes=10),
                    }
                ),
                supervised_keys=("image", "label"),
                # Keep scikit-learn's order in the files (TFDS otherwise permutes by key hash),
                # so example i of a split is the same image on every machine and version.
                disable_shuffling=True,
                homepage="https://archive.ics.uci.edu/dataset/80",
                metadata=tfds.core.MetadataDict(num_levels=NUM_LEVELS),
            )

        def _split_generators(self, dl_manager):
            del dl_manager  # nothing to download: the data ship with scikit-learn
            return {
                "train": self._generate_examples(start=0, stop=NUM_TRAIN),
                "test": self._generate_examples(start=NUM_TRAIN, stop=_TOTAL),
            }

        def _generate_examples(self, *, start: int, stop: int):
            from sklearn.datasets import load_digits

            digits = load_digits()
            images, labels = digits.images, digits.target
            if images.shape != (_TOTAL, 8, 8) or images.min() < 0 or images.max() > NUM_LEVELS - 1:
                raise RuntimeError(
                    f"scikit-learn's digits changed: expected {_TOTAL} images of 8x8 with values "
                    f"0..{NUM_LEVELS - 1}, got shape {images.shape} and range "
                    f"{images.min()}..{images.max()}"
                )
            for i in range(start, stop):
                yield i, {"image": _png(images[i].astype(np.uint8)), "label": int(labels[i])}


def prepare_digits(data_dir: str | os.PathLike | None = None) -> str:
    """Write the digits as ArrayRecord files into ``data_dir`` unless they are there already.

    Returns the data directory. Takes a fraction of a second; safe to call on every run.
    """
    data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
    builder = DigitsBuilder(data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return data_dir
    # The download directory is a scratch folder: nothing is downloaded, but TFDS creates one.
    with tempfile.TemporaryDirectory() as scratch:
        try:
            builder.download_and_prepare(
                download_dir=scratch,
                download_config=tfds.download.DownloadConfig(try_download_gcs=False),
            )
        except Exception:
            # Several hosts sharing a data_dir may prepare at once: TFDS writes to a temporary
            # folder and renames it, so a loser of that race finds the data set complete.
            if not DigitsBuilder(data_dir=data_dir, file_format="array_record").is_prepared():
                raise
    return data_dir
