"""The KL autoencoder (diffusion_jax.models.autoencoder): parity with diffusers' AutoencoderKL
(tests/fixtures/latent_parity, written by scripts/make_latent_fixtures.py: a 3-level network with
perturbed random weights), the posterior (log-variance clipping, sampling, KL), the weight
loader's name and shape checks, and the numpy safetensors reader.

The encoder and decoder are compiled once each (XLA backend optimisation level 0, which
halves compile time on the 2-core CI machine and changes code generation, not the computation)."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models.autoencoder import (
    STABLE_DIFFUSION_VAE,
    AutoencoderKL,
    DiagonalGaussian,
    autoencoder_kwargs_from_config,
    autoencoder_state_dict_shapes,
    load_autoencoder_kl,
    read_safetensors,
    read_state_dict,
)
from diffusion_jax.models.convert import ConversionError

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "latent_parity"
TOLERANCE = 1e-4  # max |ours - reference| / max |reference| in float32 (measured: about 3e-6)
FAST = {"xla_backend_optimization_level": 0}


def nhwc(a):
    return np.transpose(a, (0, 2, 3, 1))


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def vae():
    meta = json.loads((FIXTURES / "vae.json").read_text())
    module = AutoencoderKL(**autoencoder_kwargs_from_config(meta["config"]))
    params = load_autoencoder_kl(module, FIXTURES / "vae_state_dict.safetensors")
    io = dict(np.load(FIXTURES / "vae_io.npz"))
    x, z = nhwc(io["x"]), nhwc(io["z"])
    encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode")).lower(params, x)
    decode = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode")).lower(params, z)
    return dict(
        module=module,
        params=params,
        io=io,
        meta=meta,
        encode=encode.compile(compiler_options=FAST),
        decode=decode.compile(compiler_options=FAST),
    )


def test_encoder_matches_diffusers(vae):
    posterior = vae["encode"](vae["params"], nhwc(vae["io"]["x"]))
    assert isinstance(posterior, DiagonalGaussian)
    assert rel_err(posterior.mean, nhwc(vae["io"]["mean"])) < TOLERANCE
    assert rel_err(posterior.logvar, nhwc(vae["io"]["logvar"])) < TOLERANCE


def test_decoder_matches_diffusers(vae):
    out = vae["decode"](vae["params"], nhwc(vae["io"]["z"]))
    assert out.shape == (2, 16, 16, 3)
    assert rel_err(out, nhwc(vae["io"]["decoded"])) < TOLERANCE
    # The whole autoencoder without sampling: decode(mode(encode(x))).
    recon = vae["decode"](vae["params"], vae["encode"](vae["params"], nhwc(vae["io"]["x"])).mode())
    assert rel_err(recon, nhwc(vae["io"]["reconstruction"])) < TOLERANCE


def test_posterior_clips_logvar_as_the_reference():
    io = np.load(FIXTURES / "vae_io.npz")
    moments = nhwc(io["moments"])
    assert moments[..., 4:].min() < -30 and moments[..., 4:].max() > 20  # the clipping is exercised
    g = DiagonalGaussian.from_moments(jnp.asarray(moments))
    assert rel_err(g.mean, nhwc(io["moments_mean"])) < 1e-7
    assert rel_err(g.logvar, nhwc(io["moments_logvar"])) < 1e-7
    assert rel_err(g.std, nhwc(io["moments_std"])) < 1e-6


def test_posterior_sample_and_kl():
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((2, 2, 2, 3)).astype(np.float32)
    logvar = rng.uniform(-2, 1, (2, 2, 2, 3)).astype(np.float32)

    def fn(mean, logvar, key):
        g = DiagonalGaussian(mean=mean, logvar=logvar)
        expected = g.mean + jnp.exp(0.5 * g.logvar) * jax.random.normal(key, g.mean.shape)
        return g.sample(key), expected, g.kl(), g.mode()

    sample, expected, kl, mode = jax.jit(fn)(mean, logvar, jax.random.PRNGKey(3))
    np.testing.assert_allclose(sample, expected, rtol=1e-6)
    np.testing.assert_array_equal(mode, mean)
    # KL(q || N(0, I)) against a Monte-Carlo estimate of E_q[log q(z) - log N(z; 0, I)].
    eps = rng.standard_normal((100_000, *mean.shape))
    z = mean + np.exp(0.5 * logvar) * eps
    log_ratio = -0.5 * (np.square(eps) + logvar) + 0.5 * np.square(z)
    mc = np.mean(np.sum(log_ratio, axis=(2, 3, 4)), axis=0)
    assert kl.shape == (2,)
    np.testing.assert_allclose(kl, mc, rtol=0.02, atol=0.05)


def test_latent_scaling_and_shapes():
    module = AutoencoderKL(block_out_channels=(8, 8), norm_num_groups=4, scaling_factor=0.5, shift_factor=0.25)
    z = jnp.arange(4.0)
    np.testing.assert_allclose(module.scale_latents(z), (z - 0.25) * 0.5)
    np.testing.assert_allclose(module.unscale_latents(module.scale_latents(z)), z)
    assert module.downsampling_factor == 2
    with pytest.raises(ValueError, match="divisible by 2"):
        jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 6, 3))))
    with pytest.raises(ValueError, match="norm_num_groups=32 must divide"):
        AutoencoderKL(block_out_channels=(48, 64))


def test_stable_diffusion_configuration_names_every_published_tensor():
    # The published VAE: 248 tensors (diffusers' AutoencoderKL with this config), 83,653,863 parameters.
    shapes = autoencoder_state_dict_shapes(AutoencoderKL(**STABLE_DIFFUSION_VAE))
    assert len(shapes) == 248
    assert sum(int(np.prod(s)) for _, s in shapes.values()) == 83_653_863
    assert shapes["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"][1] == (256, 128, 1, 1)
    assert shapes["decoder.mid_block.attentions.0.to_out.0.weight"][1] == (512, 512)


def test_loader_checks_names_and_shapes(vae):
    state = read_state_dict(FIXTURES / "vae_state_dict.safetensors")
    assert set(state) == set(vae["meta"]["state_dict_shapes"])
    module = vae["module"]

    missing = dict(state)
    del missing["decoder.up_blocks.1.resnets.2.norm2.weight"]
    with pytest.raises(ConversionError, match=r"'decoder\.up_blocks\.1\.resnets\.2\.norm2\.weight' is missing"):
        load_autoencoder_kl(module, missing)

    extra = dict(state, **{"encoder.down_blocks.0.attentions.0.to_q.weight": np.zeros((8, 8), np.float32)})
    with pytest.raises(ConversionError, match=r"unexpected tensor 'encoder\.down_blocks\.0\.attentions\.0\.to_q"):
        load_autoencoder_kl(module, extra)

    bad = dict(state, **{"quant_conv.weight": np.zeros((8, 8, 3, 3), np.float32)})
    with pytest.raises(
        ConversionError, match=r"'quant_conv\.weight' has shape \(8, 8, 3, 3\), expected \(8, 8, 1, 1\)"
    ):
        load_autoencoder_kl(module, bad)

    # Older diffusers names of the mid-block attention, and a 'module.' prefix, load the same tree.
    old = {}
    for name, value in state.items():
        for new, legacy in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            name = name.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
        old["module." + name] = value
    assert any(".proj_attn." in n for n in old)
    reloaded = load_autoencoder_kl(module, old)
    jax.tree.map(np.testing.assert_array_equal, reloaded, vae["params"])


def test_safetensors_reader_dtypes():
    got = read_safetensors(FIXTURES / "dtypes.safetensors")
    want = np.load(FIXTURES / "dtypes_expected.npz")
    assert {k: str(v.dtype) for k, v in got.items()} == {
        "f16": "float16",
        "bf16": "bfloat16",
        "i64": "int64",
        "f32": "float32",
    }
    for name in want.files:
        np.testing.assert_array_equal(got[name].astype(want[name].dtype), want[name])


def test_config_translation_refuses_other_autoencoders():
    with pytest.raises(ValueError, match="DownEncoderBlock2D"):
        autoencoder_kwargs_from_config({"down_block_types": ["CrossAttnDownBlock2D"]})
    kwargs = autoencoder_kwargs_from_config(
        {"block_out_channels": [8, 16], "shift_factor": None, "latent_channels": 16}
    )
    assert kwargs == {"block_out_channels": (8, 16), "latent_channels": 16}
