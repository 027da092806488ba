"""Command line: ``diffusion-jax {train,eval,sample,convert} --config CONFIG.py --workdir DIR [overrides]``.

Overrides use ml_collections' syntax, e.g. ``--config.training.batch_size=64``. The command
parses flags and calls :mod:`diffusion_jax.builders.experiment`; configuration problems are
printed as one message, not a traceback. Exit status: 0 done, 2 configuration or data problem,
3 training diverged (non-finite loss), 4 a checkpoint or log could not be written (e.g. disk
full), 143 stopped by SIGTERM / a preemption notice after saving a checkpoint (rerun to resume).
"""

from __future__ import annotations

import errno
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

MODES = ("train", "eval", "sample", "convert")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/...).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_integer("num_samples", None, "sample: number of samples (default: config.eval.num_samples).")
flags.DEFINE_string("out", None, "sample: output path without suffix (writes .npz and .png).")
flags.DEFINE_integer("step", None, "sample: checkpoint step (default: the newest).")
flags.DEFINE_integer("stop_after", None, "train: stop (with a checkpoint) after this many steps.")
flags.DEFINE_string(
    "checkpoint", None, "convert: the score_sde checkpoint (.pth, or msgpack for --source=score_sde_jax)."
)
flags.DEFINE_enum("source", "score_sde_pytorch", ["score_sde_pytorch", "score_sde_jax"], "convert: checkpoint format.")
flags.DEFINE_string(
    "cache_dir", None, "Persistent compilation cache (default $DIFFUSION_JAX_CACHE or ~/.cache/diffusion_jax/jax)."
)
flags.DEFINE_boolean("compilation_cache", True, "Use JAX's persistent compilation cache.")


# Notices of the libraries underneath that say nothing about the run: orbax opening checkpoints
# read-only for eval/sample, tfds decoding images with PIL.
_QUIET_NOTICES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only", "OpenCV is not installed")


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in _QUIET_NOTICES)


def _say(msg: str) -> None:
    """One write per message, so that a background thread's output cannot split its line."""
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def _usage(msg: str) -> int:
    _say(
        f"diffusion-jax: {msg}\nusage: diffusion-jax {{{','.join(MODES)}}} --config CONFIG.py --workdir DIR "
        "[--config.section.key=value ...]"
    )
    return 2


def _run(argv) -> int:
    if len(argv) != 2 or argv[1] not in MODES:
        return _usage(f"expected one mode out of {', '.join(MODES)}, got {' '.join(argv[1:]) or 'none'}")
    if FLAGS.config is None:
        return _usage("--config is required")
    if not FLAGS.workdir:
        return _usage("--workdir is required")
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("absl").addFilter(_DropNotices())
    logging.getLogger("jax").setLevel(logging.WARNING)  # e.g. the notice that no TPU runtime is installed
    from diffusion_jax.builders import experiment
    from diffusion_jax.builders.config import ConfigError
    from diffusion_jax.training.checkpoint import CheckpointSaveError
    from diffusion_jax.training.distributed import compilation_cache
    from diffusion_jax.training.loop import Preempted, TrainingDiverged

    if FLAGS.compilation_cache:
        compilation_cache(FLAGS.cache_dir)
    mode = argv[1]
    try:
        if mode == "train":
            experiment.train(FLAGS.config, FLAGS.workdir, stop_after=FLAGS.stop_after)
        elif mode == "convert":
            if not FLAGS.checkpoint:
                return _usage("convert needs --checkpoint")
            experiment.convert(FLAGS.config, FLAGS.workdir, checkpoint=FLAGS.checkpoint, source=FLAGS.source)
        elif mode == "eval":
            experiment.evaluate(FLAGS.config, FLAGS.workdir)
        else:
            experiment.sample(
                FLAGS.config, FLAGS.workdir, num_samples=FLAGS.num_samples, out=FLAGS.out, step=FLAGS.step
            )
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
    app.run(lambda argv: sys.exit(_run(argv)))


if __name__ == "__main__":
    main()
