"""Sharded training through config.mesh: FSDP and tensor-parallel layouts hold 1/n of the state
per device, train like one device, report parameters that declare no axes, and resume across
layouts and device counts (orbax restores into the target layout)."""

import numpy as np
import pytest
from _scale_cli import ROOT, assert_trees_equal, history, load_state, run, run_script

from diffusion_jax.builders.config import ConfigError, load_config, validate_config

# One process with 8 simulated devices (the flag must be set before JAX starts) runs every
# layout, so each compiled step is built once; it prints one JSON object of measurements.
SCRIPT = r"""
import json, logging, tempfile
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from diffusion_jax.builders import diffusion as diffusion_builders, experiment, sharding as sharding_builders
from diffusion_jax.builders.config import load_config
from diffusion_jax.training import sharding as sh
from diffusion_jax.training.checkpoint import Checkpointer
from diffusion_jax.training.distributed import compilation_cache
from diffusion_jax.training.state import init_train_state
from diffusion_jax.training.step import make_train_step, shard_batch

compilation_cache()
devices = jax.devices()
out = {"devices": len(devices)}

def config(kind, data=-1, fsdp=1, tensor=1, **model):
    if kind == "dit":  # a 2-block DiT, class-conditional (label dropout and the null class in play)
        c = load_config("configs/digits/dit.py")
        c.model.hidden_size, c.model.depth, c.model.num_heads, c.model.num_classes = 32, 2, 4, 10
    else:  # the smallest DDPM++ U-Net
        c = load_config("configs/digits/ddpmpp_vp.py")
        c.model.nf, c.model.ch_mult, c.model.num_res_blocks, c.model.attn_resolutions = 16, (1,), 1, ()
        c.model.init_scale = 1.0  # every layer gets a real gradient
    c.optim.warmup = 0
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
    for k, v in model.items():
        setattr(c.model, k, v)
    return c

rng = np.random.default_rng(0)
B, STEPS = 16, 3
batches = [{"image": rng.uniform(-1, 1, (1, B, 8, 8, 1)).astype(np.float32),
            "label": rng.integers(0, 10, (1, B)).astype(np.int32)} for _ in range(STEPS)]

class Layout:
    def __init__(self, kind, n, **kw):
        self.c = config(kind, **kw)
        self.exp = experiment.build_experiment(self.c, devices=devices[:n])
        self.mesh = self.exp.mesh
        opt = diffusion_builders.build_optimizer(self.c)
        loss = diffusion_builders.build_loss(self.c, model_fn=self.exp.model_fn(train=True), sde=self.exp.sde,
                                             parametrization=self.exp.parametrization)
        params = self.exp.init_params(jax.random.PRNGKey(0))
        self.state0 = init_train_state(params, opt, jax.random.PRNGKey(1))
        self.layout = self.exp.layout(params)
        self.shardings = self.exp.state_shardings(self.state0, self.layout)
        self.step = jax.jit(make_train_step(loss, opt, ema_rate=0.9), donate_argnums=0,
                            out_shardings=(self.shardings, NamedSharding(self.mesh, P())))

    def start(self):
        return sh.place(self.state0, self.shardings)

    def run(self, state, first, last):
        losses = []
        for i in range(first, last):
            state, m = self.step(state, shard_batch(batches[i], self.mesh, leading_steps=True))
            losses.append(float(m["loss"][0]))
        return state, losses

_built = {}
def layout(kind, n, **kw):
    # One Layout (one compiled step) per configuration, shared by the checks below.
    key = (kind, n, tuple(sorted(kw.items())))
    if key not in _built:
        _built[key] = Layout(kind, n, **kw)
    return _built[key]

def host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))

def rel_gap(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    num = sum(float(np.sum((x - y) ** 2)) for x, y in zip(la, lb))
    return (num / sum(float(np.sum(y ** 2)) for y in lb)) ** 0.5

def max_rel(a, b):
    return max(float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-12))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))

def state_bytes(state):
    per = sh.bytes_per_device((state.params, state.opt_state, state.ema_params))
    total = sum(l.nbytes for l in jax.tree_util.tree_leaves((state.params, state.opt_state, state.ema_params)))
    return {"max": max(per.values()), "min": min(per.values()), "total": total, "devices": len(per)}

LAYOUTS = {"1": (1, {}), "data8": (8, {}), "data2_fsdp4": (8, {"data": 2, "fsdp": 4}),
           "fsdp4_tensor2": (8, {"data": 1, "fsdp": 4, "tensor": 2})}
for kind in ("dit", "unet"):
    res = out[kind] = {"layouts": {}}
    ref = None
    for name, (n, kw) in LAYOUTS.items():
        lay = layout(kind, n, **kw)
        state = lay.start()
        if name == "fsdp4_tensor2":
            res["specs"] = {"/".join(p): str(s) for p, s in lay.layout.specs.items()}
        state, losses = lay.run(state, 0, STEPS)
        got = host(state)
        if ref is None:
            ref = (got, losses)
        res["layouts"][name] = {"losses": losses, "param_gap": rel_gap(got.params, ref[0].params),
                                "param_max_rel": max_rel(got.params, ref[0].params),
                                "ema_gap": rel_gap(got.ema_params, ref[0].ema_params),
                                "loss_rel": max(abs(a - b) / abs(b) for a, b in zip(losses, ref[1]))}
    for name, kw in (("data8", {}), ("fsdp8", {"data": 1, "fsdp": 8})):
        lay = layout(kind, 8, **kw)
        res["bytes_" + name] = state_bytes(lay.start())
        res["replicated_" + name] = ["/".join(p) for p in lay.layout.replicated]

# Resharding restores of a DiT run: saved on fsdp=8 after 2 steps, restored on data=8, on 4
# devices (fsdp=4, then saved again) and on 1 device; each continues with step 3.
tmp = tempfile.mkdtemp()
src = layout("dit", 8, data=1, fsdp=8)
state, _ = src.run(src.start(), 0, 2)
saved = host(state)
ck = Checkpointer(f"{tmp}/a", async_save=False)
ck.save(2, state)
ck.wait()
state, cont = src.run(state, 2, 3)
expected = host(state)
restores = {}
def resume(lay, directory):
    template = jax.tree_util.tree_map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d),
                                      jax.eval_shape(lambda: lay.state0), lay.shardings)
    ck = Checkpointer(directory, read_only=True)
    restored = ck.restore(template, step=2).state
    ck.close()
    return restored
four = layout("dit", 4, data=1, fsdp=4)
r4 = resume(four, f"{tmp}/a")
ck = Checkpointer(f"{tmp}/b", async_save=False)
ck.save(2, r4)
ck.wait()
for name, n, kw, directory in (("fsdp8->data8", 8, {}, "a"), ("fsdp8->4 devices", 4, {"data": 1, "fsdp": 4}, "a"),
                               ("4 devices->1", 1, {}, "b")):
    lay = layout("dit", n, **kw)
    restored = resume(lay, f"{tmp}/{directory}")
    shardings_ok = all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(
        jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(lay.shardings)))
    identical = all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(host(restored)),
                                                        jax.tree_util.tree_leaves(saved)))
    state, losses = lay.run(restored, 2, 3)
    restores[name] = {"identical": identical, "in_target_layout": shardings_ok,
                      "devices": len(restored.params["final_layer"]["linear"]["kernel"].sharding.device_set),
                      "loss_rel": abs(losses[0] - cont[0]) / abs(cont[0]),
                      "param_gap": rel_gap(host(state).params, expected.params)}
out["restores"] = restores

# bfloat16 compute and remat on the tensor-parallel layout against one device.
bf = {}
for name, n, kw in (("1", 1, {}), ("fsdp4_tensor2", 8, {"data": 1, "fsdp": 4, "tensor": 2})):
    lay = layout("dit", n, dtype="bfloat16", remat=True, **kw)
    state, losses = lay.run(lay.start(), 0, 2)
    bf[name] = (host(state).params, losses)
out["bf16_remat"] = {"losses": [bf[k][1] for k in bf], "param_gap": rel_gap(bf["fsdp4_tensor2"][0], bf["1"][0])}

# A parameter without logical axes on a sharded mesh: refused with its path, or replicated with
# a warning under mesh.replicate_unannotated.
c = config("dit", data=1, fsdp=8)
exp = experiment.build_experiment(c)
params = dict(jax.eval_shape(exp.init_params, jax.random.PRNGKey(0)))
params["extra_layer"] = {"w": jax.ShapeDtypeStruct((16, 8), jnp.float32)}
try:
    sharding_builders.build_plan(c, params, exp.mesh)
    out["unannotated_error"] = None
except sharding_builders.UnannotatedParameters as e:
    out["unannotated_error"] = str(e)
c.mesh.replicate_unannotated = True
records = []
handler = logging.Handler()
handler.emit = lambda record: records.append(record.getMessage())
logging.getLogger("diffusion_jax.builders.sharding").addHandler(handler)
plan = sharding_builders.build_plan(c, params, exp.mesh)
out["unannotated_allowed"] = {"undeclared": ["/".join(p) for p in plan.undeclared],
                              "spec": str(plan.specs[("extra_layer", "w")]), "warnings": records}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    return run_script(SCRIPT, tmp_path_factory.mktemp("data"), devices=8, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_fsdp8_keeps_an_eighth_of_the_state_per_device(measured, kind):
    """Parameters + Adam moments + EMA bytes per device, read from the arrays' shards: all of
    it on every device with data=8, 1/8 of it (within 10%) with fsdp=8."""
    replicated, sharded = measured[kind]["bytes_data8"], measured[kind]["bytes_fsdp8"]
    assert replicated["devices"] == sharded["devices"] == 8
    assert replicated["min"] == replicated["max"] == replicated["total"]
    assert sharded["total"] == replicated["total"]
    assert sharded["max"] <= 1.10 * sharded["total"] / 8, (sharded, measured[kind]["replicated_fsdp8"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_every_layout_trains_like_one_device(measured, kind):
    """Three Adam steps of the library's loss on (data=8), (data=2, fsdp=4), (fsdp=4, tensor=2)
    give the parameters, EMA and losses of one device to float tolerance (relative L2 distance
    over the whole tree; the per-example noise is drawn for the global batch, so only the order
    of float sums differs)."""
    layouts = measured[kind]["layouts"]
    assert set(layouts) == {"1", "data8", "data2_fsdp4", "fsdp4_tensor2"}
    for name, r in layouts.items():
        assert r["loss_rel"] < 1e-5, (name, r)
        assert r["param_gap"] < 1e-5 and r["ema_gap"] < 1e-5, (name, r)
    if kind == "dit":
        # Element by element too. (Not for the U-Net: the biases of its convolutions that feed a
        # GroupNorm get a gradient that is zero up to rounding, which Adam's first steps,
        # g / (|g| + eps), turn into updates of +-lr whose signs are rounding noise on any layout.)
        assert all(r["param_max_rel"] < 1e-4 for r in layouts.values()), layouts
        # Tensor parallelism is in play: heads, MLP features and adaLN outputs over 'tensor'.
        specs = measured["dit"]["specs"]
        assert specs["blocks_0/attn/qkv/kernel"] == "P('fsdp', None, 'tensor', None)"
        assert specs["blocks_0/mlp/fc1/kernel"] == "P('fsdp', 'tensor')"
        assert specs["blocks_0/mlp/fc2/kernel"] == "P('tensor', 'fsdp')"
        assert specs["blocks_0/attn/proj/kernel"] == "P('tensor', None, 'fsdp')"


@pytest.mark.slow
def test_resharding_restores_are_exact_and_continue_alike(measured):
    """fsdp=8 -> data=8, fsdp=8 -> 4 devices -> 1 device: the restored state equals the saved
    one bit for bit, lies in the target layout, and the next step gives the loss and parameters
    of the run that continued on fsdp=8."""
    restores = measured["restores"]
    assert set(restores) == {"fsdp8->data8", "fsdp8->4 devices", "4 devices->1"}
    assert [restores[k]["devices"] for k in ("fsdp8->data8", "fsdp8->4 devices", "4 devices->1")] == [8, 4, 1]
    for name, r in restores.items():
        assert r["identical"] and r["in_target_layout"], (name, r)
        assert r["loss_rel"] < 1e-5 and r["param_gap"] < 1e-5, (name, r)


@pytest.mark.slow
def test_bfloat16_and_remat_on_a_tensor_parallel_layout(measured):
    """bfloat16 compute with remat on (fsdp=4, tensor=2) follows one device within bfloat16
    rounding (3 significant digits)."""
    one, sharded = measured["bf16_remat"]["losses"]
    np.testing.assert_allclose(sharded, one, rtol=2e-2)
    assert measured["bf16_remat"]["param_gap"] < 1e-2


@pytest.mark.slow
def test_a_parameter_without_logical_axes_is_reported(measured):
    error = measured["unannotated_error"]
    assert error is not None and "extra_layer/w" in error and "mesh.replicate_unannotated" in error
    allowed = measured["unannotated_allowed"]
    assert allowed["undeclared"] == ["extra_layer/w"] and allowed["spec"] == "P()"
    assert any("extra_layer/w" in w and "replicated" in w for w in allowed["warnings"])


@pytest.mark.slow
def test_cli_run_on_fsdp8_resumes_on_one_device(scale_reference, scale_data_dir, tmp_path):
    """The command line: 2 steps of the tiny U-Net with --config.mesh.fsdp=8 on 8 devices, then
    the same command on 1 device (the default mesh) resumes and finishes 4 steps; the result is
    the uninterrupted 1-device run's."""
    work = tmp_path / "run"
    first = run(
        "train", work, "--config.training.n_iters=2", "--config.mesh.fsdp=8", data_dir=scale_data_dir, devices=8
    )
    assert "mesh data=1 fsdp=8 tensor=1" in first.stdout
    second = run("train", work, "--config.training.n_iters=4", data_dir=scale_data_dir)
    assert "resumed from checkpoint at step 2" in second.stdout
    ours, ref = load_state(work / "checkpoints" / "4"), load_state(scale_reference / "checkpoints" / "4")
    assert_trees_equal(ours["params"], ref["params"], rtol=1e-4, atol=1e-6)
    for a, b in zip(history(work), history(scale_reference)[:4]):
        assert (a["split"], a["step"]) == (b["split"], b["step"])
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)


def _config(**changes):
    config = load_config(str(ROOT / "configs" / "digits" / "dit.py"))
    for path, value in changes.items():
        section, name = path.split(".")
        with config[section].ignore_type():
            setattr(config[section], name, value)
    return config


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"mesh.data": -1, "mesh.fsdp": -1}, "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1"),
        ({"mesh.fsdp": 0}, "mesh.fsdp = 0 must be >= 1, or -1"),
        ({"mesh.rules": "embed"}, "rule 'embed' is not 'logical_name:mesh_axis'"),
        ({"mesh.rules": "embed:data"}, "the mesh axis must be fsdp or tensor"),
        ({"model.dit_preset": "DiT-S/2"}, "leave config.model.{depth, hidden_size, num_heads, patch_size} at None"),
        ({"model.depth": None}, "missing depth"),
        ({"model.dit_preset": "DiT-Q/2"}, "model.dit_preset = 'DiT-Q/2' is not allowed"),
        ({"model.dropout": 0.1}, "DiT has no dropout"),
        ({"model.num_heads": 5}, "must be a positive multiple of num_heads"),
        ({"training.sde": "vesde"}, "DiT does not"),
    ],
)
def test_bad_dit_and_mesh_configs_are_one_message(changes, message):
    with pytest.raises(ConfigError) as info:
        validate_config(_config(**changes))
    assert message in str(info.value)


def test_a_mesh_that_does_not_fit_the_devices_is_a_config_error():
    from diffusion_jax.builders.sharding import build_mesh

    with pytest.raises(ConfigError, match=r"config.mesh: the mesh data=3, fsdp=1, tensor=1 has 3 devices; there are 1"):
        build_mesh(_config(**{"mesh.data": 3}))
