"""Faults through the command line: kills (SIGKILL, SIGTERM) and corrupt or partial checkpoints
lose no work, a non-finite loss stops or is skipped at the step it appears, a full disk, an
unwritable workdir or missing data give a clear message and keep what was saved."""

import os
import pathlib
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from _scale_cli import (
    REFERENCE_STEPS,
    Background,
    assert_trees_equal,
    checkpoint_steps,
    history,
    load_state,
    logged_steps,
    run,
    wait_for_step,
)

N = REFERENCE_STEPS


def _garble_newest(work) -> int:
    """Overwrite every array file of the newest checkpoint with junk (a corrupt checkpoint)."""
    newest = checkpoint_steps(work)[-1]
    files = [p for p in (work / "checkpoints" / str(newest) / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    assert files
    for p in files:
        p.write_bytes(b"\x00junk")
    return newest


def _truncate_newest(work) -> int:
    """Delete half of the newest checkpoint's files (a partial copy, e.g. an interrupted sync)."""
    newest = checkpoint_steps(work)[-1]
    files = sorted(p for p in (work / "checkpoints" / str(newest)).rglob("*") if p.is_file())
    for p in files[::2]:
        p.unlink()
    return newest


@pytest.mark.slow
def test_kills_and_bad_checkpoints_lose_no_work(scale_reference, scale_data_dir, tmp_path):
    """SIGKILL, SIGTERM, SIGKILL after corrupting the newest checkpoint, Ctrl-C, Ctrl-C twice, then
    a run to the end after deleting half of the newest checkpoint: the final state and the metric history
    equal those of the uninterrupted scale_reference run, bit for bit."""
    work = tmp_path / "run"
    args = (f"--config.training.n_iters={N}",)

    def start():
        return Background("train", work, *args, data_dir=scale_data_dir)

    def resume_point():
        # Wait for progress past anything a previous run logged, so stale lines do not count.
        return max(logged_steps(work), default=0) + 2

    # 1. SIGKILL: no chance to save; at most the steps since the last checkpoint are redone.
    r = start()
    wait_for_step(work, 5, r)
    r.proc.kill()
    assert r.wait() == -signal.SIGKILL

    # 2. SIGTERM: the run saves a checkpoint at the step it reached and exits with 143.
    saved = checkpoint_steps(work)  # complete ones only (a save cut short stays a temporary directory)
    r = start()
    wait_for_step(work, resume_point(), r)
    r.signal(signal.SIGTERM)
    assert r.wait() == 143, r.stderr[-2000:]
    assert not saved or f"resumed from checkpoint at step {saved[-1]}\n" in r.stdout
    stopped = int(r.stderr.split("stopped at step ")[1].split()[0])
    assert "checkpoint saved, rerun to resume" in r.stderr
    assert checkpoint_steps(work)[-1] == stopped

    # 3. The newest checkpoint is corrupt: the run warns, resumes from the one before; SIGKILL.
    bad = _garble_newest(work)
    r = start()
    wait_for_step(work, resume_point(), r)
    r.proc.kill()
    r.wait()
    assert f"checkpoint {work / 'checkpoints' / str(bad)} could not be restored" in r.stderr
    assert "skipped 1 unreadable newer checkpoint(s)" in r.stdout
    moved = list((tmp_path / "run" / "checkpoints_unreadable").iterdir())
    assert [p.name.split("-")[0] for p in moved] == [str(bad)]  # kept aside for inspection

    # 4. Ctrl-C (SIGINT): saves at the step it reached, exits with 130 and says how to resume.
    r = start()
    wait_for_step(work, resume_point(), r)
    r.signal(signal.SIGINT)
    assert r.wait() == 130, r.stderr[-2000:]
    stopped = int(r.stderr.split("interrupted at step ")[1].split(";")[0])
    assert "rerun the same command to resume" in r.stderr and "Traceback" not in r.stderr
    assert checkpoint_steps(work)[-1] == stopped

    # 4b. Ctrl-C twice: the second quits at once, with no traceback (the work since the last
    # checkpoint is redone on resume, as after a kill).
    r = start()
    wait_for_step(work, resume_point(), r)
    r.signal(signal.SIGINT)
    time.sleep(0.3)
    r.signal(signal.SIGINT)
    assert r.wait() == 130, r.stderr[-2000:]
    assert "Traceback" not in r.stderr

    # 5. Half of the newest checkpoint is missing: fall back again and run to the end.
    bad = _truncate_newest(work)
    r = start()
    assert r.wait() == 0, r.stderr[-3000:]
    assert f"checkpoint {work / 'checkpoints' / str(bad)} could not be restored" in r.stderr
    assert f"->{N} in" in r.stdout

    final, ref = load_state(work / "checkpoints" / str(N)), load_state(scale_reference / "checkpoints" / str(N))
    assert int(final["step"]) == N
    assert_trees_equal(final["params"], ref["params"])
    assert_trees_equal(final["ema_params"], ref["ema_params"], what="EMA parameters")
    assert_trees_equal(final["opt_state"], ref["opt_state"], what="optimizer state")
    np.testing.assert_array_equal(final["rng"], ref["rng"])
    assert history(work) == history(scale_reference)
    assert [h["step"] for h in history(work)] == list(range(1, N + 1))


def test_nonfinite_loss_stops_or_is_skipped_at_its_step(scale_data_dir, tmp_path):
    """A learning rate of 1e30 makes the first update blow the network up: the loss of step 2 is
    NaN. nan_policy='stop' stops there, naming the step and the metrics, with the state before
    it saved; 'skip' skips each such update, records it, and stops after max_consecutive_nan."""
    proc = run(
        "train",
        tmp_path / "stop",
        "--config.training.n_iters=6",
        "--config.optim.lr=1e30",
        "--config.training.nan_policy=stop",
        data_dir=scale_data_dir,
        check=False,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "training diverged: non-finite loss or gradient at step 2:" in proc.stderr
    assert "'loss': nan" in proc.stderr and "the update was not applied" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert checkpoint_steps(tmp_path / "stop") == [1]  # the last good state

    proc = run(
        "train",
        tmp_path / "skip",
        "--config.training.n_iters=6",
        "--config.optim.lr=1e30",
        "--config.training.nan_policy=skip",
        "--config.training.max_consecutive_nan=3",
        data_dir=scale_data_dir,
        check=False,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stderr.count("update skipped") == 3
    assert "3 consecutive non-finite steps" in proc.stderr
    records = history(tmp_path / "skip")
    assert [(h["split"], h["step"]) for h in records] == [("train", 1)] + [("nonfinite", 2)] * 3
    assert all(np.isnan(h["loss"]) for h in records[1:])
    assert load_state(tmp_path / "skip" / "checkpoints" / "1")["step"] == 1


def _mount_tmpfs(path: pathlib.Path, size: str, *, read_only=False):
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip()}); needs root")


def _umount(path: pathlib.Path):
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.slow
def test_disk_full_keeps_saved_checkpoints(scale_reference, scale_data_dir, tmp_path):
    """The disk fills up during a run (a ballast file leaves less than one checkpoint free): the
    next save fails, and the run stops with a message naming the checkpoint, the full disk and
    the intact checkpoints, which are indeed intact."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "16m")
    try:
        work = disk / "run"
        run("train", work, "--config.training.n_iters=8", "--stop_after=4", data_dir=scale_data_dir)
        assert checkpoint_steps(work) == [2, 4]
        one = sum(p.stat().st_size for p in (work / "checkpoints" / "4").rglob("*") if p.is_file())
        stat = os.statvfs(disk)
        ballast = disk / "ballast"
        ballast.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - one // 2))
        proc = run("train", work, "--config.training.n_iters=8", data_dir=scale_data_dir, check=False)
        assert proc.returncode == 4, proc.stderr[-3000:]
        # One message; background save threads of the checkpoint library may print their own
        # traceback at the same moment, so the message is searched for, not expected on a line alone.
        assert proc.stderr.count("diffusion-jax train: ") == 1, proc.stderr[-3000:]
        assert (
            f"diffusion-jax train: could not write checkpoint 6 in {work / 'checkpoints'}: the disk is full (No space "
            "left on device). The checkpoints already saved are intact (steps 2, 4); free some space, then rerun the "
            "same command to resume from step 4."
        ) in proc.stderr, proc.stderr[-3000:]
        assert checkpoint_steps(work) == [2, 4]
        assert not list((work / "checkpoints").glob("*tmp*"))  # the partial save was removed at once
        # What was saved is intact: checkpoint 4 is the reference's, bit for bit (resuming from a
        # checkpoint is tested in test_kills_and_bad_checkpoints_lose_no_work).
        saved, ref = load_state(work / "checkpoints" / "4"), load_state(scale_reference / "checkpoints" / "4")
        assert_trees_equal(saved["params"], ref["params"])
        assert_trees_equal(saved["opt_state"], ref["opt_state"], what="optimizer state")
    finally:
        _umount(disk)


def test_unwritable_workdir_missing_data_and_bad_batch(scale_data_dir, tmp_path):
    """Clear one-line messages (exit status 2, no traceback) before any work starts."""
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "1m", read_only=True)
    try:
        proc = run("train", ro / "run", data_dir=scale_data_dir, check=False)
        assert proc.returncode == 2 and f"workdir {ro / 'run'} is not writable: Read-only file system" in proc.stderr
    finally:
        _umount(ro)
    # Missing data: a TFDS data set nobody prepared, an image folder that is not there.
    proc = run(
        "train",
        tmp_path / "c",
        "--config.data.dataset=cifar10",
        "--config.data.image_size=32",
        "--config.data.num_channels=3",
        f"--config.data.data_dir={tmp_path / 'nothing'}",
        data_dir=scale_data_dir,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "diffusion-jax train: data: TFDS data set 'cifar10'" in proc.stderr and "no prepared copy" in proc.stderr
    proc = run(
        "train",
        tmp_path / "f",
        "--config.data.dataset=folder",
        f"--config.data.folder_path={tmp_path / 'none'}",
        data_dir=scale_data_dir,
        check=False,
    )
    assert proc.returncode == 2 and "is not a directory" in proc.stderr
    assert "Traceback" not in proc.stderr
    # A failed start does not tie the workdir to its config.
    assert not (tmp_path / "c" / "config.json").exists()
    # A global batch that does not split into the micro-batches on each device.
    proc = run("train", tmp_path / "b", "--config.training.grad_accum_steps=3", data_dir=scale_data_dir, check=False)
    assert proc.returncode == 2
    assert (
        "training.batch_size = 16 gives 16 examples per device (1 host x 1 device), which do not split into "
        "grad_accum_steps = 3 micro-batches"
    ) in proc.stderr


def test_incompatible_workdir_stops_through_the_command_line(scale_reference, scale_data_dir, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(scale_reference, work)
    proc = run(
        "train",
        work,
        f"--config.training.n_iters={N + 2}",
        "--config.model.nf=16",
        data_dir=scale_data_dir,
        check=False,
    )
    assert proc.returncode == 2
    assert f"workdir {work} was written by an incompatible config; these keys differ: model.nf" in proc.stderr
    assert checkpoint_steps(work) == checkpoint_steps(scale_reference)  # nothing touched
