"""Grain pipelines on a synthetic in-memory source: value maps, state, shards, evaluation."""

import json

import numpy as np
import pytest

from diffusion_jax import data
from diffusion_jax.data import transforms

N = 100  # not a multiple of the shard counts or batch sizes used below


def _source(n=N, *, levels=256, shape=(4, 6, 3), seed=0):
    """Random uint8 images; the label is the example's index, so batches reveal which
    examples they hold."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, levels, size=(n, *shape), dtype=np.uint8)
    info = data.DataInfo(
        name="synthetic",
        shape=shape,
        num_levels=levels,
        num_classes=n,
        value_range=(0.0, 1.0),
        train_size=n,
        eval_size=n,
    )
    return data.ArraySource(images, np.arange(n), info=info)


def _train(source, **kw):
    kw.setdefault("shard_index", 0)
    kw.setdefault("shard_count", 1)
    return data.train_iterator(source, **kw)


def _eval(source, **kw):
    kw.setdefault("shard_index", 0)
    kw.setdefault("shard_count", 1)
    return data.eval_iterator(source, **kw)


# -- value maps ---------------------------------------------------------------------------------


def test_plain_and_centered_values():
    source = _source()
    batch = next(_train(source, batch_size=10, seed=0))
    raw = source.images[batch["label"]]
    assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
    np.testing.assert_allclose(batch["image"], raw / 255.0, rtol=1e-6)
    it = _train(source, batch_size=10, seed=0, centered=True)
    batch = next(it)
    np.testing.assert_allclose(batch["image"], 2 * (source.images[batch["label"]] / 255.0) - 1, atol=1e-6)
    assert it.info.value_range == (-1.0, 1.0) and it.info.centered


def test_random_flip_mirrors_about_half():
    source = _source(n=400)
    batch = next(_train(source, batch_size=400, seed=3, random_flip=True))
    raw = source.images[batch["label"]] / 255.0
    same = np.all(np.isclose(batch["image"], raw), axis=(1, 2, 3))
    mirrored = np.all(np.isclose(batch["image"], raw[:, :, ::-1]), axis=(1, 2, 3))
    assert np.all(same | mirrored)  # every image is either itself or its mirror image
    assert 160 < mirrored.sum() < 240  # Binomial(400, 1/2): 200 +- 20 is +-2 sigma; +-40 is 4
    # Flips are per-example horizontal flips only: heights (axis 1) never reverse.
    assert not np.any(np.all(np.isclose(batch["image"], raw[:, ::-1]), axis=(1, 2, 3)) & ~same)


def test_no_flip_in_evaluation():
    source = _source()
    batch = next(_eval(source, batch_size=N))
    np.testing.assert_allclose(batch["image"], source.images / 255.0, rtol=1e-6)


@pytest.mark.parametrize("levels", [256, 17])
def test_dequantization_stays_in_bins_and_is_uniform(levels):
    source = _source(n=2000, levels=levels, shape=(8, 8, 1))
    it = _train(source, batch_size=2000, seed=5, uniform_dequantization=True)
    batch = next(it)
    k = source.images[batch["label"]].astype(np.float64)
    x = batch["image"].astype(np.float64)
    assert x.min() >= 0.0 and x.max() < 1.0
    # (x (L-1) + u) / L with x = k/(L-1): value in [k/L, (k+1)/L).
    np.testing.assert_array_equal(np.floor(x * levels), k)
    u = x * levels - k  # the noise, which must be U[0, 1) within the bin
    assert abs(u.mean() - 0.5) < 4 * np.sqrt(1 / 12 / u.size)
    assert abs(u.var() - 1 / 12) < 0.005
    counts, _ = np.histogram(u, bins=10, range=(0, 1))
    expected = u.size / 10
    chi2 = np.sum((counts - expected) ** 2 / expected)
    assert chi2 < 30  # chi-square with 9 degrees of freedom: p ~ 4e-4
    assert it.info.uniform_dequantization


def test_dequantize_never_reaches_the_upper_bin_edge():
    # Levels next to 255 with u drawn close to 1 would round up in float32 arithmetic.
    levels = np.full((200_000,), 255, np.uint8)

    class NearOne:
        def random(self, shape):
            return np.full(shape, 1 - 2.0**-30)

    x = transforms.dequantize(levels, NearOne(), num_levels=256)
    assert x.dtype == np.float32 and x.max() < 1.0
    np.testing.assert_array_equal(np.floor(x.astype(np.float64) * 256), 255)


def test_requantize_to_fewer_levels():
    source = _source()
    it = _train(source, batch_size=10, seed=0, num_levels=32)
    batch = next(it)
    k = source.images[batch["label"]].astype(np.int64) // 8  # 5-bit: k // 2^(8 - 5)
    np.testing.assert_allclose(batch["image"], k / 31.0, rtol=1e-6)
    assert it.info.num_levels == 32
    with pytest.raises(ValueError, match="num_levels must be an integer between 2 and 256"):
        _train(source, batch_size=10, num_levels=300)


def test_bits_per_dim_offset():
    info = _train(_source(), batch_size=10, centered=True).info
    assert info.bits_per_dim_offset == pytest.approx(7.0)  # score_sde's constant for [-1, 1]
    assert _train(_source(), batch_size=10).info.bits_per_dim_offset == pytest.approx(8.0)


# -- order, epochs, state -------------------------------------------------------------------------


def test_each_epoch_is_a_fresh_permutation():
    it = _train(_source(), batch_size=20, seed=0, num_epochs=3)
    assert it.num_batches == 15
    ids = np.concatenate([b["label"] for b in it]).reshape(3, N)
    for epoch in ids:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(N))
    assert not np.array_equal(ids[0], ids[1]) and not np.array_equal(ids[0], np.arange(N))


def test_same_seed_same_batches_other_seed_other_batches():
    kw = dict(batch_size=16, random_flip=True, uniform_dequantization=True)
    a = [next(it) for it in [_train(_source(), seed=1, **kw)] for _ in range(8)]
    b = [next(it) for it in [_train(_source(), seed=1, **kw)] for _ in range(8)]
    c = next(_train(_source(), seed=2, **kw))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not np.array_equal(a[0]["label"], c["label"])


@pytest.mark.parametrize("num_threads", [0, 2])
def test_state_restore_gives_identical_continuation(num_threads):
    kw = dict(batch_size=24, seed=7, random_flip=True, uniform_dequantization=True, num_threads=num_threads)
    it = _train(_source(), **kw)
    for _ in range(11):  # past several epoch boundaries (100 examples, 24 per batch)
        next(it)
    state = it.get_state()
    state = json.loads(json.dumps(state))  # a checkpoint stores it as JSON
    expected = [next(it) for _ in range(6)]

    resumed = _train(_source(), **kw)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])


def test_restoring_into_another_pipeline_is_refused():
    state = _train(_source(), batch_size=20, seed=0).get_state()
    with pytest.raises(ValueError, match="different pipeline"):
        _train(_source(), batch_size=10, seed=0).set_state(state)
    with pytest.raises(ValueError, match="different pipeline"):
        _train(_source(), batch_size=20, seed=0, shard_index=1, shard_count=2).set_state(state)
    with pytest.raises(ValueError, match="not a DataIterator state"):
        _train(_source(), batch_size=20, seed=0).set_state({"next_index": 3})


def test_threads_do_not_change_the_data():
    a = next(_train(_source(), batch_size=30, seed=4, uniform_dequantization=True, num_threads=0))
    b = next(_train(_source(), batch_size=30, seed=4, uniform_dequantization=True, num_threads=3))
    np.testing.assert_array_equal(a["image"], b["image"])


# -- sharding --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, shard_count", [(96, 3), (100, 3), (100, 4)])
def test_training_shards_are_disjoint_and_cover(n, shard_count):
    source = _source(n)
    per_epoch = []
    for shard in range(shard_count):
        it = data.train_iterator(
            source, batch_size=4 * shard_count, seed=0, num_epochs=1, shard_index=shard, shard_count=shard_count
        )
        assert it.batch_size == 4 and it.global_batch_size == 4 * shard_count
        assert it.num_batches == (n // shard_count) // 4  # the same on every host
        ids = np.concatenate([b["label"] for b in it])
        assert np.all(ids % shard_count == shard)  # only this host's strided shard
        assert len(set(ids)) == len(ids)
        per_epoch.append(ids)
    union = np.concatenate(per_epoch)
    assert len(set(union)) == len(union)  # disjoint
    if n % shard_count == 0 and (n // shard_count) % 4 == 0:
        np.testing.assert_array_equal(np.sort(union), np.arange(n))  # covering
    # Over many epochs each shard is still visited in full.
    it = data.train_iterator(source, batch_size=4 * shard_count, seed=0, shard_index=1, shard_count=shard_count)
    seen = np.concatenate([next(it)["label"] for _ in range(3 * n // 4)])
    np.testing.assert_array_equal(np.unique(seen), np.arange(1, n, shard_count))


def test_global_batch_must_divide_among_hosts():
    with pytest.raises(ValueError, match="not divisible by the number of hosts"):
        data.train_iterator(_source(), batch_size=10, shard_index=0, shard_count=4)
    with pytest.raises(ValueError, match="shard_index < shard_count"):
        data.train_iterator(_source(), batch_size=8, shard_index=4, shard_count=4)


def test_default_shard_is_this_jax_process():
    it = data.train_iterator(_source(), batch_size=8)
    assert (it.shard_index, it.shard_count) == (0, 1)


# -- evaluation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shard_count, batch_size", [(1, 32), (1, 100), (3, 12), (4, 8)])
def test_eval_sees_every_example_exactly_once(shard_count, batch_size):
    source = _source()
    seen, counts = [], set()
    for shard in range(shard_count):
        it = data.eval_iterator(
            source,
            batch_size=batch_size,
            shard_index=shard,
            shard_count=shard_count,
            centered=True,
            uniform_dequantization=True,
        )
        batches = list(it)
        assert len(batches) == it.num_batches
        counts.add(it.num_batches)
        for b in batches:
            assert b["image"].shape == (batch_size // shard_count, 4, 6, 3)  # fixed shape
            assert b["mask"].dtype == bool
            assert np.all(b["image"][~b["mask"]] == 0)  # padding is zeros, even when centred
            assert np.all(b["label"][~b["mask"]] == 0)
            seen.append(b["label"][b["mask"]])
    assert len(counts) == 1  # every host runs the same number of steps
    seen = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(seen), np.arange(N))


def test_eval_order_and_values_match_the_source():
    source = _source()
    batches = list(_eval(source, batch_size=16))
    ids = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(ids, np.arange(N))  # in order
    images = np.concatenate([b["image"][b["mask"]] for b in batches])
    np.testing.assert_allclose(images, source.images / 255.0, rtol=1e-6)
    assert batches[-1]["mask"].sum() == N % 16


def test_eval_dequantization_noise_depends_on_seed():
    a = next(_eval(_source(), batch_size=20, seed=0, uniform_dequantization=True))
    b = next(_eval(_source(), batch_size=20, seed=0, uniform_dequantization=True))
    c = next(_eval(_source(), batch_size=20, seed=1, uniform_dequantization=True))
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"])
    np.testing.assert_array_equal(np.floor(a["image"] * 256), np.floor(c["image"] * 256))


def test_eval_state_restore():
    it = _eval(_source(), batch_size=16, uniform_dequantization=True)
    next(it), next(it)
    state = it.get_state()
    rest = list(it)
    resumed = _eval(_source(), batch_size=16, uniform_dequantization=True)
    resumed.set_state(state)
    again = list(resumed)
    assert len(again) == len(rest) == 5
    for x, y in zip(rest, again):
        np.testing.assert_array_equal(x["image"], y["image"])


# -- invalid arguments ----------------------------------------------------------------------------


def test_invalid_arguments_are_named():
    source = _source()
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        _train(source, batch_size=0)
    with pytest.raises(ValueError, match="num_epochs must be a positive integer"):
        _train(source, batch_size=4, num_epochs=0)
    with pytest.raises(ValueError, match="random_flip must be True or False"):
        _train(source, batch_size=4, random_flip="yes")
    with pytest.raises(ValueError, match="do not fill one batch"):
        _train(source, batch_size=200, num_epochs=1)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        _eval(source, batch_size=4, seed=-1)
    with pytest.raises(ValueError, match="num_workers must be a non-negative integer"):
        _train(source, batch_size=4, num_workers=-1)


def test_worker_processes_give_the_same_batches_and_state():
    source = _source()
    kw = dict(batch_size=20, seed=2, random_flip=True, uniform_dequantization=True)
    expected = [next(it) for it in [_train(source, **kw)] for _ in range(6)]
    with _train(source, num_workers=1, **kw) as it:
        got = [next(it) for _ in range(3)]
        state = it.get_state()
    with _train(source, num_workers=1, **kw) as resumed:
        resumed.set_state(state)
        got += [next(resumed) for _ in range(3)]
    for x, y in zip(got, expected):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
