"""Command line: ``diffusion-jax MODE --config CONFIG.py --workdir DIR [--config.SECTION.KEY=VALUE ...]``.

The command parses flags and calls a mode of :mod:`diffusion_jax.modes`. A user's mistake (an
unknown mode, flag or config key, a value of the wrong type, a missing or failing config file, a
bad config, missing data) is one message on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import copy
import errno
import sys
from collections.abc import Sequence

from diffusion_jax.builders import config as config_lib
from diffusion_jax.builders.config import ConfigError

MODES = {
    "train": "train from a config into a workdir (rerunning the command resumes from the newest checkpoint)",
    "eval": "evaluate the workdir's checkpoints: loss over the eval split, samples, bits/dim",
    "sample": "write samples of a checkpoint as .npz and a .png grid",
    "convert": "turn a score_sde checkpoint (PyTorch port or original JAX) into a workdir",
    "stats": "write a data set's reference statistics for FID (with eval.detector) to an .npz file",
}

EXIT_STATUS = """exit status:
  0    done
  2    a usage, config or data problem (the message says what to change)
  3    training diverged (non-finite loss under training.nan_policy)
  4    a checkpoint or log could not be written (e.g. disk full); saved checkpoints are intact
  130  interrupted (Ctrl-C); train saves a checkpoint first (rerun to resume), a second Ctrl-C quits at once
  143  stopped by SIGTERM or a preemption notice after saving a checkpoint (rerun to resume)"""

CONFIG_HELP = """configs:
  Config files live in configs/ (each file's docstring starts with the command that runs it).
  Every key, its type, default and meaning: docs/config.md. Override any key with
  --config.SECTION.KEY=VALUE, e.g. --config.training.batch_size=64 --config.model.ch_mult=1,2,2."""


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


def _labels(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative class labels, got {text!r}")
    return values


def _mode_parser(mode: str) -> _Parser:
    p = _Parser(
        prog=f"diffusion-jax {mode}",
        description=MODES[mode],
        epilog=f"{CONFIG_HELP}\n\n{EXIT_STATUS}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    if mode in ("eval", "sample"):
        p.add_argument(
            "--config",
            metavar="CONFIG.py",
            help="the experiment config file (default: the workdir's own config.py; another may change only "
            "sampling, eval and seed keys)",
        )
    else:
        p.add_argument("--config", required=True, metavar="CONFIG.py", help="the experiment config file (configs/...)")
    if mode == "stats":
        p.add_argument("--out", required=True, metavar="FILE.npz", help="where to write the statistics")
        p.add_argument("--split", choices=("train", "eval"), default="train", help="the split (default: train)")
        p.set_defaults(workdir=None)
    else:
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
        which = p.add_mutually_exclusive_group()
        which.add_argument(
            "--labels", type=_labels, metavar="Y1,Y2,...", help="class of each sample (class-conditional networks)"
        )
        which.add_argument("--label", type=_count(0), metavar="Y", help="one class for every sample")
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
        "usage: diffusion-jax MODE --config CONFIG.py --workdir DIR [flags] [--config.SECTION.KEY=VALUE ...]\n"
        "       diffusion-jax {eval,sample} --workdir DIR [flags]  (the workdir's own config)\n\n"
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


def resolve_config(mode: str, path: str | None, workdir: str, overrides: Sequence[tuple[str, str]]):
    """The config of a run, with the command line's overrides applied and checked against the
    schema. ``eval`` and ``sample`` start from the workdir's stored config; a ``--config`` or
    overrides there may change only what sampling and evaluation may change."""
    stored = config_lib.workdir_config(workdir) if mode in ("eval", "sample") else None
    if path is None:
        if stored is None:
            raise ConfigError(f"--config is required: {workdir} holds no config.py or config.json (train first)")
        config = copy.deepcopy(stored)
    else:
        config = config_lib.load_config(path)
    config_lib.apply_overrides(config, overrides)
    config_lib.validate_config(config, build=False)
    if stored is not None:
        config_lib.check_mutable(stored, config, workdir)
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
        config = resolve_config(mode, flags.config, flags.workdir, overrides)
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
    from diffusion_jax import modes
    from diffusion_jax.modes.setup import quiet_library_notices
    from diffusion_jax.training.checkpoint import CheckpointSaveError
    from diffusion_jax.training.distributed import compilation_cache
    from diffusion_jax.training.loop import Interrupted, Preempted, TrainingDiverged, quit_on_interrupt

    quiet_library_notices()
    if not flags.no_compilation_cache:
        compilation_cache(flags.cache_dir)
    try:
        if mode == "train":
            modes.train(config, flags.workdir, stop_after=flags.stop_after)
        elif mode == "convert":
            modes.convert(config, flags.workdir, checkpoint=flags.checkpoint, source=flags.source)
        elif mode == "eval":
            modes.evaluate(config, flags.workdir)
        elif mode == "stats":
            modes.stats(config, flags.out, split=flags.split)
        else:
            labels = flags.labels if flags.label is None else [flags.label]
            modes.sample(
                config, flags.workdir, num_samples=flags.num_samples, out=flags.out, step=flags.step, labels=labels
            )
    except ConfigError as e:
        _say(f"diffusion-jax {mode}: {e}")
        return 2
    except Interrupted as e:
        _say(f"diffusion-jax {mode}: {e}")
        return 130
    except KeyboardInterrupt:
        quit_on_interrupt()
        _say(f"diffusion-jax {mode}: interrupted; what was saved before (checkpoints, finished results) is intact")
        return 130
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
