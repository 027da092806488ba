"""Config validation: every wrong config gives one clear message saying what is allowed."""

import pathlib
import runpy

import ml_collections
import pytest

from diffusion_jax.builders import config as config_lib
from diffusion_jax.builders.config import ConfigError, default_config, validate_config
from diffusion_jax.builders.experiment import registries

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


def _with(**overrides):
    config = default_config()
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        config[section][key] = value
    return config


def _unknown_key_config():
    config = default_config()
    config.training.batchsize = 64
    return config


def _unknown_section_key():
    config = default_config()
    config.modle = ml_collections.ConfigDict({"nf": 3})
    return config


BAD = [
    (_unknown_key_config, r"unknown key 'training.batchsize' \(did you mean training.batch_size\?\); valid keys in training:"),
    (_unknown_section_key, r"unknown key 'modle' \(did you mean model\?\)"),
    (lambda: _with(training__sde="vp"), r"training.sde = 'vp' is not allowed; valid: vesde, vpsde, subvpsde, edm, cosine, rectified_flow"),
    (lambda: _with(model__name="unet"), r"model.name = 'unet' is not allowed; valid: "),
    (lambda: _with(sampling__method="heun3"), r"sampling.method = 'heun3' is not allowed; valid: "),
    (lambda: _with(training__weighting="snr"), r"training.weighting = 'snr' is not allowed; valid: sigma2, eps, likelihood, edm, v, x0, min_snr"),
    (lambda: _with(training__time_sampler="beta"), r"training.time_sampler = 'beta' is not allowed"),
    (lambda: _with(training__batch_size=0), r"training.batch_size = 0 must be > 0"),
    (lambda: _with(training__n_jitted_steps=-1), r"training.n_jitted_steps = -1 must be > 0"),
    (lambda: _with(training__nan_policy="ignore"), r"training.nan_policy = 'ignore' is not allowed; valid: skip, stop"),
    (lambda: _with(optim__lr=-1.0), r"optim.lr = -1.0 must be > 0"),
    (lambda: _with(optim__optimizer="SGD"), r"optim.optimizer = 'SGD' is not allowed; valid: Adam, AdamW"),
    (lambda: _with(model__ema_rate=1.5), r"model.ema_rate = 1.5 must be in \[0, 1\)"),
    (lambda: _with(model__dtype="float16"), r"model.dtype = 'float16' is not allowed; valid: float32, bfloat16"),
    (lambda: _with(model__output="noise"), r"model.output = 'noise' is not allowed"),
    (lambda: _with(sampling__thresholding="soft"), r"sampling.thresholding = 'soft' is not allowed"),
    (lambda: _with(training__likelihood_weighting=True, training__weighting="edm"), r"likelihood_weighting = True conflicts with training.weighting = 'edm'"),
]


@pytest.mark.parametrize("build,match", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_configs_give_clear_messages(build, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(build(), registries=registries())


def test_all_problems_reported_at_once():
    config = _with(training__batch_size=0, optim__lr=0.0)
    config.training.foo = 1
    with pytest.raises(ConfigError) as err:
        validate_config(config, registries=registries())
    msg = str(err.value)
    assert msg.count("\n  - ") == 3, msg


def test_default_config_is_valid():
    validate_config(default_config(), registries=registries())


def test_every_config_file_is_valid_and_documents_its_command():
    """Each config file builds, validates, and its docstring starts with the command that runs it."""
    files = sorted(CONFIG_DIR.rglob("*.py"))
    assert files, "no config files"
    for path in files:
        if path.name.startswith("_"):
            continue
        module = runpy.run_path(str(path))
        doc = (module.get("__doc__") or "").strip()
        rel = path.relative_to(CONFIG_DIR.parent)
        assert doc.startswith("diffusion-jax ") or doc.startswith("Run:"), f"{rel}: docstring must start with its command"
        assert str(rel) in doc.splitlines()[0] or str(rel) in doc, f"{rel}: command does not name the file"
        config = module["get_config"]()
        validate_config(config, registries=registries())


def test_config_diff():
    a, b = default_config(), default_config()
    b.model.nf = 64
    b.training.n_iters = 5
    assert config_lib.config_diff(a, b) == ["model.nf", "training.n_iters"]
    assert config_lib.config_diff(a, b, ["model"]) == ["model.nf"]
