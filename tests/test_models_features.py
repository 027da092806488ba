"""Behaviour of the networks beyond score_sde parity: class and context conditioning, remat,
bfloat16 compute, dropout, noise-label handling and validation. Tiny networks on 8x8 images."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from diffusion_jax.models import DDPM, MODELS, NCSNpp, NCSNv2, NCSNv2_128, NCSNv2_256, get_model
from diffusion_jax.models.layers import geometric_sigmas

B, H, C = 2, 8, 3
TINY = {
    "ncsnpp": dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1),
    "ddpmpp": dict(
        nf=16,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        dropout=0.1,
        fir=False,
        progressive_input="none",
        embedding_type="positional",
        scale_by_sigma=False,
        centered=True,
    ),
    "ddpm": dict(nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1),
}
CLASSES = {"ncsnpp": NCSNpp, "ddpmpp": NCSNpp, "ddpm": DDPM}


def make(kind, **overrides):
    return CLASSES[kind](**{**TINY[kind], **overrides})


def inputs(seed=0):
    kx, kl = jax.random.split(jax.random.key(seed))
    x = jax.random.uniform(kx, (B, H, H, C))
    labels = jnp.array([0.5, 7.0])  # sigma for NCSN++; a time step for DDPM(++)
    return x, labels


def shapes(module, **kwargs):
    """The parameter tree's shapes (``jax.eval_shape``: nothing is computed)."""
    x, labels = inputs()
    return jax.eval_shape(lambda: module.init(jax.random.key(0), x, labels, **kwargs))["params"]


def random_params(module, seed=1, **kwargs):
    """Random parameters for ``module`` with every branch active (the initialisers themselves are
    tested against score_sde in test_models_parity.py; here only the wiring matters). Drawn
    with numpy from the shapes, which avoids compiling an init function per network."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name in ("scale", "gamma", "alpha"):  # normalisation gains around 1
            return jnp.asarray(1 + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 10
        return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes(module, **kwargs))


def key(seed):
    return jax.random.key(seed, impl="rbg")  # cheap to compile, unlike threefry


@functools.cache
def apply_fn(module):
    """A jitted apply, one per (hashable) module so equal networks share compilations."""
    return jax.jit(
        lambda p, x, labels, class_labels=None, context=None, train=False, key=None: module.apply(
            {"params": p},
            x,
            labels,
            class_labels=class_labels,
            context=context,
            train=train,
            rngs=None if key is None else {"dropout": key},
        ),
        static_argnames=("train",),
    )


def tree_paths(params):
    return set(traverse_util.flatten_dict(params))


# -- registry and validation ----------------------------------------------------------------------


def test_registry_and_unknown_names():
    assert set(MODELS) == {"ncsnpp", "ddpm", "ncsnv2_64", "ncsnv2_128", "ncsnv2_256", "classifier", "dit"}
    assert isinstance(get_model("ncsnpp", nf=16), NCSNpp)
    with pytest.raises(
        ValueError,
        match="unknown model 'unet'; valid names: classifier, ddpm, dit, ncsnpp, ncsnv2_128, ncsnv2_256, ncsnv2_64",
    ):
        get_model("unet")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("progressive", "skip", r"progressive must be one of \('none', 'output_skip', 'residual'\), got 'skip'"),
        ("resblock_type", "unet", "resblock_type must be one of"),
        ("nonlinearity", "gelu", "unknown nonlinearity 'gelu'"),
        ("dropout", 1.0, r"dropout must be in \[0, 1\)"),
    ],
)
def test_invalid_hyperparameters_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        NCSNpp(**{field: value})


# -- class conditioning ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ncsnpp", "ddpm"])
def test_class_labels_condition_the_output(kind):
    module = make(kind, num_classes=3)
    base = make(kind)
    params = random_params(module)
    # Off, the tree is score_sde's; on, it only adds the (num_classes + 1)-row embedding.
    assert tree_paths(params) - tree_paths(shapes(base)) == {("class_embed", "embedding")}
    assert tree_paths(shapes(base)) <= tree_paths(params)
    assert params["class_embed"]["embedding"].shape == (4, 4 * TINY[kind]["nf"])
    assert module.null_label == 3
    f = apply_fn(module)
    x, labels = inputs()
    out0 = f(params, x, labels, jnp.array([0, 0]))
    out1 = f(params, x, labels, jnp.array([1, 1]))
    null = f(params, x, labels, jnp.array([3, 3]))
    assert float(jnp.max(jnp.abs(out0 - out1))) > 1e-3 * float(jnp.max(jnp.abs(out0)))
    np.testing.assert_array_equal(f(params, x, labels, None), null)  # no labels = null label
    mixed = f(params, x, labels, jnp.array([0, 1]))
    np.testing.assert_allclose(mixed[0], out0[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mixed[1], out1[1], rtol=1e-5, atol=1e-5)


def test_class_labels_need_a_class_conditional_network():
    module = make("ncsnpp")
    x, labels = inputs()
    with pytest.raises(ValueError, match="got class_labels but was built with num_classes=0"):
        module.apply({"params": random_params(module)}, x, labels, class_labels=jnp.array([0, 1]))


# -- cross-attention --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ncsnpp", "ddpm"])
def test_cross_attention_attends_to_context(kind):
    module = make(kind, cross_attn_resolutions=(4,), cross_attn_heads=2, context_dim=5)
    x, labels = inputs()
    ctx = jax.random.normal(jax.random.key(3), (B, 7, 5))
    params = random_params(module, context=ctx)
    added = {p[0] for p in tree_paths(params) - tree_paths(shapes(make(kind)))}
    assert tree_paths(shapes(make(kind))) <= tree_paths(params)
    assert added and all(name.startswith("CrossAttnBlock_") for name in added)
    f = apply_fn(module)
    out_a = f(params, x, labels, None, ctx)
    out_b = f(params, x, labels, None, ctx + 1.0)
    assert float(jnp.max(jnp.abs(out_a - out_b))) > 1e-3 * float(jnp.max(jnp.abs(out_a)))
    # Permuting the context sequence does not matter (attention is a set operation).
    np.testing.assert_allclose(f(params, x, labels, None, ctx[:, ::-1]), out_a, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="needs a context of shape"):
        module.apply({"params": params}, x, labels)
    with pytest.raises(ValueError, match="expected context_dim=5"):
        module.apply({"params": params}, x, labels, context=jnp.zeros((B, 7, 4)))


# -- remat, dtype, dropout ----------------------------------------------------------------------------


@pytest.mark.slow  # compiles two forward+backward passes: ~20 s on 2 cold CPU cores
def test_remat_gives_identical_outputs_and_gradients():
    """Checkpointed blocks recompute the same function (dropout masks included): the loss is
    bitwise equal and gradients agree to float32 rounding (XLA fuses the recomputation
    differently)."""
    module = make("ncsnpp", ch_mult=(1,), attn_resolutions=(8,))  # one level: fewer ops to compile
    remat = module.clone(remat=True)
    x, labels = inputs()
    params = random_params(module)

    def loss(m, p):
        return jnp.mean(m.apply({"params": p}, x, labels, train=True, rngs={"dropout": key(5)}) ** 2)

    l0, g0 = jax.jit(jax.value_and_grad(functools.partial(loss, module)))(params)
    l1, g1 = jax.jit(jax.value_and_grad(functools.partial(loss, remat)))(params)
    np.testing.assert_array_equal(l1, l0)
    assert jax.tree.structure(g0) == jax.tree.structure(g1)
    # Relative to the largest gradient: some leaves (biases feeding a GroupNorm) have a true
    # gradient of zero and hold rounding noise only.
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(g0))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * scale)


@pytest.mark.parametrize("kind", ["ddpm", "ncsnv2"])
def test_remat_other_networks_same_outputs(kind):
    module = NCSNv2(nf=8, num_scales=10) if kind == "ncsnv2" else make(kind)
    x, _ = inputs()
    labels = jnp.array([1, 4])
    params = random_params(module)
    f = lambda m: jax.jit(lambda p: m.apply({"params": p}, x, labels))  # noqa: E731
    np.testing.assert_array_equal(f(module.clone(remat=True))(params), f(module)(params))


def test_bfloat16_compute_is_close_to_float32():
    f32 = make("ncsnpp")
    bf16 = make("ncsnpp", dtype=jnp.bfloat16)
    params = random_params(f32)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes(bf16)))  # param_dtype
    x, labels = inputs()
    ref = apply_fn(f32)(params, x, labels)
    out = apply_fn(bf16)(params, x, labels)
    assert out.dtype == jnp.float32  # outputs come back in the input dtype
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert 1e-5 < rel < 5e-2  # really computed in bf16, yet close
    bf16_in = jax.eval_shape(lambda p, x: bf16.apply({"params": p}, x, labels), params, x.astype(jnp.bfloat16))
    assert bf16_in.dtype == jnp.bfloat16


def test_dropout_only_in_training():
    module = make("ncsnpp", dropout=0.5)
    params = random_params(module)
    f = apply_fn(module)
    x, labels = inputs()
    eval_out = f(params, x, labels)
    np.testing.assert_array_equal(f(params, x, labels), eval_out)  # deterministic, no key needed
    a = f(params, x, labels, train=True, key=key(1))
    b = f(params, x, labels, train=True, key=key(2))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3 * float(jnp.max(jnp.abs(a)))
    assert float(jnp.max(jnp.abs(a - eval_out))) > 1e-3 * float(jnp.max(jnp.abs(a)))
    no_dropout = make("ncsnpp", dropout=0.0)
    np.testing.assert_allclose(
        apply_fn(no_dropout)(params, x, labels, train=True, key=key(1)), eval_out, rtol=1e-6, atol=1e-6
    )


# -- noise labels and data range -----------------------------------------------------------------------


def test_positional_scale_by_sigma_divides_by_the_decreasing_table():
    scaled = make("ddpmpp", scale_by_sigma=True, sigma_min=0.01, sigma_max=50.0, num_scales=10)
    plain = make("ddpmpp")
    params = random_params(plain)
    x, _ = inputs()
    labels = jnp.array([0, 9])  # index 0 is sigma_max, the last index sigma_min
    table = geometric_sigmas(0.01, 50.0, 10)
    assert table[0] == pytest.approx(50.0) and table[-1] == pytest.approx(0.01)
    out = apply_fn(scaled)(params, x, labels)
    ref = apply_fn(plain)(params, x, labels)
    np.testing.assert_allclose(out * table[np.array([0, 9])][:, None, None, None], ref, rtol=1e-5, atol=1e-6)


def test_fourier_embedding_takes_sigma_and_scales_by_it():
    scaled = make("ncsnpp")
    plain = make("ncsnpp", scale_by_sigma=False)
    params = random_params(scaled)
    x, labels = inputs()
    out = apply_fn(scaled)(params, x, labels)
    ref = apply_fn(plain)(params, x, labels)
    np.testing.assert_allclose(out * labels[:, None, None, None], ref, rtol=1e-5, atol=1e-5)
    # A scalar label is broadcast over the batch.
    np.testing.assert_allclose(
        apply_fn(scaled)(params, x, 0.5), apply_fn(scaled)(params, x, jnp.array([0.5, 0.5])), rtol=1e-6
    )


@pytest.mark.parametrize("kind", ["ncsnpp", "ddpm"])
def test_uncentered_data_is_mapped_to_minus_one_one(kind):
    a = make(kind, centered=False)
    b = make(kind, centered=True)
    params = random_params(a)
    x, labels = inputs()
    np.testing.assert_allclose(
        apply_fn(a)(params, x, labels), apply_fn(b)(params, 2 * x - 1, labels), rtol=1e-5, atol=1e-5
    )


def test_unconditional_ddpm_ignores_the_labels():
    module = make("ddpm", conditional=False)
    params = random_params(module)
    assert "Dense_0" not in params
    x, _ = inputs()
    f = apply_fn(module)
    np.testing.assert_array_equal(f(params, x, jnp.array([1.0, 2.0])), f(params, x, jnp.array([500.0, 900.0])))


@pytest.mark.parametrize("cls, size", [(NCSNv2, 8), (NCSNv2_128, 16), (NCSNv2_256, 32)])
def test_ncsnv2_variants(cls, size):
    """Layouts of the three NCSNv2 variants (numerics of the shared blocks: parity tests)."""
    module = cls(nf=4, num_scales=5)
    x = jax.ShapeDtypeStruct((B, size, size, C), jnp.float32)
    labels = jnp.array([0, 4])
    params = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, labels), x)["params"]
    out = jax.eval_shape(lambda p, x: module.apply({"params": p}, x, labels), params, x)
    assert out.shape == x.shape and out.dtype == x.dtype
    n_blocks = sum(len(blocks) for _, blocks in cls.STAGES)
    assert sorted(k for k in params if k.startswith("ResidualBlock")) == sorted(
        f"ResidualBlock_{i}" for i in range(n_blocks)
    )
    assert len([k for k in params if k.startswith("RefineBlock")]) == len(cls.REFINES)
    with pytest.raises(ValueError, match="has no class or context conditioning"):
        jax.eval_shape(lambda p, x: module.apply({"params": p}, x, labels, class_labels=jnp.array([0, 1])), params, x)
