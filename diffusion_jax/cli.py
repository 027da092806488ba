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
    "sample": "write samples of a checkpoint as .npz and a .png grid; with --task, inpaint, super-resolve, "
    "edit, guide, ...",
    "convert": "turn a score_sde checkpoint (PyTorch port or original JAX) into a workdir",
    "stats": "write a data set's reference statistics for FID (with eval.detector) to an .npz file",
    "encode": "encode a data set once with a trained autoencoder (training.task = 'autoencoder') into a latent "
    "data set (data.dataset = 'latent')",
    "posthoc_ema": "reconstruct EMAs of any length (EDM2's sigma_rel) from a run's EMA snapshots, for sample / eval",
    "sweep": "run an ablation sweep file's points (train, eval) on one or many workers; --status, --report",
}

EXIT_STATUS = """exit status:
  0    done
  2    a usage, config or data problem (the message says what to change)
  3    training diverged (non-finite loss under training.nan_policy)
  4    a checkpoint or log could not be written (e.g. disk full); saved checkpoints are intact
  5    sweep: every point ran, but some failed (--status shows their errors)
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


def _sigma_rels(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    bad = [v for v in values if not 0 < v <= config_lib.SIGMA_REL_MAX]
    if not values or bad:
        raise argparse.ArgumentTypeError(
            f"sigma_rel {', '.join(map(str, bad)) or text!r} is out of range: each must be in "
            f"(0, {config_lib.SIGMA_REL_MAX:.4f}] (12^-1/2, a uniform average of all of training)"
        )
    return sorted(set(values), key=values.index)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _interval(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two times), got {text!r}") from None
    return lo, hi


def _option(text: str) -> tuple[str, object]:
    key, eq, raw = text.partition("=")
    if not eq or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    value: object = raw
    for cast in (int, float):
        try:
            value = cast(raw)
            break
        except ValueError:
            pass
    if raw in ("True", "False", "true", "false"):
        value = raw.lower() == "true"
    return key, value


TASK_HELP = """tasks (--task; docs/conditioning.md):
  inpaint, outpaint         fill hidden pixels (--mask PNG or bottom_half|top_half|left_half|right_half|center|
                            random:F; outpaint hides a --border of pixels)
  colorize, super_resolve,  recover an image from its grey version, its --factor-times average pooling, or its
  deblur, denoise           --blur; each input is measured with noise --sigma_y (or is the measurement: --measured)
                            and solved with --method (ddrm by default)
  edit                      SDEdit: noise each input to --strength of the time range and denoise it
  class, negative_class     guide towards --label (classifier-free, or with --classifier_workdir) or away from
                            --negative_label, with --guidance_scale w (1: the conditional model)"""


def _add_task_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``sample --task`` (controllable generation; :mod:`diffusion_jax.modes.tasks`)."""
    g = p.add_argument_group("controllable generation", TASK_HELP)
    g.add_argument(
        "--task",
        metavar="TASK",
        help="inpaint, outpaint, colorize, super_resolve, deblur, denoise, edit, class or negative_class "
        "(default: plain samples)",
    )
    g.add_argument("--input", metavar="PNG|NPZ", help="the images (or measurements, with --measured), in [0, 1]")
    g.add_argument("--mask", metavar="PNG|NAME", help="inpaint / outpaint: white = observed, black = hidden")
    g.add_argument("--border", type=_count(1), metavar="N", help="outpaint: hidden border (default: 1/4 of the side)")
    g.add_argument("--factor", type=_count(2), metavar="F", help="super_resolve: pooling factor (default: 2)")
    g.add_argument("--blur", metavar="KIND:W", help="deblur: gaussian:STD or uniform:SIZE (default: gaussian:1)")
    g.add_argument(
        "--sigma_y", type=_non_negative_float, metavar="S", help="measurement noise in model units (default: 0)"
    )
    g.add_argument("--measured", action="store_true", help="the inputs are the measurements y already")
    g.add_argument(
        "--method",
        metavar="NAME",
        help="posterior sampler: pc_projection, replacement, dps, pigdm, ddrm, diffpir, daps, tds (default: ddrm)",
    )
    g.add_argument("--num_steps", type=_count(1), metavar="N", help="the method's steps (default: its own)")
    g.add_argument("--option", type=_option, action="append", metavar="KEY=VALUE", help="another option of the method")
    g.add_argument("--strength", type=_non_negative_float, metavar="S", help="edit: SDEdit strength in (0, 1]")
    g.add_argument("--negative_label", type=_count(0), metavar="Y", help="negative_class: the class to avoid")
    g.add_argument(
        "--guidance_scale", type=_non_negative_float, metavar="W", help="guidance weight (default 1: no extra push)"
    )
    g.add_argument("--guidance_interval", type=_interval, metavar="LO,HI", help="times where guidance acts")
    g.add_argument("--classifier_workdir", metavar="DIR", help="class: a trained noise-conditional classifier")


def _mode_parser(mode: str) -> _Parser:
    p = _Parser(
        prog=f"diffusion-jax {mode}",
        description=MODES[mode],
        epilog=f"{CONFIG_HELP}\n\n{EXIT_STATUS}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    if mode in ("eval", "sample", "posthoc_ema", "encode"):
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
    if mode == "encode":
        p.add_argument("--out", required=True, metavar="DIR", help="where to write the latent data set")
        p.add_argument(
            "--text_encoder",
            metavar="DIR",
            help="store the captions (data.captions) as the embeddings of this frozen CLIP text encoder (config.json "
            "and model.safetensors, as a Stable Diffusion pipeline's text_encoder/), for model.text_encoder = "
            "'precomputed' (docs/latent.md)",
        )
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
        p.add_argument("--prompt", metavar="TEXT", help="text-conditioned models: the prompt (docs/latent.md)")
        p.add_argument(
            "--negative_prompt", metavar="TEXT", help="with --prompt: the prompt to steer away from (--guidance_scale)"
        )
        _add_task_flags(p)
    if mode == "posthoc_ema":
        p.add_argument(
            "--sigma_rel",
            required=True,
            type=_sigma_rels,
            metavar="S1,S2,...",
            help="relative EMA lengths (std of the averaging profile / training time) in (0, 0.2887]",
        )
        p.add_argument("--step", type=_count(1), metavar="STEP", help="reconstruct at this step (default: the newest)")
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
        "       diffusion-jax {eval,sample,posthoc_ema,encode} --workdir DIR [flags]  (the workdir's own config)\n"
        "       diffusion-jax sweep --sweep SWEEP.py --workdir DIR [--storage URL] [--status | --report]\n\n"
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
    stored = config_lib.workdir_config(workdir) if mode in ("eval", "sample", "posthoc_ema", "encode") else None
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
    if mode == "sweep":
        return _run_sweep(argv[1:])
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
        elif mode == "encode":
            modes.encode(config, flags.workdir, out=flags.out, text_encoder=flags.text_encoder)
        elif mode == "posthoc_ema":
            modes.posthoc_ema(config, flags.workdir, sigma_rels=flags.sigma_rel, step=flags.step)
        elif flags.prompt is not None or flags.negative_prompt is not None:
            if flags.task is not None or flags.labels is not None or flags.label is not None:
                raise ConfigError("--prompt does not combine with --task, --label or --labels")
            _no_task_flags(flags, allowed=("guidance_scale",))
            modes.sample(
                config,
                flags.workdir,
                num_samples=flags.num_samples,
                out=flags.out,
                step=flags.step,
                prompt=flags.prompt,
                negative_prompt=flags.negative_prompt,
                guidance_scale=flags.guidance_scale,
            )
        elif flags.task is not None:
            _sample_task(flags, config)
        else:
            _no_task_flags(flags)
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


_TASK_FLAGS = tuple(
    "input mask border factor blur sigma_y measured method num_steps option strength negative_label guidance_scale "
    "guidance_interval classifier_workdir".split()
)


def _no_task_flags(flags: argparse.Namespace, allowed: tuple[str, ...] = ()) -> None:
    given = [f"--{k}" for k in _TASK_FLAGS if k not in allowed and getattr(flags, k) not in (None, False)]
    if given:
        raise ConfigError(f"{', '.join(given)} need(s) --task (see 'diffusion-jax sample --help')")


def _sample_task(flags: argparse.Namespace, config) -> None:
    from diffusion_jax.modes.tasks import Task, sample_task

    labels = flags.labels if flags.label is None else [flags.label]
    task = Task(
        task=flags.task,
        mask=flags.mask,
        border=flags.border,
        factor=flags.factor,
        blur=flags.blur,
        sigma_y=flags.sigma_y,
        method=flags.method,
        num_steps=flags.num_steps,
        options=dict(flags.option) if flags.option else None,
        measured=flags.measured or None,
        strength=flags.strength,
        labels=labels,
        negative_labels=None if flags.negative_label is None else [flags.negative_label],
        guidance_scale=flags.guidance_scale,
        guidance_interval=flags.guidance_interval,
        classifier_workdir=flags.classifier_workdir,
    )
    sample_task(
        config,
        flags.workdir,
        task,
        input_path=flags.input,
        num_samples=flags.num_samples,
        out=flags.out,
        step=flags.step,
    )


def _sweep_parser() -> _Parser:
    p = _Parser(
        prog="diffusion-jax sweep",
        description=MODES["sweep"] + ". Each point is its own train (+ eval) run in <workdir>/points/<name>; "
        "rerunning the command resumes the sweep, and several workers running it against one --storage share "
        "the points.",
        epilog=f"sweep files: experiments/<name>/sweep.py (README, 'Sweeps').\n\n{EXIT_STATUS}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--sweep", required=True, metavar="SWEEP.py", help="the sweep file (experiments/<name>/sweep.py)")
    p.add_argument("--workdir", required=True, metavar="DIR", help="the points' workdirs, logs, report and sweep.db")
    p.add_argument(
        "--storage",
        metavar="URL",
        help="SQLAlchemy URL of the shared Optuna storage, e.g. postgresql+psycopg://user@host/db "
        "(default: sqlite:///<workdir>/sweep.db)",
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument("--dry_run", action="store_true", help="print the points and their overrides, run nothing")
    what.add_argument("--status", action="store_true", help="print which points are done, running, failed, pending")
    what.add_argument(
        "--report",
        action="store_true",
        help="write <workdir>/report: CSVs, a Markdown table (mean ± std over seeds), plots, TensorBoard hparams",
    )
    p.add_argument("--retry_failed", action="store_true", help="run the failed points again")
    p.add_argument(
        "--heartbeat",
        type=_count(1),
        default=60,
        metavar="S",
        help="seconds between a running point's heartbeats (default: 60)",
    )
    p.add_argument(
        "--grace",
        type=_count(1),
        metavar="S",
        help="a running point with no heartbeat for S seconds was lost and is run again (default: 3 heartbeats)",
    )
    p.add_argument("--metric", metavar="NAME", help="--report: the plotted metric (default: the sweep file's)")
    p.add_argument("--factor", metavar="NAME", help="--report: the factor on the plot's x axis (default: the first)")
    return p


def _run_sweep(argv: Sequence[str]) -> int:
    parser = _sweep_parser()
    try:
        if any(a in ("-h", "--help") for a in argv):
            parser.print_help()
            return 0
        flags = parser.parse_args(argv)
    except UsageError as e:
        _say(f"diffusion-jax sweep: {e}")
        return 2
    from diffusion_jax.modes.sweep import sweep
    from diffusion_jax.sweeps.engine import SweepStopped

    try:
        return sweep(
            flags.sweep,
            flags.workdir,
            storage=flags.storage,
            dry_run=flags.dry_run,
            status=flags.status,
            report=flags.report,
            retry_failed=flags.retry_failed,
            heartbeat=flags.heartbeat,
            grace=flags.grace,
            metric=flags.metric,
            factor=flags.factor,
            say=lambda msg: print(msg, flush=True),
        )
    except ConfigError as e:
        _say(f"diffusion-jax sweep: {e}")
        return 2
    except SweepStopped as e:
        _say(f"diffusion-jax sweep: {e}")
        return e.status


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
