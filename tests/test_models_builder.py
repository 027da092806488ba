"""build_model(config): score_sde's config keys -> typed network fields, with checked values."""

import pathlib
import sys

import jax.numpy as jnp
import ml_collections
import pytest

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
        (
            "name",
            "unet",
            r"config\.model\.name: unknown model 'unet'; valid names: ddpm, ncsnpp, ncsnv2_128, ncsnv2_256, ncsnv2_64",
        ),
        (
            "progressive",
            "skip",
            r"config\.model\.progressive: expected one of \('none', 'output_skip', 'residual'\), got 'skip'",
        ),
        ("progressive_combine", "mean", r"config\.model\.progressive_combine: expected one of \('sum', 'cat'\)"),
        ("resblock_type", "resnet", r"config\.model\.resblock_type"),
        ("embedding_type", "learned", r"config\.model\.embedding_type"),
        ("dropout", 1.5, r"config\.model\.dropout: expected a number in \[0, 1\), got 1\.5"),
        ("nf", 0, r"config\.model\.nf: expected an integer >= 1, got 0"),
        ("nf", 128.0, r"config\.model\.nf: expected an integer, got 128\.0"),
        ("ch_mult", (), r"config\.model\.ch_mult: expected a non-empty sequence"),
        (
            "attn_resolutions",
            (7,),
            r"config\.model\.attn_resolutions: expected resolutions among the network's \(32, 16, 8, 4\)",
        ),
        ("fir", "yes", r"config\.model\.fir: expected True or False, got 'yes'"),
        ("conv_size", 5, r"config\.model\.conv_size: expected 3"),
        ("attention_type", "legacy", r"config\.model\.attention_type"),
        ("normalization", "BatchNorm", r"config\.model\.normalization"),
        ("nonlinearity", "gelu", r"config\.model\.nonlinearity"),
        ("sigma_min", 60.0, r"config\.model\.sigma_min: expected a value below sigma_max=50\.0"),
        ("dtype", "float8", r"config\.model\.dtype: expected one of \('float32', 'bfloat16', 'float16'\)"),
        ("num_classes", -1, r"config\.model\.num_classes: expected an integer >= 0"),
        (
            "cross_attn_resolutions",
            (16,),
            r"config\.model\.context_dim: expected an integer >= 1 when cross_attn_resolutions is set",
        ),
    ],
)
def test_invalid_values_name_the_key(key, value, message):
    config = ncsnpp_config()
    if key in config.model:
        del config.model[key]  # ConfigDict is type-safe: replace the field, do not cast
    config.model[key] = value
    with pytest.raises(ValueError, match=message):
        build_model(config)


def test_missing_keys_and_sections_are_named():
    config = ncsnpp_config()
    del config.model["skip_rescale"]
    with pytest.raises(ValueError, match=r"config\.model is missing the key 'skip_rescale' \(needed by ncsnpp\)"):
        build_model(config)
    config = ncsnpp_config()
    config.data.image_size = 30
    with pytest.raises(
        ValueError,
        match=r"config\.data\.image_size=30 must be divisible by 2\*\*\(len\(config\.model\.ch_mult\) - 1\) = 8",
    ):
        build_model(config)
    config = ml_collections.ConfigDict({"model": ncsnpp_config().model.to_dict()})
    with pytest.raises(ValueError, match="the config has no 'data' section"):
        build_model(config)


def test_ddpm_group_norm_width():
    config = model_configs.cifar10_ddpm()
    config.model.nf = 48
    with pytest.raises(ValueError, match=r"config\.model\.nf: expected a width .* divisible by 32"):
        build_model(config)
