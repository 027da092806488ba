"""The embedded digits data set: built offline as a real TFDS ArrayRecord data set, read back
with tfds.data_source, 17 grey levels scaled by 1/16."""

import os
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from diffusion_jax import data
from diffusion_jax.data import digits as digits_lib


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    data.prepare_digits(path)
    return path


def test_prepared_as_array_record(data_dir):
    version_dir = pathlib.Path(data_dir, "digits", "1.0.0")
    names = sorted(p.name for p in version_dir.iterdir())
    assert "dataset_info.json" in names
    assert any(n.startswith("digits-train.array_record") for n in names)
    assert any(n.startswith("digits-test.array_record") for n in names)
    assert not any("tfrecord" in n for n in names)


def test_read_back_with_tfds_data_source(data_dir):
    sources = tfds.data_source("digits", split={"train": "train", "test": "test"}, data_dir=data_dir, download=False)
    assert len(sources["train"]) == 1500 and len(sources["test"]) == 297
    info = sources["train"].dataset_info
    assert info.metadata["num_levels"] == 17  # the true count is stored with the files
    assert info.features["label"].num_classes == 10

    reference = load_digits()
    for split, offset in (("train", 0), ("test", 1500)):
        source = sources[split]
        images = np.stack([source[i]["image"] for i in range(len(source))])
        labels = np.array([source[i]["label"] for i in range(len(source))])
        assert images.dtype == np.uint8 and images.shape == (len(source), 8, 8, 1)
        # Stored unchanged, in scikit-learn's order: pixels 0..16, not rescaled to 0..255.
        np.testing.assert_array_equal(images[..., 0], reference.images[offset : offset + len(source)])
        np.testing.assert_array_equal(labels, reference.target[offset : offset + len(source)])
        assert images.max() == 16 and images.min() == 0
        assert set(labels) == set(range(10))


def test_prepare_is_idempotent(data_dir):
    shard = next(pathlib.Path(data_dir, "digits", "1.0.0").glob("digits-train.array_record*"))
    before = shard.stat().st_mtime_ns
    assert data.prepare_digits(data_dir) == os.fspath(data_dir)
    assert shard.stat().st_mtime_ns == before


def test_load_describes_17_levels(data_dir):
    source = data.load("DIGITS", split="train", data_dir=data_dir)
    info = source.info
    assert info.shape == (8, 8, 1) and info.num_levels == 17 and info.num_classes == 10
    assert (info.train_size, info.eval_size) == (1500, 297)
    assert (info.train_split, info.eval_split) == ("train", "test")
    assert len(source) == 1500
    assert len(data.load("digits", split="eval", data_dir=data_dir)) == 297


def test_pixels_scale_by_one_sixteenth(data_dir):
    source = data.load("digits", split="eval", data_dir=data_dir)
    it = data.eval_iterator(source, batch_size=100, shard_index=0, shard_count=1)
    assert it.info.value_range == (0.0, 1.0)
    batches = list(it)
    mask = np.concatenate([b["mask"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])[mask]
    reference = load_digits().images[1500:]
    # x = k / 16 exactly (a 1/255 scaling would make the maximum 16/255).
    np.testing.assert_allclose(images[..., 0] * 16, reference, atol=1e-5)
    assert images.max() == 1.0


def test_dequantized_digits_use_17_bins(data_dir):
    source = data.load("digits", split="train", data_dir=data_dir)
    it = data.train_iterator(
        source, batch_size=500, seed=1, shard_index=0, shard_count=1, uniform_dequantization=True, num_epochs=1
    )
    x = np.concatenate([b["image"] for b in it])
    levels = np.floor(x * 17)
    assert levels.min() == 0 and levels.max() == 16
    assert it.info.bits_per_dim_offset == pytest.approx(np.log2(17))


def test_default_data_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFUSION_JAX_DATA_DIR", os.fspath(tmp_path))
    assert digits_lib.default_data_dir() == os.fspath(tmp_path)


def test_image_size_resizes_digits(data_dir):
    source = data.load("digits", split="eval", data_dir=data_dir, image_size=16)
    assert source.info.shape == (16, 16, 1)
    batch = next(data.eval_iterator(source, batch_size=8, shard_index=0, shard_count=1))
    assert batch["image"].shape == (8, 16, 16, 1)
    levels = batch["image"] * 16
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-5)  # still on the 17-level grid


def test_digits_pipeline_throughput(data_dir):
    import time

    source = data.load("digits", split="train", data_dir=data_dir)
    it = data.train_iterator(
        source,
        batch_size=128,
        seed=0,
        shard_index=0,
        shard_count=1,
        random_flip=True,
        centered=True,
        uniform_dequantization=True,
    )
    next(it)
    start = time.perf_counter()
    for _ in range(100):
        next(it)
    per_second = 100 * 128 / (time.perf_counter() - start)
    # Must not be the bottleneck of a small training run; measured ~6e5 images/s on 2 cores.
    assert per_second > 5_000, per_second
