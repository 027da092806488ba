"""End to end through the command line: train, eval (loss, samples, bits/dim) and sample on
the embedded digits with a tiny network; resume; bad configs and workdirs give clear messages."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "digits" / "ddpmpp_vp.py"

TINY = [
    "--config.model.nf=8",
    "--config.model.num_res_blocks=1",
    "--config.model.attn_resolutions=()",
    "--config.training.batch_size=16",
    "--config.training.n_jitted_steps=1",
    "--config.training.log_freq=1",
    "--config.training.eval_freq=2",
    "--config.training.snapshot_freq=4",
    "--config.training.snapshot_freq_for_preemption=2",
    "--config.training.snapshot_samples=4",
    "--config.sampling.method=dpmpp_2m",
    "--config.sampling.num_steps=3",
    "--config.sampling.batch_size=4",
    "--config.eval.batch_size=100",
    "--config.eval.num_samples=4",
    "--config.eval.bpd_rtol=1e-2",
    "--config.eval.bpd_atol=1e-2",
    "--config.eval.bpd_max_examples=8",
    "--config.optim.warmup=0",
]


# eval with samples, their quality (the digits detector) and bits/dim.
EVAL = [
    "--config.eval.enable_sampling=True",
    "--config.eval.enable_bpd=True",
    "--config.eval.enable_quality=True",
    "--config.eval.detector=digits",
    "--config.eval.fid_counts=(2,)",
    "--config.eval.kid_subset_size=4",
    "--config.eval.is_splits=2",
]


def tensorboard_scalars(directory) -> set:
    """``(tag, step)`` of every scalar in the event files of ``directory`` (TFRecord framing)."""
    import struct

    from tensorboardX.proto import event_pb2

    found = set()
    for path in pathlib.Path(directory).glob("events.out.tfevents.*"):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                found.add((value.tag, event.step))
    return found


def run(mode, workdir, *extra, env_extra=None, check=True, config=True):
    """``diffusion-jax MODE`` on ``workdir``: with the test config and TINY, or (``config=False``)
    from the workdir alone."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), DIFFUSION_JAX_DATA_DIR=str(workdir.parent / "data"))
    env.update(env_extra or {})
    given = [f"--config={CONFIG}", *TINY] if config else []
    cmd = [sys.executable, "-m", "diffusion_jax", mode, f"--workdir={workdir}", *given, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{mode} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("exp") / "run"
    proc = run("train", work, "--config.training.n_iters=4")
    return work, proc


@pytest.mark.slow
def test_train_eval_sample(trained):
    work, proc = trained
    assert "trained steps 0->4" in proc.stdout
    summary = json.loads((work / "summary.json").read_text())
    assert summary["final_step"] == 4 and summary["nonfinite_steps"] == 0
    history = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if h["split"] == "train"] == [1, 2, 3, 4]
    assert [h["step"] for h in history if h["split"] == "eval"] == [2, 4]
    assert all(np.isfinite(h["loss"]) for h in history)
    assert (work / "samples" / "step_00000004.png").exists()
    assert any((work / "tensorboard").iterdir())
    assert sorted(os.listdir(work / "checkpoints")) == ["2", "4"]

    # The workdir is the unit: eval and sample need no config, only what may change.
    assert (work / "config.py").exists()
    proc = run("eval", work, *EVAL, config=False)
    res = json.loads((work / "eval" / "results_00000004.json").read_text())
    assert res["eval_examples"] == 297  # the whole digits test split, no dropped remainder
    assert np.isfinite(res["eval_loss"])
    assert res["bpd_examples"] == 8 and np.isfinite(res["bpd"]) and res["bpd_num_levels"] == 17
    assert res["sampling_nfe"] > 0
    assert res["quality_detector"] == "digits" and res["fid_num_samples"] == 4 and "fid_2" in res
    assert all(np.isfinite(res[k]) for k in ("fid", "kid", "inception_score", "precision", "recall"))
    assert (work / "eval" / "reference_digits_digits8x8.npz").exists()
    samples = np.load(work / "eval" / "samples_00000004.npz")["samples"]
    assert samples.shape == (4, 8, 8, 1)
    # The evaluation goes to metrics.jsonl and TensorBoard too.
    records = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
    evaluation = [r for r in records if r["split"] == "evaluation"]
    assert [r["step"] for r in evaluation] == [2, 4] and evaluation[-1]["eval_loss"] == res["eval_loss"]
    assert {("evaluation/eval_loss", 4), ("evaluation/fid", 4)} <= tensorboard_scalars(work / "tensorboard")
    # A rerun (e.g. after Ctrl-C) keeps what was evaluated with the same settings.
    proc = run("eval", work, *EVAL, config=False)
    assert "checkpoint 4: evaluated before with these settings" in proc.stdout
    assert json.loads((work / "eval" / "results_00000004.json").read_text())["eval_loss"] == res["eval_loss"]

    out = work / "my_samples"
    proc = run("sample", work, "--num_samples=6", f"--out={out}", "--config.sampling.method=ddim", config=False)
    saved = np.load(str(out) + ".npz")
    x = saved["samples"]
    assert x.shape == (6, 8, 8, 1) and np.all(np.isfinite(x))
    settings = json.loads(str(saved["settings"]))
    assert settings["sampling.method"] == "ddim" and settings["step"] == 4 and settings["nfe"] == 3 + 1  # + denoise
    assert pathlib.Path(str(out) + ".png").exists()
    assert "wrote 6 samples of checkpoint 4" in proc.stdout
    # What fixes the trained model cannot change; an unconditional network takes no labels.
    proc = run("sample", work, "--config.model.nf=16", config=False, check=False)
    assert proc.returncode == 2 and "trained with other values of model.nf" in proc.stderr
    proc = run("sample", work, "--label=3", config=False, check=False)
    assert proc.returncode == 2 and "labels need a class-conditional network" in proc.stderr


@pytest.mark.slow
def test_eval_over_two_processes_equals_one(trained, tmp_path):
    """Multi-host eval: each process draws its share of the sample chunks on its own devices and
    extracts their features, the reference features of its shard of the train split likewise;
    the rows are gathered in order, so the metrics and samples equal those of one process."""
    import shutil

    from _scale_cli import free_port

    work, _ = trained
    one, two = tmp_path / "one", tmp_path / "two"
    for copy in (one, two):  # without any cached reference statistics or results
        shutil.copytree(work, copy, ignore=shutil.ignore_patterns("eval"))
    settings = [
        *EVAL,
        "--config.eval.enable_bpd=False",
        "--config.eval.enable_loss=False",
        "--config.eval.num_samples=8",
        "--config.sampling.batch_size=2",
        "--config.eval.begin_ckpt=4",
    ]
    run("eval", one, *settings, config=False)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), DIFFUSION_JAX_DATA_DIR=str(work.parent / "data"))
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "diffusion_jax",
                "eval",
                f"--workdir={two}",
                *settings,
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
            ],  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
    a, b = (json.loads((w / "eval" / "results_00000004.json").read_text()) for w in (one, two))
    for k in ("fid", "fid_2", "kid", "inception_score", "precision", "recall"):
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert b["fid_num_samples"] == a["fid_num_samples"] == 8
    for name in ("samples_00000004.npz", "reference_digits_digits8x8.features.npy"):
        load = (lambda f: np.load(f)["samples"]) if name.endswith(".npz") else np.load
        x, y = load(one / "eval" / name), load(two / "eval" / name)
        assert x.shape == y.shape
        np.testing.assert_allclose(y, x, atol=1e-4, err_msg=name)


def _config_with(overrides):
    """The test config with command-line style overrides applied in-process."""
    import ast

    from diffusion_jax.builders.config import load_config

    config = load_config(str(CONFIG))
    for item in overrides:
        key, value = item[len("--config.") :].split("=", 1)
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        config.update_from_flattened_dict({key: value})
    return config


@pytest.mark.slow
def test_load_gives_a_trained_model(trained, monkeypatch):
    """diffusion_jax.load(workdir): the config, SDE, network and EMA parameters of a checkpoint,
    with sample (any sampler by name) and the likelihoods."""
    import jax

    import diffusion_jax
    from diffusion_jax.builders.config import ConfigError

    work, _ = trained
    monkeypatch.setenv("DIFFUSION_JAX_DATA_DIR", str(work.parent / "data"))
    model = diffusion_jax.load(work, step=2)
    assert model.step == 2 and model.shape == (8, 8, 1) and model.config.model.nf == 8
    x, info = model.sample(jax.random.PRNGKey(0), 2, sampler="dpmpp_2m", num_steps=3)
    assert x.shape == (2, 8, 8, 1) and np.all(np.isfinite(x)) and int(info.nfe) == 3
    levels = jax.numpy.asarray(np.random.default_rng(0).integers(0, 17, (2, 8, 8, 1)))
    bpd, _ = model.bits_per_dim(jax.random.PRNGKey(1), levels, rtol=1e-2, atol=1e-2)
    assert bpd.shape == (2,) and np.all(np.isfinite(np.asarray(bpd)))
    config = _config_with(TINY)
    config.model.nf = 16  # a different network cannot load this workdir
    with pytest.raises(ConfigError, match="model.nf"):
        diffusion_jax.load(work, config=config)


@pytest.mark.slow
def test_labels_choose_the_class_and_are_saved(tmp_path, monkeypatch):
    """A class-conditional network: sample --labels writes the labels next to the samples, and
    load().sample takes them too."""
    import jax

    import diffusion_jax
    from diffusion_jax import modes

    monkeypatch.setenv("DIFFUSION_JAX_DATA_DIR", str(tmp_path / "data"))
    extra = ["--config.model.num_classes=10", "--config.training.n_iters=1", "--config.training.eval_freq=100"]
    config = _config_with([*TINY, "--config.training.snapshot_sampling=False", *extra])
    modes.train(config, tmp_path / "w")
    out = modes.sample(config, tmp_path / "w", labels=[3, 3, 7], out=str(tmp_path / "s"))
    saved = np.load(out)
    assert saved["samples"].shape == (3, 8, 8, 1) and saved["labels"].tolist() == [3, 3, 7]
    model = diffusion_jax.load(tmp_path / "w")
    x, _ = model.sample(jax.random.PRNGKey(0), 2, labels=5, guidance_scale=1.0)
    assert x.shape == (2, 8, 8, 1) and np.all(np.isfinite(x))


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(trained, tmp_path):
    work, _ = trained
    # Continue the trained run to 6 steps: it resumes at 4.
    proc = run("train", work, "--config.training.n_iters=6")
    assert "resumed from checkpoint at step 4" in proc.stdout
    assert "trained steps 4->6" in proc.stdout
    history = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if h["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    # --stop_after stops with a checkpoint, a rerun finishes the job.
    fresh = tmp_path / "fresh"
    run("train", fresh, "--config.training.n_iters=4", "--stop_after=2")
    assert json.loads((fresh / "summary.json").read_text())["final_step"] == 2
    proc = run("train", fresh, "--config.training.n_iters=4")
    assert "resumed from checkpoint at step 2" in proc.stdout


def test_command_line_errors(tmp_path):
    proc = run("train", tmp_path / "w", "--config.training.sde=vp", check=False)
    assert proc.returncode == 2
    assert "training.sde = 'vp' is not allowed; valid: vesde, vpsde" in proc.stderr
    assert "Traceback" not in proc.stderr
    # tests/test_cli.py runs the other bad invocations in-process.
    proc = run("eval", tmp_path / "empty", check=False)
    assert proc.returncode == 2 and "no checkpoint in" in proc.stderr
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # running as root: permissions are not enforced
            pytest.skip("cannot make an unwritable directory as this user")
        proc = run("train", ro / "w", check=False)
        assert proc.returncode == 2 and "is not writable" in proc.stderr
    finally:
        ro.chmod(0o700)


def test_incompatible_workdir_is_refused(tmp_path):
    from diffusion_jax.builders.config import ConfigError, load_config
    from diffusion_jax.modes import setup

    config = load_config(str(CONFIG))
    work = tmp_path / "w"
    work.mkdir()
    (work / "config.json").write_text(config.to_json_best_effort())
    setup.check_workdir_config(config, work)  # same config: fine
    config.model.nf = 64
    config.training.n_iters = 7  # allowed to change
    with pytest.raises(ConfigError, match="incompatible config; these keys differ: model.nf"):
        setup.check_workdir_config(config, work)
