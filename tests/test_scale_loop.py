"""The training loop's contracts with multi-host machinery, in process: the counter it gives
JAX's preemption protocol, and the global-batch layout check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.training import loop as loop_lib
from diffusion_jax.training.state import init_train_state, make_optimizer
from diffusion_jax.training.step import make_mesh, make_train_step, per_device_batch, replicate


def _loss(params, batch, key):
    per_example = jnp.sum((batch["x"] @ params["w"] - batch["y"]) ** 2, axis=-1)
    return jnp.mean(per_example), {"loss_per_example": per_example}


class _NoticeAt:
    """A checkpointer whose preemption notice arrives at loop iteration ``at``, as JAX's protocol
    delivers it: True on every process at the same counter value (the fastest one's + 1)."""

    def __init__(self, at):
        self.at, self.counters, self.saved = at, [], []

    def reached_preemption(self, counter):
        self.counters.append(counter)
        return counter == self.at

    def save(self, step, state, **kwargs):
        self.saved.append(step)

    def wait(self):
        pass

    def check_for_errors(self):
        pass


def test_preemption_counter_counts_loop_iterations():
    """Two optimizer steps per call, and one of them skipped as non-finite: the protocol still
    gets 1, 2, 3, ... (the optimizer step, 2, 3, 5, would stop at the wrong call on some
    processes, or never)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4, 3)).astype(np.float32)
    y = rng.normal(size=(6, 4, 2)).astype(np.float32)
    y[2, 0, 0] = np.nan  # the first step of the second call
    batches = iter([{"x": x[i], "y": y[i]} for i in range(6)])
    opt = make_optimizer(lr=1e-2, warmup=0)
    mesh = make_mesh(jax.devices()[:1])
    state = replicate(init_train_state({"w": jnp.zeros((3, 2))}, opt, jax.random.PRNGKey(0)), mesh)
    notice = _NoticeAt(3)
    with pytest.raises(loop_lib.Preempted, match="stopped at step 5 on a preemption signal"):
        loop_lib.fit(
            state=state,
            step_fn=jax.jit(make_train_step(_loss, opt, ema_rate=0.9)),
            data_iter=batches,
            mesh=mesh,
            n_iters=100,
            n_jitted_steps=2,
            checkpointer=notice,
            checkpoint_every=0,
            progress=False,
        )
    assert notice.counters == [1, 2, 3]
    assert notice.saved == [5]


@pytest.mark.parametrize(
    "batch, devices, hosts, accum, per_device",
    [
        (128, 8, 1, 1, 16),
        (128, 8, 2, 1, 16),
        (128, 8, 2, 4, 16),
        (16, 16, 4, 1, 1),
    ],
)
def test_per_device_batch(batch, devices, hosts, accum, per_device):
    assert per_device_batch(batch, num_devices=devices, num_processes=hosts, grad_accum_steps=accum) == per_device


def test_per_device_batch_errors_say_what_divides():
    with pytest.raises(
        ValueError,
        match=r"training.batch_size = 100 \(the global batch\) does not divide over the "
        r"8 devices \(2 hosts x 4 devices\); use a multiple of 8, e.g. 96 or 104",
    ):
        per_device_batch(100, num_devices=8, num_processes=2, name="training.batch_size")
    with pytest.raises(
        ValueError,
        match=r"gives 2 examples per device \(1 host x 8 devices\), which do not split into "
        r"grad_accum_steps = 4 micro-batches; use a global batch that is a multiple of 32",
    ):
        per_device_batch(16, num_devices=8, grad_accum_steps=4)
