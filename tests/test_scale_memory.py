"""Memory levers, each a config switch: gradient accumulation (the same update as one batch,
with no example moving between devices), remat (the same gradients, recomputed), bfloat16
compute (float32 parameters, optimizer state and loss); and all three through the command line."""

import json

import numpy as np
import pytest
from _scale_cli import ROOT, env, load_state, run, run_script  # noqa: F401

# Runs on 2 simulated devices (the flag must be set before JAX starts, hence a subprocess; two
# are enough to see examples move between devices, and compile faster than 8) and prints one
# JSON object of measurements.
SCRIPT = r"""
import json, re
import jax, jax.numpy as jnp, numpy as np, optax
from diffusion_jax.builders import diffusion as diffusion_builders, experiment
from diffusion_jax.builders.config import load_config
from diffusion_jax.training.state import init_train_state
from diffusion_jax.training.distributed import compilation_cache
from diffusion_jax.training.step import make_mesh, make_train_step, replicate, shard_batch

compilation_cache()

def config(**model):
    c = load_config("configs/digits/ddpmpp_vp.py")
    c.model.nf, c.model.ch_mult, c.model.num_res_blocks, c.model.attn_resolutions = 8, (1,), 1, ()
    c.optim.warmup = 0
    c.model.init_scale = 1.0  # not score_sde's near-zero output layer: every layer gets a real gradient
    for k, v in model.items():
        setattr(c.model, k, v)
    return c

mesh = make_mesh()
rng = np.random.default_rng(0)
B = 8  # 4 per device, 2 per device and micro-batch
data = {"x": rng.normal(size=(1, B, 8, 8, 1)), "t": rng.uniform(0.05, 1.0, size=(1, B)), "y": rng.normal(size=(1, B, 8, 8, 1))}
batch = shard_batch({k: v.astype(np.float32) for k, v in data.items()}, mesh, leading_steps=True)
out = {"devices": jax.device_count()}

def pieces(**model):
    c = config(**model)
    exp = experiment.build_experiment(c)
    model_fn = exp.model_fn(train=True)

    # Deterministic regression through the real network: the noisy input, time and target come
    # with the batch, so any split of the batch must give the same mean gradient.
    def loss(params, b, key):
        out = model_fn(params, b["x"], b["t"], {}, key)
        per_example = jnp.mean(jnp.square(out.astype(jnp.float32) - b["y"]), axis=(1, 2, 3))
        return jnp.mean(per_example), {"loss_per_example": per_example}

    opt = diffusion_builders.build_optimizer(c)
    state = replicate(init_train_state(exp.init_params(jax.random.PRNGKey(0)), opt, jax.random.PRNGKey(1)), mesh)
    return exp, model_fn, loss, opt, state

def collectives(text):
    return {op: len(re.findall(op + r"[.(]", text)) for op in ("all-to-all", "collective-permute", "all-gather", "all-reduce")}

# Plain SGD with learning rate 1, so an update is minus the gradient; Adam's first step,
# g / (|g| + eps), would magnify float noise in near-zero gradients.
sgd = optax.sgd(1.0)
steps = {}
for name, model, k in (("f32", {}, 1), ("accum", {}, 2), ("remat", {"remat": True}, 1), ("bf16", {"dtype": "bfloat16"}, 1)):
    _, _, loss, _, state = pieces(**model)
    state = state.replace(opt_state=replicate(sgd.init(state.params), mesh))
    lowered = jax.jit(make_train_step(loss, sgd, ema_rate=0.9, grad_accum_steps=k)).lower(state, batch)
    conv_lines = [l for l in lowered.as_text().splitlines() if "stablehlo.convolution" in l]
    compiled = lowered.compile()
    new, metrics = compiled(state, batch)
    update = jax.tree_util.tree_map(lambda a, b: a - b, new.params, state.params)
    steps[name] = update
    floats = [a for a in jax.tree_util.tree_leaves((new.params, new.ema_params, new.opt_state)) if jnp.issubdtype(a.dtype, jnp.floating)]
    out[name] = {
        "collectives": collectives(compiled.as_text()),
        "compiled_convs": len(re.findall(r" convolution\(", compiled.as_text())),
        "bf16_convs": sum("bf16" in l for l in conv_lines), "convs": len(conv_lines),
        "loss": float(metrics["loss"][0]), "loss_dtype": str(metrics["loss"].dtype),
        "grad_norm": float(metrics["grad_norm"][0]),
        "state_dtypes": sorted({str(a.dtype) for a in floats}),
        "update_size": max(float(jnp.max(jnp.abs(u))) for u in jax.tree_util.tree_leaves(update)),
    }

def rel_gap(a, b):
    num = sum(float(jnp.sum((u - v) ** 2)) for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    den = sum(float(jnp.sum(v ** 2)) for v in jax.tree_util.tree_leaves(b))
    return (num / den) ** 0.5

out["gap"] = {name: rel_gap(steps[name], steps["f32"]) for name in ("accum", "remat", "bf16")}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    return run_script(SCRIPT, tmp_path_factory.mktemp("data"), devices=2, timeout=600)


@pytest.mark.slow
def test_grad_accumulation_is_one_batch_without_moving_examples(measured):
    assert measured["devices"] == 2
    f32, accum = measured["f32"], measured["accum"]
    # Two micro-batches per device give the update of the whole batch (float tolerance), and
    # the update is not trivially small.
    assert f32["update_size"] > 1e-2
    assert measured["gap"]["accum"] < 1e-5  # float reassociation only
    np.testing.assert_allclose(accum["loss"], f32["loss"], rtol=1e-6)
    np.testing.assert_allclose(accum["grad_norm"], f32["grad_norm"], rtol=1e-6)
    # Micro-batches are strided so every device keeps its own examples: accumulation adds no
    # all-to-all, permute or gather (only the gradient all-reduce, once per micro-batch).
    for c in (f32["collectives"], accum["collectives"]):
        assert c["all-to-all"] == c["collective-permute"] == c["all-gather"] == 0, c
        assert c["all-reduce"] > 0


@pytest.mark.slow
def test_remat_recomputes_and_gives_the_same_gradients(measured):
    assert measured["remat"]["compiled_convs"] > measured["f32"]["compiled_convs"]  # the forward is recomputed
    assert measured["gap"]["remat"] < 1e-5  # float reassociation only


@pytest.mark.slow
def test_bf16_computes_in_bf16_and_keeps_float32_state(measured):
    f32, bf16 = measured["f32"], measured["bf16"]
    assert f32["bf16_convs"] == 0 and bf16["bf16_convs"] == bf16["convs"] > 0  # every convolution, both passes
    assert bf16["loss_dtype"] == "float32"  # accumulated in float32
    assert bf16["state_dtypes"] == ["float32"]  # parameters, EMA, optimizer state
    # bf16 has 8 bits of mantissa: loss and gradient agree to about 1%, not to float32 precision.
    assert 1e-5 < measured["gap"]["bf16"] < 5e-2
    np.testing.assert_allclose(bf16["loss"], f32["loss"], rtol=2e-2)
    assert bf16["loss"] != f32["loss"]


@pytest.mark.slow
def test_memory_switches_train_through_the_command_line(scale_data_dir, tmp_path):
    proc = run(
        "train",
        tmp_path / "w",
        "--config.training.n_iters=6",
        "--config.model.dtype=bfloat16",
        "--config.model.remat=True",
        "--config.training.grad_accum_steps=2",
        "--config.training.batch_size=32",
        data_dir=scale_data_dir,
        devices=2,
    )
    assert "global batch 32 = 1 host(s) x 2 device(s) x 16 example(s) in 2 micro-batches" in proc.stdout
    records = [json.loads(l) for l in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert len(losses) == 6 and np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    state = load_state(tmp_path / "w" / "checkpoints" / "6")
    import jax

    # Parameters, EMA and Adam moments stay float32 under bfloat16 compute.
    floats = [
        a
        for a in jax.tree_util.tree_leaves((state["params"], state["ema_params"], state["opt_state"]))
        if np.issubdtype(a.dtype, np.floating)
    ]
    assert {a.dtype for a in floats} == {np.dtype("float32")}


@pytest.mark.slow
def test_grad_accumulation_cuts_activation_memory_on_cpu():
    # On CPU the micro-batches are unrolled (convolution gradients run ~25x slower inside a while
    # loop); micro-batch i must wait for micro-batch i - 1's gradients, or XLA runs all the
    # forward passes first and keeps every micro-batch's activations alive at once.
    import jax

    from diffusion_jax.builders import diffusion as diffusion_builders
    from diffusion_jax.builders import experiment
    from diffusion_jax.builders.config import load_config
    from diffusion_jax.training.state import init_train_state
    from diffusion_jax.training.step import make_train_step, replicate, shard_batch

    c = load_config(str(ROOT / "configs/cifar10/vp/ddpmpp_continuous.py"))
    c.model.nf, c.model.ch_mult, c.model.num_res_blocks, c.model.attn_resolutions = 16, (1,), 1, ()
    c.training.batch_size = 16
    exp = experiment.build_experiment(c)
    opt = diffusion_builders.build_optimizer(c)
    loss = diffusion_builders.build_loss(
        c, model_fn=exp.model_fn(train=True), sde=exp.sde, parametrization=exp.parametrization
    )
    state = replicate(init_train_state(exp.init_params(jax.random.PRNGKey(0)), opt, jax.random.PRNGKey(1)), exp.mesh)
    batch = shard_batch({"image": np.zeros((1, 16, 32, 32, 3), np.float32)}, exp.mesh, leading_steps=True)
    temp = {}
    for k in (1, 4):
        step = make_train_step(loss, opt, ema_rate=0.999, grad_accum_steps=k, unroll=True)
        temp[k] = jax.jit(step).lower(state, batch).compile().memory_analysis().temp_size_in_bytes
    # Four micro-batches hold about a quarter of the activations (measured 0.27; 0.93 when the
    # micro-batches are not ordered).
    assert temp[4] < 0.5 * temp[1], temp
