"""Sweeps end to end through the command line, on a tiny digits network: two workers on SQLite
and on a real PostgreSQL server run every point exactly once (train, and on SQLite eval and the
report), a failing point is recorded with its error while the others finish, and a rerun runs
nothing; a source= sweep evaluates copies of a finished workdir; Ctrl-C and SIGKILL of a worker
mid-point lose nothing (the point resumes from its checkpoint, its metric history has every step
once, no point runs twice); the report's table has known means and standard deviations; bad
sweep files exit 2 without a traceback."""

import csv
import json
import os
import pathlib
import pwd
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from _scale_cli import CONFIG, TINY, env, free_port, logged_steps

from diffusion_jax import cli
from diffusion_jax.sweeps import engine, spec

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The scale tests' tiny network as overrides (checkpoints every 2 steps, a metrics line per step).
TINY_OVERRIDES = dict(a[len("--config.") :].split("=", 1) for a in TINY if a.startswith("--config."))
EVAL = {
    "eval.batch_size": 100,
    "eval.enable_bpd": True,
    "eval.bpd_max_examples": 8,
    "eval.bpd_rtol": 1e-2,
    "eval.bpd_atol": 1e-2,
}


def write_sweep(path: pathlib.Path, factors: str, *, steps: int, exclude=(), evaluate=False, extra="") -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "from diffusion_jax.sweeps import Sweep, levels, seeds, values\n\n"
        "def get_sweep():\n"
        "    return Sweep(\n"
        f"        config={str(CONFIG)!r},\n"
        f"        factors=({factors}),\n"
        f"        exclude={tuple(exclude)!r},\n"
        f"        overrides={{**{TINY_OVERRIDES!r}, 'training.n_iters': {steps}}},\n"
        f"        evaluate={evaluate!r},\n"
        f"        eval_overrides={EVAL!r},\n"
        f"        {extra}\n"
        "    )\n"
    )
    return path


def sweep_cmd(sweep, workdir, *extra) -> list[str]:
    return [sys.executable, "-m", "diffusion_jax", "sweep", f"--sweep={sweep}", f"--workdir={workdir}", *extra]


class Worker:
    """A sweep worker in the background, its output in files."""

    def __init__(self, sweep, workdir, *extra, data_dir, name):
        log = pathlib.Path(workdir).parent / f"{pathlib.Path(workdir).name}.{name}"
        self.out_path, self.err_path = pathlib.Path(f"{log}.out"), pathlib.Path(f"{log}.err")
        self.out, self.err = self.out_path.open("w"), self.err_path.open("w")
        self.proc = subprocess.Popen(
            sweep_cmd(sweep, workdir, *extra), stdout=self.out, stderr=self.err, env=env(data_dir), cwd=ROOT
        )

    def wait(self, timeout=600) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.out.close()
            self.err.close()

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def started(self) -> list[str]:
        return [
            l.split()[1].rstrip(":") for l in self.stdout.splitlines() if l.startswith("point ") and ": started" in l
        ]


def cli_run(args, capsys) -> tuple[int, str, str]:
    status = cli.run(["sweep", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def attempts(sweep, workdir, storage=None) -> dict[str, list[engine.Attempt]]:
    plan = spec.resolve(sweep, build=False)
    db = engine.open_storage(storage or engine.default_storage(workdir))
    return {s.point.name: list(s.attempts) for s in engine.statuses(db, plan)}


def wait_for_train_step(work: pathlib.Path, step: int, worker: Worker, timeout=300) -> None:
    t0 = time.monotonic()
    while max(logged_steps(work), default=0) < step:
        assert worker.proc.poll() is None, f"the worker exited early:\n{worker.stdout}\n{worker.stderr}"
        assert time.monotonic() - t0 < timeout, f"no step {step} in {work} within {timeout} s"
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------
# Sweep files, points, bad input (in-process, no training)
# ------------------------------------------------------------------------------------------


def test_points_names_and_dry_run(tmp_path, capsys):
    """The product of the factors less the excluded points, in order, with stable names and
    the overrides of the base, the factors and the zipped lists."""
    path = tmp_path / "exp" / "sweep.py"
    path.parent.mkdir()
    path.write_text(
        "from diffusion_jax.sweeps import Sweep, levels, seeds, values, zipped\n"
        "def get_sweep():\n"
        f"    return Sweep(config={str(CONFIG)!r},\n"
        "        factors=(levels('sde', vp={'training.sde': 'vpsde'}, sub={'training.sde': 'subvpsde'}),\n"
        "                 zipped('opt', {'optim.lr': (1e-3, 2e-3), 'optim.warmup': (0, 50)}), seeds(0, 1)),\n"
        "        exclude=({'sde': 'sub', 'opt': '0.002-50'},), overrides={'model.nf': 16, 'training.n_iters': 9})\n"
    )
    plan = spec.resolve(path)
    assert plan.name == "exp"
    assert [p.name for p in plan.points] == [
        "sde-vp__opt-0.001-0__seed-0",
        "sde-vp__opt-0.001-0__seed-1",
        "sde-vp__opt-0.002-50__seed-0",
        "sde-vp__opt-0.002-50__seed-1",
        "sde-sub__opt-0.001-0__seed-0",
        "sde-sub__opt-0.001-0__seed-1",
    ]
    assert plan.points[2].args() == [
        "--config.model.nf=16",
        "--config.optim.lr=0.002",
        "--config.optim.warmup=50",
        "--config.seed=0",
        "--config.training.n_iters=9",
        "--config.training.sde=vpsde",
    ]
    assert spec.resolve(path).definition() == plan.definition()  # stable
    status, out, err = cli_run(["--sweep", path, "--workdir", tmp_path / "w", "--dry_run"], capsys)
    assert status == 0, err
    assert "sweep exp: 6 points (train from" in out
    assert "sde-sub__opt-0.001-0__seed-1\n    --config.model.nf=16 --config.optim.lr=0.001" in out
    assert not (tmp_path / "w").exists()  # a dry run touches nothing


def test_committed_ablation_resolves():
    """experiments/digits_ablation's 12 points (3 SDEs x 2 outputs x 2 seeds) pass the schema and
    build, and each SDE/output pair sets its own recipe."""
    plan = spec.resolve(ROOT / "experiments" / "digits_ablation" / "sweep.py")
    assert len(plan.points) == 12
    by_name = {p.name: p.overrides for p in plan.points}
    assert by_name["sde-vp__output-native__seed-0"]["training.weighting"] == "sigma2"
    assert by_name["sde-edm__output-native__seed-1"]["model.output"] == "score"
    assert by_name["sde-ve__output-edm__seed-0"]["model.output"] == "edm"
    assert {p.overrides["model.ema_warmup"] for p in plan.points} == {True}


def _bad_sweeps(tmp_path):
    def f(name, body):
        p = tmp_path / name / "sweep.py"
        p.parent.mkdir()
        p.write_text("from diffusion_jax.sweeps import Sweep, levels, seeds, values, zipped\n" + body)
        return p

    c = repr(str(CONFIG))
    return [
        (tmp_path / "none" / "sweep.py", "does not exist"),
        (
            f("tuple", f"def get_sweep():\n    return Sweep(config={c}, factors=seeds(0, 1))\n"),
            "factors= must be a tuple, got Factor (one entry needs a trailing comma: factors=(x,))",
        ),
        (f("nofn", "X = 1\n"), "defines no get_sweep()"),
        (f("raises", "def get_sweep():\n    raise RuntimeError('boom')\n"), "raised RuntimeError: boom"),
        (f("notsweep", "def get_sweep():\n    return {}\n"), "returned dict, not a diffusion_jax.sweeps.Sweep"),
        (
            f("key", f"def get_sweep():\n    return Sweep(config={c}, factors=(values('model.nff', (8, 16)),))\n"),
            "point nff-8: unknown config key 'model.nff' (did you mean model.nf?)",
        ),
        (
            f("type", f"def get_sweep():\n    return Sweep(config={c}, factors=(values('model.nf', ('a',)),))\n"),
            "point nf-a: --config.model.nf=a: expected an integer",
        ),
        (
            f("value", f"def get_sweep():\n    return Sweep(config={c}, factors=(values('training.sde', ('vp',)),))\n"),
            "training.sde = 'vp' is not allowed",
        ),
        (
            f(
                "exclude",
                f"def get_sweep():\n    return Sweep(config={c}, factors=(seeds(0, 1),), exclude=({{'seed': '7'}},))\n",
            ),
            "exclude= names level '7' of factor 'seed'; its levels are 0, 1",
        ),
        (
            f(
                "zip",
                f"def get_sweep():\n    return Sweep(config={c},\n"
                "        factors=(zipped('z', {'seed': (1, 2), 'model.nf': (8,)}),))\n",
            ),
            "zipped factor 'z': the value lists have different lengths",
        ),
        (
            f("both", f"def get_sweep():\n    return Sweep(config={c}, source='x', factors=(seeds(0),))\n"),
            "set exactly one of config=",
        ),
        (
            f("clash", f"def get_sweep():\n    return Sweep(config={c}, factors=(values('seed', (1,)), seeds(0)))\n"),
            "factor names repeated: seed",
        ),
        (
            f("source", "def get_sweep():\n    return Sweep(source='../nowhere', factors=(seeds(0),))\n"),
            "holds no config.py or config.json",
        ),
    ]


def test_bad_sweep_files_exit_2(tmp_path, capsys):
    for path, message in _bad_sweeps(tmp_path):
        status, out, err = cli_run(["--sweep", path, "--workdir", tmp_path / "w", "--dry_run"], capsys)
        assert status == 2, (path, out, err)
        assert message in err, (message, err)
        assert "Traceback" not in err and err.count("diffusion-jax sweep:") == 1
    status, _, err = cli_run(["--sweep", path, "--workdir", tmp_path / "w", "--status", "--report"], capsys)
    assert status == 2 and "not allowed with argument" in err
    status, _, err = cli_run(["--workdir", tmp_path / "w"], capsys)
    assert status == 2 and "the following arguments are required: --sweep" in err
    good = write_sweep(tmp_path / "good" / "sweep.py", "seeds(0),", steps=2)
    status, _, err = cli_run(["--sweep", good, "--workdir", tmp_path / "nothing", "--status"], capsys)
    assert status == 2 and "holds no sweep yet" in err
    status, _, err = cli_run(["--sweep", good, "--workdir", tmp_path / "w", "--storage", "nodb://x"], capsys)
    assert status == 2 and "cannot open the sweep storage nodb://x" in err and "Traceback" not in err


def test_report_from_recorded_results(tmp_path, capsys):
    """Recorded results -> CSVs, a Markdown table with mean ± sample std over seeds, the plots,
    and a TensorBoard hparams summary per point; --status counts done and pending points."""
    path = write_sweep(tmp_path / "rep" / "sweep.py", "values('optim.lr', (1e-3, 2e-3)), seeds(0, 1, 2)", steps=2)
    work = tmp_path / "w"
    work.mkdir()
    plan = spec.resolve(path, build=False)
    db = engine.open_storage(engine.default_storage(work))
    study = engine.open_study(db, plan, create=True)
    losses = {"lr-0.001": [1.0, 2.0, 3.0], "lr-0.002": [0.5, 0.7]}  # the last point stays pending
    for group, values in losses.items():
        for seed, loss in enumerate(values):
            curve = [[s, loss * 2 / s] for s in (1, 2)]
            result = {"metrics": {"loss": loss, "bpd": 2.0 + seed, "sampling_nfe": 24.0}, "curve": curve}
            engine.record_result(study, f"{group}__seed-{seed}", result, loss)
    status, out, err = cli_run(["--sweep", path, "--workdir", work, "--report"], capsys)
    assert status == 0, err
    table = (work / "report" / "table.md").read_text()
    assert "| lr | seeds | loss | bpd | sampling_nfe |" in table
    assert "| 0.001 | 3 | 2.0 ± 1.0 | 3.0 ± 1.0 | 24 ± 0 |" in table
    assert "| 0.002 | 2 | 0.60 ± 0.14 | 2.50 ± 0.71 | 24 ± 0 |" in table
    assert "5 of 6 points done; not in the table: lr-0.002__seed-2" in table
    with (work / "report" / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    np.testing.assert_allclose(float(rows[1]["loss_mean"]), 0.6, rtol=1e-12)
    np.testing.assert_allclose(float(rows[1]["loss_std"]), np.std([0.5, 0.7], ddof=1), rtol=1e-12)
    with (work / "report" / "points.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 5
    for png in ("loss_vs_lr.png", "learning_curves.png"):
        assert (work / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tags = _event_tags(work / "report" / "tensorboard" / "lr-0.001__seed-1")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "sweep/loss"} <= tags
    status, out, _ = cli_run(["--sweep", path, "--workdir", work, "--report", "--metric=bpd", "--factor=seed"], capsys)
    assert status == 0 and (work / "report" / "bpd_vs_seed.png").exists()
    status, _, err = cli_run(["--sweep", path, "--workdir", work, "--report", "--metric=fid"], capsys)
    assert status == 2 and "--metric 'fid' was not recorded" in err
    status, out, _ = cli_run(["--sweep", path, "--workdir", work, "--status"], capsys)
    assert status == 0 and "6 points: 5 done, 0 running, 0 failed, 1 pending" in out
    assert "  pending  lr-0.002__seed-2" in out


def test_plots_use_log_axes_for_values_over_decades():
    """NFE 4..50 spans a decade (log x); FID from 1.5 to 1,458 spans three (log y); FID 5 to 9 or
    a level of 0 stays linear."""
    from diffusion_jax.sweeps.report import spans_decades

    assert spans_decades([4, 8, 12, 24, 50], 1)
    assert spans_decades([1.5, 20.0, 1458.0], 2)
    assert not spans_decades([5.0, 7.0, 9.0], 2)
    assert not spans_decades([0.0, 8.0, 12.0], 1)
    assert not spans_decades([1.0, 1000.0], 2)  # two points: linear


def _event_tags(directory) -> set:
    tags = set()
    for p in pathlib.Path(directory).rglob("events.out.tfevents.*"):
        from tensorboardX.proto import event_pb2

        data, pos = p.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            tags |= {v.tag for v in event.summary.value}
    return tags


# ------------------------------------------------------------------------------------------
# Running sweeps (subprocesses that train the tiny network)
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_interrupt_and_sigkill_mid_point_lose_nothing(tmp_path, scale_data_dir):
    """Ctrl-C stops the running point with a checkpoint (exit 130); the next worker resumes it.
    A worker killed with SIGKILL mid-point: after the heartbeat's grace period the next worker
    takes the point again and resumes it from its checkpoint. Every point completes once, and
    each point's metric history holds every step exactly once."""
    n = 14
    path = write_sweep(tmp_path / "kill" / "sweep.py", "seeds(0, 1),", steps=n)
    work = tmp_path / "w"
    fast = ("--heartbeat=1", "--grace=3")

    w1 = Worker(path, work, *fast, data_dir=scale_data_dir, name="w1")
    wait_for_train_step(work / "points" / "seed-0", 5, w1)
    w1.proc.send_signal(signal.SIGINT)
    assert w1.wait() == 130, w1.stderr
    assert "interrupted; finished points are kept" in w1.stderr and "Traceback" not in w1.stderr

    w2 = Worker(path, work, *fast, data_dir=scale_data_dir, name="w2")
    wait_for_train_step(work / "points" / "seed-1", 5, w2)
    w2.proc.kill()
    assert w2.wait() == -signal.SIGKILL
    assert w2.started() == ["seed-0", "seed-1"]

    w3 = Worker(path, work, *fast, data_dir=scale_data_dir, name="w3")
    assert w3.wait() == 0, w3.stdout + w3.stderr
    assert w3.started() == ["seed-1"]  # seed-0 was done: not run again
    assert "resumes from step" in w3.stdout

    found = attempts(path, work)
    # seed-0: interrupted, then done; seed-1: lost with its worker (no outcome), then done.
    assert [(a.state, a.outcome) for a in found["seed-0"]] == [("FAIL", "interrupted"), ("COMPLETE", "done")]
    assert [(a.state, a.outcome) for a in found["seed-1"]] == [("FAIL", None), ("COMPLETE", "done")]
    for name in ("seed-0", "seed-1"):
        assert logged_steps(work / "points" / name) == list(range(1, n + 1)), name
    logs = sorted((work / "logs").glob("seed-1.trial*.log"))
    assert len(logs) == 2 and "resumed from checkpoint at step" in logs[1].read_text()


def _postgres_url(root: pathlib.Path) -> str:
    """Start a PostgreSQL server (Debian's package) on 127.0.0.1 in ``root``; its URL."""
    bins = sorted(pathlib.Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    initdb = str(bins[-1]) if bins else shutil.which("initdb")
    if initdb is None:
        pytest.skip("PostgreSQL's server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql")
    bindir = pathlib.Path(initdb).parent
    prefix: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        shutil.chown(root, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()
    subprocess.run(
        [*prefix, str(initdb), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
        check=True,
        capture_output=True,
    )
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"


@pytest.fixture
def storage_url(request, tmp_path):
    if request.param == "sqlite":
        yield None  # the default: <workdir>/sweep.db
        return
    root = pathlib.Path(tempfile.mkdtemp(prefix="sweep_pg"))
    root.chmod(0o755)
    try:
        url = _postgres_url(root)
        yield url
    finally:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        pg_ctl = sorted(pathlib.Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")) or [shutil.which("pg_ctl")]
        if (root / "data" / "postmaster.pid").exists():
            subprocess.run(
                [*prefix, str(pg_ctl[-1]), "-D", str(root / "data"), "-m", "immediate", "stop"], capture_output=True
            )
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("storage_url", ["sqlite", "postgresql"], indirect=True)
def test_two_workers_run_every_point_once(tmp_path, scale_data_dir, storage_url, capsys):
    """Two workers started together on one storage: every point runs exactly once between them,
    each trained (and on SQLite also evaluated) in its own workdir with its own overrides, and
    the storage holds the final metrics of its files. The point that fails (its data set is
    missing) is recorded with train's message while the others finish, and both workers exit 5.
    On SQLite the sweep then reports its table; a rerun runs nothing."""
    sqlite = storage_url is None
    path = write_sweep(
        tmp_path / "pair" / "sweep.py",
        "levels('data', ok={}, missing={'data.dataset': 'folder', 'data.folder_path': '/nonexistent/digits'}), "
        "seeds(0, 1, 2)",
        steps=4 if sqlite else 2,
        exclude=[{"data": "missing", "seed": "1"}, {"data": "missing", "seed": "2"}],
        evaluate=sqlite,
    )
    work = tmp_path / "w"
    storage = () if sqlite else (f"--storage={storage_url}",)
    extra = ("--heartbeat=1", "--grace=5", *storage)
    workers = [Worker(path, work, *extra, data_dir=scale_data_dir, name=f"w{i}") for i in range(2)]
    codes = [w.wait() for w in workers]
    assert codes == [5, 5], [w.stdout + w.stderr for w in workers]
    runs = [w.started() for w in workers]
    names = ["data-ok__seed-0", "data-ok__seed-1", "data-ok__seed-2", "data-missing__seed-0"]
    assert sorted(runs[0] + runs[1]) == sorted(names), runs  # every point once, none twice
    found = attempts(path, work, storage_url)
    steps = 4 if sqlite else 2
    for seed, name in enumerate(names[:3]):
        [done] = found[name]
        assert done.state == "COMPLETE", name
        pw = work / "points" / name
        assert logged_steps(pw) == list(range(1, steps + 1))
        stored = json.loads((pw / "config.json").read_text())
        assert stored["seed"] == seed and stored["training"]["n_iters"] == steps
        metrics = done.user_attrs["metrics"]
        summary = json.loads((pw / "summary.json").read_text())
        assert metrics["loss"] == pytest.approx(summary["last_metrics"]["loss"], rel=1e-12)
        assert [s for s, _ in done.user_attrs["curve"]] == list(range(1, steps + 1))
        if sqlite:
            result = json.loads((pw / "eval" / f"results_{steps:08d}.json").read_text())
            assert metrics["bpd"] == pytest.approx(result["bpd"], rel=1e-12) and 0 < metrics["bpd"] < 20
    losses = {found[n][0].user_attrs["metrics"]["loss"] for n in names[:3]}
    assert len(losses) == 3  # different seeds, different networks
    [failed] = found["data-missing__seed-0"]
    assert failed.state == "FAIL" and failed.outcome == "error"
    assert "train exited with status 2" in failed.user_attrs["error"]
    assert "/nonexistent/digits" in failed.user_attrs["error"]
    status, out, _ = cli_run(["--sweep", path, "--workdir", work, "--status", *storage], capsys)
    assert status == 0 and "4 points: 3 done, 0 running, 1 failed, 0 pending" in out
    assert "  failed   data-missing__seed-0  train exited with status 2" in out
    if sqlite:
        status, out, err = cli_run(["--sweep", path, "--workdir", work, "--report"], capsys)
        assert status == 0, err
        assert "| data | seeds | loss | eval_loss | bpd |" in out and "\n| ok | 3 | " in out
        # A rerun with --retry_failed runs the failed point again (it fails again), not the done ones.
        again = subprocess.run(
            sweep_cmd(path, work, "--retry_failed"), capture_output=True, text=True, env=env(scale_data_dir), cwd=ROOT
        )
        assert again.returncode == 5 and "this worker ran 1 point(s); 3 done" in again.stdout, again.stderr
        assert "point data-missing__seed-0: started" in again.stdout and again.stdout.count(": started") == 1
        tries = attempts(path, work)["data-missing__seed-0"]
        assert [(a.state, a.outcome) for a in tries] == [("FAIL", "error"), ("FAIL", "error")]
        _evaluate_a_finished_point(tmp_path, work / "points" / "data-ok__seed-0", scale_data_dir)


def _evaluate_a_finished_point(tmp_path, source: pathlib.Path, data_dir) -> None:
    """A sweep with source= evaluates copies of a finished workdir's newest checkpoint, one
    sampler per point, and leaves the source untouched."""
    before = {p: p.stat().st_mtime_ns for p in source.rglob("*")}
    path = tmp_path / "samplers" / "sweep.py"
    path.parent.mkdir()
    path.write_text(
        "from diffusion_jax.sweeps import Sweep, levels\n"
        "def get_sweep():\n"
        f"    return Sweep(source={str(source)!r}, factors=(levels('sampler',\n"
        "        ddim={'sampling.method': 'ddim', 'sampling.num_steps': 2},\n"
        "        euler={'sampling.method': 'euler', 'sampling.num_steps': 3}),),\n"
        "        eval_overrides={'eval.enable_loss': False, 'eval.enable_bpd': False,\n"
        "                        'eval.enable_sampling': True, 'eval.num_samples': 4,\n"
        "                        'sampling.noise_removal': False})\n"
    )
    work = tmp_path / "ws"
    proc = subprocess.run(sweep_cmd(path, work), capture_output=True, text=True, env=env(data_dir), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = attempts(path, work)
    for name, nfe in (("sampler-ddim", 2), ("sampler-euler", 3)):
        [done] = found[name]
        assert done.state == "COMPLETE" and done.user_attrs["metrics"]["sampling_nfe"] == nfe
        assert (work / "points" / name / "eval" / "samples_00000004.npz").exists()
    assert {p: p.stat().st_mtime_ns for p in source.rglob("*")} == before
