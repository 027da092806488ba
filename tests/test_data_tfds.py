"""Registered TFDS data sets (score_sde's) through tfds.data_source, on mocked data.

``tfds.testing.mock_data`` with ``MockPolicy.USE_CODE`` mocks the ArrayRecord data source
itself, so ``tfds.data_source`` works without TensorFlow and without prepared files (``AUTO``
falls back to it; ``USE_FILES`` needs metadata files that the TFDS wheel does not ship). The
mock yields the same random examples for every split.
"""

import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion_jax import data
from diffusion_jax.data import transforms

NUM = 10


@pytest.fixture
def mock():
    with tfds.testing.mock_data(num_examples=NUM, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def _raw_images(tfds_name):
    source = tfds.data_source(tfds_name, split="train", download=False)
    return np.stack([source[i]["image"] for i in range(NUM)]), source


def _all_eval(source, **kw):
    batches = list(data.eval_iterator(source, batch_size=4, shard_index=0, shard_count=1, **kw))
    mask = np.concatenate([b["mask"] for b in batches])
    return {k: np.concatenate([b[k] for b in batches])[mask] for k in batches[0] if k != "mask"}


@pytest.mark.parametrize(
    "name, tfds_name, shape",
    [
        ("CIFAR10", "cifar10", (32, 32, 3)),
        ("mnist", "mnist", (28, 28, 1)),
        ("fashion_mnist", "fashion_mnist", (28, 28, 1)),
        ("SVHN", "svhn_cropped", (32, 32, 3)),
    ],
)
def test_labelled_data_sets_at_native_size(mock, tmp_path, name, tfds_name, shape):
    source = data.load(name, split="train", data_dir=tmp_path)
    info = source.info
    assert info.name == tfds_name and info.shape == shape
    assert info.num_levels == 256 and info.num_classes == 10
    assert (info.train_size, info.eval_size) == (NUM, NUM)
    raw, records = _raw_images(tfds_name)
    out = _all_eval(source)
    # At the native size the geometry is the identity: exactly k / 255, in order, with labels.
    np.testing.assert_allclose(out["image"], raw / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(out["label"], [records[i]["label"] for i in range(NUM)])
    assert out["label"].dtype == np.int32


def test_cifar10_train_batches(mock, tmp_path):
    source = data.load("cifar10", split="train", data_dir=tmp_path)
    it = data.train_iterator(
        source,
        batch_size=4,
        seed=0,
        shard_index=0,
        shard_count=1,
        random_flip=True,
        centered=True,
        uniform_dequantization=True,
    )
    batch = next(it)
    assert batch["image"].shape == (4, 32, 32, 3) and batch["label"].shape == (4,)
    assert batch["image"].min() >= -1.0 and batch["image"].max() < 1.0
    assert it.info.value_range == (-1.0, 1.0)


def test_celeba_crops_140_and_resizes(mock, tmp_path):
    source = data.load("CELEBA", split="eval", data_dir=tmp_path)  # score_sde's spelling
    assert source.info.name == "celeb_a" and source.info.shape == (64, 64, 3)
    assert source.info.num_classes is None and source.info.eval_split == "validation"
    raw, _ = _raw_images("celeb_a")
    assert raw.shape[1:] == (218, 178, 3)
    out = _all_eval(source)
    assert set(out) == {"image"}  # no labels
    expected = transforms.resize(transforms.center_crop(raw[0], 140), 64, method="bilinear")
    np.testing.assert_allclose(out["image"][0], expected / 255.0, rtol=1e-6)


@pytest.mark.parametrize("image_size", [16, 128])
def test_lsun_category_and_geometry(mock, tmp_path, image_size):
    source = data.load("LSUN", split="train", category="bedroom", image_size=image_size, data_dir=tmp_path)
    assert source.info.name == "lsun/bedroom" and source.info.shape == (image_size, image_size, 3)
    out = _all_eval(source)
    assert out["image"].shape == (NUM, image_size, image_size, 3)
    levels = out["image"] * 255
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)  # on the 256-level grid
    assert data.load("lsun/bedroom", data_dir=tmp_path, image_size=image_size).info == source.info


def test_svhn_and_cifar_resize_to_other_sizes(mock, tmp_path):
    source = data.load("cifar10", split="train", image_size=16, data_dir=tmp_path)
    batch = next(data.train_iterator(source, batch_size=2, shard_index=0, shard_count=1))
    assert batch["image"].shape == (2, 16, 16, 3)


def test_channel_mismatch_is_an_error(mock, tmp_path):
    with pytest.raises(ValueError, match="mnist has 1 channel"):
        data.load("mnist", num_channels=3, data_dir=tmp_path)


def test_lsun_needs_a_known_category(tmp_path):
    with pytest.raises(ValueError, match="category is required.*bedroom"):
        data.load("lsun", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown category 'bedrooms'"):
        data.load("lsun/bedrooms", data_dir=tmp_path)


def test_missing_data_set_names_data_dir_and_how_to_prepare(tmp_path):
    with pytest.raises(data.DatasetNotPreparedError) as caught:
        data.load("cifar10", data_dir=tmp_path)
    message = str(caught.value)
    assert str(tmp_path) in message
    assert "tfds build cifar10" in message and "--file_format=array_record" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no TFDS traceback
    assert isinstance(caught.value, FileNotFoundError)


def test_data_set_prepared_as_tfrecord_is_recognised(tmp_path):
    version = pathlib.Path(tmp_path, "mnist", "3.0.1")
    version.mkdir(parents=True)
    (version / "dataset_info.json").write_text("{}")
    (version / "mnist-train.tfrecord-00000-of-00001").write_bytes(b"")
    with pytest.raises(data.DatasetNotPreparedError, match="(?s)prepared there as tfrecord.*convert_format"):
        data.load("mnist", data_dir=tmp_path)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="unknown dataset 'cifar100'; valid: digits, cifar10") as caught:
        data.load("cifar100")
    assert "svhn -> svhn_cropped" in str(caught.value)
    assert data.canonical_name("CelebA") == ("celeb_a", None)
    assert data.canonical_name("LSUN/church_outdoor") == ("lsun", "church_outdoor")
    with pytest.raises(ValueError, match="only lsun takes"):
        data.canonical_name("cifar10/bedroom")


# -- geometry ---------------------------------------------------------------------------------


def test_center_crop_offsets():
    image = np.arange(7 * 6, dtype=np.uint8).reshape(7, 6, 1)
    crop = transforms.center_crop(image, 4)
    np.testing.assert_array_equal(crop[..., 0], image[1:5, 1:5, 0])  # (7-4)//2 = 1, (6-4)//2 = 1
    with pytest.raises(ValueError, match="cannot crop"):
        transforms.center_crop(image, 8)


def test_resize_small_keeps_aspect_and_crop_resize_is_square():
    image = np.zeros((218, 178, 3), np.uint8)
    assert transforms.resize_small(image, 64).shape == (78, 64, 3)  # 218 * 64 / 178 = 78.4
    assert transforms.crop_resize(image, 32).shape == (32, 32, 3)


def test_resize_stays_on_the_level_grid():
    # A 0/16 checkerboard upsampled bicubically overshoots; the result must stay in 0..16.
    board = (np.indices((8, 8)).sum(0) % 2 * 16).astype(np.uint8)[..., None]
    up = transforms.resize(board, 20, method="bicubic", max_level=16)
    assert up.dtype == np.uint8 and up.min() == 0 and up.max() == 16
    flat = np.full((9, 7, 3), 200, np.uint8)
    np.testing.assert_array_equal(transforms.resize(flat, 4), 200)  # antialiased mean of a constant
    same = np.random.default_rng(0).integers(0, 256, (5, 5, 3), dtype=np.uint8)
    assert transforms.resize(same, 5) is same
