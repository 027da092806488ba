"""Helpers for the scale and fault-tolerance tests: the command line on a tiny digits network in
subprocesses (so each run gets its own device count, process group and signals), and readers
for what a run leaves in its workdir."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from diffusion_jax import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "digits" / "ddpmpp_vp.py"
DRIVER = ROOT / "tests" / "_scale_driver.py"

# One resolution level, one residual block, no attention: the smallest network the config
# builds, so a step takes a fraction of a second on one CPU core.
TINY_NET = [
    "--config.model.nf=8",
    "--config.model.ch_mult=(1,)",
    "--config.model.num_res_blocks=1",
    "--config.model.attn_resolutions=()",
]
# The tiny network on the main job's config. Checkpoints every 2 steps, kept for good every 4;
# one metrics line per step.
TINY = [
    f"--config={CONFIG}",
    *TINY_NET,
    "--config.training.batch_size=16",
    "--config.training.n_jitted_steps=1",
    "--config.training.log_freq=1",
    "--config.training.eval_freq=100000",
    "--config.training.snapshot_freq=4",
    "--config.training.snapshot_freq_for_preemption=2",
    "--config.training.snapshot_sampling=False",
    "--config.optim.warmup=0",
]
REFERENCE_STEPS = 20


def cli_in_process(*argv) -> int:
    """``diffusion-jax ARGV`` in this process, without the compilation cache; its exit status."""
    return cli.run([*map(str, argv), "--no_compilation_cache"])


def env(data_dir, *, devices: int = 1, **extra) -> dict:
    e = dict(os.environ, PYTHONPATH=str(ROOT), DIFFUSION_JAX_DATA_DIR=str(data_dir), JAX_PLATFORMS="cpu")
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    e.update(extra)
    return e


def command(mode, workdir, *extra, driver: tuple = ()) -> list:
    base = [sys.executable, str(DRIVER), *driver, "--"] if driver else [sys.executable, "-m", "diffusion_jax"]
    return [*base, mode, f"--workdir={workdir}", *TINY, *extra]


def run(mode, workdir, *extra, data_dir, devices=1, driver=(), check=True, timeout=600):
    proc = subprocess.run(
        command(mode, workdir, *extra, driver=driver),
        capture_output=True,
        text=True,
        env=env(data_dir, devices=devices),
        cwd=ROOT,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{mode} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


class Background:
    """A command-line run in the background, its output in files (so a kill loses nothing)."""

    def __init__(self, mode, workdir, *extra, data_dir, devices=1, driver=(), log=None):
        workdir = pathlib.Path(workdir)
        self.log = pathlib.Path(log or workdir.parent / f"{workdir.name}.{time.monotonic_ns()}")
        self.out, self.err = open(f"{self.log}.out", "w"), open(f"{self.log}.err", "w")
        self.proc = subprocess.Popen(
            command(mode, workdir, *extra, driver=driver),
            stdout=self.out,
            stderr=self.err,
            env=env(data_dir, devices=devices),
            cwd=ROOT,
        )

    def wait(self, timeout=600) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.out.close()
            self.err.close()

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    @property
    def stdout(self) -> str:
        return pathlib.Path(f"{self.log}.out").read_text()

    @property
    def stderr(self) -> str:
        return pathlib.Path(f"{self.log}.err").read_text()


def run_script(script: str, data_dir, *, devices: int, timeout: int = 600) -> dict:
    """Run ``script`` (Python source) in a process with ``devices`` simulated devices and return
    the JSON it prints on its one line that starts with ``RESULT ``."""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env=env(data_dir, devices=devices),
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-5000:]
    return json.loads(lines[0][len("RESULT ") :])


def logged_steps(workdir) -> list[int]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written
        if record.get("split") == "train":
            steps.append(record["step"])
    return steps


def wait_for_step(workdir, step: int, run: Background, timeout=300) -> None:
    """Poll the metrics until a train record for ``step`` or later is written."""
    t0 = time.monotonic()
    while max(logged_steps(workdir), default=0) < step:
        if run.proc.poll() is not None:
            raise AssertionError(f"the run exited ({run.proc.returncode}) before step {step}:\n{run.stderr[-3000:]}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"no step {step} within {timeout} s")
        time.sleep(0.05)


def history(workdir) -> list[dict]:
    return [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def checkpoint_steps(workdir) -> list[int]:
    root = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())


def load_state(checkpoint_dir) -> dict:
    """The TrainState saved in ``<checkpoint>/state`` as NumPy arrays, whatever device layout
    wrote it (orbax needs a target layout when the writer's devices differ from this process's)."""
    import jax
    import orbax.checkpoint as ocp

    path = pathlib.Path(checkpoint_dir) / "state"
    ck = ocp.StandardCheckpointer()
    meta = ck.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
    return jax.tree_util.tree_map(np.asarray, ck.restore(path, abstract))


def assert_trees_equal(a, b, *, rtol=0.0, atol=0.0, what="parameters"):
    import jax

    leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    leaves_b = jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b), f"{what}: different structures"
    for (path, x), y in zip(leaves_a, leaves_b):
        name = jax.tree_util.keystr(path)
        if rtol == atol == 0.0:
            np.testing.assert_array_equal(x, y, err_msg=f"{what}{name}")
        else:
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=f"{what}{name}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Session fixtures, registered in conftest.py so that every test module shares one of each.
@pytest.fixture(scope="session")
def scale_data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("scale_data")


@pytest.fixture(scope="session")
def scale_reference(tmp_path_factory, scale_data_dir):
    """An uninterrupted single-device run of REFERENCE_STEPS steps (checkpoints kept every 4)."""
    work = tmp_path_factory.mktemp("scale_reference") / "run"
    run("train", work, f"--config.training.n_iters={REFERENCE_STEPS}", data_dir=scale_data_dir)
    return work
