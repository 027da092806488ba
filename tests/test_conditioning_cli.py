"""Controllable generation from the command line (``diffusion-jax sample --task ...``) on a tiny
class-conditional digits network, and the noise-conditional classifier: its training objective,
its use by classifier guidance, and training it from a config.

One module-scoped pair of workdirs (a score network and a classifier, two training steps each)
serves every test; the runs call the command line in-process, with its real argument parsing
and error handling."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _scale_cli import TINY_NET, cli_in_process

from diffusion_jax import conditioning as C
from diffusion_jax.evaluation.digits import load_digits_split

ROOT = pathlib.Path(__file__).resolve().parent.parent

TINY = [
    *TINY_NET,
    "--config.training.batch_size=16",
    "--config.training.n_iters=2",
    "--config.training.n_jitted_steps=1",
    "--config.training.log_freq=1",
    "--config.training.eval_freq=100",
    "--config.training.snapshot_freq=2",
    "--config.training.snapshot_freq_for_preemption=2",
    "--config.training.snapshot_sampling=False",
    "--config.sampling.num_steps=3",
    "--config.optim.warmup=0",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``(score workdir, classifier workdir, inputs .npz)``: a class-conditional EDM network
    (configs/digits/edm_cond.py) and a classifier (configs/digits/classifier.py), both tiny."""
    root = tmp_path_factory.mktemp("cond_cli")
    data = f"--config.data.data_dir={root / 'data'}"
    score, clf = root / "score", root / "classifier"
    config = ROOT / "configs" / "digits"
    assert cli_in_process("train", f"--config={config / 'edm_cond.py'}", f"--workdir={score}", data, *TINY) == 0
    assert cli_in_process("train", f"--config={config / 'classifier.py'}", f"--workdir={clf}", data, *TINY) == 0
    images, labels = load_digits_split("test")
    inputs = root / "inputs.npz"
    np.savez(inputs, images=images[:4], labels=labels[:4])
    return score, clf, inputs


def _task(runs, tmp_path, name, *flags):
    score, _, inputs = runs
    out = tmp_path / name
    argv = ["sample", f"--workdir={score}", f"--out={out}", *flags]
    assert cli_in_process(*argv) == 0
    return np.load(out.with_suffix(".npz")), out


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, observed",
    [
        (["--task=inpaint", "--mask=bottom_half", "--num_steps=3"], "bottom_half"),
        (["--task=inpaint", "--mask=random:0.5", "--method=replacement", "--num_steps=3"], "random"),
        (["--task=outpaint", "--border=2", "--method=pc_projection", "--num_steps=3"], "border"),
        (["--task=super_resolve", "--factor=2", "--num_steps=3"], None),
        (["--task=deblur", "--blur=gaussian:1", "--sigma_y=0.05", "--num_steps=3"], None),
        (["--task=denoise", "--sigma_y=0.2", "--method=pigdm", "--num_steps=3"], None),
    ],
)
def test_inverse_tasks_run_and_keep_the_known_pixels(runs, tmp_path, flags, observed):
    inputs = np.load(runs[2])["images"]
    got, out = _task(runs, tmp_path, "r", f"--input={runs[2]}", *flags)
    x = got["samples"]
    assert x.shape == inputs.shape and np.all(np.isfinite(x))
    assert out.with_suffix(".png").exists()
    settings = json.loads(str(got["settings"]))
    assert settings["task"] == flags[0].split("=")[1] and settings["nfe"] > 0
    assert np.array_equal(got["inputs"], inputs)
    if observed is None:
        return
    mask = got["mask"]
    expected = {
        "bottom_half": np.concatenate([np.ones((4, 8, 1)), np.zeros((4, 8, 1))]),
        "border": np.pad(np.ones((4, 4, 1)), ((2, 2), (2, 2), (0, 0))),
    }
    if observed in expected:
        np.testing.assert_array_equal(mask, expected[observed])
    else:
        assert 0.25 < mask.mean() < 0.75  # random:0.5 on 64 pixels
    # sigma_y = 0: the known pixels come back as given (to float32 rounding of (2v - 1 + 1) / 2).
    known = mask.astype(bool)[None].repeat(4, 0)
    np.testing.assert_allclose(x[known], inputs[known], atol=1e-6)
    assert settings["known_pixels_max_abs_error"] <= 1e-6
    # The hidden pixels are the model's: not the input's, and not the grey of the measurement.
    assert np.max(np.abs(x[~known] - inputs[~known])) > 1e-3


@pytest.mark.slow
def test_edit_and_guidance_tasks(runs, tmp_path):
    score, clf, inputs = runs
    got, _ = _task(runs, tmp_path, "edit", "--task=edit", f"--input={inputs}", "--strength=0.3")
    assert got["samples"].shape == (4, 8, 8, 1) and np.all(np.isfinite(got["samples"]))
    got, _ = _task(runs, tmp_path, "cfg", "--task=class", "--label=3", "--guidance_scale=2", "--num_samples=4")
    assert got["labels"].tolist() == [3] * 4 and np.all(np.isfinite(got["samples"]))
    got, _ = _task(
        runs, tmp_path, "neg", "--task=negative_class", "--negative_label=5", "--guidance_scale=3", "--num_samples=2"
    )
    assert got["negative_labels"].tolist() == [5, 5] and got["labels"].tolist() == [10, 10]  # null: avoid only
    got, _ = _task(runs, tmp_path, "clf", "--task=class", "--labels=1,2", f"--classifier_workdir={clf}")
    assert got["labels"].tolist() == [1, 2] and np.all(np.isfinite(got["samples"]))
    settings = json.loads(str(got["settings"]))
    assert settings["classifier_workdir"] == str(clf)


def _bad_inputs(tmp_path, runs):
    from PIL import Image

    score, clf, inputs = runs
    images = np.load(inputs)["images"]
    files = {
        "big": (np.zeros((2, 16, 16, 1), np.float32), "shape 2x16x16x1"),
        "rgb": (np.zeros((2, 8, 8, 3), np.float32), "3 channel(s); this needs 1"),
        "range": (images * 255.0, "images must be in [0, 1]"),
        "nan": (np.full((1, 8, 8, 1), np.nan, np.float32), "non-finite"),
    }
    cases = []
    for name, (arr, message) in files.items():
        np.savez(tmp_path / f"{name}.npz", images=arr)
        cases.append(([f"--input={tmp_path / f'{name}.npz'}", "--task=inpaint", "--mask=bottom_half"], message))
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / "mask16.png")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "all.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "none.png")
    given = f"--input={inputs}"
    cases += [
        ([given, "--task=inpaint", f"--mask={tmp_path / 'mask16.png'}"], "16x16 pixels; the images are 8x8"),
        ([given, "--task=inpaint", f"--mask={tmp_path / 'all.png'}"], "hides no pixel"),
        ([given, "--task=inpaint", f"--mask={tmp_path / 'none.png'}"], "observes no pixel"),
        ([given, "--task=inpaint", "--mask=random:2"], "random:F with F in (0, 1)"),
        ([given, "--task=inpaint"], "needs --mask"),
        ([given, "--task=colorize"], "colour images (3 channels); this one has 1"),
        ([given, "--task=super_resolve", "--factor=3"], "does not divide"),
        ([given, "--task=deblur", "--blur=box:3"], "gaussian:STD or uniform:SIZE"),
        ([given, "--task=denoise"], "needs --sigma_y > 0"),
        ([given, "--task=inpaint", "--mask=top_half", "--method=daps"], "needs a noisy measurement: sigma_y > 0"),
        ([given, "--task=paint"], "unknown task 'paint'"),
        ([given, "--task=inpaint", "--mask=top_half", "--method=magic"], "unknown method 'magic'"),
        ([given, "--task=inpaint", "--mask=top_half", "--option=bogus=1"], "unknown option(s) ['bogus']"),
        ([given, "--task=inpaint", "--mask=top_half", "--strength=0.5"], "does not take --strength"),
        ([f"--input={tmp_path / 'missing.npz'}", "--task=deblur"], "does not exist"),
        (["--task=deblur"], "needs --input"),
        (["--mask=top_half"], "--mask need(s) --task"),
        (["--task=class"], "needs --label"),
        (["--task=class", "--label=12"], "outside the classes 0..9"),
        (["--task=class", "--label=1", f"--classifier_workdir={score}"], "not a classifier"),
        ([given, "--task=edit", "--strength=1.5"], "strength must be in (0, 1]"),
        ([given, "--task=super_resolve", "--measured"], "shape 4x8x8x1"),  # a measurement is 4x4
    ]
    return cases


@pytest.mark.slow
def test_bad_inputs_exit_2_with_one_message(runs, tmp_path, capsys):
    score = runs[0]
    for flags, message in _bad_inputs(tmp_path, runs):
        capsys.readouterr()
        status = cli_in_process("sample", f"--workdir={score}", f"--out={tmp_path / 'x'}", *flags)
        err = capsys.readouterr().err
        assert status == 2, (flags, err)
        assert message in err, (flags, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (flags, err)
    assert not (tmp_path / "x.npz").exists()


def test_classifier_loss_falls_on_a_toy_problem():
    """Two classes of 8x8 images (bright top half / bright bottom half) noised on the VP SDE: a
    few Adam steps on the classifier objective lower the cross-entropy from ln 2."""
    from diffusion_jax import parametrization as P
    from diffusion_jax import sde as sde_lib
    from diffusion_jax.builders.diffusion import make_model_fn
    from diffusion_jax.losses import UniformTime
    from diffusion_jax.models.classifier import NoiseConditionalClassifier

    sde = sde_lib.get_sde("vpsde")
    param = P.score_sde_parametrization("vpsde", continuous=True, num_scales=1000)
    net = NoiseConditionalClassifier(num_classes=2, nf=8, ch_mult=(1,), num_res_blocks=1)
    params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))["params"]
    labels = jnp.arange(64) % 2
    top = jnp.concatenate([jnp.ones((4, 8, 1)), -jnp.ones((4, 8, 1))])
    x0 = jnp.where(labels[:, None, None, None] == 0, top, -top)
    # Times up to 0.5: the classes are still told apart there (alpha(0.5) ~ 0.5).
    loss_fn = C.classifier_loss_fn(make_model_fn(net, train=True), sde, param, time_sampler=UniformTime(t_max=0.5))
    batch = {"image": x0, "label": labels}
    opt = optax.adam(3e-3)

    @jax.jit
    def step(params, state, key):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    state = opt.init(params)
    first = float(loss_fn(params, batch, jax.random.PRNGKey(99))[0])
    for i in range(40):
        params, state, _ = step(params, state, jax.random.PRNGKey(i))
    last, aux = loss_fn(params, batch, jax.random.PRNGKey(99))
    assert float(last) < 0.5 * first
    assert float(jnp.mean(aux["correct"])) > 0.9


def test_trained_classifier_is_called_with_the_model_inputs_and_guides(x64):
    """``trained_classifier`` feeds the network EDM's input scaling c_in = 1/sqrt(sigma^2 +
    sigma_data^2) and noise label ln(sigma)/4 (written out here, not taken from the library), and
    classifier guidance adds ``scale * grad_x log softmax(logits)[y]`` to the score."""
    from diffusion_jax import parametrization as P
    from diffusion_jax import sde as sde_lib
    from diffusion_jax.models.classifier import NoiseConditionalClassifier

    sde = sde_lib.get_sde("edm", sigma_min=0.002, sigma_max=80.0)
    param = P.edm_parametrization(0.5)
    net = NoiseConditionalClassifier(num_classes=3, nf=8, ch_mult=(1,), num_res_blocks=1)
    params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 1)), jnp.zeros((1,)))["params"]
    params = jax.tree_util.tree_map(  # random weights everywhere, so every input matters
        lambda p: jax.random.normal(jax.random.PRNGKey(p.size), p.shape, p.dtype) * 0.3, params
    )
    fn = C.trained_classifier(net, params, sde, param)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 1), jnp.float64)
    t = jnp.asarray([0.3, 2.0], jnp.float64)

    def by_hand(x):
        c_in = 1.0 / jnp.sqrt(t**2 + 0.25)
        return net.apply({"params": params}, x * c_in[:, None, None, None], jnp.log(t) / 4.0)

    np.testing.assert_allclose(fn(x, t), by_hand(x), rtol=1e-10)
    score = lambda x, t: -x / (1.0 + t[:, None, None, None] ** 2)  # noqa: E731
    labels = jnp.asarray([2, 0])
    guided = C.classifier_guidance(score, fn, labels, sde, scale=1.5)

    def log_p(x):
        return jnp.sum(jax.nn.log_softmax(by_hand(x))[jnp.arange(2), labels])

    np.testing.assert_allclose(guided(x, t), score(x, t) + 1.5 * jax.grad(log_p)(x), rtol=1e-7, atol=1e-12)
    assert float(jnp.max(jnp.abs(jax.grad(log_p)(x)))) > 1e-3  # the classifier term is not zero
