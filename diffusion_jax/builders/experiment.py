"""Experiments from a config: ``train``, ``evaluate`` and ``sample`` (what the command line runs).

This is the top of the builder layer: it turns a validated config into the library's typed
objects (network, SDE, parametrization, loss, optimiser, data, sampler) and hands them to the
training loop, the evaluation code and the samplers.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import math
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_jax import parametrization as param_lib
from diffusion_jax.builders import config as config_lib
from diffusion_jax.builders import diffusion as diffusion_builders
from diffusion_jax.builders.config import ConfigError
from diffusion_jax.training import checkpoint as ckpt_lib
from diffusion_jax.training import loop as loop_lib
from diffusion_jax.training.logging import MetricWriter, save_image_grid
from diffusion_jax.training.state import init_train_state
from diffusion_jax.training.step import (
    make_eval_step,
    make_mesh,
    make_train_step,
    per_device_batch,
    replicate,
    shard_batch,
)

__all__ = [
    "Experiment",
    "build_experiment",
    "load_params",
    "train",
    "evaluate",
    "sample",
    "convert",
    "registries",
    "check_workdir_config",
]

log = logging.getLogger(__name__)

# Keys whose change makes a workdir's checkpoints unusable or its results incomparable.
INCOMPATIBLE_KEYS = (
    "model",
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


def registries() -> dict[str, list[str]]:
    """Valid names for the config's name-valued keys, from the library's literal registries.
    (Data set names are checked by the data builder, which also knows LSUN categories.)"""
    from diffusion_jax import losses as losses_lib
    from diffusion_jax import models as models_lib
    from diffusion_jax import samplers as samplers_lib
    from diffusion_jax import sde as sde_lib

    reg = {
        "sde": list(sde_lib.SDES),
        "model": list(models_lib.MODELS),
        "sampler": list(samplers_lib.SAMPLERS),
        "weighting": list(losses_lib.WEIGHTINGS),
        "time_sampler": list(losses_lib.TIME_SAMPLERS),
        "output": list(param_lib.OUTPUTS),
        "noise_cond": list(param_lib.NOISE_CONDITIONINGS),
    }
    for key, attr in (("predictor", "PREDICTORS"), ("corrector", "CORRECTORS"), ("grid", "GRIDS")):
        if hasattr(samplers_lib, attr):
            reg[key] = list(getattr(samplers_lib, attr))
    return reg


@dataclasses.dataclass
class Experiment:
    """Everything built from one config."""

    config: ml_collections.ConfigDict
    module: Any
    sde: Any
    parametrization: param_lib.Parametrization
    mesh: Any
    data_info: Any
    input_shape: tuple[int, ...]
    _score_impl: Any = None

    @property
    def null_label(self) -> int | None:
        return getattr(self.module, "null_label", None) if getattr(self.module, "num_classes", 0) else None

    def model_fn(self, *, train: bool):
        return diffusion_builders.make_model_fn(
            self.module,
            train=train,
            class_dropout=self.config.training.class_dropout if train else 0.0,
            null_label=self.null_label,
        )

    def score_fn(self, params, *, class_labels=None, guidance_scale: float = 0.0):
        """The score of the network with ``params``; with class labels and ``guidance_scale`` w,
        classifier-free guidance (1 + w) s(x|y) - w s(x|null) (Ho & Salimans 2022).

        Returned as a ``jax.tree_util.Partial`` holding the parameters, so the samplers take
        them as arguments (no recompilation for new parameters, no giant constants)."""
        if self._score_impl is None:
            self._score_impl = functools.partial(_score, self.module, self.sde, self.parametrization, self.null_label)
        return jax.tree_util.Partial(self._score_impl, params, class_labels, float(guidance_scale))

    def init_params(self, key):
        x = jnp.zeros((1,) + self.input_shape, jnp.float32)
        labels = jnp.zeros((1,), jnp.float32)
        kwargs = {"class_labels": jnp.zeros((1,), jnp.int32)} if self.null_label is not None else {}
        init = jax.jit(
            lambda k: self.module.init({"params": k, "dropout": k}, x, labels, train=False, **kwargs)["params"]
        )
        return init(key)

    def to_data_range(self, x):
        """Model-space samples -> the data's natural range [0, 1] (images) or as is (toys)."""
        info = self.data_info
        if info is not None and getattr(info, "centered", False):
            return (np.asarray(x) + 1.0) / 2.0
        return np.asarray(x)


def _score(module, sde, parametrization, null_label, params, class_labels, guidance_scale, x, t):
    def net(labels):
        kwargs = {} if labels is None else {"class_labels": labels}
        return lambda x_in, c: module.apply({"params": params}, x_in, c, train=False, **kwargs)

    score = parametrization.apply(net(class_labels), sde, x, t, "score")
    if class_labels is None or not guidance_scale:
        return score
    uncond = parametrization.apply(net(jnp.full_like(class_labels, null_label)), sde, x, t, "score")
    return (1.0 + guidance_scale) * score - guidance_scale * uncond


def _maybe_initialize_distributed(config) -> None:
    from diffusion_jax.training import distributed

    distributed.initialize(
        coordinator_address=config.distributed.coordinator_address or None,
        num_processes=config.distributed.num_processes or None,
        process_id=None if config.distributed.process_id < 0 else config.distributed.process_id,
        timeout=config.distributed.initialization_timeout,
    )


def build_experiment(config, *, data_info=None) -> Experiment:
    from diffusion_jax.builders.model import build_model, model_input_shape

    try:
        module = build_model(config)
        input_shape = tuple(model_input_shape(config, 1)[1:])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    sde = diffusion_builders.build_sde(config)
    parametrization = diffusion_builders.build_parametrization(config)
    return Experiment(config, module, sde, parametrization, make_mesh(), data_info, input_shape)


def check_workdir_config(config, workdir: pathlib.Path) -> None:
    """Refuse a workdir whose saved config differs from this one in incompatible keys."""
    path = workdir / "config.json"
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); move it away to start a new run") from None
    diff = config_lib.config_diff(saved, json.loads(config.to_json_best_effort()), INCOMPATIBLE_KEYS)
    if diff:
        raise ConfigError(
            f"workdir {workdir} was written by an incompatible config; these keys differ: {', '.join(diff)}. "
            "Use a new --workdir, or restore the original values."
        )


def _prepare_workdir(workdir) -> pathlib.Path:
    workdir = pathlib.Path(workdir)
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
    return workdir


def _write_atomically(path: pathlib.Path, text: str) -> None:
    """Write a file whole or not at all (a temporary file renamed into place), so neither a
    kill, a full disk, nor another host reading it at the same moment sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _build_data(config, **kwargs):
    """The data iterator, with a missing or unreadable data set reported as a ConfigError."""
    from diffusion_jax.builders.data import build_data

    try:
        return build_data(config, **kwargs)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        raise ConfigError(f"data: {e}") from None


def _check_batch(config, key: str, global_batch: int, *, grad_accum_steps: int = 1) -> int:
    """Per-device batch of ``config.<key>`` on the mesh; a ConfigError if it does not divide."""
    try:
        return per_device_batch(
            global_batch,
            num_devices=jax.device_count(),
            num_processes=jax.process_count(),
            grad_accum_steps=grad_accum_steps,
            name=key,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _validate(config) -> None:
    config_lib.validate_config(config, registries=registries())


def _sampler(config, *, sde):
    from diffusion_jax.builders.sampler import build_sampler

    try:
        return build_sampler(config, sde=sde)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _sample_images(exp: Experiment, params, key, n: int, sampler, *, labels=None) -> tuple[np.ndarray, Any]:
    """``n`` samples in chunks of ``sampling.batch_size`` (one compiled sampler); returns the
    samples and the info of the last chunk. Chunk ``i`` uses ``fold_in(key, i)``."""
    from diffusion_jax import samplers as samplers_lib

    guidance = exp.config.sampling.guidance_scale
    chunk = min(n, exp.config.sampling.batch_size)
    out, info = [], None
    for i, start in enumerate(range(0, n, chunk)):
        lab = None if labels is None else labels[start : start + chunk]
        if lab is not None and lab.shape[0] < chunk:  # keep one shape: pad the last chunk
            lab = jnp.concatenate([lab, jnp.zeros((chunk - lab.shape[0],), lab.dtype)])
        score_fn = exp.score_fn(params, class_labels=lab, guidance_scale=guidance)
        x, info = samplers_lib.sample(
            jax.random.fold_in(key, i), score_fn, exp.sde, (chunk,) + exp.input_shape, sampler
        )
        out.append(np.asarray(jax.device_get(x)))
    return np.concatenate(out)[:n], info


def _class_labels(exp: Experiment, n: int):
    if exp.null_label is None:
        return None
    return jnp.arange(n, dtype=jnp.int32) % exp.module.num_classes


def _save_samples(exp: Experiment, x: np.ndarray, path_png: pathlib.Path) -> None:
    images = np.clip(exp.to_data_range(x), 0.0, 1.0)
    if images.ndim == 4:
        save_image_grid(path_png, images, upscale=max(1, 64 // images.shape[1]))


def train(config, workdir, *, stop_after: int | None = None) -> loop_lib.RunSummary:
    """Train from ``config`` into ``workdir``, resuming from its newest checkpoint."""
    _maybe_initialize_distributed(config)
    _validate(config)
    t = config.training
    per_device = _check_batch(config, "training.batch_size", t.batch_size, grad_accum_steps=t.grad_accum_steps)
    if t.eval_freq and t.eval_freq <= t.n_iters:
        _check_batch(config, "eval.batch_size", config.eval.batch_size)
    workdir = _prepare_workdir(workdir)
    check_workdir_config(config, workdir)
    primary = jax.process_index() == 0

    train_iter = _build_data(config, split="train")
    exp = build_experiment(config, data_info=train_iter.info)
    if primary:
        # Written once the data and the network are known to build, so a failed start does
        # not tie the workdir to a config that never ran.
        _write_atomically(workdir / "config.json", config.to_json_best_effort(indent=2))
        print(
            f"global batch {t.batch_size} = {jax.process_count()} host(s) x {jax.local_device_count()} "
            f"device(s) x {per_device} example(s)"
            + (f" in {t.grad_accum_steps} micro-batches" if t.grad_accum_steps > 1 else ""),
            flush=True,
        )

    optimizer = diffusion_builders.build_optimizer(config)
    loss_fn = diffusion_builders.build_loss(
        config, model_fn=exp.model_fn(train=True), sde=exp.sde, parametrization=exp.parametrization
    )
    key = jax.random.PRNGKey(config.seed)
    k_init, k_state, k_eval, k_sample = jax.random.split(key, 4)
    params = exp.init_params(k_init)
    state = replicate(init_train_state(params, optimizer, k_state), exp.mesh)

    checkpointer = ckpt_lib.Checkpointer(
        workdir / "checkpoints",
        keep_period=t.snapshot_freq,
        max_to_keep=t.max_to_keep,
        async_save=t.async_checkpointing,
    )
    writer = MetricWriter(workdir)
    try:
        try:
            step, state, _, errors = checkpointer.restore(state, data_iterator=train_iter)
            writer.truncate(step)
            if primary:
                skipped = f" (skipped {len(errors)} unreadable newer checkpoint(s), see the warnings)" if errors else ""
                print(f"resumed from checkpoint at step {step}{skipped}", flush=True)
        except ckpt_lib.NoCheckpointError as e:
            if checkpointer.steps():  # checkpoints exist but none could be read
                raise ConfigError(f"{e}\nMove the unreadable checkpoints away to start afresh.") from None
            writer.truncate(0)

        replicated = NamedSharding(exp.mesh, P())
        state_sharding = jax.tree_util.tree_map(lambda _: replicated, state)
        step_fn = jax.jit(
            make_train_step(
                loss_fn,
                optimizer,
                ema_rate=config.model.ema_rate,
                ema_warmup=config.model.ema_warmup,
                grad_accum_steps=t.grad_accum_steps,
                learning_rate_fn=diffusion_builders.learning_rate_fn(config),
            ),
            out_shardings=(state_sharding, replicated),
            donate_argnums=0,
        )
        eval_fn = _make_periodic_eval(config, exp, k_eval) if t.eval_freq else None
        sampler = _sampler(config, sde=exp.sde)
        n_snap = t.snapshot_samples

        def snapshot_fn(state, step):
            if not t.snapshot_sampling:
                return
            x, _ = _sample_images(
                exp,
                state.ema_params,
                jax.random.fold_in(k_sample, step),
                n_snap,
                sampler,
                labels=_class_labels(exp, n_snap),
            )
            if primary:
                _save_samples(exp, x, workdir / "samples" / f"step_{step:08d}.png")

        meta = {"config_sde": config.training.sde, "model": config.model.name}
        state, summary = loop_lib.fit(
            state=state,
            step_fn=step_fn,
            data_iter=train_iter,
            mesh=exp.mesh,
            n_iters=t.n_iters,
            n_jitted_steps=t.n_jitted_steps,
            checkpointer=checkpointer,
            checkpoint_every=math.gcd(t.snapshot_freq_for_preemption, t.snapshot_freq),
            writer=writer,
            log_freq=t.log_freq,
            eval_freq=t.eval_freq,
            eval_fn=eval_fn,
            snapshot_freq=t.snapshot_freq,
            snapshot_fn=snapshot_fn,
            nan_policy=t.nan_policy,
            max_consecutive_nan=t.max_consecutive_nan,
            meta=meta,
            stop_after=stop_after,
        )
        if summary.final_step == t.n_iters and t.snapshot_sampling and t.n_iters % t.snapshot_freq:
            snapshot_fn(state, summary.final_step)  # always leave a grid of the final model
        if primary:
            record = dataclasses.asdict(summary)
            _write_atomically(workdir / "summary.json", json.dumps(record, indent=2))
            print(
                f"trained steps {summary.start_step}->{summary.final_step} in {summary.seconds:.1f} s "
                f"({summary.steps_per_second:.2f} steps/s); final loss {summary.last_metrics.get('loss', float('nan')):.4f}; "  # noqa: E501
                f"non-finite steps skipped: {summary.nonfinite_steps}; workdir {workdir}",
                flush=True,
            )
        return summary
    finally:
        checkpointer.close()
        writer.close()
        close = getattr(train_iter, "close", None)
        if close:
            close()


def _make_periodic_eval(config, exp: Experiment, key):
    """Loss of the EMA parameters on the next eval batch (score_sde's eval during training)."""
    loss_fn = diffusion_builders.build_loss(
        config, model_fn=exp.model_fn(train=False), sde=exp.sde, parametrization=exp.parametrization
    )
    eval_step = jax.jit(make_eval_step(loss_fn))
    holder = {"it": None}

    def next_batch():
        for _ in range(2):
            if holder["it"] is None:
                holder["it"] = _build_data(config, split="eval")
            try:
                return next(holder["it"])
            except StopIteration:
                holder["it"] = None
        raise ConfigError("the eval split is empty")

    def eval_fn(state, step):
        batch = shard_batch(next_batch(), exp.mesh)
        total, count = eval_step(state.ema_params, batch, jax.random.fold_in(key, step))
        return {"loss": float(total) / max(float(count), 1.0)}

    return eval_fn


def _restore_for_eval(config, exp: Experiment, workdir: pathlib.Path, step: int | None):
    """(step, TrainState) of a checkpoint (newest readable when ``step`` is None)."""
    optimizer = diffusion_builders.build_optimizer(config)
    params = jax.eval_shape(exp.init_params, jax.random.PRNGKey(0))
    template = jax.eval_shape(lambda p: init_train_state(p, optimizer, jax.random.PRNGKey(0)), params)
    # Replicated over the mesh, like the training state: on several hosts every array must be
    # a global array to enter computations sharded over all devices.
    template = replicate(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), template), exp.mesh)
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", read_only=True)
    try:
        got, state, _, errors = checkpointer.restore(template, step=step)
    finally:
        checkpointer.close()
    return got, state


def load_params(config, workdir, *, step: int | None = None) -> tuple[Experiment, int, Any]:
    """``(experiment, step, EMA parameters)`` of a checkpoint in ``workdir`` trained with
    ``config`` (the newest readable one when ``step`` is None): a trained model for scripts and
    notebooks, e.g. ``exp.score_fn(params)`` for :func:`diffusion_jax.sample` or the likelihood."""
    _validate(config)
    workdir = pathlib.Path(workdir)
    check_workdir_config(config, workdir)
    with _build_data(config, split="eval") as it:
        exp = build_experiment(config, data_info=it.info)
    got, state = _restore_for_eval(config, exp, workdir, step)
    return exp, got, state.ema_params


def _checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    ck = ckpt_lib.Checkpointer(workdir / "checkpoints", read_only=True)
    try:
        return ck.steps()
    finally:
        ck.close()


def evaluate(config, workdir) -> dict:
    """Evaluate saved checkpoints in ``[eval.begin_ckpt, eval.end_ckpt]``: loss over the whole
    eval split, samples, and bits/dim; results go to ``<workdir>/eval/`` (process 0 writes)."""
    _maybe_initialize_distributed(config)
    _validate(config)
    workdir = pathlib.Path(workdir)
    check_workdir_config(config, workdir)
    steps = _checkpoint_steps(workdir) if (workdir / "checkpoints").exists() else []
    if not steps:
        raise ConfigError(f"no checkpoint in {workdir / 'checkpoints'}; train first")
    e = config.eval
    end = steps[-1] if e.end_ckpt < 0 else e.end_ckpt
    chosen = [s for s in steps if e.begin_ckpt <= s <= end]
    if not chosen:
        raise ConfigError(
            f"no checkpoint step in [eval.begin_ckpt={e.begin_ckpt}, eval.end_ckpt={e.end_ckpt}]; saved: {steps}"
        )
    _check_batch(config, "eval.batch_size", e.batch_size)
    info_iter = _build_data(config, split="eval")
    exp = build_experiment(config, data_info=info_iter.info)
    info_iter.close()
    out_dir = workdir / "eval"
    primary = jax.process_index() == 0
    if primary:
        out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for step in chosen:
        _, state = _restore_for_eval(config, exp, workdir, step)
        params = state.ema_params
        res: dict[str, Any] = {"step": step}
        if e.enable_loss:
            res.update(_eval_loss(config, exp, params, step))
        if e.enable_sampling:
            sampler = _sampler(config, sde=exp.sde)
            x, sinfo = _sample_images(
                exp, params, jax.random.PRNGKey(step), e.num_samples, sampler, labels=_class_labels(exp, e.num_samples)
            )
            res["sampling_nfe"] = int(np.asarray(sinfo.nfe))
            if primary:
                np.savez(out_dir / f"samples_{step:08d}.npz", samples=exp.to_data_range(x))
                _save_samples(exp, x, out_dir / f"samples_{step:08d}.png")
        if e.enable_bpd:
            res.update(_eval_bpd(config, exp, params, step))
        results[step] = res
        if primary:
            _write_atomically(out_dir / f"results_{step:08d}.json", json.dumps(res, indent=2))
            print(json.dumps(res), flush=True)
    return results


def _eval_loss(config, exp: Experiment, params, step: int) -> dict:
    """Mean loss over every example of the eval split (padded batches are masked)."""
    loss_fn = diffusion_builders.build_loss(
        config, model_fn=exp.model_fn(train=False), sde=exp.sde, parametrization=exp.parametrization
    )
    eval_step = jax.jit(make_eval_step(loss_fn))
    total = count = 0.0
    key = jax.random.PRNGKey(step)
    with _build_data(config, split="eval") as it:
        for i, batch in enumerate(it):
            s, c = eval_step(params, shard_batch(batch, exp.mesh), jax.random.fold_in(key, i))
            total, count = total + float(s), count + float(c)
    return {"eval_loss": total / max(count, 1.0), "eval_examples": int(count)}


def _eval_bpd(config, exp: Experiment, params, step: int) -> dict:
    from diffusion_jax.builders.likelihood import evaluate_bpd

    return evaluate_bpd(config, exp, params, step=step)


def sample(
    config, workdir, *, num_samples: int | None = None, out: str | None = None, step: int | None = None
) -> pathlib.Path:
    """Write ``num_samples`` samples of a checkpoint (newest by default) with ``config.sampling``:
    ``<out>.npz`` (values in the data's range) and ``<out>.png`` (a grid); process 0 writes."""
    _maybe_initialize_distributed(config)
    _validate(config)
    workdir = pathlib.Path(workdir)
    check_workdir_config(config, workdir)
    if not (workdir / "checkpoints").exists() or not _checkpoint_steps(workdir):
        raise ConfigError(f"no checkpoint in {workdir / 'checkpoints'}; train first")
    from diffusion_jax.builders.data import build_data_source

    try:
        info = build_data_source(config, split="eval").info
    except ValueError:
        info = None
    if info is not None and config.data.centered and not getattr(info, "centered", False):
        info = dataclasses.replace(info, centered=True)
    exp = build_experiment(config, data_info=info)
    got, state = _restore_for_eval(config, exp, workdir, step)
    n = num_samples or config.eval.num_samples
    sampler = _sampler(config, sde=exp.sde)
    t0 = time.perf_counter()
    x, sinfo = _sample_images(
        exp, state.ema_params, jax.random.PRNGKey(config.seed + got), n, sampler, labels=_class_labels(exp, n)
    )
    seconds = time.perf_counter() - t0
    out_path = pathlib.Path(out) if out else workdir / "samples" / f"samples_{got:08d}_{config.sampling.method}"
    if jax.process_index() != 0:
        return out_path.with_suffix(".npz")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out_path.with_suffix(".npz"), samples=exp.to_data_range(x))
    _save_samples(exp, x, out_path.with_suffix(".png"))
    print(
        f"wrote {n} samples of checkpoint {got} ({config.sampling.method}, nfe={int(np.asarray(sinfo.nfe))}, "
        f"{seconds:.1f} s) to {out_path.with_suffix('.npz')} and .png",
        flush=True,
    )
    return out_path.with_suffix(".npz")


def _load_checkpoint_file(path: str, source: str):
    from diffusion_jax.models import convert as convert_lib

    if source == "score_sde_pytorch":
        return convert_lib.load_torch_checkpoint(path)
    if source == "score_sde_jax":
        import flax.serialization

        with open(path, "rb") as f:
            return flax.serialization.msgpack_restore(f.read())
    raise ConfigError(f"unknown checkpoint source {source!r}; valid: score_sde_pytorch, score_sde_jax")


def convert(config, workdir, *, checkpoint, source: str = "score_sde_pytorch") -> int:
    """Turn a score_sde checkpoint into a workdir that ``train`` (to fine-tune), ``eval`` and
    ``sample`` load: ``<workdir>/checkpoints/<step>`` holding the converted weights as ``params``
    and the converted EMA weights as ``ema_params`` (the weights score_sde samples with), a fresh
    optimiser state, and ``<workdir>/config.json``.

    ``checkpoint`` is a path (``.pth`` read with torch's weights-only loader for
    ``score_sde_pytorch``; a ``flax.training.checkpoints`` msgpack file for ``score_sde_jax``) or
    an already loaded dict. Key or shape mismatches raise an error naming the first offending
    entry. Returns the step written.
    """
    from diffusion_jax.models import convert as convert_lib

    _validate(config)
    workdir = _prepare_workdir(workdir)
    check_workdir_config(config, workdir)
    exp = build_experiment(config)
    loaded = _load_checkpoint_file(checkpoint, source) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    shape = (1,) + exp.input_shape
    try:
        if source == "score_sde_pytorch":
            params = convert_lib.convert_checkpoint(exp.module, loaded, input_shape=shape, ema=False)
            has_ema = isinstance(loaded, dict) and "ema" in loaded
            ema = convert_lib.convert_checkpoint(exp.module, loaded, input_shape=shape, ema=True) if has_ema else params
        else:
            params = convert_lib.load_score_sde_flax_params(exp.module, loaded, input_shape=shape, ema=False)
            has_ema = isinstance(loaded, dict) and "params_ema" in loaded
            ema = (
                convert_lib.load_score_sde_flax_params(exp.module, loaded, input_shape=shape, ema=True)
                if has_ema
                else params
            )
    except convert_lib.ConversionError as e:
        raise ConfigError(
            f"cannot convert {checkpoint if isinstance(checkpoint, str) else 'the checkpoint'}: {e}"
        ) from None
    step = int(np.asarray(loaded.get("step", 0))) if isinstance(loaded, dict) else 0
    optimizer = diffusion_builders.build_optimizer(config)
    state = init_train_state(params, optimizer, jax.random.PRNGKey(config.seed))
    state = state.replace(step=jnp.asarray(step, jnp.int32), ema_params=ema)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", async_save=False)
    try:
        checkpointer.save(
            step,
            state,
            meta={
                "converted_from": str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "dict",
                "source": source,
                "ema": has_ema,
            },
        )
        checkpointer.wait()
    finally:
        checkpointer.close()
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    print(
        f"converted {n:,} parameters ({'with' if has_ema else 'without'} EMA weights) at step {step} "
        f"into {workdir / 'checkpoints' / str(step)}",
        flush=True,
    )
    return step
