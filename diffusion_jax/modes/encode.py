"""``diffusion-jax encode``: encode a data set once with a trained autoencoder into a latent data
set (``diffusion_jax.data.latent``) that training, sampling and evaluation then read with
``data.dataset = 'latent'`` and ``data.latent_dir``.

Every process encodes its own shard of each split (the evaluation pipeline's strided shard:
examples ``p, p + P, ...``), each global batch split over all devices, every device encoding its
examples one at a time (a batch of one: XLA's kernels round differently for other batch sizes),
and writes its own ArrayRecord file; process 0 writes ``latents.json`` once every process has finished. A latent is
the posterior mean, or with ``autoencoder.encode_sample`` a posterior sample drawn with the key
``fold_in(PRNGKey(seed), example index)``: either way a pure function of the example and the
parameters, so the files do not depend on the number of devices or processes. The scale factor
is ``autoencoder.scale_factor``, else 1 / std of every element of the train split's latents
(Rombach et al. 2022, App. G: unit-variance latents for the diffusion model), reduced over all
processes.

Captions (``data.captions``) are stored with the latents as token ids, or with ``text_encoder``
(a frozen CLIP text encoder's directory, :mod:`diffusion_jax.builders.text_encoder`) as the
encoder's last hidden states at the first ``L`` positions, ``L`` the longest caption's token
count over every process (each distinct caption is encoded once).
"""

from __future__ import annotations

import math
import os
import pathlib
import time
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from diffusion_jax.builders import autoencoder as ae_builders
from diffusion_jax.builders.config import ConfigError
from diffusion_jax.data import latent as latent_lib
from diffusion_jax.data.captions import CAPTIONERS, ink_mass
from diffusion_jax.models.autoencoder import DiagonalGaussian
from diffusion_jax.modes import setup
from diffusion_jax.training.step import DATA_AXIS, make_mesh, replicate, shard_batch

__all__ = ["encode", "encode_split"]


def _host_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of an array sharded along the batch axis, in order."""
    if jax.process_count() == 1:
        return np.asarray(x)
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def encode_split(config, restored: ae_builders.RestoredAutoencoder, *, split: str, mesh=None):
    """``(indices, labels or None, latents, ink)`` of this process's shard of ``split``: the
    unscaled latents (posterior mean, or a seeded posterior sample) in example order, and each
    image's ink mass (sum of its pixels in [0, 1], for captions)."""
    mesh = make_mesh() if mesh is None else mesh
    module, sample = restored.module, config.autoencoder.encode_sample
    base_key = jax.random.PRNGKey(config.seed)

    def encode_batch(params, x, index):
        posterior = cast(DiagonalGaussian, module.apply({"params": params}, x, method="encode"))
        if not sample:
            return posterior.mode()
        keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(index)
        eps = jax.vmap(lambda k, m: jax.random.normal(k, m.shape, m.dtype))(keys, posterior.mean)
        return posterior.mean + posterior.std * eps

    def encode_local(params, x, index):
        # This device's examples one at a time: XLA's convolution kernels round differently for
        # different batch sizes, so a batch of one per example makes every latent bitwise the
        # same on any number of devices.
        return jax.lax.map(lambda a: encode_batch(params, a[0][None], a[1][None])[0], (x, index))

    spec = P(DATA_AXIS)
    fn = jax.jit(jax.shard_map(encode_local, mesh=mesh, in_specs=(P(), spec, spec), out_specs=spec))
    params = replicate(restored.params, mesh)
    it = setup.build_data(config, split=split, evaluation=True)
    shard_index, shard_count = it.shard_index, it.shard_count
    n = it.info.train_size if split == "train" else it.info.eval_size
    own = np.arange(shard_index, n, shard_count)
    b = it.batch_size
    indices, labels, latents, ink = [], [], [], []
    for j, batch in enumerate(it):
        index = np.full(b, -1, np.int64)
        part = own[j * b : (j + 1) * b]
        index[: len(part)] = part
        global_batch = shard_batch({"image": batch["image"], "index": np.maximum(index, 0).astype(np.int32)}, mesh)
        z = _host_rows(fn(params, global_batch["image"], global_batch["index"]))
        keep = batch["mask"].astype(bool)
        indices.append(index[keep])
        latents.append(z[keep])
        images = batch["image"][keep]
        ink.append(ink_mass((images + 1.0) / 2.0 if config.data.centered else images))
        if "label" in batch:
            labels.append(batch["label"][keep])
    x0 = jax.ShapeDtypeStruct((1, *it.info.shape), jnp.float32)
    latent_shape = jax.eval_shape(
        lambda x: cast(DiagonalGaussian, module.apply({"params": restored.params}, x, method="encode")).mean, x0
    ).shape[1:]
    z_all = np.concatenate(latents) if latents else np.zeros((0, *latent_shape), np.float32)
    labels_all = np.concatenate(labels) if labels else None
    return np.concatenate(indices), labels_all, z_all.astype(np.float32), np.concatenate(ink)


def _gather(values) -> np.ndarray:
    """``values`` (float64) of every process, stacked: (process_count, ...)."""
    values = np.asarray(values, np.float64)
    if jax.process_count() == 1:
        return values[None]
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return np.asarray(multihost_utils.process_allgather(values)).reshape(jax.process_count(), *values.shape)


def _gather_rows(values: np.ndarray) -> np.ndarray:
    """Every process's rows of ``values`` (1-D), concatenated in process order."""
    if jax.process_count() == 1:
        return np.asarray(values)
    from jax.experimental import multihost_utils  # noqa: PLC0415

    counts = _gather(len(values)).astype(int).ravel()
    padded = np.zeros(int(counts.max()), np.float64)
    padded[: len(values)] = values
    every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(counts), -1)
    return np.concatenate([row[:c] for row, c in zip(every, counts)])


def _captions(config, encoded: dict, text_encoder=None) -> tuple[dict | None, dict[str, np.ndarray]]:
    """With ``data.captions``: the metadata of the captions and each split's context (this
    process's examples): token ids (N, L), or with ``text_encoder`` (a
    :class:`~diffusion_jax.builders.text_encoder.FrozenTextEncoder`) embeddings (N, L, D). The
    attribute thresholds come from the whole train split."""
    from diffusion_jax.builders.model import caption_tokenizer  # noqa: PLC0415

    name = config.data.captions
    if not name:
        return None, {}
    _, labels, _, ink = encoded["train"]
    if labels is None:
        raise ConfigError(f"data.captions = {name!r} writes captions from labels, and {config.data.dataset} has none")
    captioner = CAPTIONERS[name]
    edges = captioner.edges(_gather_rows(ink), _gather_rows(labels).astype(int))
    texts = {split: captioner.captions(e[3], e[1], edges) for split, e in encoded.items()}
    if text_encoder is None:
        tok = caption_tokenizer(name)
        contexts = {split: tok(t) for split, t in texts.items()}
        meta = {"name": name, "max_length": tok.max_length, "tokenizer": tok.to_dict(), "ink_edges": edges.tolist()}
        return meta, contexts
    every = [t for split in texts.values() for t in split]
    counts = text_encoder.token_count(every) if every else np.zeros(1, np.int64)
    length = int(_gather(counts.max()).max())  # the same L on every process
    if length > text_encoder.max_length:
        longest = every[int(np.argmax(counts))] if counts.max() == length else "a caption of another process"
        raise ConfigError(
            f"caption {longest!r} has {length} tokens with the start and end tokens; the text encoder at "
            f"{text_encoder.path} reads at most {text_encoder.max_length}"
        )
    contexts = {split: text_encoder.embed(t, length) for split, t in texts.items()}
    embedding = {
        "encoder": "clip",
        "path": text_encoder.path,
        "fingerprint": text_encoder.fingerprint,
        "hidden_size": text_encoder.hidden_size,
    }
    meta = {"name": name, "max_length": length, "ink_edges": edges.tolist(), "embedding": embedding}
    return meta, contexts


def encode(config, workdir, *, out: str, text_encoder: str | None = None) -> pathlib.Path:
    """Encode both splits of the autoencoder workdir's data set into ``out``; returns ``out``.
    ``text_encoder``: a frozen CLIP text encoder's directory (``config.json`` and its weights);
    the captions of ``data.captions`` are then stored as its embeddings instead of token ids."""
    run = setup.prepare(config, workdir, create=False)
    config, workdir = run.config, run.workdir
    if config.training.task != "autoencoder":
        raise ConfigError(
            f"{workdir} was trained with training.task = {config.training.task!r}; encode needs an autoencoder's "
            "workdir (training.task = 'autoencoder')"
        )
    setup.check_batch("eval.batch_size", config.eval.batch_size)
    frozen = None
    if text_encoder is not None:
        if not config.data.captions:
            raise ConfigError(
                "--text_encoder embeds the captions of data.captions, which this config leaves empty; set "
                f"data.captions (one of {', '.join(map(repr, CAPTIONERS))}) in the autoencoder's config"
            )
        from diffusion_jax.builders.text_encoder import load_frozen_text_encoder  # noqa: PLC0415

        frozen = load_frozen_text_encoder(text_encoder)
    restored = ae_builders.restore_autoencoder(workdir)
    info = setup.data_info(config)
    out_dir = pathlib.Path(out).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out_dir} cannot be created: {e.strerror or e}") from None
    if run.primary:
        (out_dir / latent_lib.METADATA).unlink(missing_ok=True)  # incomplete until rewritten at the end
    t0 = time.perf_counter()
    sizes: dict[str, int] = {}
    shape: tuple[int, ...] = ()
    stats = np.zeros((1, 5))
    encoded = {s: encode_split(config, restored, split=s) for s in ("train", "eval")}
    captions_meta, contexts = _captions(config, encoded, frozen)
    for split, (indices, labels, latents, _) in encoded.items():
        path = latent_lib.shard_path(out_dir, split, jax.process_index(), jax.process_count())
        latent_lib.write_shard(path, indices=indices, labels=labels, latents=latents, context=contexts.get(split))
        sizes[split] = int(_gather(len(indices)).sum())
        shape = tuple(int(s) for s in latents.shape[1:])
        if split == "train":
            z = latents.astype(np.float64)
            empty = z.size == 0
            stats = _gather(
                [z.size, z.sum(), np.square(z).sum(), np.inf if empty else z.min(), -np.inf if empty else z.max()]
            )
    count, total, total_sq = stats[:, 0].sum(), stats[:, 1].sum(), stats[:, 2].sum()
    lo, hi = float(stats[:, 3].min()), float(stats[:, 4].max())
    mean = total / max(count, 1.0)
    std = math.sqrt(max(total_sq / max(count, 1.0) - mean**2, 0.0))
    scale = config.autoencoder.scale_factor
    if scale is None:
        if not std > 0:
            raise ConfigError("the train latents have zero variance: no scale factor 1 / std exists")
        scale = 1.0 / std
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices("diffusion_jax_encode_written")
    if run.primary:
        latent_lib.write_metadata(
            out_dir,
            {
                "latent_shape": list(shape),
                "sizes": sizes,
                "scale_factor": float(scale),
                "latent_mean": float(mean),
                "latent_std": float(std),
                "value_range": [lo * float(scale), hi * float(scale)],
                "num_classes": info.num_classes,
                "captions": captions_meta,
                "train_split": info.train_split,
                "eval_split": info.eval_split,
                "encoding": "sample" if config.autoencoder.encode_sample else "mean",
                "seed": int(config.seed),
                "centered": bool(config.data.centered),
                "source": {
                    "dataset": config.data.dataset,
                    "image_size": config.data.image_size,
                    "num_channels": config.data.num_channels,
                },
                "autoencoder": {
                    "workdir": os.fspath(restored.workdir),
                    "step": restored.step,
                    "fingerprint": restored.fingerprint,
                    "config": restored.config.autoencoder.to_dict(),
                },
            },
        )
        how = "given" if config.autoencoder.scale_factor else "1 / std of the train latents"
        if captions_meta is None:
            stored = ""
        elif frozen is None:
            stored = f", with the token ids of their {captions_meta['name']!r} captions"
        else:
            stored = (
                f", with the embeddings ({captions_meta['max_length']} tokens x {frozen.hidden_size}) of their "
                f"{captions_meta['name']!r} captions by the text encoder at {frozen.path}"
            )
        print(
            f"encoded {sizes['train']} train and {sizes['eval']} eval examples into {shape} latents{stored} "
            f"(scale factor {scale:.5f}: {how}) "
            f"in {time.perf_counter() - t0:.1f} s: {out_dir}",
            flush=True,
        )
    return out_dir
