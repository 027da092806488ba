"""Parity of the score networks with score_sde's PyTorch port (tests/fixtures/score_sde_parity).

Each fixture holds a shrunk network's weights (perturbed so every branch matters), an input, the
labels score_sde fed the network and its output. We build the network from the fixture's own
config through the builder, convert the weights and compare outputs, per-module activations,
initialiser statistics and full-size parameter counts.
"""

import functools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from diffusion_jax.builders.model import build_model, model_input_shape
from diffusion_jax.models.convert import convert_state_dict, flax_param_shapes, torch_to_flax_mapping

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import model_configs  # noqa: E402

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "score_sde_parity"

VARIANTS = [
    "ncsnpp_ve_cont",
    "ddpmpp_vp_cont",
    "ncsnpp_ve_cont_256style_sum",
    "ncsnpp_ve_cont_256style_cat",
    "ddpmpp_vp_cont_resblock_ddpm_patched",
    "ddpm_vp_cont",
    "ncsnv2_ve_patched",
]
TOLERANCE = 1e-5  # max |ours - reference| / max |reference|, float32


@functools.cache
def fixture(name):
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    data = dict(np.load(FIXTURES / f"{name}_perturbed.npz"))
    module = build_model(ml_collections.ConfigDict(meta["config"]))
    state = {k: v for k, v in data.items() if "." in k or k == "sigmas"}
    params = convert_state_dict(module, state, input_shape=data["x_nhwc"].shape)
    return meta, data, module, params


# Fixtures with per-module activations: one compiled forward returns the output and every
# top-level submodule's output, shared by the output and the activation tests.
WITH_ACTS = ("ncsnpp_ve_cont", "ncsnpp_ve_cont_256style_cat")


@functools.cache
def jitted_apply(name):
    _, _, module, _ = fixture(name)
    if name not in WITH_ACTS:
        return jax.jit(lambda p, x, labels: module.apply({"params": p}, x, labels))

    def run(p, x, labels):
        return module.apply(
            {"params": p},
            x,
            labels,
            capture_intermediates=lambda mdl, method: method == "__call__" and len(mdl.scope.path) == 1,
            mutable=["intermediates"],
        )

    return jax.jit(run)


def forward(name, labels_key="labels"):
    """``(output, {top-level submodule name: output} or None)`` for a fixture's input."""
    _, data, _, params = fixture(name)
    result = jitted_apply(name)(params, jnp.asarray(data["x_nhwc"]), jnp.asarray(data[labels_key]))
    if name not in WITH_ACTS:
        return result, None
    out, state = result
    return out, {k: v["__call__"][0] for k, v in state["intermediates"].items()}


def relative_error(out, ref):
    return float(np.max(np.abs(np.asarray(out, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("name", VARIANTS)
def test_output_matches_score_sde_pytorch(name):
    _, data, _, _ = fixture(name)
    out, _ = forward(name)
    # NCSNv2's PyTorch output is float64 (float32 activations divided by a float64 sigma table).
    ref = data["out_nhwc_f64"] if "out_nhwc_f64" in data else data["out_nhwc"]
    assert out.shape == ref.shape and out.dtype == jnp.float32
    assert relative_error(out, ref) < TOLERANCE


def test_ddpm_integer_labels_match():
    """Discrete DDPM training feeds integer time steps; same network, other labels."""
    _, data, _, _ = fixture("ddpm_vp_cont")
    assert np.issubdtype(data["labels_int"].dtype, np.integer)
    out, _ = forward("ddpm_vp_cont", "labels_int")
    assert relative_error(out, data["out_int_nhwc"]) < TOLERANCE
    # ... and they really are different inputs from the continuous ones.
    assert relative_error(data["out_int_nhwc"], data["out_nhwc"]) > 1e-2


@pytest.mark.parametrize("name", WITH_ACTS)
def test_per_module_activations_match(name):
    """Every top-level module's output (and the parameter-free pyramid resamplers) matches."""
    _, data, module, _ = fixture(name)
    acts = dict(np.load(FIXTURES / f"{name}_perturbed_acts.npz"))
    _, outputs = forward(name)
    state = {k: v.shape for k, v in data.items() if "." in k}
    unit_to_flax = {}
    for m in torch_to_flax_mapping(module, state, data["x_nhwc"].shape):
        unit_to_flax[".".join(m.torch_name.split(".")[:2])] = m.flax_path[0]
    # Parameter-free resamplers, in call order: pyramid_downsample#k / pyramid_upsample#k.
    _, order = flax_param_shapes(module, data["x_nhwc"].shape)
    param_free = [n for n in order if n not in unit_to_flax.values()]
    for kind, prefix in (("pyramid_downsample", "Downsample_"), ("pyramid_upsample", "Upsample_")):
        for k, flax_name in enumerate(n for n in param_free if n.startswith(prefix)):
            unit_to_flax[f"{kind}#{k}"] = flax_name
    assert set(acts) <= set(unit_to_flax), sorted(set(acts) - set(unit_to_flax))
    for key, ref in acts.items():
        ours = np.asarray(outputs[unit_to_flax[key]])
        if ref.ndim == 4:
            ref = np.transpose(ref, (0, 2, 3, 1))  # NCHW -> NHWC
        assert ours.shape == ref.shape, key
        assert relative_error(ours, ref) < TOLERANCE, key


@pytest.mark.parametrize(
    "name", ["ncsnpp_ve_cont", "ddpmpp_vp_cont_resblock_ddpm_patched", "ddpm_vp_cont", "ncsnv2_ve_patched"]
)
def test_initialisers_match_score_sde_statistics(name):
    """Our init draws have the statistics score_sde's constructors produced (fixture
    ``init_tensor_stats``): exact constants (zeros, ones) stay exact; for random tensors the
    means, standard deviations and extreme values agree within sampling error."""
    meta, data, module, _ = fixture(name)
    stats = meta["init_tensor_stats"]
    # lazy_init computes only the parameters (no forward pass); the rbg generator compiles fast.
    x = jax.ShapeDtypeStruct(data["x_nhwc"].shape, jnp.float32)
    params = module.lazy_init(jax.random.key(7, impl="rbg"), x, jnp.asarray(data["labels"]))["params"]
    flat = traverse_util.flatten_dict(params)
    shapes = {e["name"]: e["shape"] for e in meta["state_dict"]}
    mappings = torch_to_flax_mapping(module, shapes, data["x_nhwc"].shape)
    assert len(mappings) == len([n for n in shapes if n != "sigmas"])
    for m in mappings:
        ref = stats[m.torch_name]
        ours = np.asarray(flat[m.flax_path], np.float64)
        n = ours.size
        if ref["std"] == 0:
            np.testing.assert_array_equal(ours, ref["mean"], err_msg=m.torch_name)
            continue
        sigma = ref["std"]
        # Two independent estimates: their difference has std ~ sigma / sqrt(n) (std estimates
        # of uniform and normal draws are tighter than that). 6 of those is a safe margin.
        margin = 6 * sigma / np.sqrt(n)
        assert abs(ours.mean() - ref["mean"]) < margin, m.torch_name
        assert abs(ours.std() - sigma) < margin, m.torch_name
        if n >= 256:
            ref_absmax = max(abs(ref["min"]), abs(ref["max"]))
            assert 0.75 < np.abs(ours).max() / ref_absmax < 1.33, m.torch_name


@pytest.mark.parametrize("manifest", sorted(model_configs.CIFAR10_MODELS))
def test_full_size_parameter_count_and_names(manifest):
    """The CIFAR-10 networks built from score_sde's settings have exactly the PyTorch parameter
    counts, and every PyTorch state-dict entry maps to one Flax leaf of the same size."""
    meta = json.loads((FIXTURES / f"param_manifest_{manifest}.json").read_text())
    config = model_configs.CIFAR10_MODELS[manifest]()
    module = build_model(config)
    input_shape = model_input_shape(config)
    structure = flax_param_shapes(module, input_shape)  # shapes only: jax.eval_shape, no weights
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(structure[0])) == meta["param_count"]
    shapes = {e["name"]: e["shape"] for e in meta["state_dict"]}
    mappings = torch_to_flax_mapping(module, shapes, input_shape, structure=structure)
    assert sorted(m.torch_name for m in mappings) == sorted(n for n in shapes if n != "sigmas")
    assert len({m.flax_path for m in mappings}) == len(mappings)
    trainable = sum(int(np.prod(shapes[m.torch_name])) for m in mappings if m.trainable)
    assert trainable == meta["trainable_param_count"]
