"""FID, KID, Inception score and precision/recall as functions of features; streaming statistics
and reference-statistics files."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest

from diffusion_jax.evaluation import metrics, stats

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "fid_inception"
# The complete pytorch-fid fixture (with is_logits, 4 MB, not committed): the shared fixtures
# beside the checkout (as CI lays them out), or $DIFFUSION_JAX_FID_FIXTURE_DIR.
_SHARED = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "fid_inception"
FULL_FIXTURE = os.environ.get("DIFFUSION_JAX_FID_FIXTURE_DIR") or (str(_SHARED) if _SHARED.is_dir() else None)


@pytest.fixture(scope="module")
def values():
    return json.loads((FIXTURE / "metric_values.json").read_text())


@pytest.fixture(scope="module")
def features():
    with np.load(FIXTURE / "parity.npz") as z:
        return z["features_a"], z["features_b"]


def test_fid_matches_pytorch_fid(features, values):
    a, b = features
    sa, sb = stats.statistics_of(a), stats.statistics_of(b)
    fid = metrics.frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    assert fid == pytest.approx(values["fid_features_a_vs_b"], rel=1e-6)
    result = metrics.fid_from_features(a, sb)
    assert result.fid == pytest.approx(fid, rel=1e-12) and (result.num_samples, result.reference_num_samples) == (
        1200,
        1000,
    )


def test_kid_matches_reference(features, values):
    a, b = features
    # one subset of the full size: every key gives the same value (a permutation of the rows)
    for seed in (0, 1):
        kid = metrics.kernel_inception_distance(a[:1000], b[:1000], key=jax.random.key(seed), num_subsets=1)
        assert kid.kid == pytest.approx(values["kid_features_a1000_vs_b1000"], rel=1e-6)
        assert kid.subset_size == 1000


def test_kid_subsets_follow_the_key(features):
    a, b = features
    k = lambda seed: metrics.kernel_inception_distance(a, b, key=jax.random.key(seed), num_subsets=4, subset_size=100)
    assert k(3) == k(3) and k(3).kid != k(4).kid
    # same distribution: the unbiased estimate is centred on 0
    same = metrics.kernel_inception_distance(a[:600], a[600:], key=jax.random.key(0), num_subsets=5, subset_size=300)
    assert abs(same.kid) < 0.1 * k(3).kid


@pytest.mark.skipif(not FULL_FIXTURE, reason="needs the complete pytorch-fid fixture (../shared or the env variable)")
def test_inception_score_matches_reference_on_the_full_fixture():
    full = pathlib.Path(FULL_FIXTURE)
    ref = json.loads((full / "metric_values.json").read_text())
    with np.load(full / "inception_outputs.npz") as z:
        logits = z["is_logits"]
    for splits in (1, 10):
        score = metrics.inception_score(logits, num_splits=splits)
        np.testing.assert_allclose([score.mean, score.std], ref[f"is_logits_splits{splits}"], rtol=1e-6, atol=1e-12)


def test_inception_score_closed_forms():
    # confident and balanced over C classes: IS = C; uniform predictions: IS = 1
    confident = np.full((40, 8), -1e4)
    confident[np.arange(40), np.arange(40) % 8] = 0.0
    assert metrics.inception_score(confident, num_splits=1).mean == pytest.approx(8.0, rel=1e-9)
    uniform = metrics.inception_score(np.zeros((30, 5)), num_splits=3)
    assert (uniform.mean, uniform.std) == (pytest.approx(1.0), pytest.approx(0.0, abs=1e-12))
    # all inputs confident about one class: IS = 1 however sharp
    assert metrics.inception_score(confident[:, ::-1] * 0 + np.eye(8)[0] * 50, num_splits=2).mean == pytest.approx(1.0)
    # splits are contiguous (numpy.array_split): the first split holds classes 0..3 only
    rows = np.repeat(np.eye(8) * 60.0, 5, axis=0)  # 40 rows, classes in order
    s = metrics.inception_score(rows, num_splits=2)
    assert s.mean == pytest.approx(4.0, rel=1e-9) and s.std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_against_written_out_formula():
    logits = np.random.default_rng(0).normal(size=(50, 7)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = [np.exp(np.mean([np.sum(q * np.log(q / part.mean(0))) for q in part])) for part in np.array_split(p, 3)]
    got = metrics.inception_score(logits, num_splits=3)
    np.testing.assert_allclose([got.mean, got.std], [np.mean(scores), np.std(scores)], rtol=1e-12)


def test_fid_of_a_set_with_itself_is_zero(features):
    a, _ = features
    s = stats.statistics_of(a)
    assert abs(metrics.frechet_distance(s.mu, s.sigma, s.mu, s.sigma)) < 1e-8 * np.trace(s.sigma)


def test_fid_with_equal_covariances_is_the_mean_distance(features):
    a, _ = features
    s = stats.statistics_of(a)
    shift = np.random.default_rng(1).normal(size=s.mu.shape)
    fid = metrics.frechet_distance(s.mu, s.sigma, s.mu + shift, s.sigma)
    assert fid == pytest.approx(shift @ shift, rel=1e-8)


def test_trace_sqrt_product_closed_form_and_never_complex():
    # commuting diagonal covariances: tr((S1 S2)^(1/2)) = sum sqrt(d1 d2)
    d1, d2 = np.array([1.0, 4.0, 9.0]), np.array([16.0, 1.0, 0.25])
    assert metrics.trace_sqrt_product(np.diag(d1), np.diag(d2)) == pytest.approx(np.sqrt(d1 * d2).sum(), rel=1e-12)
    # 1-d Gaussians: FID = (m1 - m2)^2 + (s1 - s2)^2
    assert metrics.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # singular covariances (fewer samples than dimensions): a finite real number
    x = np.random.default_rng(2).normal(size=(10, 50))
    y = np.random.default_rng(3).normal(size=(12, 50))
    sx, sy = stats.statistics_of(x), stats.statistics_of(y)
    value = metrics.frechet_distance(sx.mu, sx.sigma, sy.mu, sy.sigma)
    assert isinstance(value, float) and np.isfinite(value) and value > 0


def test_streaming_statistics_equal_np_cov_and_merge_equals_one_pass(features):
    a, _ = features
    a = a.astype(np.float64) + 100.0  # an offset that would hurt a sum-of-squares formula
    state = stats.init_moments(a.shape[1])
    for lo in range(0, len(a), 97):  # uneven batches
        state = stats.update_moments(state, a[lo : lo + 97])
    s = stats.finalize_moments(state)
    np.testing.assert_allclose(s.mu, a.mean(0), rtol=1e-13)
    np.testing.assert_allclose(s.sigma, np.cov(a, rowvar=False), rtol=1e-9, atol=1e-12)
    assert s.num_samples == len(a)
    # two "hosts" with different batchings, merged: equal to one pass
    left, right = stats.init_moments(a.shape[1]), stats.init_moments(a.shape[1])
    for lo in range(0, 500, 128):
        left = stats.update_moments(left, a[lo : min(lo + 128, 500)])
    right = stats.update_moments(right, a[500:])
    merged = stats.finalize_moments(stats.merge_moments(left, right))
    one = stats.statistics_of(a)
    np.testing.assert_allclose(merged.sigma, one.sigma, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(merged.mu, one.mu, rtol=1e-13)
    # merge is commutative and the empty state is its identity
    m2 = stats.merge_moments(right, left)
    np.testing.assert_allclose(m2.m2, stats.merge_moments(left, right).m2, rtol=1e-12)
    assert stats.merge_moments(stats.init_moments(a.shape[1]), left) is left


def test_fid_at_counts_uses_the_first_rows(features):
    a, b = features
    ref = stats.statistics_of(b)
    at = metrics.fid_at_counts(a, ref, counts=(100, 1000, 5000))
    assert list(at) == [100, 1000]  # 5000 > 1200 rows
    assert at[1000].fid == pytest.approx(metrics.fid_from_features(a[:1000], ref).fid) and at[100].num_samples == 100
    assert at[100].fid > at[1000].fid  # the small-sample bias
    with pytest.raises(ValueError, match="none of the counts"):
        metrics.fid_at_counts(a, ref, counts=(5000,))


def test_precision_recall_on_constructed_sets():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 4))
    same = rng.normal(size=(300, 4))
    # all sets 300 x 4 and one block size: the distance kernels compile once for the whole test
    pr = metrics.precision_recall(real, same, k=3, block_size=128)
    assert pr.precision > 0.8 and pr.recall > 0.8
    # a generator that drops modes (only points like the real ones with x_0 > 1): precise, low recall
    kept = real[real[:, 0] > 1.0]
    dropped = kept[rng.integers(0, len(kept), size=300)] + 1e-3 * rng.normal(size=(300, 4))
    pr = metrics.precision_recall(real, dropped, k=3, block_size=128)
    assert pr.precision == 1.0 and pr.recall < 0.5, pr
    # samples far away: neither
    pr = metrics.precision_recall(real, same + 100.0, k=3, block_size=128)
    assert pr.precision == 0.0 and pr.recall == 0.0


def test_precision_recall_matches_a_brute_force_count():
    rng = np.random.default_rng(5)
    real, fake = rng.normal(size=(300, 4)), rng.normal(size=(300, 4)) * 1.5
    d = lambda x, y: np.sqrt(((x[:, None] - y[None]) ** 2).sum(-1))
    radius = lambda x: np.sort(d(x, x), axis=1)[:, 3]  # column 0 is the point itself
    precision = np.mean((d(fake, real) <= radius(real)[None]).any(1))
    recall = np.mean((d(real, fake) <= radius(fake)[None]).any(1))
    pr = metrics.precision_recall(real, fake, k=3, block_size=128)
    assert (pr.precision, pr.recall) == (pytest.approx(precision), pytest.approx(recall))


def test_reference_statistics_round_trip_and_refusal(features, tmp_path):
    a, _ = features
    ref = stats.ReferenceStatistics(stats.statistics_of(a), "inception", "pytorch_fid")
    path = tmp_path / "ref.npz"
    stats.save_reference_statistics(path, ref)
    back = stats.load_reference_statistics(path, detector="inception", preprocessing="pytorch_fid")
    assert (back.detector, back.preprocessing, back.stats.num_samples) == ("inception", "pytorch_fid", 1200)
    np.testing.assert_array_equal(back.stats.sigma, ref.stats.sigma)
    with pytest.raises(stats.ReferenceMismatchError, match="detector 'inception'.*'digits'"):
        stats.load_reference_statistics(path, detector="digits")
    with pytest.raises(stats.ReferenceMismatchError, match="preprocessing 'pytorch_fid'.*'tf'"):
        stats.load_reference_statistics(path, detector="inception", preprocessing="tf")


def test_inception_score_of_one_hot_predictions_is_finite():
    """A class that no sample gives any probability (p underflows to 0) adds 0 log 0 = 0."""
    logits = np.full((4, 10), -1e4)
    logits[np.arange(4), [0, 1, 2, 3]] = 0.0
    score = metrics.inception_score(logits, num_splits=1)
    assert score.mean == pytest.approx(4.0)
