"""Latent diffusion's pipeline: the autoencoder's loss and its discriminator, the training task,
`encode` into a latent data set (identical over 1 and 8 devices), training and sampling in latent
space with decoding, and the refusals (missing latents or autoencoder, latents of another one)."""

import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _clip import needs_vocabulary

from diffusion_jax import data as data_lib
from diffusion_jax.builders import autoencoder as ae_builders
from diffusion_jax.builders.config import ConfigError, load_config
from diffusion_jax.builders.model import caption_tokenizer
from diffusion_jax.data import latent as latent_lib
from diffusion_jax.models.autoencoder import AutoencoderKL
from diffusion_jax.models.discriminator import PatchDiscriminator
from diffusion_jax.training.autoencoder import autoencoder_loss_fn, params_fingerprint, reconstruction_metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent
AE_CONFIG = ROOT / "configs" / "digits" / "autoencoder.py"
LATENT_CONFIG = ROOT / "configs" / "digits" / "latent.py"


def _tiny_ae_config(data_dir, **overrides):
    config = load_config(str(AE_CONFIG))
    config.data.data_dir = str(data_dir)
    config.data.image_size = 8
    a = config.autoencoder
    a.block_out_channels, a.norm_num_groups, a.layers_per_block = (8, 8), 4, 1
    t = config.training
    t.batch_size, t.n_iters, t.n_jitted_steps, t.log_freq = 16, 3, 1, 1
    t.eval_freq, t.snapshot_freq, t.snapshot_freq_for_preemption, t.snapshot_samples = 3, 3, 3, 4
    t.async_checkpointing = False
    config.eval.batch_size = 64
    config.optim.warmup = 0
    for path, value in overrides.items():
        section, key = path.split(".")
        config[section][key] = value
    return config


# -- the loss ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nets():
    ae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 8), norm_num_groups=4, scaling_factor=1.0)
    disc = PatchDiscriminator(channels=8, num_layers=2)
    x = jax.random.uniform(jax.random.PRNGKey(0), (3, 8, 8, 1), minval=-1.0, maxval=1.0)
    params = {
        "autoencoder": ae.init(jax.random.PRNGKey(1), x)["params"],
        "discriminator": disc.init(jax.random.PRNGKey(2), x)["params"],
    }
    return ae, disc, x, params


def test_discriminator_gives_one_logit_per_patch(nets):
    _, disc, x, params = nets
    logits = disc.apply({"params": params["discriminator"]}, x)
    assert logits.shape == (3, 2, 2, 1)
    with pytest.raises(ValueError, match="divisible by 2\\^num_layers = 4"):
        disc.apply({"params": params["discriminator"]}, x[:, :6, :6])


def test_each_network_gets_the_gradient_of_its_own_loss(nets):
    """One loss, one optimiser: d/d(autoencoder) is that of rec + kl_weight KL + w L_G and
    d/d(discriminator) that of the hinge loss L_D, computed here separately by hand."""
    ae, disc, x, params = nets
    w, kl_weight, key = 0.7, 0.01, jax.random.PRNGKey(3)
    fn = autoencoder_loss_fn(ae, disc, reconstruction="l1", kl_weight=kl_weight, disc_weight=w, disc_start=5)
    batch = {"image": x, "step": jnp.full((3,), 5)}
    grads = jax.jit(jax.grad(lambda p: fn(p, batch, key)[0]))(params)

    def decoded(p_ae):
        post = ae.apply({"params": p_ae}, x, method="encode")
        return post, ae.apply({"params": p_ae}, post.sample(key), method="decode")

    def ae_loss(p_ae):
        post, x_hat = decoded(p_ae)
        logits = disc.apply({"params": params["discriminator"]}, x_hat)
        rec = jnp.abs(x_hat - x).sum(axis=(1, 2, 3))
        return jnp.mean(rec + kl_weight * post.kl()) - w * jnp.mean(logits)

    def d_loss(p_d):
        _, x_hat = decoded(params["autoencoder"])
        real, fake = disc.apply({"params": p_d}, x), disc.apply({"params": p_d}, x_hat)
        return 0.5 * (jnp.mean(jax.nn.relu(1 - real)) + jnp.mean(jax.nn.relu(1 + fake)))

    want = {
        "autoencoder": jax.jit(jax.grad(ae_loss))(params["autoencoder"]),
        "discriminator": jax.jit(jax.grad(d_loss))(params["discriminator"]),
    }
    for got, ref in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(got, ref, rtol=2e-4, atol=1e-6)


def test_discriminator_starts_at_disc_start(nets):
    ae, disc, x, params = nets
    key = jax.random.PRNGKey(4)
    with_disc = autoencoder_loss_fn(ae, disc, disc_weight=0.5, disc_start=10)
    without = autoencoder_loss_fn(ae, None)
    before = with_disc(params, {"image": x, "step": jnp.full((3,), 9)}, key)
    after = with_disc(params, {"image": x, "step": jnp.full((3,), 10)}, key)
    plain = without({"autoencoder": params["autoencoder"]}, {"image": x}, key)
    np.testing.assert_allclose(before[0], plain[0], rtol=1e-6)
    expected = plain[0] + 0.5 * after[1]["g_loss"] + after[1]["d_loss"]
    np.testing.assert_allclose(after[0], expected, rtol=1e-5)
    assert abs(float(after[0] - plain[0])) > 1e-3


def test_reconstruction_metrics_skip_padding_and_use_image_units(nets):
    ae, _, x, params = nets
    x_hat = np.asarray(ae.apply({"params": params["autoencoder"]}, x))
    err = (x_hat - np.asarray(x)) / 2.0  # centred data: units of the [0, 1] range
    sums = reconstruction_metrics(ae)(params["autoencoder"], {"image": x, "mask": np.array([True, True, False])})
    assert float(sums["count"]) == 2
    np.testing.assert_allclose(sums["abs"], np.abs(err[:2]).mean(axis=(1, 2, 3)).sum(), rtol=1e-5)
    np.testing.assert_allclose(sums["sq"], np.square(err[:2]).mean(axis=(1, 2, 3)).sum(), rtol=1e-5)
    psnr = -10 * np.log10(np.square(err[:2]).mean(axis=(1, 2, 3)))
    np.testing.assert_allclose(sums["psnr"], psnr.sum(), rtol=1e-5)


def test_fingerprint_names_the_values():
    p = {"b": {"kernel": np.ones((2, 3), np.float32)}, "a": np.arange(4, dtype=np.float32)}
    q = {"a": np.arange(4, dtype=np.float32), "b": {"kernel": np.ones((2, 3), np.float32)}}
    assert params_fingerprint(p) == params_fingerprint(q)
    q["b"]["kernel"][1, 2] = np.nextafter(np.float32(1), np.float32(2))
    assert params_fingerprint(p) != params_fingerprint(q)


# -- the latent data set format -----------------------------------------------------------------


def _write_set(directory, n_train=10, n_eval=4, scale=2.0):
    rng = np.random.default_rng(0)
    z = {s: rng.normal(size=(n, 2, 2, 3)).astype(np.float32) for s, n in (("train", n_train), ("eval", n_eval))}
    for split, n in (("train", n_train), ("eval", n_eval)):
        # Two writers, each its strided shard, as two processes would.
        for p in range(2):
            idx = np.arange(p, n, 2)
            latent_lib.write_shard(
                latent_lib.shard_path(directory, split, p, 2), indices=idx, labels=idx % 3, latents=z[split][idx]
            )
    meta = {
        "latent_shape": [2, 2, 3],
        "sizes": {"train": n_train, "eval": n_eval},
        "scale_factor": scale,
        "value_range": [-5.0, 5.0],
        "num_classes": 3,
        "centered": True,
        "autoencoder": {"workdir": "/nowhere", "step": 1, "fingerprint": "0" * 64},
    }
    latent_lib.write_metadata(directory, meta)
    return z


def test_latent_set_reads_through_the_grain_pipeline(tmp_path):
    from diffusion_jax import data

    z = _write_set(tmp_path)
    source = data.load("latent", split="eval", latent_dir=tmp_path)
    assert source.info.shape == (2, 2, 3) and source.info.num_levels is None and source.info.num_classes == 3
    rows = source.read(np.arange(len(source)))
    order = np.argsort(rows["index"])
    np.testing.assert_array_equal(rows["latent"][order], z["eval"])
    np.testing.assert_array_equal(rows["label"][order], np.arange(4) % 3)
    seen, labels = [], []
    for batch in data.eval_iterator(source, batch_size=3, shard_index=0, shard_count=1):
        seen.append(batch["image"][batch["mask"]])
        labels.append(batch["label"][batch["mask"]])
    got = np.concatenate(seen)
    np.testing.assert_allclose(np.sort(got.ravel()), np.sort(2.0 * z["eval"].ravel()), rtol=1e-6)  # scaled
    assert len(np.concatenate(labels)) == 4
    with pytest.raises(ValueError, match="holds 2x2x3 latents, but image_size=4"):
        data.load("latent", split="train", latent_dir=tmp_path, image_size=4)
    with pytest.raises(FileNotFoundError, match="diffusion-jax encode"):
        data.load("latent", split="train", latent_dir=tmp_path / "missing")


# -- end to end: train, eval, encode, latent diffusion, refusals ---------------------------------


@pytest.fixture(scope="module")
def trained_ae(tmp_path_factory):
    from diffusion_jax import modes

    root = tmp_path_factory.mktemp("latent")
    config = _tiny_ae_config(root / "data")
    modes.train(config, root / "ae")
    return root, config


def test_autoencoder_trains_resumes_and_reports_reconstruction(trained_ae):
    from diffusion_jax import modes

    root, config = trained_ae
    work = root / "ae"
    assert (work / "samples" / "reconstructions_00000003.png").is_file()
    history = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert {h["split"] for h in history} >= {"train", "eval"}
    assert all(np.isfinite(h["loss"]) for h in history if h["split"] == "train")
    more = config.copy_and_resolve_references()
    more.training.n_iters = 4
    summary = modes.train(more, work)
    assert (summary.start_step, summary.final_step) == (3, 4)
    result = modes.evaluate(more, work)
    assert result["step"] == 4 and result["examples"] == 297  # the digits' test split
    assert 0 < result["mae"] < 1 and 0 < result["mse"] < 1
    assert json.loads((work / "eval" / "reconstruction_00000004.json").read_text())["mae"] == result["mae"]


@pytest.fixture(scope="module")
def encoded(trained_ae):
    from diffusion_jax import modes

    root, config = trained_ae
    out = modes.encode(config.copy_and_resolve_references(), root / "ae", out=str(root / "latents1"))
    return root, config, out


def test_encode_writes_a_scaled_deterministic_latent_set(encoded):
    root, config, out = encoded
    meta = latent_lib.read_metadata(out)
    restored = ae_builders.restore_autoencoder(root / "ae")
    assert meta["autoencoder"]["fingerprint"] == restored.fingerprint and meta["latent_shape"] == [4, 4, 4]
    assert meta["sizes"] == {"train": 1500, "eval": 297}
    source = latent_lib.LatentData().load(split="train", options=_Options(out))
    rows = source.read(np.arange(len(source)))
    # 1 / std of every element of the train latents
    np.testing.assert_allclose(meta["scale_factor"], 1.0 / rows["latent"].astype(np.float64).std(), rtol=1e-6)
    # The posterior mean of the examples, recomputed here from the same parameters.
    from diffusion_jax.builders.data import build_data

    batch = next(iter(build_data(config, split="train", evaluation=True)))
    mean = restored.module.apply({"params": restored.params}, batch["image"][:8], method="encode").mean
    np.testing.assert_allclose(rows["latent"][np.argsort(rows["index"])][:8], mean, rtol=1e-5, atol=1e-6)


class _Options:
    def __init__(self, latent_dir):
        self.latent_dir, self.image_size, self.num_channels = os.fspath(latent_dir), None, None
        self.latent_captions = True


def test_encode_is_identical_on_eight_devices(encoded):
    root, config, out = encoded
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="--xla_force_host_platform_device_count=8")
    cmd = [sys.executable, "-m", "diffusion_jax", "encode", f"--workdir={root / 'ae'}", f"--out={root / 'latents8'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for split in ("train", "eval"):
        one = latent_lib.LatentData().load(split=split, options=_Options(out))
        eight = latent_lib.LatentData().load(split=split, options=_Options(root / "latents8"))
        a, b = one.read(np.arange(len(one))), eight.read(np.arange(len(eight)))
        np.testing.assert_array_equal(a["index"], b["index"])
        np.testing.assert_array_equal(a["latent"], b["latent"])
    assert (
        json.loads((root / "latents8" / "latents.json").read_text())["scale_factor"]
        == json.loads((out / "latents.json").read_text())["scale_factor"]
    )


def _latent_config(latent_dir):
    config = load_config(str(LATENT_CONFIG))
    config.data.latent_dir = str(latent_dir)
    m = config.model
    m.nf, m.num_res_blocks, m.attn_resolutions, m.ch_mult = 8, 1, (), (1,)
    t = config.training
    t.batch_size, t.n_iters, t.n_jitted_steps, t.log_freq, t.eval_freq = 16, 2, 1, 1, 2
    t.snapshot_freq, t.snapshot_freq_for_preemption, t.snapshot_samples = 2, 2, 4
    t.async_checkpointing = False
    config.sampling.num_steps, config.sampling.batch_size = 3, 4
    config.eval.batch_size, config.optim.warmup = 64, 0
    return config


def test_latent_diffusion_trains_and_samples_decoded_images(encoded):
    from diffusion_jax import modes

    root, _, out = encoded
    config = _latent_config(out)
    modes.train(config, root / "ldm")
    assert (root / "ldm" / "samples" / "step_00000002.png").is_file()
    stored = load_config(str(root / "ldm" / "config.py"))  # as `sample` reads it: the shape resolved
    path = modes.sample(stored, root / "ldm", num_samples=4, out=str(root / "s"), labels=[3])
    saved = np.load(path)
    assert saved["latents"].shape == (4, 4, 4, 4) and saved["samples"].shape == (4, 8, 8, 1)
    assert saved["samples"].min() >= 0 and saved["samples"].max() <= 1


def test_refusals(encoded, tmp_path):
    from diffusion_jax import modes

    root, ae_config, out = encoded
    with pytest.raises(ConfigError, match="holds no latents.json"):
        modes.train(_latent_config(tmp_path / "nothing"), tmp_path / "w1")
    # Another autoencoder (other initial weights) decoding these latents.
    other = _tiny_ae_config(ae_config.data.data_dir, **{"training.n_iters": 1})
    other.seed = 7
    modes.train(other, tmp_path / "other_ae")
    config = _latent_config(out)
    config.data.autoencoder_workdir = str(tmp_path / "other_ae")
    with pytest.raises(ConfigError, match="written by another autoencoder"):
        modes.train(config, tmp_path / "w2")
    config.data.autoencoder_workdir = str(tmp_path / "no_ae")
    with pytest.raises(ConfigError, match="autoencoder workdir .* does not exist"):
        modes.train(config, tmp_path / "w3")
    with pytest.raises(ConfigError, match="draws no samples"):
        modes.sample(ae_config.copy_and_resolve_references(), root / "ae", num_samples=2)


# -- text conditioning ---------------------------------------------------------------------------


def test_digit_captions_split_each_class_in_thirds():
    from diffusion_jax.data.captions import CAPTIONERS

    cap = CAPTIONERS["digits"]
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 30)
    ink = rng.uniform(size=300) + labels  # ink levels differ by class: thresholds must be per class
    texts = cap.captions(ink, labels, cap.edges(ink, labels))
    for k, name in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")):
        own = [t for t, y in zip(texts, labels) if y == k]
        assert own.count(f"a thin {name}") == 10 and own.count(f"a bold {name}") == 10 and own.count(f"a {name}") == 10
    thinnest = np.argmin(np.where(labels == 7, ink, np.inf))
    assert texts[thinnest] == "a thin seven"


class _Echo(nn.Module):
    """A stand-in network: its output is x plus the sum over tokens of the context's first feature
    (a mean over features would be 0 after the encoder's final LayerNorm)."""

    @nn.compact
    def __call__(self, x, c_noise, *, context=None, train=False):
        return x + jnp.sum(context[:, :, 0], axis=1)[:, None, None, None]


@pytest.fixture(scope="module")
def echo_text():
    from diffusion_jax.models.text import tiny_text_encoder
    from diffusion_jax.models.text_conditioned import TextConditioned

    tok = caption_tokenizer("digits")
    module = TextConditioned(
        network=_Echo(), encoder=tiny_text_encoder(tok.vocab_size, tok.max_length, hidden_size=16), caption_dropout=1.0
    )
    x = jnp.zeros((2, 4, 4, 1))
    params = module.init({"params": jax.random.PRNGKey(0)}, x, jnp.zeros((2,)))["params"]
    return tok, module, params, x


def test_text_conditioned_null_caption_padding_and_dropout(echo_text):
    tok, module, params, x = echo_text
    ids = jnp.asarray(tok(["a bold seven", "a one"]))

    def run(context, train=False):
        return module.apply(
            {"params": params},
            x,
            jnp.zeros((2,)),
            context=context,
            train=train,
            rngs={"dropout": jax.random.PRNGKey(1)},
        )

    null = run(None)
    cond = run(ids)
    assert float(jnp.abs(cond[0] - cond[1]).max()) > 1e-4  # the caption reaches the network
    assert float(jnp.abs(cond - null).max()) > 1e-4
    np.testing.assert_allclose(run(jnp.zeros_like(ids)), null, rtol=1e-6)  # padding rows: the null caption
    np.testing.assert_allclose(run(ids, train=True), null, rtol=1e-6)  # caption_dropout = 1 drops every caption
    with pytest.raises(ValueError, match="expected token ids of shape"):
        run(ids[:, :3])


def test_text_guidance_combines_prompt_and_negative_prompt(echo_text):
    """(1 + w) s(x | c) - w s(x | c_neg), through the parametrization (here a VP score network)."""
    from diffusion_jax import parametrization as param_lib
    from diffusion_jax import sde as sde_lib
    from diffusion_jax.conditioning.text import text_guided_score

    tok, module, params, _ = echo_text
    sde = sde_lib.get_sde("vpsde")
    par = param_lib.score_sde_parametrization("vpsde", continuous=True, num_scales=1000)
    x, t = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 4, 1)), jnp.full((2,), 0.5)
    pos, neg = jnp.asarray(tok(["a thin two"] * 2)), jnp.asarray(tok(["a two"] * 2))
    s_pos = text_guided_score(module, sde, par, params, pos, neg, 0.0)(x, t)
    s_neg = text_guided_score(module, sde, par, params, neg, pos, 0.0)(x, t)
    guided = text_guided_score(module, sde, par, params, pos, neg, 2.5)(x, t)
    np.testing.assert_allclose(guided, 3.5 * s_pos - 2.5 * s_neg, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(s_pos - s_neg).max()) > 1e-4


def _text_config(latent_dir):
    config = _latent_config(latent_dir)
    config.data.captions = "digits"
    m = config.model
    m.num_classes, m.text_encoder, m.context_dim, m.cross_attn_resolutions, m.cross_attn_heads = 0, "tiny", 16, (4,), 2
    return config


def _train_and_prompt(config, workdir, out):
    """Train ``config`` (2 steps) into ``workdir``, sample 4 images of "a bold seven" with the
    negative prompt "a one" at w = 2, check what was saved; the stored config."""
    from diffusion_jax import modes

    modes.train(config, workdir)
    stored = load_config(str(workdir / "config.py"))
    kwargs = dict(prompt="a bold seven", negative_prompt="a one", guidance_scale=2.0)
    saved = np.load(modes.sample(stored, workdir, num_samples=4, out=str(out), **kwargs))
    assert saved["samples"].shape == (4, 8, 8, 1) and np.all(np.isfinite(saved["samples"]))
    assert str(saved["prompt"]) == "a bold seven" and str(saved["negative_prompt"]) == "a one"
    return stored


def test_text_to_latents_trains_samples_and_refuses_bad_prompts(encoded, tmp_path):
    import shutil

    from diffusion_jax import modes

    root, _, out = encoded
    meta = latent_lib.read_metadata(out)
    assert meta["captions"]["name"] == "digits" and meta["captions"]["max_length"] == 5
    source = data_lib.load("latent", split="train", latent_dir=out, latent_captions=True)
    rows = source.read(np.arange(len(source)))
    tok = caption_tokenizer("digits")
    names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    texts = [tok.decode(ids) for ids in rows["context"][:50]]
    assert all(t.split()[-1] == names[y] for t, y in zip(texts, rows["label"][:50]))
    config = _train_and_prompt(_text_config(out), root / "t2i", tmp_path / "p")
    with pytest.raises(ConfigError, match="unknown word 'zebra'"):
        modes.sample(config, root / "t2i", num_samples=4, prompt="a zebra")
    with pytest.raises(ConfigError, match="at most 3 fit"):
        modes.sample(config, root / "t2i", num_samples=4, prompt="a thin bold seven")
    with pytest.raises(ConfigError, match="no text encoder"):
        modes.sample(_latent_config(out), tmp_path / "plain", num_samples=4, prompt="a seven")
    # A latent set without captions cannot feed a text model.
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    stored = json.loads((bare / "latents.json").read_text())
    stored["captions"] = None
    (bare / "latents.json").write_text(json.dumps(stored))
    with pytest.raises(ConfigError, match="holds no captions"):
        modes.train(_text_config(bare), tmp_path / "t2i_bare")


# -- a frozen text encoder: caption embeddings stored with the latents -----------------------------


# A CLIP text encoder's config.json (transformers' CLIPTextConfig), shrunk to width 16.
_TINY_CLIP = dict(
    vocab_size=49408,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=49406,
    eos_token_id=49407,
)


def _write_clip(directory, *, seed=0, **changes):
    """A random CLIP text encoder in transformers' layout: config.json and model.safetensors."""
    from flax import traverse_util

    from diffusion_jax.models.convert import write_safetensors
    from diffusion_jax.models.text import TextTransformer, clip_text_kwargs_from_config, clip_text_state_dict_shapes

    config = dict(_TINY_CLIP, **changes)
    module = TextTransformer(**clip_text_kwargs_from_config(config))
    params = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))["params"]
    # Non-zero biases and LayerNorm parameters, so a misplaced one would show.
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(seed + 1), p.shape), params)
    flat = traverse_util.flatten_dict(params)
    state = {}
    for name, (path, _) in clip_text_state_dict_shapes(module).items():
        value = np.asarray(flat[path])
        state[f"text_model.{name}"] = value.T if path[-1] == "kernel" else value
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    write_safetensors(directory / "model.safetensors", state)
    return module, params


def test_safetensors_writer_round_trips(tmp_path):
    import ml_dtypes

    from diffusion_jax.models.convert import read_safetensors, write_safetensors

    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.normal(size=(3, 5)).astype(np.float32),
        "f16_big_endian": rng.normal(size=(7,)).astype(">f2"),
        "bf16": rng.normal(size=(2, 2)).astype(ml_dtypes.bfloat16),
        "i64": np.arange(5, dtype=np.int64) - 2,
        "flag": np.array([True, False, True]),
        "scalar": np.float32(3.5),
    }
    write_safetensors(tmp_path / "t.safetensors", tensors, metadata={"format": "pt"})
    raw = (tmp_path / "t.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    assert n % 8 == 0 and header["__metadata__"] == {"format": "pt"} and header["f16_big_endian"]["dtype"] == "F16"
    got = read_safetensors(tmp_path / "t.safetensors")
    assert list(got) == list(tensors)
    for name, value in tensors.items():
        assert got[name].shape == np.shape(value) and got[name].dtype.newbyteorder("=") == value.dtype.newbyteorder("=")
        np.testing.assert_array_equal(got[name], value)
    with pytest.raises(ValueError, match="complex64"):
        write_safetensors(tmp_path / "c.safetensors", {"c": np.zeros(2, np.complex64)})


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip") / "text_encoder"
    module, params = _write_clip(directory)
    return directory, module, params


@pytest.fixture(scope="module")
def embedded(trained_ae, clip_dir):
    from diffusion_jax import modes

    root, config = trained_ae
    out = modes.encode(
        config.copy_and_resolve_references(), root / "ae", out=str(root / "latents_clip"), text_encoder=str(clip_dir[0])
    )
    return root, out


def _sorted_rows(latent_dir):
    source = data_lib.load("latent", split="train", latent_dir=latent_dir, latent_captions=True)
    rows = source.read(np.arange(len(source)))
    return source, rows[np.argsort(rows["index"])]


@needs_vocabulary
def test_encode_stores_the_frozen_encoders_caption_embeddings(embedded, encoded, clip_dir):
    """The stored context is the encoder's own last hidden state of the example's caption at all 77
    positions, truncated to the longest caption's token count (exact: the attention is causal)."""
    from diffusion_jax.models.tokenizer import CLIPTokenizer

    root, out = embedded
    directory, module, params = clip_dir
    meta = latent_lib.read_metadata(out)
    tok = CLIPTokenizer.from_package()
    _, ids_rows = _sorted_rows(encoded[2])
    texts = [caption_tokenizer("digits").decode(ids) for ids in ids_rows["context"]]
    length = max(len(tok.encode(t)) + 2 for t in texts)
    captions = meta["captions"]
    assert captions["name"] == "digits" and captions["max_length"] == length and "tokenizer" not in captions
    assert captions["embedding"] == {
        "encoder": "clip",
        "path": str(directory.absolute()),
        "fingerprint": params_fingerprint(jax.tree.map(np.asarray, params)),
        "hidden_size": 16,
    }
    source, rows = _sorted_rows(out)
    assert rows["context"].dtype == np.float32 and rows["context"].shape == (1500, length, 16)
    np.testing.assert_array_equal(rows["latent"], ids_rows["latent"])  # the same autoencoder, the same latents
    pick = np.arange(0, 1500, 50)
    full = module.apply({"params": params}, jnp.asarray(tok([texts[i] for i in pick]))).last_hidden_state
    assert full.shape == (len(pick), 77, 16)
    np.testing.assert_allclose(rows["context"][pick], np.asarray(full)[:, :length], rtol=0, atol=1e-6)
    batch = source.get_batch(np.arange(4))
    assert batch["context"].dtype == np.float32 and batch["context"].shape == (4, length, 16)


class _Attend(nn.Module):
    """A stand-in network: one cross-attention block from the pixels to the context."""

    @nn.compact
    def __call__(self, x, c_noise, *, context=None, train=False):
        from diffusion_jax.models.layers import CrossAttnBlock

        return CrossAttnBlock(num_heads=2, init_scale=1.0)(x, context)


def test_embedding_conditioned_null_token_padding_and_dropout():
    from diffusion_jax.models.text_conditioned import EmbeddingConditioned

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 8))
    emb = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 16))
    module = EmbeddingConditioned(network=_Attend(), context_dim=16, caption_dropout=1.0)
    params = module.init({"params": jax.random.PRNGKey(2)}, x, jnp.zeros((2,)))["params"]
    np.testing.assert_array_equal(params["null_context"], np.zeros((1, 16)))  # zeros at initialisation
    params = dict(params, null_context=jax.random.normal(jax.random.PRNGKey(3), (1, 16)))

    def run(context, train=False, m=module):
        return m.apply(
            {"params": params},
            x,
            jnp.zeros((2,)),
            context=context,
            train=train,
            rngs={"dropout": jax.random.PRNGKey(4)},
        )

    null = run(None)  # the null token as a (B, 1, D) context
    cond = run(emb)
    assert float(jnp.abs(cond - null).max()) > 1e-3 and float(jnp.abs(run(emb[::-1]) - cond).max()) > 1e-3
    # Zero rows become the null token at all 5 positions; attention over 5 copies equals attention over one.
    np.testing.assert_allclose(run(jnp.zeros_like(emb)), null, rtol=1e-6, atol=1e-6)
    mixed = run(emb.at[1].set(0.0))
    np.testing.assert_allclose(mixed[0], cond[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mixed[1], null[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(run(emb, train=True), null, rtol=1e-6, atol=1e-6)  # caption_dropout = 1 drops all
    keep = EmbeddingConditioned(network=_Attend(), context_dim=16, caption_dropout=0.0)
    np.testing.assert_allclose(run(emb, train=True, m=keep), cond, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="expected caption embeddings of shape"):
        run(emb[:, :, :8])


def _embedding_config(latent_dir, context_dim=16):
    config = _text_config(latent_dir)
    config.model.text_encoder, config.model.context_dim = "precomputed", context_dim
    return config


@needs_vocabulary
def test_text_embeddings_train_sample_and_refuse(embedded, encoded, clip_dir, tmp_path):
    import shutil

    from diffusion_jax import modes
    from diffusion_jax.builders.text_encoder import load_frozen_text_encoder
    from diffusion_jax.modes.prompts import prompt_context

    root, out = embedded
    directory = clip_dir[0]
    length = latent_lib.read_metadata(out)["captions"]["max_length"]
    config = _train_and_prompt(_embedding_config(out), root / "t2i_clip", tmp_path / "p")
    # The prompt is embedded by the recorded encoder at the stored length; no negative prompt: zeros (the null token).
    text = prompt_context(config, "a bold seven")
    want = load_frozen_text_encoder(directory).embed(["a bold seven"], length)
    np.testing.assert_array_equal(text.context, want)
    assert text.negative_context.shape == (1, length, 16) and not text.negative_context.any()
    long = "a very thin and rather bold seven"
    with pytest.raises(ConfigError, match=rf"has 9 tokens with the start and end tokens; at most {length} fit \(the"):
        modes.sample(config, root / "t2i_clip", num_samples=4, prompt=long)
    # The encoder moved away, then replaced by other weights.
    moved = directory.with_name("moved")
    directory.rename(moved)
    try:
        with pytest.raises(ConfigError, match="which is gone"):
            modes.sample(config, root / "t2i_clip", num_samples=4, prompt="a seven")
    finally:
        moved.rename(directory)
    original = (directory / "model.safetensors").read_bytes()
    _write_clip(tmp_path / "other", seed=5)
    shutil.copy(tmp_path / "other" / "model.safetensors", directory / "model.safetensors")
    try:
        with pytest.raises(ConfigError, match="is not the one that wrote these embeddings"):
            prompt_context(config, "a seven")  # what `sample` calls first
    finally:
        (directory / "model.safetensors").write_bytes(original)
    # Embeddings of another width, a tiny text model on embeddings, embeddings expected from token ids.
    with pytest.raises(ConfigError, match="embeddings of .* have width 16 .* set model.context_dim = 16"):
        modes.train(_embedding_config(out, context_dim=32), tmp_path / "w1")
    with pytest.raises(ConfigError, match="'tiny' reads the captions' token ids, but .* holds their embeddings"):
        modes.train(_text_config(out), tmp_path / "w2")
    with pytest.raises(ConfigError, match="'precomputed' reads caption embeddings, but .* holds the captions' token"):
        modes.train(_embedding_config(encoded[2]), tmp_path / "w3")


@needs_vocabulary
def test_frozen_text_encoder_refusals(trained_ae, clip_dir, tmp_path, monkeypatch):
    from diffusion_jax import modes
    from diffusion_jax.builders.text_encoder import load_frozen_text_encoder
    from diffusion_jax.models.tokenizer import CLIPTokenizer

    encoder = load_frozen_text_encoder(clip_dir[0])
    assert encoder.hidden_size == 16 and encoder.token_count(["a seven", ""]).tolist() == [4, 2]
    with pytest.raises(ConfigError, match="'a bold seven' has 5 tokens with the start and end tokens; at most 4 fit"):
        encoder.embed(["a seven", "a bold seven"], 4)
    with pytest.raises(ConfigError, match="does not exist"):
        load_frozen_text_encoder(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        load_frozen_text_encoder(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(_TINY_CLIP))
    with pytest.raises(ConfigError, match="has none of model.safetensors, pytorch_model.bin, model.npz"):
        load_frozen_text_encoder(tmp_path / "empty")
    _write_clip(tmp_path / "small_vocab", vocab_size=1000)
    with pytest.raises(ConfigError, match="vocab_size 1000 is smaller than CLIP's tokenizer's 49408 .ids up to 49407"):
        load_frozen_text_encoder(tmp_path / "small_vocab")
    wide = tmp_path / "wide"
    _write_clip(wide)  # weights of width 16 under a config of width 32
    (wide / "config.json").write_text(json.dumps(dict(_TINY_CLIP, hidden_size=32)))
    with pytest.raises(ConfigError, match="model.safetensors: CLIP text weights: tensor .* has shape"):
        load_frozen_text_encoder(wide)

    def missing(**kwargs):
        raise ImportError("CLIP's BPE vocabulary ships inside the open-clip-torch wheel, which is not installed")

    with monkeypatch.context() as m:
        m.setattr(CLIPTokenizer, "from_package", missing)
        with pytest.raises(ConfigError, match="needs CLIP's tokenizer: .* open-clip-torch wheel, which is not"):
            load_frozen_text_encoder(clip_dir[0])
    # encode --text_encoder embeds data.captions: without captions there is nothing to embed.
    root, config = trained_ae
    bare = config.copy_and_resolve_references()
    bare.data.captions = ""
    with pytest.raises(ConfigError, match="embeds the captions of data.captions, which this config leaves empty"):
        modes.encode(bare, root / "ae", out=str(tmp_path / "never"), text_encoder=str(clip_dir[0]))


def test_command_line_refusals(trained_ae):
    """One message and exit status 2, never a traceback."""
    root, _ = trained_ae
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cases = (
        (["encode", f"--workdir={root / 'ae'}"], "the following arguments are required: --out"),
        (
            ["encode", f"--workdir={root / 'ae'}", f"--out={root / 'never'}", "--text_encoder=/nonexistent"],
            "text encoder directory /nonexistent does not exist",
        ),
        (["sample", f"--workdir={root / 'ae'}", "--prompt=a seven"], "draws no samples"),
        (["sample", f"--workdir={root / 'ae'}", "--prompt=a seven", "--label=3"], "does not combine with"),
    )
    for args, message in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "diffusion_jax", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=600,
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
