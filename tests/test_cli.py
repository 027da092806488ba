"""The command line explains itself: help for every mode, and every bad invocation gives one
message and exit status 2, never a traceback."""

import pathlib
import subprocess
import sys

import pytest

from diffusion_jax import cli
from diffusion_jax.builders import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "digits" / "edm.py")


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _bad_invocations(tmp_path):
    w = str(tmp_path / "work")
    base = ["--config", CONFIG, "--workdir", w]
    raises = _write(tmp_path, "raises.py", "def get_config():\n    raise RuntimeError('boom')\n")
    no_fn = _write(tmp_path, "no_fn.py", "X = 1\n")
    not_dict = _write(tmp_path, "not_dict.py", "def get_config():\n    return {'a': 1}\n")
    syntax = _write(tmp_path, "syntax.py", "def get_config(:\n")
    return [
        ([], "usage: diffusion-jax MODE"),
        (["trian"], "unknown mode 'trian'; valid: train, eval, sample, convert"),
        (["train"], "the following arguments are required: --config, --workdir"),
        (["train", "--config", "configs/nope.py", "--workdir", w], "config file configs/nope.py does not exist"),
        (["train", "--config", raises, "--workdir", w], "raised RuntimeError: boom"),
        (["train", "--config", no_fn, "--workdir", w], "defines no get_config()"),
        (["train", "--config", not_dict, "--workdir", w], "returned dict, not an ml_collections.ConfigDict"),
        (["train", "--config", syntax, "--workdir", w], "raised SyntaxError"),
        (["train", *base, "--config.training.batchsize=3"], "(did you mean training.batch_size?)"),
        (["train", *base, "--config.trainng.batch_size=3"], "unknown config key 'trainng.batch_size'"),
        (["train", *base, "--config.training.batch_size=abc"], "batch_size=abc: expected an integer"),
        (["train", *base, "--config.training.snapshot_sampling=maybe"], "expected True or False"),
        (["train", *base, "--config.model.ch_mult=(1,x)"], "expected integers like (1, 2)"),
        (["train", *base, "--config.training.batch_size=0"], "training.batch_size = 0 must be > 0"),
        (["train", *base, "--config.training.sde=vp"], "training.sde = 'vp' is not allowed; valid: vesde"),
        (["train", *base, "--config.sampling.eta=fast"], "expected a number or None"),
        (["train", *base, "--config.training.batch_size"], "--config.training.batch_size needs a value"),
        (["train", *base, "--bogus"], "unrecognized arguments: --bogus"),
        (["train", *base, "stray"], "unexpected argument(s) stray"),
        (["train", *base, "--stop_after=0"], "argument --stop_after: expected an integer >= 1, got 0"),
        (["sample", *base, "--num_samples=-1"], "argument --num_samples: expected an integer >= 1, got -1"),
        (["sample", *base, "--num_samples=abc"], "expected an integer, got 'abc'"),
        (["sample", *base, "--step=-3"], "argument --step: expected an integer >= 0, got -3"),
        (["convert", *base], "the following arguments are required: --checkpoint"),
        (["convert", *base, "--checkpoint=x.pth", "--source=torch"], "argument --source: invalid choice: 'torch'"),
        (["eval", *base, "--print_config", "--config.model.attn_resolutions=(3,)"], "resolutions must be among"),
        (["sample", *base], "no checkpoint in"),
        (["stats", "--config", CONFIG], "the following arguments are required: --out"),
        (["stats", "--config", CONFIG, "--out", w, "--split=test"], "argument --split: invalid choice: 'test'"),
    ]


def test_bad_invocations_exit_2_with_one_message(tmp_path, capsys):
    cases = _bad_invocations(tmp_path)
    assert len(cases) >= 20
    for argv, message in cases:
        status = cli.run(argv)
        out, err = capsys.readouterr()
        assert status == 2, (argv, status, out, err)
        assert message in out + err, (argv, out, err)
        assert "Traceback" not in out + err, (argv, err)
    assert not (tmp_path / "work" / "config.json").exists()  # nothing was started


def test_help_lists_modes_flags_and_where_keys_are_documented(capsys):
    assert cli.run(["--help"]) == 0
    out = capsys.readouterr().out
    for mode in cli.MODES:
        assert f"\n  {mode}" in out
    assert "docs/config.md" in out and "configs/" in out and "143" in out
    flags = {"train": "--stop_after", "sample": "--num_samples", "eval": "--print_config", "convert": "--checkpoint"}
    for mode, flag in flags.items():
        assert cli.run([mode, "--help"]) == 0
        out = capsys.readouterr().out
        assert flag in out and "--config.SECTION.KEY=VALUE" in out and "docs/config.md" in out


def test_print_config_prints_a_loadable_resolved_config(tmp_path, capsys):
    argv = ["train", "--config", CONFIG, "--workdir", str(tmp_path / "w"), "--print_config"]
    assert cli.run([*argv, "--config.training.batch_size=32", "--config.model.ch_mult=1,2"]) == 0
    text = capsys.readouterr().out
    assert "config.training.batch_size = 32" in text and "config.model.ch_mult = (1, 2)" in text
    resolved = config_lib.load_config(_write(tmp_path, "resolved.py", text))
    assert resolved.training.batch_size == 32 and resolved.model.ch_mult == (1, 2)
    assert not (tmp_path / "w").exists()  # nothing ran


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "usage: diffusion-jax MODE"),
        (["train", "--config", CONFIG, "--workdir", "unused", "--config.training.batchsize=3"], "did you mean"),
    ],
)
def test_real_process_prints_no_traceback(argv, message):
    proc = subprocess.run([sys.executable, "-m", "diffusion_jax", *argv], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
