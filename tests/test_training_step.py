"""The training step and loop: Adam + EMA match a hand computation, several jitted steps and
gradient accumulation equal their plain forms, NaNs are caught, checkpoints resume exactly."""

import json
import os
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax.training import checkpoint as ckpt_lib
from diffusion_jax.training import loop as loop_lib
from diffusion_jax.training.logging import MetricWriter
from diffusion_jax.training.state import ema_decay, init_train_state, make_optimizer
from diffusion_jax.training.step import make_mesh, make_train_step, replicate, shard_batch


def _quadratic_loss(params, batch, key):
    """Deterministic least squares: mean over examples of ||w x - y||^2."""
    pred = batch["x"] @ params["w"]
    per_example = jnp.sum((pred - batch["y"]) ** 2, axis=-1)
    return jnp.mean(per_example), {"loss_per_example": per_example}


def _noisy_loss(params, batch, key):
    noise = 0.1 * jax.random.normal(key, batch["y"].shape)
    per_example = jnp.sum((batch["x"] @ params["w"] - batch["y"] - noise) ** 2, axis=-1)
    return jnp.mean(per_example), {"loss_per_example": per_example}


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = (x @ np.array([[1.0, -2.0], [0.5, 0.0], [0.0, 1.5]], np.float32)).astype(np.float32)
    return x, y


def _state(opt, seed=0):
    return init_train_state({"w": jnp.zeros((3, 2))}, opt, jax.random.PRNGKey(seed))


def test_step_matches_optax_and_ema_by_hand():
    opt = make_optimizer(lr=1e-2, warmup=0, grad_clip=-1)
    state = _state(opt)
    x, y = _data(8)
    step = jax.jit(make_train_step(_quadratic_loss, opt, ema_rate=0.9))
    new, metrics = step(state, {"x": x[None], "y": y[None]})
    # By hand with optax directly.
    grads = jax.grad(lambda p: _quadratic_loss(p, {"x": x, "y": y}, None)[0])(state.params)
    upd, _ = optax.adam(1e-2).update(grads, optax.adam(1e-2).init(state.params), state.params)
    params = optax.apply_updates(state.params, upd)
    np.testing.assert_allclose(new.params["w"], params["w"], rtol=1e-6)
    np.testing.assert_allclose(new.ema_params["w"], 0.1 * params["w"], rtol=1e-6)
    assert int(new.step) == 1 and metrics["loss"].shape == (1,)
    np.testing.assert_allclose(metrics["grad_norm"][0], optax.tree.norm(grads), rtol=1e-6)
    assert not np.array_equal(new.rng, state.rng)


def test_warmup_clipping_and_ema_warmup():
    opt = make_optimizer(lr=1.0, warmup=4, grad_clip=0.5)
    state = _state(opt)
    x, y = _data(8)
    grads = jax.grad(lambda p: _quadratic_loss(p, {"x": x, "y": y}, None)[0])(state.params)
    assert float(optax.tree.norm(grads)) > 0.5
    # Step 0 of a linear warm-up has learning rate 0: parameters do not move.
    new, _ = jax.jit(make_train_step(_quadratic_loss, opt, ema_rate=0.9))(state, {"x": x[None], "y": y[None]})
    np.testing.assert_array_equal(new.params["w"], state.params["w"])
    np.testing.assert_allclose(ema_decay(jnp.int32(0), 0.999, True), 0.1)
    np.testing.assert_allclose(ema_decay(jnp.int32(10**6), 0.999, True), 0.999)


def test_jitted_steps_and_grad_accumulation_equal_plain_steps():
    opt = make_optimizer(lr=1e-2, warmup=2, grad_clip=1.0)
    x, y = _data(48)
    batches = {"x": x.reshape(3, 16, 3), "y": y.reshape(3, 16, 2)}
    plain = jax.jit(make_train_step(_noisy_loss, opt, ema_rate=0.99))
    state = _state(opt)
    for i in range(3):
        state, _ = plain(state, {k: v[i : i + 1] for k, v in batches.items()})
    three, metrics = plain(_state(opt), batches)
    np.testing.assert_allclose(three.params["w"], state.params["w"], rtol=1e-6)
    np.testing.assert_array_equal(three.rng, state.rng)
    assert metrics["loss"].shape == (3,)
    # Accumulating 4 micro-batches of 4 = one batch of 16 (deterministic loss).
    acc = jax.jit(make_train_step(_quadratic_loss, opt, ema_rate=0.99, grad_accum_steps=4))
    full = jax.jit(make_train_step(_quadratic_loss, opt, ema_rate=0.99))
    a, ma = acc(_state(opt), batches)
    f, mf = full(_state(opt), batches)
    np.testing.assert_allclose(a.params["w"], f.params["w"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ma["loss"], mf["loss"], rtol=1e-5)


def test_nonfinite_step_is_skipped():
    opt = make_optimizer(lr=1e-2, warmup=0)
    x, y = _data(8)
    y_bad = y.copy()
    y_bad[3, 0] = np.nan
    step = jax.jit(make_train_step(_quadratic_loss, opt, ema_rate=0.9))
    state = _state(opt)
    new, metrics = step(state, {"x": np.stack([x, x]), "y": np.stack([y_bad, y])})
    assert metrics["nonfinite"].tolist() == [1, 0]
    assert int(new.step) == 1  # one good step applied, the bad one skipped
    good, _ = step(state, {"x": x[None], "y": y[None]})
    np.testing.assert_allclose(new.params["w"], good.params["w"], rtol=1e-6)


def _grain_iter(x, y, batch, seed=0):
    ds = grain.MapDataset.source(np.arange(len(x))).shuffle(seed=seed).repeat().batch(batch)
    ds = ds.map(lambda idx: {"x": x[idx], "y": y[idx]})
    return iter(ds.to_iter_dataset())


def _fit(
    tmp_path,
    n_iters,
    *,
    stop_after=None,
    signal_at=None,
    nan_policy="skip",
    data=None,
    n_jitted=2,
    background_compile=False,
    progress=False,
    log_freq=2,
):
    x, y = data if data is not None else _data(64)
    opt = make_optimizer(lr=1e-2, warmup=3, grad_clip=1.0)
    mesh = make_mesh()
    step = jax.jit(make_train_step(_noisy_loss, opt, ema_rate=0.9))
    it = _grain_iter(x, y, 8)
    state = replicate(_state(opt), mesh)
    ck = ckpt_lib.Checkpointer(tmp_path / "checkpoints", keep_period=8, max_to_keep=1)
    writer = MetricWriter(tmp_path, tensorboard=False)
    try:
        state = ck.restore(state, data_iterator=it).state
        writer.truncate(int(state.step))
    except ckpt_lib.NoCheckpointError:
        pass
    if signal_at is not None:
        inner, count = it, [0]

        class Wrapped:
            def __next__(self):
                count[0] += 1
                if count[0] == signal_at:
                    os.kill(os.getpid(), signal.SIGTERM)
                return next(inner)

            def get_state(self):
                return inner.get_state()

            def set_state(self, s):
                inner.set_state(s)

        it = Wrapped()
    try:
        return loop_lib.fit(
            state=state,
            step_fn=step,
            data_iter=it,
            mesh=mesh,
            n_iters=n_iters,
            n_jitted_steps=n_jitted,
            checkpointer=ck,
            checkpoint_every=4,
            writer=writer,
            log_freq=log_freq,
            stop_after=stop_after,
            nan_policy=nan_policy,
            progress=progress,
            background_compile=background_compile,
        )
    finally:
        ck.close()


def _history(tmp_path):
    return [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_resume_and_sigterm_reproduce_an_uninterrupted_run(tmp_path):
    ref_state, summary = _fit(tmp_path / "ref", 14)
    assert summary.final_step == 14
    # Stopped after 6 steps (checkpoint at 6), resumed to the end.
    _fit(tmp_path / "stop", 14, stop_after=6)
    state, _ = _fit(tmp_path / "stop", 14)
    np.testing.assert_array_equal(state.params["w"], ref_state.params["w"])
    np.testing.assert_array_equal(state.ema_params["w"], ref_state.ema_params["w"])
    assert _history(tmp_path / "stop") == _history(tmp_path / "ref")
    # SIGTERM while drawing the 5th batch: a checkpoint is saved, Preempted is raised, resume is
    # exact. The loop reads one call ahead, so the 5th batch is drawn while the 2nd call (steps 3
    # and 4) runs: the stop comes after step 4, and the batches read ahead are read again.
    with pytest.raises(loop_lib.Preempted, match="checkpoint saved"):
        _fit(tmp_path / "term", 14, signal_at=5)
    steps = ckpt_lib.Checkpointer(tmp_path / "term" / "checkpoints", read_only=True).steps()
    assert steps[-1] == 4
    state, _ = _fit(tmp_path / "term", 14)
    np.testing.assert_array_equal(state.params["w"], ref_state.params["w"])
    assert _history(tmp_path / "term") == _history(tmp_path / "ref")


def test_background_compile_switches_grouping_without_changing_the_run(tmp_path, capsys):
    """One step per call while the 4-step program compiles in a thread, 4 per call from the next
    multiple of 4 once it is ready: the same parameters and logged history as 1 and 4 steps per
    call throughout (a remainder of 2 steps at the end runs one step per call)."""
    n = 202
    runs = {
        "one": dict(n_jitted=1),
        "four": dict(n_jitted=4),
        "background": dict(n_jitted=4, background_compile=True, progress=True),
    }
    states = {name: _fit(tmp_path / name, n, log_freq=20, **kw)[0] for name, kw in runs.items()}
    out = capsys.readouterr().out
    assert "compiled the train step and ran 1 step(s)" in out
    assert "compiled the 4-step train step in the background" in out
    for name in ("four", "background"):
        np.testing.assert_array_equal(states[name].params["w"], states["one"].params["w"])
        assert _history(tmp_path / name) == _history(tmp_path / "one")


def test_nan_policy_stop_names_the_step(tmp_path):
    x, y = _data(64)
    y[5:, :] = np.nan  # every batch but (maybe) the first has a NaN
    with pytest.raises(loop_lib.TrainingDiverged, match=r"non-finite loss or gradient at step 1: .*'loss': nan"):
        _fit(tmp_path / "a", 10, nan_policy="stop", data=(x, y), n_jitted=1)
    with pytest.raises(loop_lib.TrainingDiverged, match="consecutive non-finite steps"):
        _fit(tmp_path / "b", 1000, nan_policy="skip", data=(x, y), n_jitted=1)


def test_corrupt_newest_checkpoint_falls_back(tmp_path, caplog):
    _fit(tmp_path, 8)
    _fit(tmp_path, 12)  # checkpoints 8 (kept series) and 12 (newest)
    steps = ckpt_lib.Checkpointer(tmp_path / "checkpoints", read_only=True).steps()
    assert steps == [8, 12]
    for root, _, files in os.walk(tmp_path / "checkpoints" / "12" / "state"):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"\x00garbage")
    opt = make_optimizer(lr=1e-2, warmup=3, grad_clip=1.0)
    ck = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
    with caplog.at_level("WARNING"):
        restored = ck.restore(_state(opt))
    assert restored.step == 8 and int(restored.state.step) == 8 and restored.meta["step"] == 8
    assert len(restored.errors) == 1 and "checkpoints/12 could not be restored" in restored.errors[0]
    step, state, meta, errors = restored  # callers may still unpack it as a tuple
    assert (step, meta, errors) == (restored.step, restored.meta, restored.errors)
    assert "trying an older one" in caplog.text


def test_sharded_batch_layout():
    mesh = make_mesh()
    b = shard_batch({"x": np.ones((2, 4, 3))}, mesh, leading_steps=True)
    assert b["x"].shape == (2, 4, 3)
    assert b["x"].sharding.spec == jax.sharding.PartitionSpec(None, "data")
