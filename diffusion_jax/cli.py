"""Command line: ``diffusion-jax MODE --config CONFIG.py --workdir DIR [--config.SECTION.KEY=VALUE ...]``.

The command parses flags and calls a mode of :mod:`diffusion_jax.modes`. A user's mistake (an
unknown mode, flag or config key, a value of the wrong type, a missing or failing config file, a
bad config, missing data) is one message on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Sequence

from diffusion_jax.builders import config as config_lib
from diffusion_jax.builders.config import ConfigError

MODES = {
    "train": "train from a config into a workdir (rerunning the command resumes from the newest checkpoint)",
    "eval": "evaluate the workdir's checkpoints: loss over the eval split, samples, bits/dim",
    "sample": "write samples of a checkpoint as .npz and a .png grid",
    "convert": "turn a score_sde checkpoint (PyTorch port or original JAX) into a workdir",
}

EXIT_STATUS = """exit status:
  0    done
  2    a usage, config or data problem (the message says what to change)
  3    training diverged (non-finite loss under training.nan_policy)
  4    a checkpoint or log could not be written (e.g. disk full); saved checkpoints are intact
  143  stopped by SIGTERM or a preemption notice after saving a checkpoint (rerun to resume)"""

CONFIG_HELP = """configs:
  Config files live in configs/ (each file's docstring starts with the command that runs it).
  Every key, its type, default and meaning: docs/config.md. Override any key with
  --config.SECTION.KEY=VALUE, e.g. --config.training.batch_size=64 --config.model.ch_mult=1,2,2."""

# Notices of the libraries underneath that say nothing about the run: orbax opening checkpoints
# read-only for eval/sample, tfds decoding images with PIL.
_QUIET_NOTICES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only", "OpenCV is not installed")


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in _QUIET_NOTICES)


class UsageError(Exception):
    """A bad invocation: printed as one message, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors (unknown flag, bad value) end here
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _say(msg: str) -> None:
    """One write per message, so that a background thread's output cannot split its line."""
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def _mode_parser(mode: str) -> _Parser:
    p = _Parser(
        prog=f"diffusion-jax {mode}",
        description=MODES[mode],
        epilog=f"{CONFIG_HELP}\n\n{EXIT_STATUS}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--config", required=True, metavar="CONFIG.py", help="the experiment config file (configs/...)")
    p.add_argument("--workdir", required=True, metavar="DIR", help="checkpoints, metrics, samples and config.json")
    p.add_argument(
        "--print_config", action="store_true", help="print the resolved config (after overrides), run nothing"
    )
    p.add_argument(
        "--cache_dir",
        metavar="DIR",
        help="persistent compilation cache (default: $DIFFUSION_JAX_CACHE or ~/.cache/diffusion_jax/jax)",
    )
    p.add_argument("--no_compilation_cache", action="store_true", help="do not use JAX's persistent compilation cache")
    if mode == "train":
        p.add_argument("--stop_after", type=_count(1), metavar="N", help="stop with a checkpoint after N steps")
    if mode == "sample":
        p.add_argument("--num_samples", type=_count(1), metavar="N", help="number of samples (eval.num_samples)")
        p.add_argument("--out", metavar="PATH", help="output path without suffix (writes PATH.npz and PATH.png)")
        p.add_argument("--step", type=_count(0), metavar="STEP", help="checkpoint step (default: the newest)")
    if mode == "convert":
        p.add_argument("--checkpoint", required=True, metavar="FILE", help="the score_sde checkpoint (.pth or msgpack)")
        p.add_argument(
            "--source",
            choices=("score_sde_pytorch", "score_sde_jax"),
            default="score_sde_pytorch",
            help="checkpoint format (default: score_sde_pytorch)",
        )
    p.add_argument_group("config overrides").add_argument(
        "overrides",
        nargs="*",
        metavar="--config.SECTION.KEY=VALUE",
        help="set a config key (typed by the schema; see docs/config.md)",
    )
    return p


def _top_help() -> str:
    width = max(map(len, MODES))
    modes = "\n".join(f"  {m.ljust(width)}  {h}" for m, h in MODES.items())
    return (
        "usage: diffusion-jax MODE --config CONFIG.py --workdir DIR [flags] [--config.SECTION.KEY=VALUE ...]\n\n"
        "Score-based diffusion models in JAX: train, evaluate, sample and convert from a config.\n\n"
        f"modes:\n{modes}\n\n'diffusion-jax MODE --help' lists a mode's flags.\n\n{CONFIG_HELP}\n\n{EXIT_STATUS}"
    )


def _split_overrides(args: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separate ``--config.a.b=v`` / ``--config.a.b v`` from the other flags."""
    rest: list[str] = []
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--config."):
            key, eq, value = a[len("--config.") :].partition("=")
            if not eq:
                if i + 1 >= len(args):
                    raise UsageError(f"{a} needs a value: {a}=VALUE")
                value, i = args[i + 1], i + 1
            overrides.append((key, value))
        else:
            rest.append(a)
        i += 1
    return rest, overrides


def _quiet_logs() -> None:
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("absl").addFilter(_DropNotices())
    logging.getLogger("jax").setLevel(logging.WARNING)  # e.g. the notice that no TPU runtime is installed


def resolve_config(path: str, overrides: Sequence[tuple[str, str]]):
    """The config file with the command line's overrides applied and checked against the schema."""
    config = config_lib.load_config(path)
    config_lib.apply_overrides(config, overrides)
    config_lib.validate_config(config, build=False)
    return config


def run(argv: Sequence[str]) -> int:
    """Run the command line ``argv`` (without the program name); returns the exit status."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_help())
        return 0 if argv else 2
    mode = argv[0]
    if mode not in MODES:
        _say(f"diffusion-jax: unknown mode {mode!r}; valid: {', '.join(MODES)} (see 'diffusion-jax --help')")
        return 2
    parser = _mode_parser(mode)
    try:
        rest, overrides = _split_overrides(argv[1:])
        if any(a in ("-h", "--help") for a in rest):
            parser.print_help()
            return 0
        flags = parser.parse_args(rest)
        if flags.overrides:
            raise UsageError(f"unexpected argument(s) {' '.join(flags.overrides)} (see '{parser.prog} --help')")
        config = resolve_config(flags.config, overrides)
    except UsageError as e:
        _say(f"diffusion-jax {mode}: {e}")
        return 2
    except ConfigError as e:
        _say(f"diffusion-jax {mode}: {e}")
        return 2
    if flags.print_config:
        try:
            config_lib.validate_config(config)
        except ConfigError as e:
            _say(f"diffusion-jax {mode}: {e}")
            return 2
        print(config_lib.to_python(config), end="")
        return 0
    return _run_mode(mode, flags, config)


def _run_mode(mode: str, flags: argparse.Namespace, config) -> int:
    _quiet_logs()
    from diffusion_jax import modes
    from diffusion_jax.training.checkpoint import CheckpointSaveError
    from diffusion_jax.training.distributed import compilation_cache
    from diffusion_jax.training.loop import Preempted, TrainingDiverged

    if not flags.no_compilation_cache:
        compilation_cache(flags.cache_dir)
    try:
        if mode == "train":
            modes.train(config, flags.workdir, stop_after=flags.stop_after)
        elif mode == "convert":
            modes.convert(config, flags.workdir, checkpoint=flags.checkpoint, source=flags.source)
        elif mode == "eval":
            modes.evaluate(config, flags.workdir)
        else:
            modes.sample(config, flags.workdir, num_samples=flags.num_samples, out=flags.out, step=flags.step)
    except ConfigError as e:
        _say(f"diffusion-jax {mode}: {e}")
        return 2
    except Preempted as e:
        _say(f"diffusion-jax {mode}: {e}")
        return 143
    except TrainingDiverged as e:
        _say(f"diffusion-jax {mode}: training diverged: {e}")
        return 3
    except CheckpointSaveError as e:
        _say(f"diffusion-jax {mode}: {e}")
        return 4
    except OSError as e:
        if e.errno == errno.ENOSPC:
            _say(
                f"diffusion-jax {mode}: disk full while writing {e.filename or ''} ({e.strerror}); "
                "the checkpoints already saved are intact"
            )
            return 4
        raise
    return 0


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
