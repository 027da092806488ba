"""Data parallelism through the command line: 8 simulated devices train like one, two
`jax.distributed` processes train, stop together on a preemption notice, resume, and match a
single process fed the same global batches, each reading only its own shard."""

import json
import signal

import numpy as np
import pytest
from _scale_cli import (
    Background,
    assert_trees_equal,
    checkpoint_steps,
    free_port,
    history,
    load_state,
    run,
    wait_for_step,
)


def _assert_histories_close(a, b, rtol):
    assert [(h["split"], h["step"]) for h in a] == [(h["split"], h["step"]) for h in b]
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(x[key], y[key], rtol=rtol, err_msg=f"step {x['step']} {key}")


@pytest.mark.slow
def test_eight_devices_train_like_one(scale_reference, scale_data_dir, tmp_path):
    """The same global batch of 16 split 2 per device over 8 devices gives the parameters of one
    device to float tolerance: the per-example noise and times are drawn for the global batch
    from one key (jax_threefry_partitionable, the default, makes sharded draws equal unsharded
    ones), and XLA's gradient all-reduce only reorders float sums."""
    work = tmp_path / "eight"
    proc = run("train", work, "--config.training.n_iters=4", data_dir=scale_data_dir, devices=8)
    assert "global batch 16 = 1 host(s) x 8 device(s) x 2 example(s)" in proc.stdout
    ours, ref = load_state(work / "checkpoints" / "4"), load_state(scale_reference / "checkpoints" / "4")
    assert_trees_equal(ours["params"], ref["params"], rtol=1e-4, atol=1e-6)
    assert_trees_equal(ours["ema_params"], ref["ema_params"], rtol=1e-4, atol=1e-6)
    _assert_histories_close(history(work), history(scale_reference)[:4], rtol=1e-5)


def test_global_batch_must_divide_over_devices(scale_data_dir, tmp_path):
    proc = run(
        "train", tmp_path / "w", "--config.training.batch_size=12", data_dir=scale_data_dir, devices=8, check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        "training.batch_size = 12 (the global batch) does not divide over the 8 devices (1 host x 8 devices); "
        "use a multiple of 8, e.g. 8 or 16"
    ) in proc.stderr


# Power-function EMAs snapshotted every 4 steps, for the post-hoc reconstruction after the run.
SNAPSHOTS = ("--config.model.ema_sigma_rels=0.05,0.1", "--config.model.ema_snapshot_freq=4")


def _launch(work, n_iters, *extra, data_dir, port, logs):
    return [
        Background(
            "train",
            work,
            f"--config.training.n_iters={n_iters}",
            *SNAPSHOTS,
            *extra,
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={i}",
            data_dir=data_dir,
            devices=2,
            driver=("--log-indices", str(logs[i])),
            log=work.parent / f"p{i}.{port}",
        )
        for i in range(2)
    ]


def _is_gloo_notice(line):
    return "[Gloo]" in line or "peer ranks" in line


@pytest.mark.slow
def test_two_processes_preempt_resume_and_match_one(scale_data_dir, tmp_path):
    """Two processes with two devices each (global batch 16 = 2 x 2 x 4). SIGTERM reaches only
    process 1; JAX's preemption service tells process 0, both save one checkpoint collectively
    at the same step and exit 143. The rerun resumes there and finishes. Each process read only
    its own shard (indices = process index mod 2), only process 0 wrote logs, and the run equals
    one process that reads the concatenation of the two shards' batches.

    The rerun resumes on another layout across the two hosts (fsdp=4: every parameter, Adam
    moment and EMA split over the four devices of both processes), and the final checkpoint and
    the EMA snapshots, written by both processes, are restored on one process with one device:
    the parameters and a post-hoc EMA reconstructed there equal the single-process run's."""
    # The notice reaches the loop a few steps after the signal (JAX's notifier polls; then the
    # processes agree on a step): leave room to stop well before the end.
    work, n = tmp_path / "run", 16
    logs = [tmp_path / f"indices{i}.jsonl" for i in range(2)]
    procs = _launch(work, n, data_dir=scale_data_dir, port=free_port(), logs=logs)
    wait_for_step(work, 2, procs[0])
    procs[1].signal(signal.SIGTERM)
    codes = [p.wait() for p in procs]
    assert codes == [143, 143], [(p.stdout[-1000:], p.stderr[-2000:]) for p in procs]
    stops = {int(p.stderr.split("stopped at step ")[1].split()[0]) for p in procs}
    assert len(stops) == 1, stops  # both stopped at the same step
    stop = stops.pop()
    assert stop < n and checkpoint_steps(work)[-1] == stop
    data_states = sorted((work / "checkpoints" / str(stop) / "data").glob("process_*-of-2.json"))
    assert [json.loads(p.read_text())["json"]["pipeline"].split()[-1] for p in data_states] == [
        "shard=0/2",
        "shard=1/2",
    ]

    procs = _launch(work, n, "--config.mesh.fsdp=4", data_dir=scale_data_dir, port=free_port(), logs=logs)
    codes = [p.wait() for p in procs]
    assert codes == [0, 0], [p.stderr[-2000:] for p in procs]
    assert "mesh data=1 fsdp=4 tensor=1" in procs[0].stdout
    assert f"resumed from checkpoint at step {stop}" in procs[0].stdout
    assert f"trained steps {stop}->{n}" in procs[0].stdout
    assert "global batch 16 = 2 host(s) x 2 device(s) x 4 example(s)" in procs[0].stdout
    # Only process 0 reports and writes: one metrics record per step, no output from process 1.
    # (The CPU collectives library prints connection notices and blank lines of its own; they are
    # not ours.)
    assert [l for l in procs[1].stdout.splitlines() if l.strip() and not _is_gloo_notice(l)] == [], procs[1].stdout
    assert [h["step"] for h in history(work)] == list(range(1, n + 1))

    # Each process loaded only its own strided shard, 8 examples per step, disjoint.
    seen = [[i for line in p.read_text().splitlines() for i in json.loads(line)] for p in logs]
    for k, ids in enumerate(seen):
        assert len(ids) >= 8 * n and all(i % 2 == k for i in ids), f"process {k} read outside its shard"
    assert not set(seen[0]) & set(seen[1])

    # One process, one device, fed the concatenated shard batches: the same run.
    ref = tmp_path / "single"
    run(
        "train",
        ref,
        f"--config.training.n_iters={n}",
        *SNAPSHOTS,
        data_dir=scale_data_dir,
        driver=("--concat-shards", "2"),
    )
    _assert_histories_close(history(work), history(ref), rtol=1e-5)
    assert_trees_equal(
        load_state(work / "checkpoints" / str(n))["params"],
        load_state(ref / "checkpoints" / str(n))["params"],
        rtol=1e-4,
        atol=1e-5,
    )
    # The snapshots of both processes, combined on one: the same post-hoc EMA as the reference's.
    rebuilt = []
    for w in (work, ref):
        run("posthoc_ema", w, "--sigma_rel=0.07", f"--config.training.n_iters={n}", *SNAPSHOTS, data_dir=scale_data_dir)
        rebuilt.append(load_state(w / "posthoc_ema" / "sigma_rel_0.07" / str(n)))
    assert_trees_equal(rebuilt[0], rebuilt[1], rtol=1e-4, atol=1e-5, what="post-hoc EMA")


def test_global_batch_must_divide_over_hosts(scale_data_dir, tmp_path):
    port = free_port()
    procs = [
        Background(
            "train",
            tmp_path / "w",
            "--config.training.batch_size=6",
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={i}",
            data_dir=scale_data_dir,
            devices=2,
            log=tmp_path / f"p{i}",
        )
        for i in range(2)
    ]
    assert [p.wait() for p in procs] == [2, 2]
    assert (
        "training.batch_size = 6 (the global batch) does not divide over the 4 devices (2 hosts x 2 devices); "
        "use a multiple of 4, e.g. 4 or 8"
    ) in procs[0].stderr
