"""builders.data: config.data -> data iterators, with errors that name the config key."""

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion_jax import data
from diffusion_jax.builders.config import ConfigError, default_config, validate_config, with_defaults
from diffusion_jax.builders.data import build_data, build_data_source


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    data.prepare_digits(path)
    return str(path)


def _config(data_dir, **data_overrides):
    config = ml_collections.ConfigDict()
    config.seed = 42
    config.data = ml_collections.ConfigDict(
        dict(
            dataset="digits",
            image_size=8,
            random_flip=True,
            centered=True,
            uniform_dequantization=False,
            num_channels=1,
            data_dir=data_dir,
        )
    )
    config.training = ml_collections.ConfigDict(dict(batch_size=64))
    config.eval = ml_collections.ConfigDict(dict(batch_size=100))
    for key, value in data_overrides.items():
        if key in config.data:
            del config.data[key]  # ConfigDict keeps a key's type; replace the entry instead
        config.data[key] = value
    return config


def test_train_and_eval_from_config(data_dir):
    config = _config(data_dir)
    it = build_data(config, split="train", shard_index=0, shard_count=1)
    batch = next(it)
    assert batch["image"].shape == (64, 8, 8, 1) and batch["label"].shape == (64,)
    assert it.info.num_levels == 17 and it.info.value_range == (-1.0, 1.0)
    ev = build_data(config, split="eval", shard_index=0, shard_count=1)
    assert ev.num_batches == 3 and ev.info.eval_size == 297
    assert sum(int(b["mask"].sum()) for b in ev) == 297


def test_global_batch_is_split_over_hosts(data_dir):
    config = _config(data_dir)
    it = build_data(config, split="train", shard_index=1, shard_count=4)
    assert next(it)["image"].shape == (16, 8, 8, 1)
    with pytest.raises(ValueError, match="config.training.batch_size .*not divisible by the number of hosts"):
        build_data(config, split="train", shard_index=0, shard_count=3)


def test_seed_falls_back_to_config_seed(data_dir):
    a = next(build_data(_config(data_dir), split="train", shard_index=0, shard_count=1))
    b = next(build_data(_config(data_dir, seed=42), split="train", shard_index=0, shard_count=1))
    c = next(build_data(_config(data_dir, seed=7), split="train", shard_index=0, shard_count=1))
    np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(a["label"], c["label"])


def test_likelihood_evaluation_overrides(data_dir):
    config = _config(data_dir, centered=False)
    ev = build_data(config, split="train", evaluation=True, uniform_dequantization=True, shard_index=0, shard_count=1)
    assert ev.info.uniform_dequantization and ev.num_batches == 15  # 1500 train images / 100
    x = next(ev)["image"]
    assert not np.allclose(x * 16, np.round(x * 16))  # dequantized off the grid


def test_toys_ignore_image_keys(data_dir):
    # An image config with only the data set swapped runs on a toy: image keys are not read.
    config = _config(data_dir, dataset="checkerboard")
    it = build_data(config, split="train", shard_index=0, shard_count=1)
    assert next(it)["image"].shape == (64, 2)


def test_mock_cifar10_by_score_sde_name(tmp_path):
    config = _config(str(tmp_path), dataset="CIFAR10", image_size=32, num_channels=3)
    with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
        config.training.batch_size = 4
        it = build_data(config, split="train", shard_index=0, shard_count=1)
        assert next(it)["image"].shape == (4, 32, 32, 3)
        assert it.info.name == "cifar10"


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(dataset="imagenet"), "config.data.dataset: unknown dataset 'imagenet'; valid: digits"),
        (dict(num_channels=3), "digits has 1 channel.*num_channels=3"),
        (dict(num_levels=40), "config.data.*num_levels must be an integer between 2 and 17"),
        (dict(dataset="lsun"), "a category is required"),
        (dict(dataset="folder", image_size=8, num_channels=None), "folder_path is required"),
    ],
)
def test_invalid_config_values_name_the_key(data_dir, overrides, match):
    with pytest.raises(ValueError, match=match):
        build_data(_config(data_dir, **overrides), split="train", shard_index=0, shard_count=1)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(centred=True), r"unknown key 'data.centred' \(did you mean data.centered\?\)"),
        (dict(image_size=0), r"data.image_size = 0 must be > 0"),
        (dict(random_flip=1), r"data.random_flip = 1 has the wrong type; expected bool"),
        (dict(num_workers=-2), r"data.num_workers = -2 must be >= 0"),
        (dict(tfrecords_path="/data/ffhq"), r"data.tfrecords_path = '/data/ffhq' is not supported"),
    ],
)
def test_single_keys_are_checked_by_the_schema(data_dir, overrides, match):
    """Types and ranges of the data keys are the schema's (one check per key, before any work);
    what depends on the data set (channels, levels, categories) is the data builder's."""
    with pytest.raises(ConfigError, match=match):
        validate_config(with_defaults(_config(data_dir, **overrides)), build=False)


def test_missing_pieces_of_the_config(data_dir):
    config = _config(data_dir)
    del config.training["batch_size"]  # a partial config takes the schema's default
    it = build_data(config, split="train", shard_index=0, shard_count=1)
    assert next(it)["image"].shape[0] == default_config().training.batch_size
    it.close()
    with pytest.raises(ValueError, match="split must be one of"):
        build_data_source(_config(data_dir), split="test")
