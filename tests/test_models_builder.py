"""build_model(config): score_sde's config keys -> typed network fields, with checked values."""

import pathlib
import sys

import jax.numpy as jnp
import ml_collections
import pytest

from diffusion_jax.builders.config import ConfigError, default_config, validate_config, with_defaults
from diffusion_jax.builders.model import build_model, model_input_shape
from diffusion_jax.models import DDPM, NCSNpp, NCSNv2_128

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import model_configs  # noqa: E402


def ncsnpp_config():
    return model_configs.cifar10_ncsnpp_continuous()


def test_cifar10_configs_build_the_published_networks():
    ncsnpp = build_model(model_configs.cifar10_ncsnpp_continuous())
    assert isinstance(ncsnpp, NCSNpp)
    assert (ncsnpp.fir, ncsnpp.embedding_type, ncsnpp.progressive_input, ncsnpp.scale_by_sigma) == (
        True,
        "fourier",
        "residual",
        True,
    )
    assert (ncsnpp.centered, ncsnpp.num_res_blocks, ncsnpp.fir_kernel, ncsnpp.fourier_scale) == (
        False,
        4,
        (1, 3, 3, 1),
        16.0,
    )
    ddpmpp = build_model(model_configs.cifar10_ddpmpp_deep_continuous())
    assert (ddpmpp.fir, ddpmpp.embedding_type, ddpmpp.progressive_input, ddpmpp.centered, ddpmpp.num_res_blocks) == (
        False,
        "positional",
        "none",
        True,
        8,
    )
    ddpm = build_model(model_configs.cifar10_ddpm())
    assert isinstance(ddpm, DDPM) and ddpm.num_res_blocks == 2 and ddpm.centered
    # Fields this project added default to "off".
    assert (ncsnpp.num_classes, ncsnpp.cross_attn_resolutions, ncsnpp.remat, ncsnpp.dtype) == (
        0,
        (),
        False,
        jnp.float32,
    )
    assert model_input_shape(model_configs.cifar10_ddpm(), batch_size=8) == (8, 32, 32, 3)


def test_new_keys_reach_the_network():
    config = ncsnpp_config()
    config.model.num_classes = 10
    config.model.cross_attn_resolutions = (16, 8)
    config.model.context_dim = 64
    config.model.remat = True
    config.model.dtype = "bfloat16"
    m = build_model(config)
    assert (m.num_classes, m.null_label, m.cross_attn_resolutions, m.context_dim, m.remat, m.dtype) == (
        10,
        10,
        (16, 8),
        64,
        True,
        jnp.bfloat16,
    )


def test_ncsnv2_config():
    config = ml_collections.ConfigDict()
    config.model = dict(
        name="ncsnv2_128",
        nf=32,
        normalization="InstanceNorm++",
        nonlinearity="elu",
        sigma_min=0.01,
        sigma_max=190.0,
        num_scales=1086,
        interpolation="bilinear",
        scale_by_sigma=True,
    )
    config.data = dict(image_size=128, num_channels=3, centered=False)
    m = build_model(config)
    assert isinstance(m, NCSNv2_128) and (m.nf, m.num_scales, m.sigma_max) == (32, 1086, 190.0)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("name", "unet", r"model\.name = 'unet' is not allowed; valid: ncsnpp, ddpm, ncsnv2_64"),
        ("progressive", "skip", r"model\.progressive = 'skip' is not allowed; valid: none, output_skip, residual"),
        ("progressive_combine", "mean", r"model\.progressive_combine = 'mean' is not allowed; valid: sum, cat"),
        ("resblock_type", "resnet", r"model\.resblock_type = 'resnet' is not allowed"),
        ("embedding_type", "learned", r"model\.embedding_type = 'learned' is not allowed"),
        ("dropout", 1.5, r"model\.dropout = 1\.5 must be in \[0, 1\)"),
        ("nf", 0, r"model\.nf = 0 must be > 0"),
        ("nf", 128.0, r"model\.nf = 128\.0 has the wrong type; expected int"),
        ("ch_mult", (), r"model\.ch_mult = \(\) must not be empty"),
        (
            "attn_resolutions",
            (7,),
            r"config\.model\.attn_resolutions = \(7,\): resolutions must be among the network's \[32, 16, 8, 4\]",
        ),
        ("fir", "yes", r"model\.fir = 'yes' has the wrong type; expected bool"),
        ("conv_size", 5, r"model\.conv_size = 5 must be 3"),
        ("attention_type", "legacy", r"model\.attention_type = 'legacy' is not allowed"),
        ("normalization", "BatchNorm", r"model\.normalization = 'BatchNorm' is not allowed"),
        ("nonlinearity", "gelu", r"model\.nonlinearity = 'gelu' is not allowed"),
        ("sigma_min", 60.0, r"model\.sigma_min = 60\.0 must be below model\.sigma_max = 50"),
        ("dtype", "float16", r"model\.dtype = 'float16' is not allowed; valid: float32, bfloat16"),
        ("num_classes", -1, r"model\.num_classes = -1 must be >= 0"),
        ("cross_attn_resolutions", (16,), r"model\.cross_attn_resolutions needs model\.context_dim"),
        ("cross_attn_heads", 0, r"model\.cross_attn_heads = 0 must be > 0"),
    ],
)
def test_invalid_values_name_the_key(key, value, message):
    """Every model key is checked once, by the schema, before the network is built."""
    config = with_defaults(ncsnpp_config())
    with config.model.ignore_type():
        config.model[key] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_partial_configs_take_the_schema_defaults():
    """score_sde's model and data sections alone build: missing keys take the schema's defaults."""
    config = ncsnpp_config()
    del config.model["skip_rescale"]
    assert build_model(config).skip_rescale is default_config().model.skip_rescale
    config = ncsnpp_config()
    config.data.image_size = 30
    with pytest.raises(
        ValueError,
        match=r"config\.data\.image_size=30 must be divisible by 2\*\*\(len\(config\.model\.ch_mult\) - 1\) = 8",
    ):
        build_model(config)


def test_ddpm_group_norm_width():
    config = model_configs.cifar10_ddpm()
    config.model.nf = 48
    with pytest.raises(ValueError, match=r"config\.model\.nf = 48: DDPM uses GroupNorm\(32\)"):
        build_model(config)
