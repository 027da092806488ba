"""The FID Inception-v3 against pytorch-fid's own outputs (tests/fixtures/fid_inception, random
weights regenerated from the manifest's seed), its resize, and its weights loader.

Tolerances: float32 on CPU agrees with pytorch-fid to about 1e-5 of max|reference| (worst case
below 1e-4: a float64 evaluation of the same network differs from pytorch-fid's float32 outputs
by 6e-5 on the 32x32 inputs, so that is the reference's own rounding)."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.evaluation import inception as inc
from diffusion_jax.evaluation import resize

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "fid_inception"
TOL = 1e-4  # of max|reference|
SIZES = {"x32": 2, "x64": 2, "x299": 1, "x512": 1}  # images per input size in the fixture subset
OUTPUTS = ("block0_mean", "block1_mean", "block2_mean", "pool3", "logits", "logits_unbiased")


def nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


def rel_err(ours, ref):
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE / "parity.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def state_dict():
    manifest = json.loads((FIXTURE / "state_dict_manifest.json").read_text())
    with np.load(FIXTURE / "inception_bn.npz") as bn:
        return inc.random_state_dict(manifest, bn)


@pytest.fixture(scope="module")
def variables(state_dict):
    return inc.convert_state_dict(state_dict)


def _run(module):
    @jax.jit
    def fn(v, x):
        out, state = module.apply(v, x, mutable=["intermediates"])
        inter = {k: val[0] for k, val in state["intermediates"].items()}
        return out, inter

    return fn


@pytest.fixture(scope="module")
def net():
    return _run(inc.FIDInceptionV3())


@pytest.fixture(scope="module")
def inputs(ref):
    """The 6 network inputs (B, 299, 299, 3) in [-1, 1], in SIZES order: x32 and x64 resized here
    (pytorch_fid mode), x299 unchanged, x512 through pytorch-fid's own resize (the stored image)."""
    parts = [
        resize.preprocess_for_inception(jnp.asarray(nhwc(ref["x32"]))),
        resize.preprocess_for_inception(jnp.asarray(nhwc(ref["x64"]))),
        resize.preprocess_for_inception(jnp.asarray(nhwc(ref["x299"]))),
        2.0 * jnp.asarray(nhwc(ref["x512_resized0"])) - 1.0,
    ]
    return jnp.concatenate(parts)


def _split(values):
    out, start = {}, 0
    for name, n in SIZES.items():
        out[name] = values[start : start + n]
        start += n
    return out


def _outputs(out, inter):
    """Our outputs in the fixture's names, split per input size."""
    flat = {
        "block0_mean": inter["block0"].mean((1, 2)),
        "block1_mean": inter["block1"].mean((1, 2)),
        "block2_mean": inter["block2"].mean((1, 2)),
        "block2_crop0": inter["block2"][:, :4, :4, :].transpose(0, 3, 1, 2),
        "pool3": out.pool3,
        "logits": out.logits,
        "logits_unbiased": out.logits_unbiased,
    }
    return {k: _split(np.asarray(v)) for k, v in flat.items()}


@pytest.fixture(scope="module")
def ours(net, variables, inputs):
    return _outputs(*net(variables, inputs))


def _max_error(ours, ref, names=OUTPUTS, sizes=SIZES):
    return max(rel_err(ours[k][s], ref[f"{s}_{k}"]) for k in names for s in sizes)


@pytest.mark.parametrize("size", list(SIZES))
def test_outputs_match_pytorch_fid(ours, ref, size):
    for name in OUTPUTS:
        err = rel_err(ours[name][size], ref[f"{size}_{name}"])
        assert err < TOL, f"{size} {name}: {err:.2e} of max|ref|"
    err = rel_err(ours["block2_crop0"][size][:1], ref[f"{size}_block2_crop0"])
    assert err < TOL, f"{size} block2 crop: {err:.2e}"


def test_logits_bias_convention(ours, variables):
    bias = np.asarray(variables["params"]["fc"]["bias"])
    diff = ours["logits"]["x32"] - ours["logits_unbiased"]["x32"]
    np.testing.assert_allclose(diff, np.broadcast_to(bias, diff.shape), atol=1e-5)


def test_resize_matches_f_interpolate(ref):
    grid = ref["grid"]
    for name in ("x32", "x64"):
        ours = resize.resize_bilinear(jnp.asarray(nhwc(ref[name][:1])), (299, 299))
        ours = nhwc(np.asarray(ours).transpose(0, 3, 1, 2)[:, :, grid][:, :, :, grid])
        np.testing.assert_allclose(ours, nhwc(ref[f"{name}_resized0_grid"]), atol=1e-5, err_msg=name)
    # 512 -> 299 shrinks: F.interpolate does not antialias, neither do we. The stored crop is the
    # input's top-left 128x128; output rows and columns < 72 read nothing else.
    mh = resize.interpolation_matrix(512, 299)[:72]
    assert not mh[:, 128:].any()
    x = jnp.zeros((1, 512, 512, 3)).at[:, :128, :128].set(nhwc(ref["x512_crop"]))
    ours = np.asarray(resize.resize_bilinear(x, (299, 299)))[:, :72, :72]
    np.testing.assert_allclose(ours, nhwc(ref["x512_resized0_crop"]), atol=1e-5)
    # equal sizes: the identity (x299's stored resize is the input itself)
    x = jnp.asarray(nhwc(ref["x299"]))
    np.testing.assert_array_equal(resize.resize_bilinear(x, (299, 299)), x)


def test_antialiased_resize_is_clearly_wrong(ref):
    """jax.image's resampling with antialias=True (jax.image.resize's default) blurs when shrinking;
    pytorch-fid does not. Same coordinates (scale 299/512, half-pixel centres) both ways."""
    x = jnp.asarray(nhwc(ref["x512_crop"]))
    target = nhwc(ref["x512_resized0_crop"])
    scale = jnp.array([299 / 512, 299 / 512])
    errors = {}
    for antialias in (False, True):
        out = jax.image.scale_and_translate(
            x, (1, 72, 72, 3), (1, 2), scale, jnp.zeros(2), method="linear", antialias=antialias
        )
        errors[antialias] = float(np.abs(np.asarray(out) - target).max())
    assert errors[False] < 1e-5 and errors[True] > 1e-2, errors


def test_input_scaling_mistake_is_clearly_worse(net, variables, inputs, ref, ours):
    """Feeding [0, 1] (no 2x - 1) or TF-GAN's (255x - 128) / 128 instead of pytorch-fid's 2x - 1:
    one batch, the first 3 inputs unscaled, the other 3 TF-scaled."""
    x01 = (inputs + 1.0) / 2.0
    wrong = jnp.concatenate([x01[:3], 255.0 / 128.0 * x01[3:] - 1.0])
    out = np.asarray(net(variables, wrong)[0].pool3)
    good = np.asarray(np.concatenate([ours["pool3"][s] for s in SIZES]))
    truth = np.concatenate([ref[f"{s}_pool3"] for s in SIZES])
    scale = np.abs(truth).max(axis=1)
    err = lambda a, rows: float(np.max(np.abs(a[rows] - truth[rows]).max(axis=1) / scale[rows]))
    for rows, factor in ((slice(0, 3), 100), (slice(3, 6), 10)):
        assert err(out, rows) > factor * max(err(good, rows), 1e-6), (rows, err(out, rows), err(good, rows))


@pytest.mark.parametrize(
    "variant, affected",
    [
        # torchvision's average pools count the zero padding: block 2 already differs
        (dict(pool_include_pad=True), "block2_mean"),
        # an average instead of a max pool in the last block: only pool3 and the logits differ
        (dict(last_pool="avg"), "pool3"),
    ],
)
def test_pooling_mistakes_are_clearly_worse(variant, affected, variables, ref, ours):
    x = 2.0 * jnp.asarray(nhwc(ref["x512_resized0"])) - 1.0
    wrong = _outputs(*_run(inc.FIDInceptionV3(**variant))(variables, x))
    wrong = {k: {"x512": v["x32"]} for k, v in wrong.items()}  # batch of 1: the first slot
    good = rel_err(ours[affected]["x512"], ref[f"x512_{affected}"])
    bad = rel_err(wrong[affected]["x512"], ref[f"x512_{affected}"])
    assert bad > 100 * good and bad > 1e-3, (good, bad)
    if affected == "pool3":  # the last block's pool does not touch block 2
        np.testing.assert_allclose(wrong["block2_mean"]["x512"], ours["block2_mean"]["x512"], rtol=1e-6)


# --- weights files ----------------------------------------------------------------------------


def test_state_dict_names_and_shapes(state_dict):
    expected = inc.expected_state_dict_shapes()
    assert len(expected) == 94 * 5 + 2  # 94 conv layers (weight + 4 BatchNorm tensors), fc weight and bias
    assert {k: tuple(v.shape) for k, v in state_dict.items()} == expected


def test_missing_extra_and_misshaped_tensors_are_named(state_dict):
    broken = dict(state_dict)
    del broken["Mixed_6c.branch7x7dbl_4.bn.running_var"]
    with pytest.raises(inc.InceptionWeightsError, match=r"Mixed_6c\.branch7x7dbl_4\.bn\.running_var"):
        inc.convert_state_dict(broken)
    broken = dict(state_dict, **{"Mixed_7c.branch_pool.extra.weight": np.zeros(3)})
    with pytest.raises(inc.InceptionWeightsError, match=r"Mixed_7c\.branch_pool\.extra\.weight"):
        inc.convert_state_dict(broken)
    broken = dict(state_dict, **{"AuxLogits.fc.weight": np.zeros((1000, 768))})
    with pytest.raises(inc.InceptionWeightsError, match=r"AuxLogits\.fc\.weight"):
        inc.convert_state_dict(broken)
    broken = dict(state_dict, **{"fc.weight": np.zeros((1000, 2048))})
    with pytest.raises(inc.InceptionWeightsError, match=r"fc\.weight.*\(1000, 2048\).*\(1008, 2048\)"):
        inc.convert_state_dict(broken)


def test_npz_round_trip(state_dict, variables, tmp_path):
    path = tmp_path / "inception.npz"
    inc.save_inception_npz(state_dict, path)
    loaded = inc.load_inception_weights(path)
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)


def test_pth_is_read_with_the_weights_only_loader(state_dict, variables, tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "pt_inception.pth"
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, path)
    jax.tree.map(np.testing.assert_array_equal, inc.load_inception_weights(path), variables)


def test_missing_weights_stop_with_one_message(monkeypatch, tmp_path):
    monkeypatch.delenv(inc.WEIGHTS_ENV_VAR, raising=False)
    with pytest.raises(inc.InceptionWeightsError) as err:
        inc.resolve_inception_weights(None)
    msg = str(err.value)
    assert inc.PYTORCH_FID_WEIGHTS_FILE in msg and "eval.inception_weights" in msg and inc.WEIGHTS_ENV_VAR in msg
    monkeypatch.setenv(inc.WEIGHTS_ENV_VAR, str(tmp_path / "nope.pth"))
    with pytest.raises(inc.InceptionWeightsError, match="nope.pth' does not exist"):
        inc.resolve_inception_weights(None)
    from diffusion_jax.evaluation import get_detector

    with pytest.raises(inc.InceptionWeightsError, match="eval.inception_weights"):
        get_detector("inception")


def test_resize_conventions_by_hand():
    # 2 -> 4 pixels. Half-pixel centres: sources -0.25 (clamped to 0), 0.25, 0.75, 1.25 (upper
    # neighbour clamped); TF1 legacy: sources 0, 0.5, 1, 1.5.
    half = resize.interpolation_matrix(2, 4, half_pixel=True)
    np.testing.assert_allclose(half, [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    legacy = resize.interpolation_matrix(2, 4, half_pixel=False)
    np.testing.assert_allclose(legacy, [[1, 0], [0.5, 0.5], [0, 1], [0, 1]])
    # input scaling per mode, on a constant image (the resize keeps constants)
    x = jnp.full((1, 5, 5, 1), 0.25)
    expected = {"pytorch_fid": 2 * 0.25 - 1, "tf": (255 * 0.25 - 128) / 128, "tf_legacy": (255 * 0.25 - 128) / 128}
    for mode, value in expected.items():
        out = resize.preprocess_for_inception(x, mode=mode)
        assert out.shape == (1, 299, 299, 3)
        np.testing.assert_allclose(out, value, rtol=1e-6, err_msg=mode)
    with pytest.raises(ValueError, match="unknown resize mode 'area'"):
        resize.preprocess_for_inception(x, mode="area")
