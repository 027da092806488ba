"""Config validation: every wrong config gives one clear message saying what is allowed."""

import pathlib
import runpy

import ml_collections
import model_configs
import pytest

from diffusion_jax.builders import config as config_lib
from diffusion_jax.builders import diffusion as diffusion_builders
from diffusion_jax.builders.config import ConfigError, default_config, load_config, validate_config
from diffusion_jax.builders.model import build_model, model_input_shape
from diffusion_jax.data.datasets import canonical_name
from diffusion_jax.models.convert import count_params

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs"


def _with(**overrides):
    config = default_config()
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        with config[section].ignore_type():
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
    (
        _unknown_key_config,
        r"unknown key 'training.batchsize' \(did you mean training.batch_size\?\); valid keys in training:",
    ),
    (_unknown_section_key, r"unknown section 'modle' \(did you mean model\?\)"),
    (
        lambda: _with(training__sde="vp"),
        r"training.sde = 'vp' is not allowed; valid: vesde, vpsde, subvpsde, edm, cosine, rectified_flow",
    ),
    (lambda: _with(model__name="unet"), r"model.name = 'unet' is not allowed; valid: "),
    (lambda: _with(sampling__method="heun3"), r"sampling.method = 'heun3' is not allowed; valid: "),
    (
        lambda: _with(training__weighting="snr"),
        r"training.weighting = 'snr' is not allowed; valid: sigma2, eps, likelihood, edm, v, x0, min_snr",
    ),
    (lambda: _with(training__time_sampler="beta"), r"training.time_sampler = 'beta' is not allowed"),
    (lambda: _with(training__batch_size=0), r"training.batch_size = 0 must be > 0"),
    (lambda: _with(training__batch_size="64"), r"training.batch_size = '64' has the wrong type; expected int"),
    (lambda: _with(model__cross_attn_heads=0), r"model.cross_attn_heads = 0 must be > 0"),
    (
        lambda: _with(model__cross_attn_resolutions=(8,)),
        r"model.cross_attn_resolutions needs model.context_dim",
    ),
    (lambda: _with(training__sde="edm", training__continuous=False), r"training.continuous = False .* not 'edm'"),
    (lambda: _with(model__attn_resolutions=(3,)), r"config.model.attn_resolutions = \(3,\): resolutions"),
    (lambda: _with(sampling__method="ode", sampling__thresholding="static"), r"cannot threshold"),
    (lambda: _with(model__output="eps"), r"set both model.output and model.noise_cond, or neither"),
    (lambda: _with(training__n_jitted_steps=-1), r"training.n_jitted_steps = -1 must be > 0"),
    (lambda: _with(training__nan_policy="ignore"), r"training.nan_policy = 'ignore' is not allowed; valid: skip, stop"),
    (lambda: _with(optim__lr=-1.0), r"optim.lr = -1.0 must be > 0"),
    (lambda: _with(optim__optimizer="SGD"), r"optim.optimizer = 'SGD' is not allowed; valid: Adam, AdamW"),
    (lambda: _with(model__ema_rate=1.5), r"model.ema_rate = 1.5 must be in \[0, 1\)"),
    (lambda: _with(model__dtype="float16"), r"model.dtype = 'float16' is not allowed; valid: float32, bfloat16"),
    (lambda: _with(model__output="noise"), r"model.output = 'noise' is not allowed"),
    (lambda: _with(sampling__thresholding="soft"), r"sampling.thresholding = 'soft' is not allowed"),
    (
        lambda: _with(training__likelihood_weighting=True, training__weighting="edm"),
        r"likelihood_weighting = True conflicts with training.weighting = 'edm'",
    ),
]


@pytest.mark.parametrize("build,match", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_configs_give_clear_messages(build, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(build())


def test_all_problems_reported_at_once():
    config = _with(training__batch_size=0, optim__lr=0.0)
    config.training.foo = 1
    with pytest.raises(ConfigError) as err:
        validate_config(config)
    msg = str(err.value)
    assert msg.count("\n  - ") == 3, msg


def test_default_config_passes_the_schema():
    """The defaults are a schema, not an experiment: score_sde's CIFAR-10 network on the digits'
    8x8 images does not build (attention at 16x16), and validation says so."""
    validate_config(default_config(), build=False)
    with pytest.raises(ConfigError, match=r"attn_resolutions = \(16,\): resolutions must be among"):
        validate_config(default_config())


def _is_base(path: pathlib.Path) -> bool:
    """Base files are loaded by variants and not run themselves: default_*.py and _*.py."""
    return path.name.startswith(("default_", "_"))


CONFIG_FILES = sorted(CONFIG_DIR.rglob("*.py"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[str(p.relative_to(CONFIG_DIR)) for p in CONFIG_FILES])
def test_every_config_file_is_valid_and_documents_its_command(path):
    """Each config file builds and validates; a runnable one's docstring starts with the command
    that runs it, which names the file; its network, SDE and parametrization build."""
    module = runpy.run_path(str(path))
    assert "get_config" in module, f"{path}: no get_config()"
    config = module["get_config"]()
    validate_config(config, build=not _is_base(path))
    if _is_base(path):
        return
    rel = path.relative_to(ROOT).as_posix()
    # The command: the docstring's first paragraph, with shell line continuations joined.
    command = (module.get("__doc__") or "").strip().split("\n\n")[0].replace("\\\n", " ")
    command = " ".join(command.removeprefix("Run:").split())
    assert command.startswith(("diffusion-jax train ", "diffusion-jax eval ", "diffusion-jax sample ")), (
        f"{rel}: the docstring must start with the command that runs it, got {command[:60]!r}"
    )
    assert f"--config {rel} " in command + " ", f"{rel}: the command must name the file (--config {rel})"
    assert "--workdir " in command, f"{rel}: the command needs --workdir"
    canonical_name(config.data.dataset)  # a registered data set (the data builder's check)
    build_model(config)  # constructs and checks the module; nothing is traced
    diffusion_builders.build_sde(config)
    diffusion_builders.build_parametrization(config)


def test_config_files_exist():
    assert len([p for p in CONFIG_FILES if not _is_base(p)]) >= 20, CONFIG_FILES


# score_sde's CIFAR-10 networks: config file, the network settings verified against score_sde
# (tests/model_configs.py), and score_sde's parameter count (PyTorch state dict, the fixed
# Fourier projection included).
CIFAR10_NETWORKS = [
    ("cifar10/ve/ncsnpp_continuous.py", "ncsnpp_continuous", 62_758_915),
    ("cifar10/ve/ncsnpp_deep_continuous.py", "ncsnpp_deep_continuous", 107_587_075),
    ("cifar10/vp/ddpmpp_continuous.py", "ddpmpp_continuous", 61_804_419),
    ("cifar10/vp/ddpmpp_deep_continuous.py", "ddpmpp_deep_continuous", 106_632_579),
    ("cifar10/vp/ddpm.py", "ddpm", 35_218_947),
]


@pytest.mark.parametrize("file,reference,count", CIFAR10_NETWORKS, ids=[c[0] for c in CIFAR10_NETWORKS])
def test_cifar10_config_networks_match_score_sde(file, reference, count):
    """The config files' networks have score_sde's published parameter counts (shapes only,
    through jax.eval_shape) and the settings of tests/model_configs.py."""
    config = load_config(str(CONFIG_DIR / file))
    expected = model_configs.CIFAR10_MODELS[reference]()
    for section in ("model", "data"):
        for key, value in expected[section].items():
            got = config[section][key]
            norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v
            assert norm(got) == norm(value), f"{file}: {section}.{key} = {got!r}, score_sde has {value!r}"
    assert count_params(build_model(config), model_input_shape(config)) == count


def _load(rel):
    return load_config(str(CONFIG_DIR / rel))


@pytest.mark.parametrize(
    "name",
    ["ddpmpp_continuous", "ddpmpp_deep_continuous", "ddpm_continuous", "ncsnpp_continuous", "ncsnpp_deep_continuous"],
)
def test_subvp_configs_differ_from_vp_only_in_the_sde(name):
    """score_sde's sub-VP CIFAR-10 configs are its VP configs with training.sde = 'subvpsde'."""
    vp, subvp = _load(f"cifar10/vp/{name}.py"), _load(f"cifar10/subvp/{name}.py")
    assert config_lib.config_diff(vp, subvp) == ["training.sde"]
    assert (vp.training.sde, subvp.training.sde) == ("vpsde", "subvpsde")


@pytest.mark.parametrize(
    "deep,base",
    [
        ("cifar10/ve/ncsnpp_deep_continuous.py", "cifar10/ve/ncsnpp_continuous.py"),
        ("cifar10/vp/ddpmpp_deep_continuous.py", "cifar10/vp/ddpmpp_continuous.py"),
        ("cifar10/vp/ncsnpp_deep_continuous.py", "cifar10/vp/ncsnpp_continuous.py"),
    ],
)
def test_deep_configs_double_the_blocks_and_train_950k_steps(deep, base):
    d, b = _load(deep), _load(base)
    assert config_lib.config_diff(b, d) == ["model.num_res_blocks", "training.n_iters"]
    assert (b.model.num_res_blocks, d.model.num_res_blocks, d.training.n_iters) == (4, 8, 950001)


def test_edm_config():
    """EDM's CIFAR-10 settings: sigma in [0.002, 80], EDM preconditioning (the builder's choice
    for sde 'edm'), log-normal sigma, 35-evaluation Heun sampling, and a 500k-image EMA half-life."""
    config = _load("cifar10/edm/ddpmpp.py")
    p = diffusion_builders.build_parametrization(config)
    assert (p.output, p.noise_cond, p.input_scaling, p.sigma_data) == ("edm", "edm", "edm", 0.5)
    sde = diffusion_builders.build_sde(config)
    assert (sde.sigma_min, sde.sigma_max) == (0.002, 80.0)
    assert config.training.n_iters * config.training.batch_size == 200_000_000
    assert config.model.ema_rate ** (500_000 / config.training.batch_size) == pytest.approx(0.5)
    assert 2 * config.sampling.num_steps + int(config.sampling.noise_removal) == 35
    vp = _load("cifar10/edm/ddpmpp_vpsde.py")
    assert config_lib.config_diff(config, vp) == ["model.noise_cond", "model.output", "training.sde"]
    assert diffusion_builders.build_parametrization(vp) == p


def test_config_diff():
    a, b = default_config(), default_config()
    b.model.nf = 64
    b.training.n_iters = 5
    assert config_lib.config_diff(a, b) == ["model.nf", "training.n_iters"]
    assert config_lib.config_diff(a, b, ["model"]) == ["model.nf"]
