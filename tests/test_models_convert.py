"""Weight conversion: score_sde_pytorch state dicts and checkpoints, score_sde (JAX) trees, the
conversion command. Uses the small NCSN++ fixture (tests/fixtures/score_sde_parity)."""

import functools
import json
import pathlib
import re
import sys

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from diffusion_jax.builders.model import build_model
from diffusion_jax.models import NCSNpp
from diffusion_jax.models.convert import (
    ConversionError,
    convert_checkpoint,
    convert_state_dict,
    flax_param_shapes,
    load_score_sde_flax_params,
    load_torch_checkpoint,
    state_dict_from_checkpoint,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "score_sde_parity"
NAME = "ncsnpp_ve_cont"


@functools.cache
def fixture(name=NAME):
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    data = dict(np.load(FIXTURES / f"{name}_perturbed.npz"))
    config = ml_collections.ConfigDict(meta["config"])
    state = {k: v for k, v in data.items() if "." in k or k == "sigmas"}
    return config, data, state


def module_and_shape(name=NAME):
    config, data, _ = fixture(name)
    return build_model(config), data["x_nhwc"].shape


@functools.cache
def reference_params():
    module, shape = module_and_shape()
    return convert_state_dict(module, fixture()[2], input_shape=shape)


def same_tree(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


# -- errors -------------------------------------------------------------------------------------


def test_renamed_entry_names_torch_and_flax():
    module, shape = module_and_shape()
    state = dict(fixture()[2])
    state["all_modules.4.Conv_7.weight"] = state.pop("all_modules.4.Conv_0.weight")
    with pytest.raises(ConversionError, match=r"'all_modules\.4\.Conv_7\.weight'.*ResnetBlockBigGANpp_0/Conv_7/kernel"):
        convert_state_dict(module, state, input_shape=shape)


def test_wrong_shape_names_torch_and_flax():
    module, shape = module_and_shape()
    state = dict(fixture()[2])
    state["all_modules.8.NIN_1.W"] = np.zeros((32, 16), np.float32)
    with pytest.raises(
        ConversionError,
        match=r"shape mismatch: PyTorch 'all_modules\.8\.NIN_1\.W' \(32, 16\).*AttnBlockpp_0/NIN_1/W.*\(32, 32\)",
    ):
        convert_state_dict(module, state, input_shape=shape)


def test_missing_entry_and_extra_layer_are_reported():
    module, shape = module_and_shape()
    state = dict(fixture()[2])
    del state["all_modules.25.bias"]
    with pytest.raises(ConversionError, match=r"Flax parameter 'Conv_\d+/bias' has no PyTorch entry"):
        convert_state_dict(module, state, input_shape=shape)
    state = dict(fixture()[2], **{"all_modules.26.weight": np.zeros((3, 3, 3, 3), np.float32)})
    with pytest.raises(
        ConversionError, match=r"27 PyTorch layers vs 26 Flax .* PyTorch 'all_modules\.26' and Flax '<none>'"
    ):
        convert_state_dict(module, state, input_shape=shape)
    state = dict(fixture()[2], **{"bogus.weight": np.zeros((3,), np.float32)})
    with pytest.raises(ConversionError, match="unexpected PyTorch entry 'bogus.weight'"):
        convert_state_dict(module, state, input_shape=shape)


def test_wrong_network_for_checkpoint():
    config, data, state = fixture()
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.num_res_blocks = 2
    with pytest.raises(ConversionError, match="PyTorch layers vs"):
        convert_state_dict(build_model(config), state, input_shape=data["x_nhwc"].shape)


# -- checkpoints ----------------------------------------------------------------------------------


def _checkpoint(state, *, shadow_scale=2.0):
    """A score_sde_pytorch-style checkpoint of a DataParallel model."""
    trainable = [n for n in state if n != "sigmas" and not re.fullmatch(r"all_modules\.\d+\.W", n)]
    return {
        "model": {"module." + k: v for k, v in state.items()},
        "ema": {"decay": 0.999, "num_updates": 10, "shadow_params": [state[n] * shadow_scale for n in trainable]},
        "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4}]},
        "step": 10,
    }


def test_checkpoint_with_module_prefix_and_ema():
    module, shape = module_and_shape()
    state = fixture()[2]
    ckpt = _checkpoint(state)
    assert same_tree(convert_checkpoint(module, ckpt, input_shape=shape), reference_params())
    ema = convert_checkpoint(module, ckpt, input_shape=shape, ema=True)
    ref, got = traverse_util.flatten_dict(reference_params()), traverse_util.flatten_dict(ema)
    fourier = ("GaussianFourierProjection_0", "W")
    np.testing.assert_array_equal(got[fourier], ref[fourier])  # fixed W is not in the EMA
    for path in ref:
        if path != fourier:
            np.testing.assert_array_equal(got[path], 2.0 * ref[path], err_msg="/".join(path))


def test_ema_length_mismatch_is_reported():
    ckpt = _checkpoint(fixture()[2])
    ckpt["ema"]["shadow_params"] = ckpt["ema"]["shadow_params"][:-1]
    with pytest.raises(ConversionError, match=r"the EMA holds \d+ tensors but the model has \d+ trainable entries"):
        state_dict_from_checkpoint(ckpt, ema=True)


def test_unconditional_ncsnpp_drops_unused_block_dense_layers():
    """With conditional=False, score_sde_pytorch still creates each block's (unused) Dense_0."""
    config, data, state = fixture()
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.conditional = False
    module = build_model(config)
    renamed = {}
    for name, value in state.items():
        m = re.match(r"all_modules\.(\d+)\.(.*)", name)
        if not m:
            continue
        i = int(m.group(1))
        if i in (1, 2):  # the two time-embedding Linear layers exist only with conditional=True
            continue
        renamed[f"all_modules.{i - 2 if i > 2 else i}.{m.group(2)}"] = value
    params = convert_state_dict(module, renamed, input_shape=data["x_nhwc"].shape)
    assert "Dense_0" not in params and "Dense_0" not in params["ResnetBlockBigGANpp_0"]
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(data["x_nhwc"]), jnp.asarray(data["labels"]))
    assert np.all(np.isfinite(out))


def test_load_torch_checkpoint_without_torch_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ImportError, match=r'pip install "diffusion_jax\[convert\]"'):
        load_torch_checkpoint("anything.pth")


def test_torch_pth_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    config, data, state = fixture()
    ckpt = _checkpoint(state)
    to_torch = lambda v: torch.from_numpy(np.array(v))  # noqa: E731
    torch_ckpt = {
        "model": {k: to_torch(v) for k, v in ckpt["model"].items()},
        "ema": dict(ckpt["ema"], shadow_params=[to_torch(v) for v in ckpt["ema"]["shadow_params"]]),
        "optimizer": ckpt["optimizer"],
        "step": ckpt["step"],
    }
    path = tmp_path / "checkpoint_1.pth"
    torch.save(torch_ckpt, path)
    module, shape = module_and_shape()
    params = convert_checkpoint(module, load_torch_checkpoint(str(path)), input_shape=shape)
    assert same_tree(params, reference_params())
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(data["x_nhwc"]), jnp.asarray(data["labels"]))
    ref = data["out_nhwc"]
    assert np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)) < 1e-5


def test_bfloat16_tensors_keep_their_bits(tmp_path):
    torch = pytest.importorskip("torch")
    values = torch.tensor([1.0, -2.5, 3.140625, 1e-3, 65280.0], dtype=torch.bfloat16)
    path = tmp_path / "bf16.pth"
    torch.save({"w": values, "nested": [values.float()]}, path)
    loaded = load_torch_checkpoint(str(path))
    assert loaded["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(loaded["w"].view(np.int16), values.view(torch.int16).numpy())
    np.testing.assert_array_equal(loaded["w"].astype(np.float32), loaded["nested"][0])


@pytest.mark.parametrize(
    "name,config_file",
    [
        ("ncsnpp_ve_cont", "configs/cifar10/ve/ncsnpp_continuous.py"),
        ("ddpmpp_vp_cont", "configs/cifar10/vp/ddpmpp_continuous.py"),
    ],
)
def test_convert_command_writes_a_workdir_the_tools_load(tmp_path, name, config_file):
    """``diffusion-jax convert``'s library call: the converted workdir restores through the
    experiment code, and its score function (config -> network -> parametrization) reproduces
    score_sde's ``get_score_fn`` output on the fixture."""
    from diffusion_jax import modes
    from diffusion_jax.builders import experiment
    from diffusion_jax.builders.config import load_config
    from diffusion_jax.modes import setup

    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    _, data, state = fixture(name)
    config = load_config(str(ROOT / config_file))
    for dotted, value in meta["overrides"].items():
        section, key = dotted.split(".")
        config[section][key] = tuple(value) if isinstance(value, list) else value
    work = tmp_path / "converted"
    step = modes.convert(config, work, checkpoint=_checkpoint(state, shadow_scale=1.0))
    assert step == 10 and (work / "config.json").exists()
    exp = experiment.build_experiment(config)
    got_step, restored = setup.restore_state(config, exp, work, None)
    assert got_step == 10
    x, t = jnp.asarray(data["x_nhwc"]), jnp.asarray(data["t"])
    score = exp.score_fn(restored.ema_params)(x, t)
    ref = data["score_nhwc"]
    assert np.max(np.abs(np.asarray(score) - ref)) / np.max(np.abs(ref)) < 1e-5
    # A checkpoint of another network is refused with the first offending entry named.
    bad = dict(_checkpoint(state))
    bad["model"] = {k.replace("Conv_0", "Conv_9"): v for k, v in bad["model"].items()}
    from diffusion_jax.builders.config import ConfigError

    with pytest.raises(ConfigError, match="cannot convert the checkpoint: .*Conv_9"):
        modes.convert(config, tmp_path / "other", checkpoint=bad)


# -- score_sde (JAX) parameter trees ---------------------------------------------------------------

# Top-level submodules of score_sde's Flax NCSNpp for the 256-px-style fixture (ch_mult (1, 1, 2),
# one block per level, attention at 8 px, output_skip / input_skip / cat), in creation order,
# written out from score_sde's models/ncsnpp.py: linen names each submodule <Class>_<n> per class,
# and the parameter-free pyramid resamplers (Downsample_0/1, Upsample_0/1) use up indices.
SCORE_SDE_FLAX_ORDER_256STYLE = (
    ["GaussianFourierProjection_0", "Dense_0", "Dense_1", "Conv_0"]
    + ["ResnetBlockBigGANpp_0", "ResnetBlockBigGANpp_1", "Downsample_0", "Combine_0"]
    + ["ResnetBlockBigGANpp_2", "AttnBlockpp_0", "ResnetBlockBigGANpp_3", "Downsample_1", "Combine_1"]
    + ["ResnetBlockBigGANpp_4", "ResnetBlockBigGANpp_5", "AttnBlockpp_1", "ResnetBlockBigGANpp_6"]
    + ["ResnetBlockBigGANpp_7", "ResnetBlockBigGANpp_8", "GroupNorm_0", "Conv_1", "ResnetBlockBigGANpp_9"]
    + ["ResnetBlockBigGANpp_10", "ResnetBlockBigGANpp_11", "AttnBlockpp_2", "Upsample_0", "GroupNorm_1", "Conv_2"]
    + [
        "ResnetBlockBigGANpp_12",
        "ResnetBlockBigGANpp_13",
        "ResnetBlockBigGANpp_14",
        "Upsample_1",
        "GroupNorm_2",
        "Conv_3",
    ]
)


def test_top_level_names_follow_score_sde_flax_naming():
    module, shape = module_and_shape("ncsnpp_ve_cont_256style_cat")
    params, order = flax_param_shapes(module, shape)
    assert order == SCORE_SDE_FLAX_ORDER_256STYLE
    assert set(params) == set(SCORE_SDE_FLAX_ORDER_256STYLE) - {
        "Downsample_0",
        "Downsample_1",
        "Upsample_0",
        "Upsample_1",
    }
    block = params["ResnetBlockBigGANpp_1"]  # a down block: 1x1 skip Conv_2
    assert sorted(block) == ["Conv_0", "Conv_1", "Conv_2", "Dense_0", "GroupNorm_0", "GroupNorm_1"]
    assert sorted(params["AttnBlockpp_0"]) == ["GroupNorm_0", "NIN_0", "NIN_1", "NIN_2", "NIN_3"]
    assert sorted(params["Combine_0"]) == ["Conv_0"]


def test_remat_keeps_the_parameter_names():
    module, shape = module_and_shape("ncsnpp_ve_cont_256style_cat")
    remat = module.clone(remat=True)
    a, order_a = flax_param_shapes(module, shape)
    b, order_b = flax_param_shapes(remat, shape)
    assert order_a == order_b
    assert jax.tree.structure(a) == jax.tree.structure(b)


def _score_sde_state(params, ema_params):
    """A score_sde training state as flax.serialization.msgpack_restore returns it."""
    state = {
        "step": np.int32(5),
        "optimizer": {"target": params, "state": {"step": np.int32(5), "param_states": {}}},
        "lr": np.float32(2e-4),
        "model_state": {},
        "ema_rate": np.float32(0.999),
        "params_ema": ema_params,
        "rng": np.zeros((2,), np.uint32),
    }
    return flax.serialization.msgpack_restore(flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, state)))


def test_score_sde_flax_state_loads_params_and_ema():
    module, shape = module_and_shape()
    params = reference_params()
    ema = jax.tree.map(lambda v: v * 0.5, params)
    state = _score_sde_state(params, ema)
    assert same_tree(load_score_sde_flax_params(module, state, input_shape=shape, ema=False), params)
    assert same_tree(
        load_score_sde_flax_params(module, state, input_shape=shape, ema=True), jax.tree.map(np.asarray, ema)
    )
    broken = _score_sde_state(params, {**ema, "Conv_99": {"kernel": np.zeros((1,))}})
    with pytest.raises(ConversionError, match="'Conv_99/kernel' does not exist"):
        load_score_sde_flax_params(module, broken, input_shape=shape)


def test_score_sde_flax_instance_norm_shapes_are_reshaped():
    """score_sde's Flax InstanceNorm++ stores (1, 1, 1, C) parameters; ours are (C,)."""
    module, shape = module_and_shape("ncsnv2_ve_patched")
    _, data, state = fixture("ncsnv2_ve_patched")
    params = convert_state_dict(module, state, input_shape=shape)
    flat = traverse_util.flatten_dict(params)
    jaxlike = {k: (v.reshape(1, 1, 1, -1) if k[-1] in ("alpha", "gamma", "beta") else v) for k, v in flat.items()}
    loaded = load_score_sde_flax_params(module, traverse_util.unflatten_dict(jaxlike), input_shape=shape)
    assert same_tree(loaded, params)


def test_conversion_refuses_class_or_context_networks():
    module, shape = module_and_shape()
    with pytest.raises(ConversionError, match="num_classes=0"):
        convert_state_dict(module.clone(num_classes=10), fixture()[2], input_shape=shape)
    assert isinstance(module, NCSNpp)
