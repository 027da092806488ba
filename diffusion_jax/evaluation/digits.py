"""A feature detector for the embedded 8x8 digits that needs no download.

Inception features mean little for 8x8 images with 17 grey levels, so the digits get their own
detector: a small MLP classifier (64 -> 128 -> 64 -> 10, GELU) trained on the 1,500 training
digits (the ``train`` split of :mod:`diffusion_jax.data.digits`: scikit-learn's first 1,500
images). Its 64-d penultimate activations are the features (for FID, KID, precision/recall),
its 10 logits the classes (for the digits "Inception score", at most 10).

Training is deterministic: fixed initialisation key, full-batch Adam for a fixed number of steps
on the whole train split, no data order to shuffle. It takes about a second, runs on first use
and is cached in memory and on disk (``$DIFFUSION_JAX_CACHE_DIR`` or ``~/.cache/diffusion_jax``,
file name carrying the recipe version). The cached parameters fix the detector: FIDs are
comparable only between runs that use the same file, so copy it along with reference statistics
when moving between machines (a retrained network on another platform may differ in the last
float bits). Inputs are images (B, 8, 8, 1) in [0, 1] (the data pipeline's ``k / 16``).
"""

from __future__ import annotations

import functools
import os
import tempfile
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

__all__ = ["DigitsClassifier", "train_digits_classifier", "digits_classifier_params", "load_digits_split", "RECIPE"]

NUM_TRAIN = 1500  # equals diffusion_jax.data.digits.NUM_TRAIN (checked by the tests)
# The training recipe; changing any entry changes the cache file name.
RECIPE: dict[str, Any] = {
    "version": 1,
    "hidden": 128,
    "features": 64,
    "steps": 150,
    "lr": 1e-2,
    "weight_decay": 1e-2,
    "seed": 0,
}


class DigitsClassifier(nn.Module):
    """(B, 8, 8, 1) images in [0, 1] -> (features (B, 64), logits (B, 10))."""

    hidden: int = 128
    features: int = 64

    @nn.compact
    def __call__(self, images):
        x = images.reshape(images.shape[0], -1) * 2.0 - 1.0
        x = nn.gelu(nn.Dense(self.hidden, name="hidden")(x))
        h = nn.gelu(nn.Dense(self.features, name="features")(x))
        return h, nn.Dense(10, name="logits")(h)


def load_digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 8, 8, 1) float32 in [0, 1] (``k / 16``) and labels (N,) of ``train`` or ``test``."""
    from sklearn.datasets import load_digits  # noqa: PLC0415 (ships the data; imported on use)

    d = load_digits()
    images = (d.images.astype(np.float32) / 16.0)[..., None]
    sl = {"train": slice(0, NUM_TRAIN), "test": slice(NUM_TRAIN, None)}
    if split not in sl:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    return images[sl[split]], d.target[sl[split]].astype(np.int32)


def train_digits_classifier(recipe: dict[str, Any] = RECIPE) -> dict[str, Any]:
    """Trains the classifier deterministically (full-batch Adam with decoupled weight decay,
    Loshchilov & Hutter 2019) and returns its Flax variables."""
    images, labels = load_digits_split("train")
    model = DigitsClassifier(recipe["hidden"], recipe["features"])
    params = model.init(jax.random.key(recipe["seed"]), jnp.zeros((1, 8, 8, 1)))["params"]
    x, y = jnp.asarray(images), jnp.asarray(labels)
    lr, wd, b1, b2 = recipe["lr"], recipe["weight_decay"], 0.9, 0.999

    def loss_fn(p):
        _, logits = cast(tuple[jax.Array, jax.Array], model.apply({"params": p}, x))
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    def step(carry, t):
        p, m, v = carry
        g = jax.grad(loss_fn)(p)
        m = jax.tree.map(lambda m_, g_: b1 * m_ + (1 - b1) * g_, m, g)
        v = jax.tree.map(lambda v_, g_: b2 * v_ + (1 - b2) * g_ * g_, v, g)
        c1, c2 = 1 - b1 ** (t + 1.0), 1 - b2 ** (t + 1.0)
        p = jax.tree.map(lambda p_, m_, v_: p_ - lr * (m_ / c1 / (jnp.sqrt(v_ / c2) + 1e-8) + wd * p_), p, m, v)
        return (p, m, v), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (params, _, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(recipe["steps"])))((params, zeros, zeros))
    return {"params": jax.device_get(params)}


def _cache_path() -> str:
    root = os.environ.get("DIFFUSION_JAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "diffusion_jax")
    tag = "_".join(f"{k}{v}" for k, v in RECIPE.items())
    return os.path.join(root, f"digits_detector_{tag}.npz")


@functools.lru_cache(maxsize=1)
def digits_classifier_params() -> dict[str, Any]:
    """The detector's variables: from the disk cache, else trained now and cached."""
    path = _cache_path()
    if os.path.isfile(path):
        with np.load(path) as data:
            flat = {tuple(k.split("/")): data[k] for k in data.files}
        return traverse_util.unflatten_dict(flat)
    variables = train_digits_classifier()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    flat = traverse_util.flatten_dict(variables)
    # Written to a temporary file and renamed, so concurrent first uses never read half a file.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **{"/".join(k): np.asarray(v) for k, v in flat.items()})  # type: ignore[arg-type]
    os.replace(tmp, path)
    return variables
