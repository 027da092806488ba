"""Toy distributions: deterministic samples, exact densities, and the common pipeline API."""

import json

import numpy as np
import pytest

from diffusion_jax import data
from diffusion_jax.data import toys

TOY_NAMES = ["gaussian_mixture", "checkerboard", "swiss_roll", "two_moons"]


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_through_the_pipeline(name):
    source = data.load(name, split="train")
    info = source.info
    assert info.shape == (2,) and info.num_levels is None
    assert (info.train_size, info.eval_size) == (65_536, 8_192)
    it = data.train_iterator(source, batch_size=256, seed=0, shard_index=0, shard_count=1)
    batch = next(it)
    assert batch["image"].shape == (256, 2) and batch["image"].dtype == np.float32
    assert ("label" in batch) == (toys.TOYS[name].num_classes is not None)
    lo, hi = info.value_range
    assert lo <= batch["image"].min() and batch["image"].max() <= hi
    # Same state API as the images.
    state = json.loads(json.dumps(it.get_state()))
    want = next(it)
    resumed = data.train_iterator(source, batch_size=256, seed=0, shard_index=0, shard_count=1)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["image"], want["image"])
    with pytest.raises(ValueError, match="bits per dimension of discrete data are undefined"):
        _ = info.bits_per_dim_offset


def test_samples_are_fixed_and_splits_differ():
    a, la = toys.toy_sample("two_moons", train=True)
    b, lb = toys.toy_sample("two_moons", train=True)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    e, _ = toys.toy_sample("two_moons", train=False)
    assert len(e) == 8_192 and not np.allclose(e[:100], a[:100])
    c, _ = toys.toy_sample("checkerboard", train=True)
    assert not np.allclose(a[:100], c[:100])


def test_gaussian_mixture_density_is_exact():
    x, labels = toys.toy_sample("gaussian_mixture", train=True)
    means = toys.mixture_means()
    # Sample statistics per component: mean at the circle point, std 0.2.
    for k in range(8):
        xs = x[labels == k]
        np.testing.assert_allclose(xs.mean(0), means[k], atol=0.02)
        np.testing.assert_allclose(xs.std(0), 0.2, rtol=0.05)
    log_prob = toys.TOYS["gaussian_mixture"].log_prob
    grid = np.linspace(-3.5, 3.5, 701)
    xx, yy = np.meshgrid(grid, grid)
    density = np.exp(log_prob(np.stack([xx, yy], -1)))
    assert density.sum() * (grid[1] - grid[0]) ** 2 == pytest.approx(1.0, abs=1e-3)
    # Far from the other components, the mixture is one Gaussian with weight 1/8.
    at_mean = log_prob(means[0])
    assert at_mean == pytest.approx(np.log(1 / 8) - np.log(2 * np.pi * 0.2**2), abs=1e-6)


def test_checkerboard_support_and_density():
    x, _ = toys.toy_sample("checkerboard", train=True)
    log_prob = toys.TOYS["checkerboard"].log_prob
    assert np.all(np.isfinite(log_prob(x)))  # every sample lies on a filled square
    np.testing.assert_allclose(log_prob(x), -np.log(8.0))
    assert log_prob(np.array([0.5, 1.5])) == -np.inf  # an empty square
    # Each of the 8 filled squares gets an eighth of the samples.
    cells = np.floor(x).astype(int)
    _, counts = np.unique(cells[:, 0] * 10 + cells[:, 1], return_counts=True)
    assert len(counts) == 8
    np.testing.assert_allclose(counts / len(x), 1 / 8, atol=0.01)


def test_two_moons_labels_match_the_moons():
    x, labels = toys.toy_sample("two_moons", train=True)
    # The upper moon (label 0) lies higher on average than the lower one.
    assert x[labels == 0, 1].mean() > x[labels == 1, 1].mean() + 0.5


def test_toys_reject_image_options():
    source = data.load("swiss_roll")
    for kw in (dict(random_flip=True), dict(centered=True), dict(uniform_dequantization=True), dict(num_levels=16)):
        with pytest.raises(ValueError, match="continuous toy distribution"):
            data.train_iterator(source, batch_size=8, shard_index=0, shard_count=1, **kw)
    with pytest.raises(ValueError, match="image_size and num_channels do not apply"):
        data.load("swiss_roll", image_size=32)
    with pytest.raises(ValueError, match="split must be one of"):
        data.load("swiss_roll", split="test")


def test_toy_eval_covers_the_eval_sample():
    source = data.load("gaussian_mixture", split="eval")
    batches = list(data.eval_iterator(source, batch_size=1000, shard_index=0, shard_count=1))
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == 8_192 and len(batches) == 9
    x = np.concatenate([b["image"] for b in batches])[mask]
    np.testing.assert_array_equal(x, toys.toy_sample("gaussian_mixture", train=False)[0])
