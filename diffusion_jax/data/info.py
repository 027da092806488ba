"""The description that travels with every data set: shape, grey levels, classes, sizes."""

from __future__ import annotations

import dataclasses
import math

__all__ = ["DataInfo"]


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What a model, a loss and a likelihood need to know about a data set.

    Attributes:
      name: canonical name in :data:`diffusion_jax.data.DATASETS` (``'lsun/bedroom'`` for LSUN).
      shape: shape of one example: ``(H, W, C)`` for images, ``(D,)`` for the toy distributions.
      num_levels: number of grey levels per channel of the discrete data (256 for 8-bit images,
        17 for the digits, whose pixels are 0..16), after any requantisation; ``None`` for
        continuous data. Bits per dimension need it: see :attr:`bits_per_dim_offset`.
      num_classes: number of labels, or ``None`` when batches carry no ``'label'``.
      value_range: ``(low, high)`` of the values the pipeline yields: ``(0, 1)`` or, with
        ``centered``, ``(-1, 1)``; for a toy distribution, bounds of the stored sample.
      train_size, eval_size: number of examples in the train and eval splits (all hosts together).
      train_split, eval_split: the splits those sizes refer to (TFDS split names).
      centered, uniform_dequantization: how the pipeline maps levels to values:
        ``x = k / (L - 1)`` or, dequantized, ``x = (k + u) / L`` with ``u ~ U[0, 1)``, then
        ``2 x - 1`` when centred.
    """

    name: str
    shape: tuple[int, ...]
    num_levels: int | None
    num_classes: int | None
    value_range: tuple[float, float]
    train_size: int
    eval_size: int
    train_split: str = "train"
    eval_split: str = "test"
    centered: bool = False
    uniform_dequantization: bool = False

    def __post_init__(self):
        if self.num_levels is not None and self.num_levels < 2:
            raise ValueError(f"DataInfo: num_levels must be >= 2 or None, got {self.num_levels}")
        lo, hi = self.value_range
        if not lo < hi:
            raise ValueError(f"DataInfo: value_range must satisfy low < high, got {self.value_range}")

    @property
    def dim(self) -> int:
        """Number of dimensions of one example, ``prod(shape)``: the D of bits per dimension."""
        return math.prod(self.shape)

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    @property
    def has_labels(self) -> bool:
        return self.num_classes is not None

    @property
    def bits_per_dim_offset(self) -> float:
        """Constant that turns a continuous density into bits per dimension of the discrete data.

        Dequantized data of ``L`` levels spread over a value range of width ``W`` put each level in
        a bin of width ``W / L``, so ``-log2 P(level) ~= -log2 p(x) - log2(W / L)`` per dimension:

            bpd = -log p(x) / (D ln 2) + log2(L) - log2(W).

        That is 8 - 1 = 7 for 8-bit images centred to [-1, 1] and 8 for [0, 1], the constants of
        score_sde's ``likelihood.py``; 17-level digits in [0, 1] get log2(17) ~= 4.09.
        """
        if self.num_levels is None:
            raise ValueError(
                f"{self.name} is continuous (num_levels=None): bits per dimension of discrete data "
                f"are undefined; report the negative log-likelihood in nats instead"
            )
        lo, hi = self.value_range
        return math.log2(self.num_levels) - math.log2(hi - lo)
