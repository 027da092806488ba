"""``diffusion-jax convert``: a score_sde checkpoint (PyTorch port or original JAX) as a workdir."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.builders import diffusion as diffusion_builders
from diffusion_jax.builders.config import ConfigError
from diffusion_jax.models import convert as convert_lib
from diffusion_jax.modes import setup
from diffusion_jax.training import checkpoint as ckpt_lib
from diffusion_jax.training.state import init_train_state

__all__ = ["convert"]


def _load_checkpoint_file(path: str, source: str):
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
    run = setup.prepare(config, workdir, create=True, need_data=False)
    config, workdir, exp = run.config, run.workdir, run.exp
    loaded = (
        _load_checkpoint_file(os.fspath(checkpoint), source)
        if isinstance(checkpoint, (str, os.PathLike))
        else checkpoint
    )
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
    if run.primary:
        setup.write_config(workdir, config)
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
