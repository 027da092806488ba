"""The detector registry, the digits detector, sharded extraction (8 simulated devices give the
FID of one) and reference statistics."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import evaluation as ev
from diffusion_jax.evaluation import digits as digits_lib


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The trained digits detector, cached in a temporary folder (trained once per test run)."""
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("DIFFUSION_JAX_CACHE_DIR")
    os.environ["DIFFUSION_JAX_CACHE_DIR"] = str(cache)
    digits_lib.digits_classifier_params.cache_clear()
    try:
        yield ev.get_detector("digits"), cache
    finally:
        digits_lib.digits_classifier_params.cache_clear()
        if old is None:
            del os.environ["DIFFUSION_JAX_CACHE_DIR"]
        else:
            os.environ["DIFFUSION_JAX_CACHE_DIR"] = old


def test_registry_lists_the_valid_names():
    assert {"inception", "digits"} <= set(ev.DETECTORS)
    with pytest.raises(ValueError, match=r"unknown detector 'vgg'; choose one of \['digits', 'inception'\]"):
        ev.get_detector("vgg")
    with pytest.raises(ValueError, match="unknown resize mode 'bicubic'"):
        ev.get_detector("inception", variables={}, resize_mode="bicubic")


def test_digits_split_matches_the_data_set():
    # diffusion_jax.data.digits: the first 1,500 images are train, the last 297 test (not imported
    # here: it loads tensorflow_datasets, seconds of start-up)
    assert digits_lib.NUM_TRAIN == 1500
    x, y = digits_lib.load_digits_split("test")
    assert x.shape == (297, 8, 8, 1) and x.min() == 0.0 and x.max() == 1.0
    assert np.allclose(x * 16, np.round(x * 16))  # 17 levels


def test_digits_detector_classifies_and_is_cached(digits):
    detector, cache = digits
    x, y = digits_lib.load_digits_split("test")
    out = ev.extract_features(detector, x, batch_size=99)
    assert out.features.shape == (len(x), detector.feature_dim) and out.logits.shape == (len(x), 10)
    accuracy = (out.logits.argmax(1) == y).mean()
    assert accuracy > 0.9, accuracy  # held-out digits (the harder last 297)
    score = ev.inception_score(out.logits, num_splits=1).mean
    assert 8.0 < score <= 10.0, score
    # cached on disk: a fresh load gives the same parameters, without training
    files = list(cache.glob("digits_detector_*.npz"))
    assert len(files) == 1
    digits_lib.digits_classifier_params.cache_clear()
    again = ev.get_detector("digits")
    jax.tree.map(np.testing.assert_array_equal, again.params, detector.params)


def test_digits_fid_separates_real_from_noise(digits):
    detector, _ = digits
    train, _ = digits_lib.load_digits_split("train")
    test, _ = digits_lib.load_digits_split("test")
    ref = ev.compute_reference_statistics(detector, train, batch_size=99)
    real = ev.fid_from_features(ev.extract_features(detector, test, batch_size=99).features, ref.stats).fid
    noise = np.random.default_rng(0).integers(0, 17, size=test.shape) / 16.0
    fake = ev.fid_from_features(ev.extract_features(detector, noise, batch_size=99).features, ref.stats).fid
    assert fake > 10 * real, (real, fake)


def test_extraction_regroups_batches_and_drops_padding(digits):
    detector, _ = digits
    x, _ = digits_lib.load_digits_split("test")
    x = x[:100]
    direct = detector(jnp.asarray(x))
    chunks = [x[:7], x[7:40], x[40:41], x[41:]]  # uneven pieces, 100 = 99 + 1 (the last batch padded)
    out = ev.extract_features(detector, iter(chunks), batch_size=99)
    np.testing.assert_allclose(out.features, direct.features, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.logits, direct.logits, rtol=1e-5, atol=1e-5)
    streamed = ev.feature_statistics(detector, iter(chunks), batch_size=99)
    whole = ev.statistics_of(np.asarray(direct.features))
    np.testing.assert_allclose(streamed.sigma, whole.sigma, rtol=1e-4, atol=1e-7)


def test_evaluate_samples_and_reference_files(digits, tmp_path):
    detector, _ = digits
    train, _ = digits_lib.load_digits_split("train")
    test, _ = digits_lib.load_digits_split("test")
    path = tmp_path / "digits_train.npz"
    ev.compute_reference_statistics(detector, train, path, batch_size=99)
    ref = ev.load_reference_statistics(path, detector="digits", preprocessing="digits8x8")
    real = ev.extract_features(detector, train[:297], batch_size=99).features
    m = ev.evaluate_samples(
        detector,
        test,
        ref,
        key=jax.random.key(0),
        real_features=real,
        counts=(100, 1000),
        kid_subsets=3,
        kid_subset_size=200,
        batch_size=99,
    )
    assert m.fid.num_samples == 297 and list(m.fid_at_counts) == [100] and m.kid.subset_size == 200
    assert m.inception_score.mean == m.inception_score_unbiased.mean  # the digits report one form
    assert m.precision_recall.precision > 0.5 and m.precision_recall.recall > 0.5
    wrong = ev.ReferenceStatistics(ref.stats, "inception", "pytorch_fid")
    with pytest.raises(ev.ReferenceMismatchError, match="'inception'"):
        ev.evaluate_samples(detector, test, wrong, key=jax.random.key(0))


_EIGHT_DEVICES = textwrap.dedent(
    """
    import jax, numpy as np
    from diffusion_jax import evaluation as ev
    from diffusion_jax.evaluation import digits as d
    assert len(jax.devices()) == 8, jax.devices()
    variables = d.DigitsClassifier().init(jax.random.key(1), np.zeros((1, 8, 8, 1)))
    detector = ev.get_detector("digits", variables=variables)  # untrained: sharding is the point
    x = np.random.default_rng(0).integers(0, 17, size=(203, 8, 8, 1)) / 16.0
    ref = ev.statistics_of(np.random.default_rng(0).normal(size=(500, 64)))
    fids = {}
    for n in (8, 1):
        mesh = ev.make_mesh(jax.devices()[:n])
        feats = ev.extract_features(detector, x, batch_size=40, mesh=mesh).features  # last batch padded
        fids[n] = ev.fid_from_features(feats, ref).fid
        streamed = ev.feature_statistics(detector, x, batch_size=40, mesh=mesh)
        fids[f"streamed{n}"] = ev.frechet_distance(streamed.mu, streamed.sigma, ref.mu, ref.sigma)
    print(repr(fids))
    """
)


def test_fid_over_eight_simulated_devices_equals_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fids = eval(proc.stdout.strip().splitlines()[-1])  # noqa: S307 (our own repr of a dict of floats)
    assert fids[8] == pytest.approx(fids[1], rel=1e-6) and fids["streamed8"] == pytest.approx(
        fids["streamed1"], rel=1e-6
    )
    assert fids[8] > 0
