"""The run set-up every mode shares: start-up, config checks, the workdir, the data's description,
the experiment, and the pieces two or more modes use (checkpoint restore, chunked sampling, image
grids, atomic result files).

Everything that can refuse a run (a bad config, an unwritable or incompatible workdir, missing
data) happens in :func:`prepare`, before any work.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_jax.builders import config as config_lib
from diffusion_jax.builders import data as data_builders
from diffusion_jax.builders import diffusion as diffusion_builders
from diffusion_jax.builders.config import ConfigError
from diffusion_jax.builders.experiment import Experiment, build_experiment, check_buildable
from diffusion_jax.training import checkpoint as ckpt_lib
from diffusion_jax.training import sharding as sharding_lib
from diffusion_jax.training.distributed import allgather_rows
from diffusion_jax.training.logging import progress_bar, save_image_grid
from diffusion_jax.training.state import init_train_state
from diffusion_jax.training.step import per_device_batch

__all__ = [
    "Run",
    "prepare",
    "INCOMPATIBLE_KEYS",
    "check_workdir_config",
    "build_data",
    "check_batch",
    "restore_state",
    "checkpoint_steps",
    "sample_images",
    "resume",
    "gather_chunks",
    "class_labels",
    "save_samples",
    "write_atomically",
    "write_config",
    "quiet_library_notices",
    "data_info",
]

# Keys whose change makes a workdir's checkpoints unusable or its results incomparable.
INCOMPATIBLE_KEYS = (
    "model",
    "autoencoder",
    "data.latent_dir",
    "training.task",
    "training.sde",
    "training.continuous",
    "data.dataset",
    "data.image_size",
    "data.num_channels",
    "data.centered",
    "data.category",
    "data.num_levels",
    "optim.optimizer",
)


# Notices of the libraries underneath that say nothing about the run: orbax opening checkpoints
# read-only for eval/sample, tfds decoding images with PIL.
_QUIET_NOTICES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only", "OpenCV is not installed")


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in _QUIET_NOTICES)


def quiet_library_notices() -> None:
    """Only warnings and errors from absl (orbax, tfds) and JAX, without the notices above."""
    absl_log = logging.getLogger("absl")
    absl_log.setLevel(logging.WARNING)
    if not any(isinstance(f, _DropNotices) for f in absl_log.filters):
        absl_log.addFilter(_DropNotices())
    logging.getLogger("jax").setLevel(logging.WARNING)  # e.g. the notice that no TPU runtime is installed


@dataclasses.dataclass
class Run:
    """What :func:`prepare` hands a mode: the checked config (image shape resolved from the data),
    the workdir, the experiment built from the config, and whether this process writes files."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    exp: Experiment
    primary: bool


def _initialize_distributed(config) -> None:
    from diffusion_jax.training import distributed

    d = config.distributed
    distributed.initialize(
        coordinator_address=d.coordinator_address or None,
        num_processes=d.num_processes or None,
        process_id=None if d.process_id < 0 else d.process_id,
        timeout=d.initialization_timeout,
    )


def _prepare_workdir(workdir: pathlib.Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        # One probe per process: hosts sharing the workdir must not remove each other's.
        probe = workdir / f".write_test.{jax.process_index()}.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ConfigError(f"workdir {workdir}: the disk is full (No space left on device)") from None
        raise ConfigError(f"workdir {workdir} is not writable: {e.strerror or e}") from None


def check_workdir_config(config, workdir: pathlib.Path) -> None:
    """Refuse a workdir whose saved config differs from this one in incompatible keys."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); move it away to start a new run") from None
    # Keys added to the schema after the workdir was written take their defaults (which keep
    # the behaviour of before), as when its config.py is loaded.
    saved = config_lib.with_defaults(saved).to_dict()
    diff = config_lib.config_diff(saved, json.loads(config.to_json_best_effort()), INCOMPATIBLE_KEYS)
    if diff:
        raise ConfigError(
            f"workdir {workdir} was written by an incompatible config; these keys differ: {', '.join(diff)}. "
            "Use a new --workdir, or restore the original values."
        )


def build_data(config, **kwargs):
    """The data iterator, with a missing or unreadable data set reported as a ConfigError."""
    try:
        return data_builders.build_data(config, **kwargs)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        raise ConfigError(f"data: {e}") from None


def data_info(config):
    """The data as the pipeline yields it; a data set that cannot be opened is a ConfigError."""
    return _data_info(config, required=True)


def _data_info(config, *, required: bool):
    """The data as the pipeline yields it (the one place a mode learns it); without ``required``,
    None when the data set cannot be opened (sampling needs only the config)."""
    try:
        return data_builders.build_data_info(config)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        if required:
            raise ConfigError(f"data: {e}") from None
        return None


def _resolve_shape(config, info) -> ml_collections.ConfigDict:
    """``data.image_size`` / ``data.num_channels`` left at None take the data's own."""
    if config.data.image_size is not None and config.data.num_channels is not None:
        return config
    if info is None or not info.is_image:
        raise ConfigError("data.image_size and data.num_channels must be set when the data set cannot be opened")
    config = ml_collections.ConfigDict(config.to_dict())
    h, _, c = info.shape
    with config.data.ignore_type():
        if config.data.image_size is None:
            config.data.image_size = int(h)
        if config.data.num_channels is None:
            config.data.num_channels = int(c)
    return config


def prepare(config, workdir, *, create: bool, need_data: bool = True) -> Run:
    """Start a mode: join the other processes, check the config (once, every check), check (and
    with ``create``, make) the workdir, learn the data and build the experiment. Every refusal is a
    :class:`ConfigError` with one message."""
    _initialize_distributed(config)
    config_lib.validate_config(config, build=False)
    workdir = pathlib.Path(workdir)
    if create:
        _prepare_workdir(workdir)
    check_workdir_config(config, workdir)
    latent = config.data.dataset.lower() == "latent"
    info = _data_info(config, required=need_data or latent)  # a latent set describes its samples
    config = _resolve_shape(config, info)
    problems = check_buildable(config)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    exp = build_experiment(config, data_info=info)
    if latent and config.training.task != "autoencoder":
        from diffusion_jax.builders.autoencoder import latent_decoder  # noqa: PLC0415
        from diffusion_jax.data.latent import read_metadata  # noqa: PLC0415

        meta = read_metadata(config.data.latent_dir)
        if config.model.text_encoder != "none":
            check_latent_captions(config, meta)
        exp.decode = latent_decoder(config, meta)
    return Run(config, workdir, exp, jax.process_index() == 0)


def check_latent_captions(config, meta: dict) -> None:
    """A text-conditioned model needs a latent set holding its captions in the form it reads:
    token ids for ``model.text_encoder = 'tiny'``, embeddings of width ``model.context_dim`` for
    ``'precomputed'``. A ConfigError (one message) otherwise."""
    where, kind = config.data.latent_dir, config.model.text_encoder
    captions = meta.get("captions") or {}
    name = captions.get("name", "")
    if name != config.data.captions:
        raise ConfigError(
            f"model.text_encoder reads data.captions = {config.data.captions!r}, but the latent data set "
            f"{where} holds {'captions ' + repr(name) if name else 'no captions'}; "
            "encode it with the autoencoder's data.captions set"
        )
    embedding = captions.get("embedding")
    if kind == "precomputed":
        if not embedding:
            raise ConfigError(
                f"model.text_encoder = 'precomputed' reads caption embeddings, but the latent data set {where} holds "
                "the captions' token ids; encode it with `diffusion-jax encode --text_encoder DIR` (or set "
                "model.text_encoder = 'tiny')"
            )
        if int(embedding["hidden_size"]) != config.model.context_dim:
            raise ConfigError(
                f"model.context_dim = {config.model.context_dim}, but the caption embeddings of {where} have width "
                f"{embedding['hidden_size']} (the text encoder at {embedding['path']}); set "
                f"model.context_dim = {embedding['hidden_size']}"
            )
    elif embedding:
        raise ConfigError(
            f"model.text_encoder = 'tiny' reads the captions' token ids, but the latent data set {where} holds their "
            f"embeddings by the text encoder at {embedding['path']}; set model.text_encoder = 'precomputed' and "
            f"model.context_dim = {embedding['hidden_size']}, or encode without --text_encoder"
        )


def write_config(workdir: pathlib.Path, config) -> None:
    """The run's config as ``config.json`` (read back to check later runs) and ``config.py`` (a
    config file that ``eval``, ``sample`` and ``--config`` load)."""
    write_atomically(workdir / "config.json", config.to_json_best_effort(indent=2))
    title = f"The config this workdir was trained with: diffusion-jax sample --workdir {workdir}"
    write_atomically(workdir / "config.py", config_lib.to_python(config, title=title))


def write_atomically(path: pathlib.Path, text: str) -> None:
    """Write a file whole or not at all (a temporary file renamed into place), so neither a
    kill, a full disk, nor another host reading it at the same moment sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_batch(key: str, global_batch: int, *, grad_accum_steps: int = 1, mesh=None) -> int:
    """Per-device batch of ``config.<key>`` on the mesh; a ConfigError if it does not divide. With
    ``mesh``, the batch is split over its ``data x fsdp`` devices (a ``tensor`` group shares its
    examples); without, over every device."""
    try:
        return per_device_batch(
            global_batch,
            num_devices=jax.device_count() if mesh is None else sharding_lib.batch_shards(mesh),
            num_processes=jax.process_count(),
            grad_accum_steps=grad_accum_steps,
            name=key,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    """Saved checkpoint steps (a ConfigError when there are none: train first)."""
    steps: list[int] = []
    if (workdir / "checkpoints").exists():
        ck = ckpt_lib.Checkpointer(workdir / "checkpoints", read_only=True)
        try:
            steps = ck.steps()
        finally:
            ck.close()
    if not steps:
        raise ConfigError(f"no checkpoint in {workdir / 'checkpoints'}; train first")
    return steps


def restore_state(config, exp: Experiment, workdir: pathlib.Path, step: int | None):
    """``(step, TrainState)`` of a checkpoint (the newest readable one when ``step`` is None)."""
    optimizer = diffusion_builders.build_optimizer(config)
    params = jax.eval_shape(exp.init_params, jax.random.PRNGKey(0))
    extra_ema = diffusion_builders.build_ema(config)
    template = jax.eval_shape(lambda p: init_train_state(p, optimizer, jax.random.PRNGKey(0), ema=extra_ema), params)
    # Laid out on the mesh of config.mesh, as in training: orbax reads each device's slice,
    # whatever mesh wrote the checkpoint; on several hosts every array is a global array.
    shardings = exp.state_shardings(template)
    template = jax.tree_util.tree_map(
        lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), template, shardings
    )
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", read_only=True)
    try:
        restored = checkpointer.restore(template, step=step)
    finally:
        checkpointer.close()
    return restored.step, restored.state


def resume(checkpointer: ckpt_lib.Checkpointer, state, train_iter, writer, *, primary: bool):
    """The state (and the data position) of the newest readable checkpoint, or ``state`` when
    there is none; the metric logs are cut back to that step. Checkpoints that exist but none of
    which can be read are a ConfigError, so a run never starts afresh over them."""
    try:
        restored = checkpointer.restore(state, data_iterator=train_iter)
    except ckpt_lib.NoCheckpointError as e:
        if checkpointer.steps():  # checkpoints exist but none could be read
            raise ConfigError(f"{e}\nMove the unreadable checkpoints away to start afresh.") from None
        writer.truncate(0)
        return state
    writer.truncate(restored.step)
    if primary:
        errors = restored.errors
        skipped = f" (skipped {len(errors)} unreadable newer checkpoint(s), see the warnings)" if errors else ""
        print(f"resumed from checkpoint at step {restored.step}{skipped}", flush=True)
    return restored.state


def class_labels(exp: Experiment, n: int):
    """Labels of ``n`` samples of a class-conditional network (0, 1, ..., cycling); None otherwise."""
    if exp.null_label is None:
        return None
    return jnp.arange(n, dtype=jnp.int32) % exp.module.num_classes


def sample_images(
    exp: Experiment, params, key, n: int, sampler, *, labels=None, share: bool = False
) -> tuple[np.ndarray, Any]:
    """``n`` samples in chunks of ``sampling.batch_size`` (one compiled sampler, each chunk's
    batch split over this process's devices when it divides over them); returns the samples
    and the info of the last chunk. Chunk ``i`` uses ``fold_in(key, i)``, so the samples do not
    depend on the number of devices or processes.

    With ``share`` and several processes, process ``p`` draws only chunks ``p, p + P, ...`` and
    returns them, whole and concatenated (info None when it has none): :func:`gather_chunks`
    puts every process's rows back in chunk order. Otherwise every process draws all ``n``.
    """
    from diffusion_jax import samplers as samplers_lib
    from diffusion_jax.samplers.base import NoiseSource

    guidance = exp.config.sampling.guidance_scale
    chunk = min(n, exp.config.sampling.batch_size)
    shape = (chunk, *exp.input_shape)
    starts = list(enumerate(range(0, n, chunk)))
    if share:
        starts = starts[jax.process_index() :: jax.process_count()]
    devices = jax.local_devices()
    mesh = Mesh(np.asarray(devices), ("data",))
    split = len(devices) > 1 and chunk % len(devices) == 0
    if split or jax.process_count() > 1:
        # This process's computation on its own devices: the parameters replicated there.
        params = _replicate_locally(params, mesh)
    out, info = [], None
    for i, start in progress_bar(starts, len(starts), f"sampling {n}"):
        k = jax.random.fold_in(key, i)
        lab = None if labels is None else labels[start : start + chunk]
        if lab is not None and lab.shape[0] < chunk:  # keep one shape: pad the last chunk
            lab = jnp.concatenate([lab, jnp.zeros((chunk - lab.shape[0],), lab.dtype)])
        x_init = None
        if split:
            # The sampler's own start (stream 0 of the chunk's key), placed split over the
            # devices: the whole sampler then runs on each device's share of the batch.
            prior = NoiseSource(k, chunk, False).prior(exp.sde, shape, jnp.float32)
            x_init = jax.device_put(prior, NamedSharding(mesh, P("data")))
            lab = None if lab is None else jax.device_put(lab, NamedSharding(mesh, P("data")))
        score_fn = exp.score_fn(params, class_labels=lab, guidance_scale=guidance)
        x, info = samplers_lib.sample(k, score_fn, exp.sde, shape, sampler, x_init=x_init)
        out.append(np.asarray(jax.device_get(x)))
    if not out:
        return np.zeros((0, *exp.input_shape), np.float32), None
    x_all = np.concatenate(out)
    return (x_all if share and jax.process_count() > 1 else x_all[:n]), info


def _replicate_locally(tree, mesh: Mesh):
    """``tree``'s arrays replicated over ``mesh`` (this process's devices); arrays that span other
    processes' devices too contribute the copy this process holds, or, when they are sharded
    (``mesh.fsdp`` / ``mesh.tensor``), are gathered from every process (a collective)."""
    from jax.experimental import multihost_utils

    def put(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            if a.sharding.is_fully_replicated:
                a = np.asarray(a.addressable_data(0))
            else:
                a = np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return jax.device_put(a, NamedSharding(mesh, P()))

    return jax.tree_util.tree_map(put, tree)


def gather_chunks(rows: np.ndarray, n: int, chunk: int) -> np.ndarray:
    """The rows that every process computed for its chunks (``sample_images(..., share=True)``, or
    anything computed row by row from them), on every process, in chunk order, the first ``n``."""
    procs = jax.process_count()
    if procs == 1:
        return np.asarray(rows)[:n]
    every = allgather_rows(rows)
    num_chunks = -(-n // chunk)
    offsets = np.cumsum([0] + [len(range(p, num_chunks, procs)) * chunk for p in range(procs)])
    parts = [every[offsets[i % procs] + (i // procs) * chunk :][:chunk] for i in range(num_chunks)]
    return np.concatenate(parts)[:n]


def save_samples(exp: Experiment, x: np.ndarray, path_png: pathlib.Path) -> None:
    """A PNG grid of image samples (nothing for data that are not images)."""
    images = np.clip(exp.to_data_range(x), 0.0, 1.0)
    if images.ndim == 4:
        save_image_grid(path_png, images, upscale=max(1, 64 // images.shape[1]))
