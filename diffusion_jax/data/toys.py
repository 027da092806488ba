"""Low-dimensional toy distributions for fast debugging.

Each toy data set is a fixed sample drawn once from a seeded generator (like a real data set it
does not change between runs), served through the same pipeline as the images: the same batch
dict (``'image'`` of shape ``(B, 2)`` float32, ``'label'`` where the toy has classes), shuffling,
sharding and checkpointable iterator state. Where the density is known in closed form,
``log_prob`` gives it, so likelihood code can be checked against exact values.

The 2-D shapes follow the usual benchmarks of the continuous-flow literature (e.g. FFJORD,
Grathwohl et al. 2019): eight Gaussians on a circle, a checkerboard, a swiss roll, two moons.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

__all__ = ["Toy", "TOYS", "TOY_TRAIN_SIZE", "TOY_EVAL_SIZE", "toy_sample"]

TOY_TRAIN_SIZE = 65_536
TOY_EVAL_SIZE = 8_192
# Fixed seeds of the stored samples (not the shuffling seed): the train and eval samples are
# independent draws.
_TRAIN_SEED = 0
_EVAL_SEED = 1

# Eight Gaussians: equal weights, means on a circle of radius 2, isotropic std 0.2.
_MIXTURE_COMPONENTS = 8
_MIXTURE_RADIUS = 2.0
_MIXTURE_STD = 0.2


def mixture_means() -> np.ndarray:
    """Means of the Gaussian mixture components, shape (8, 2)."""
    angles = 2 * np.pi * np.arange(_MIXTURE_COMPONENTS) / _MIXTURE_COMPONENTS
    return _MIXTURE_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=-1)


def _gaussian_mixture(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(_MIXTURE_COMPONENTS, size=n)
    x = mixture_means()[labels] + _MIXTURE_STD * rng.standard_normal((n, 2))
    return x, labels


def _gaussian_mixture_log_prob(x: np.ndarray) -> np.ndarray:
    """log p(x) of the eight-Gaussian mixture, x of shape (..., 2) -> (...)."""
    d2 = np.sum((x[..., None, :] - mixture_means()) ** 2, axis=-1)  # (..., 8)
    log_components = -0.5 * d2 / _MIXTURE_STD**2 - math.log(2 * math.pi * _MIXTURE_STD**2)
    m = np.max(log_components, axis=-1, keepdims=True)
    log_sum = m[..., 0] + np.log(np.sum(np.exp(log_components - m), axis=-1))
    return log_sum - math.log(_MIXTURE_COMPONENTS)


def _checkerboard(rng: np.random.Generator, n: int) -> tuple[np.ndarray, None]:
    # A 4x4 board on [-2, 2]^2 with 8 filled unit squares: x1 uniform, x2 in the row whose
    # parity makes (floor x1 + floor x2) even.
    x1 = rng.uniform(-2.0, 2.0, size=n)
    x2 = rng.uniform(0.0, 1.0, size=n) - 2.0 * rng.integers(2, size=n) + np.floor(x1) % 2
    return np.stack([x1, x2], axis=-1), None


def _checkerboard_log_prob(x: np.ndarray) -> np.ndarray:
    """log p(x): uniform on the 8 filled unit squares (total area 8), -inf elsewhere."""
    inside = np.all((x >= -2.0) & (x < 2.0), axis=-1)
    filled = (np.floor(x[..., 0]) + np.floor(x[..., 1])) % 2 == 0
    return np.where(inside & filled, -math.log(8.0), -np.inf)


def _swiss_roll(rng: np.random.Generator, n: int) -> tuple[np.ndarray, None]:
    # The 2-D spiral (t cos t, t sin t) for t in [1.5 pi, 4.5 pi], scaled to about [-3, 3]
    # and blurred with N(0, 0.05^2).
    t = 1.5 * np.pi * (1.0 + 2.0 * rng.uniform(size=n))
    x = np.stack([t * np.cos(t), t * np.sin(t)], axis=-1) / 5.0
    return x + 0.05 * rng.standard_normal((n, 2)), None


def _two_moons(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    # Two interleaved half circles (label 0: upper, 1: lower), centred at the origin and scaled
    # to about [-2, 2], blurred with N(0, 0.1^2).
    labels = rng.integers(2, size=n)
    angle = np.pi * rng.uniform(size=n)
    upper = np.stack([np.cos(angle), np.sin(angle)], axis=-1)
    lower = np.stack([1.0 - np.cos(angle), 0.5 - np.sin(angle)], axis=-1)
    x = np.where(labels[:, None] == 0, upper, lower) - np.array([0.5, 0.25])
    return 2.0 * x + 0.1 * rng.standard_normal((n, 2)), labels


@dataclasses.dataclass(frozen=True)
class Toy:
    """A toy distribution: ``sample(rng, n) -> (x (n, D) float64, labels (n,) int or None)``.

    ``log_prob(x)`` for ``x`` of shape ``(..., D)`` is the exact log density where known, else
    ``None``.
    """

    sample: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray | None]]
    dim: int
    num_classes: int | None
    log_prob: Callable[[np.ndarray], np.ndarray] | None = None


TOYS: dict[str, Toy] = {
    "gaussian_mixture": Toy(_gaussian_mixture, dim=2, num_classes=8, log_prob=_gaussian_mixture_log_prob),
    "checkerboard": Toy(_checkerboard, dim=2, num_classes=None, log_prob=_checkerboard_log_prob),
    "swiss_roll": Toy(_swiss_roll, dim=2, num_classes=None),
    "two_moons": Toy(_two_moons, dim=2, num_classes=2),
}


def toy_sample(name: str, *, train: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The stored sample of toy ``name``: ``(x float32 (N, D), labels int32 (N,) or None)``,
    N = 65,536 for train and 8,192 for eval; the same on every call and machine."""
    toy = TOYS[name]
    seed, n = (_TRAIN_SEED, TOY_TRAIN_SIZE) if train else (_EVAL_SEED, TOY_EVAL_SIZE)
    # The name enters the seed so the toys are not transforms of one shared uniform stream.
    rng = np.random.default_rng([seed, *name.encode()])
    x, labels = toy.sample(rng, n)
    return x.astype(np.float32), None if labels is None else labels.astype(np.int32)
