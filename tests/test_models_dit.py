"""DiT (diffusion_jax.models.dit): parity with the official implementation
(tests/fixtures/dit_parity: outputs, null-label outputs, its classifier-free guidance and
activations for two small configurations with perturbed random weights), the 12 published
parameter counts, the checkpoint loader's checks, logical axes, adaLN-Zero initialisation,
remat, bfloat16, and use through the library's parametrizations and loss.

Compiled functions are shared (one per fixture) and compiled with XLA's backend optimisation
level 0 (:func:`compile_fast`): on the 2-core CI machine that halves compile time, which is most
of these tests' time; it changes code generation, not the computation."""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion_jax import losses
from diffusion_jax import parametrization as param_lib
from diffusion_jax import sde as sde_lib
from diffusion_jax.builders.diffusion import make_model_fn
from diffusion_jax.models import convert
from diffusion_jax.models.dit import (
    DIT_PRESETS,
    LOGICAL_AXIS_NAMES,
    DiT,
    count_dit_params,
    dit_preset,
    load_dit_state_dict,
    logical_axes,
    sincos_2d_positions,
)

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "dit_parity"
VARIANTS = ["dit_p2_d3", "dit_p4_d2_nosigma"]
TOLERANCE = 1e-4  # max |ours - reference| / max |reference|, float32 (measured: about 1e-6)
ACTIVATIONS = {
    "x_embedder": "act_x_embedder",
    "t_embedder": "act_t_embedder",
    "blocks_0": "act_block0",
    "final_layer": "act_final_layer",
}


FAST = {"xla_backend_optimization_level": 0}


def compile_fast(fn, *args):
    """``fn`` jitted and compiled for ``args`` (arrays or shapes) with :data:`FAST` options."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST)


def nhwc(a):
    return np.transpose(a, (0, 2, 3, 1))


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def module_from_reference(kwargs, **overrides):
    """Our DiT for the reference's constructor arguments (a null class iff class dropout > 0)."""
    fields = dict(
        input_size=kwargs["input_size"],
        patch_size=kwargs["patch_size"],
        in_channels=kwargs["in_channels"],
        hidden_size=kwargs["hidden_size"],
        depth=kwargs["depth"],
        num_heads=kwargs["num_heads"],
        mlp_ratio=kwargs.get("mlp_ratio", 4.0),
        num_classes=kwargs["num_classes"],
        null_class=kwargs["class_dropout_prob"] > 0,
        learn_sigma=kwargs["learn_sigma"],
    )
    return DiT(**{**fields, **overrides})


@functools.cache
def fixture(name):
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    io = dict(np.load(FIXTURES / f"{name}_io.npz"))
    state = dict(np.load(FIXTURES / f"{name}_state_dict.npz"))
    module = module_from_reference(meta["kwargs"])
    return meta, io, state, module, load_dit_state_dict(module, state)


def _run(module, params, x, t, y):
    """Full output and every top-level submodule's output."""
    return module.apply(
        {"params": params},
        x,
        t,
        class_labels=y,
        method="full_output",
        capture_intermediates=lambda mdl, method: method == "__call__" and len(mdl.scope.path) == 1,
        mutable=["intermediates"],
    )


@functools.cache
def reference_run(name):
    """Everything the parity tests compare, from one compiled function per fixture: the full
    output and activations, the x-shaped call, and (with a null class) the null-label and
    omitted-label outputs and the reference's classifier-free guidance on cfg_x."""
    _, io, _, module, params = fixture(name)
    x, t, y = nhwc(io["x"]), io["t"], jnp.asarray(io["y"], jnp.int32)

    def run(p):
        apply = functools.partial(module.apply, {"params": p})
        out, state = _run(module, p, x, t, y)
        result = {"out": out, "x_shaped": apply(x, t, class_labels=y)}
        result["acts"] = {k: v["__call__"][0] for k, v in state["intermediates"].items()}
        if module.null_label is None:
            return result
        result["null"] = apply(x, t, class_labels=jnp.full_like(y, module.null_label), method="full_output")
        result["omitted"] = apply(x, t, method="full_output")
        # forward_with_cfg(cfg_x, cfg_t, cfg_y, 4): its batch is [half, half] with labels [y, null].
        half = io["cfg_x"].shape[0] // 2
        cx, ct, cy = nhwc(io["cfg_x"])[:half], io["cfg_t"], jnp.asarray(io["cfg_y"], jnp.int32)
        guided = functools.partial(apply, cx, ct[:half], class_labels=cy[:half], scale=4.0, method="guided_output")
        result["guided3"] = guided(guided_channels=3)
        result["guided_all"] = guided()
        result["cfg_uncond"] = apply(cx, ct[half:], class_labels=cy[half:], method="full_output")
        return result

    return jax.tree.map(np.asarray, compile_fast(run, params)(params))


# --------------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_output_matches_reference(name):
    _, io, _, module, _ = fixture(name)
    run = reference_run(name)
    ref = nhwc(io["out"])
    assert run["out"].shape == ref.shape == (5, module.input_size, module.input_size, module.out_channels)
    assert rel_err(run["out"], ref) < TOLERANCE
    # The x-shaped call returns the first in_channels channels (the prediction, not the variance).
    assert run["x_shaped"].shape == nhwc(io["x"]).shape
    np.testing.assert_allclose(run["x_shaped"], run["out"][..., : module.in_channels], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", VARIANTS)
def test_activations_match_reference(name):
    _, io, _, _, _ = fixture(name)
    acts = reference_run(name)["acts"]
    for ours, theirs in ACTIVATIONS.items():
        assert rel_err(acts[ours], io[theirs]) < TOLERANCE, ours


def test_null_label_output_matches_reference():
    _, io, _, _, _ = fixture("dit_p2_d3")
    run = reference_run("dit_p2_d3")
    assert rel_err(run["null"], nhwc(io["out_null_label"])) < TOLERANCE
    np.testing.assert_allclose(run["omitted"], run["null"], rtol=0, atol=1e-6)  # omitted labels: null


def test_guided_output_matches_reference_cfg():
    """The reference's forward_with_cfg(cfg_x, cfg_t, cfg_y, 4) returns, for its batch
    [half, half] with labels [y, null], guidance on the first 3 channels (in both halves) and,
    on the other channels, each half's own pass."""
    _, io, _, module, _ = fixture("dit_p2_d3")
    run = reference_run("dit_p2_d3")
    ref = nhwc(io["cfg_out_scale4"])
    half = ref.shape[0] // 2
    assert np.all(io["cfg_y"][half:] == module.null_label) and np.all(io["cfg_t"][:half] == io["cfg_t"][half:])
    assert np.all(io["cfg_x"][:half] == io["cfg_x"][half:])
    assert rel_err(run["guided3"], ref[:half]) < TOLERANCE
    assert rel_err(run["guided3"][..., :3], ref[half:, ..., :3]) < TOLERANCE
    assert rel_err(run["cfg_uncond"][..., 3:], ref[half:, ..., 3:]) < TOLERANCE
    # Guidance on every prediction channel (the library's convention) changes channel 3 only.
    np.testing.assert_allclose(run["guided_all"][..., :3], run["guided3"][..., :3], rtol=0, atol=1e-5)
    np.testing.assert_allclose(run["guided_all"][..., 4:], run["guided3"][..., 4:], rtol=0, atol=1e-5)
    assert not np.allclose(run["guided_all"][..., 3], run["guided3"][..., 3], atol=1e-3)


def test_parameter_counts_of_the_12_published_configs():
    counts = json.loads((FIXTURES / "param_counts.json").read_text())["counts"]
    assert len(DIT_PRESETS) == len(counts) == 12
    for name in DIT_PRESETS:
        key = name.replace("-", "_").replace("/", "_")
        assert count_dit_params(dit_preset(name)) == counts[key], name
    assert count_dit_params(dit_preset("DiT-XL/2"))["total_incl_pos_embed"] == 675_129_632


def test_position_table_is_the_reference_pos_embed():
    _, _, state, module, _ = fixture("dit_p2_d3")
    ours = sincos_2d_positions(module.hidden_size, module.input_size // module.patch_size)
    np.testing.assert_allclose(ours, state["pos_embed"][0], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------


def test_loader_rejects_missing_extra_and_misshaped_tensors():
    _, _, state, module, _ = fixture("dit_p2_d3")
    missing = {k: v for k, v in state.items() if k != "blocks.1.mlp.fc2.bias"}
    with pytest.raises(convert.ConversionError, match=r"missing \['blocks\.1\.mlp\.fc2\.bias'\]"):
        load_dit_state_dict(module, missing)
    extra = dict(state, **{"blocks.3.attn.qkv.weight": state["blocks.0.attn.qkv.weight"]})
    with pytest.raises(convert.ConversionError, match=r"unexpected \['blocks\.3\.attn\.qkv\.weight'\]"):
        load_dit_state_dict(module, extra)
    bad = dict(state, **{"final_layer.linear.weight": state["final_layer.linear.weight"][:16]})
    with pytest.raises(convert.ConversionError, match=r"final_layer\.linear\.weight: shape \(16, 96\)"):
        load_dit_state_dict(module, bad)
    learned_pos = dict(state, pos_embed=state["pos_embed"] + 0.1)
    with pytest.raises(convert.ConversionError, match="pos_embed differs"):
        load_dit_state_dict(module, learned_pos)
    # The same weights for a network without learned sigma: the output layer does not fit.
    with pytest.raises(convert.ConversionError, match="final_layer.linear.weight"):
        load_dit_state_dict(module.clone(learn_sigma=False), state)


def test_loader_sources(tmp_path, monkeypatch):
    """npz path, training checkpoints ({'model', 'ema'}, DDP prefix) and .pth through the
    library's torch reader (replaced here: torch is optional)."""
    _, _, state, module, params = fixture("dit_p2_d3")
    flat = traverse_util.flatten_dict(params)
    same = lambda p: all(np.array_equal(v, traverse_util.flatten_dict(p)[k]) for k, v in flat.items())
    assert same(load_dit_state_dict(module, FIXTURES / "dit_p2_d3_state_dict.npz"))
    zeros = {k: np.zeros_like(v) for k, v in state.items()}
    zeros["pos_embed"] = state["pos_embed"]
    prefixed = {f"module.{k}": v for k, v in state.items()}
    assert same(load_dit_state_dict(module, {"model": zeros, "ema": prefixed, "opt": {}}))
    assert not same(load_dit_state_dict(module, {"model": zeros, "ema": prefixed}, use_ema=False))
    seen = []
    monkeypatch.setattr(convert, "load_torch_checkpoint", lambda path: seen.append(path) or state)
    assert same(load_dit_state_dict(module, tmp_path / "DiT-XL-2-256x256.pt"))
    assert seen == [str(tmp_path / "DiT-XL-2-256x256.pt")]
    # Loaded parameters are plain float32 numpy arrays.
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in flat.values())


# --------------------------------------------------------------------------------------------
# Logical axes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["DiT-S/2", "fixture", "unconditional"])
def test_logical_axes_cover_every_parameter(preset):
    if preset == "fixture":
        module = fixture("dit_p4_d2_nosigma")[3]
    elif preset == "unconditional":
        module = DiT(input_size=16, patch_size=8, hidden_size=64, depth=2, num_heads=2, num_classes=0)
    else:
        module = dit_preset(preset)
    x = jnp.zeros((1, module.input_size, module.input_size, module.in_channels))
    kwargs = {"class_labels": jnp.zeros((1,), jnp.int32)} if module.num_classes else {}
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x, jnp.zeros((1,)), **kwargs))["params"]
    axes = logical_axes(shapes)
    assert jax.tree.structure(axes) == jax.tree.structure(shapes)
    for shape, spec in zip(jax.tree.leaves(shapes), jax.tree.leaves(axes)):
        assert isinstance(spec, PartitionSpec) and len(spec) == len(shape.shape)
        assert all(name in LOGICAL_AXIS_NAMES for name in spec)
        assert len(set(spec)) == len(spec)  # no name twice in one array: rules can map each
    if module.num_classes:
        assert axes["y_embedder"]["embedding_table"] == PartitionSpec("vocab", "embed")
    assert axes["blocks_0"]["attn"]["qkv"]["kernel"] == PartitionSpec("embed", "qkv", "heads", "kv")
    with pytest.raises(KeyError, match="no axis names for DiT parameter blocks/attn/extra"):
        logical_axes({"blocks_0": {"attn": {"extra": shapes["blocks_0"]["attn"]["proj"]["bias"]}}})


def test_params_are_plain_arrays_and_shard_through_logical_axes():
    """init gives plain arrays (no boxed metadata), and flax maps the logical names to a mesh."""
    import flax.linen as nn

    _, io, _, module, params = fixture("dit_p4_d2_nosigma")
    x = nhwc(io["x"])[:1]
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.key(0), x, io["t"][:1], class_labels=jnp.zeros((1,), jnp.int32))
    )
    assert set(shapes) == {"params"}
    assert all(type(leaf) is jax.ShapeDtypeStruct for leaf in jax.tree.leaves(shapes["params"]))
    assert jax.tree.structure(shapes["params"]) == jax.tree.structure(params)

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tensor"))
    rules = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("vocab", None))
    shardings = nn.logical_to_mesh_sharding(logical_axes(params), mesh, rules)
    fc1 = shardings["blocks_1"]["mlp"]["fc1"]["kernel"]
    assert isinstance(fc1, NamedSharding) and fc1.spec == PartitionSpec("fsdp", "tensor")
    assert shardings["blocks_0"]["attn"]["proj"]["kernel"].spec == PartitionSpec("tensor", None, "fsdp")
    placed = jax.device_put(params, shardings)
    assert jax.tree.structure(placed) == jax.tree.structure(params)


# --------------------------------------------------------------------------------------------
# Behaviour: initialisation, remat, bfloat16, contract
# --------------------------------------------------------------------------------------------

TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=5)


def test_adaln_zero_initialisation():
    """At initialisation every block is the identity and the output is zero (sec. 3.2)."""
    module = DiT(**(TINY | {"depth": 1}))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    t, labels = jnp.array([3.0, 500.0]), jnp.array([1, 4])

    def init_and_run():
        params = module.init(jax.random.key(0), x, t, class_labels=labels)["params"]
        out, state = _run(module, params, x, t, labels)
        return out, {k: v["__call__"][0] for k, v in state["intermediates"].items()}

    out, acts = compile_fast(init_and_run)()
    assert out.shape == (2, 8, 8, 6) and np.all(np.asarray(out) == 0.0)
    pos = sincos_2d_positions(32, 4)
    np.testing.assert_allclose(acts["blocks_0"], acts["x_embedder"] + pos, rtol=0, atol=1e-6)
    assert float(jnp.std(acts["x_embedder"])) > 0.1  # the embeddings themselves are not zero


def test_call_contract_and_errors():
    module = DiT(**TINY, learn_sigma=False)
    x = jnp.ones((2, 8, 8, 3))
    # A scalar noise label and no class labels (the null label); shapes only.
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), x, 0.5))["params"]
    assert module.null_label == 5 and params["y_embedder"]["embedding_table"].shape == (6, 32)
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 8, 8, 3\)"):
        module.apply({"params": params}, jnp.ones((2, 16, 16, 3)), 0.5)
    with pytest.raises(ValueError, match=r"class_labels must be integers of shape \(2,\)"):
        module.apply({"params": params}, x, 0.5, class_labels=jnp.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="noise_labels must be a scalar or of shape"):
        module.apply({"params": params}, x, jnp.ones((3,)))
    uncond = DiT(**(TINY | {"num_classes": 0}))
    assert uncond.null_label is None
    with pytest.raises(ValueError, match="num_classes=0"):
        uncond.init(jax.random.key(0), x, 0.5, class_labels=jnp.array([1, 2]))
    no_null = DiT(**TINY, null_class=False)
    assert no_null.null_label is None
    with pytest.raises(ValueError, match="class_labels are required"):
        no_null.init(jax.random.key(0), x, 0.5)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        DiT(**(TINY | {"hidden_size": 36, "num_heads": 8}))
    with pytest.raises(ValueError, match=r"unknown DiT preset 'DiT-M/2'; valid names: DiT-S/2, DiT-S/4"):
        dit_preset("DiT-M/2")
    with pytest.raises(ValueError, match="set by the preset"):
        dit_preset("DiT-S/2", depth=3)


def random_params(module, x, seed=0, std=0.1):
    """Random parameters of ``module`` with every layer active (adaLN-Zero would leave the blocks
    and the output at zero), drawn with numpy from the shapes: no init function to compile."""
    kwargs = {"class_labels": jnp.zeros((x.shape[0],), jnp.int32)} if module.num_classes else {}
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x, jnp.ones((x.shape[0],)), **kwargs))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (std * rng.standard_normal(s.shape)).astype(np.float32), shapes["params"])


def test_training_with_the_library_loss_remat_and_bfloat16():
    """The network inside the library's pieces: EDM preconditioning (c_noise = ln(sigma) / 4) and
    score_sde's VP epsilon parametrization (999 t) give x-shaped predictions; the EDM denoising
    loss with classifier-free label dropout by the training code has the same gradient with
    per-block remat, and Adam steps reduce it; bfloat16 compute keeps float32 parameters and
    returns x's dtype."""
    plain = DiT(**(TINY | {"depth": 1}))
    remat, bf16 = plain.clone(remat=True), plain.clone(dtype=jnp.bfloat16)
    x0 = jax.random.uniform(jax.random.key(2), (4, 8, 8, 3), minval=-1, maxval=1)
    batch = {"image": x0, "label": jnp.array([0, 1, 2, 3])}
    params = random_params(plain, x0)
    edm_sde, edm = sde_lib.EDMSDE(), param_lib.edm_parametrization()
    vp_sde, vp = sde_lib.VPSDE(), param_lib.score_sde_parametrization("vpsde", continuous=True)

    def loss_fn(module):
        model_fn = make_model_fn(module, train=True, class_dropout=0.5, null_label=module.null_label)
        loss = losses.dsm_loss_fn(model_fn, edm_sde, edm, weighting="edm")
        return lambda p: loss(p, batch, jax.random.key(3))[0]

    opt = optax.adam(1e-2)

    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn(plain))(p)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss, g

    def others(p):
        net = lambda m: lambda xi, c: m.apply({"params": p}, xi, c, class_labels=batch["label"])
        t = jnp.full((4,), 0.7)
        preds = (edm.apply(net(plain), edm_sde, x0, t, "score"), vp.apply(net(plain), vp_sde, x0, t, "score"))
        return preds, net(plain)(x0, t), net(bf16)(x0, t), jax.grad(loss_fn(remat))(p)

    preds, out, out_bf16, g_remat = compile_fast(others, params)(params)
    assert all(p.shape == x0.shape and bool(jnp.all(jnp.isfinite(p))) for p in preds)
    state, history = opt.init(params), []
    step = compile_fast(step, params, state)
    for i in range(6):
        params, state, loss, g = step(params, state)
        history.append(float(loss))
        if i == 0:  # remat recomputes the blocks in the backward pass without changing values
            for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_remat)):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(a))))
    assert np.all(np.isfinite(history)) and history[-1] < 0.9 * history[0], history
    assert out_bf16.dtype == jnp.float32 and out_bf16.shape == x0.shape
    err = rel_err(out_bf16, out)
    assert 1e-5 < err < 5e-2, err  # bfloat16 really ran (not float32), and stayed close
    init = jax.eval_shape(lambda: bf16.init(jax.random.key(0), x0, jnp.ones((4,)), class_labels=batch["label"]))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(init["params"]))
