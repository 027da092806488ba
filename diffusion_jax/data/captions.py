"""Captions generated from a data set's labels and simple attributes, for text-conditioned
models trained on data sets without captions of their own (``data.captions``).

A captioner has a closed ``vocabulary`` and a ``max_words``; ``edges(ink, labels)`` fixes its
attribute thresholds from the train split, and ``captions(ink, labels, edges)`` writes one caption
per example. ``ink`` is the ink mass of each image: the sum of its pixel values in [0, 1].

The digits: "a thin seven", "a seven", "a bold seven": within each class, the third of the train
digits with the least ink are "thin", the third with the most "bold" (the class's 1/3 and 2/3
quantiles of ink mass, so every class has its thin and bold examples).
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["DIGIT_NAMES", "DigitCaptions", "CAPTIONERS", "ink_mass"]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def ink_mass(images: np.ndarray) -> np.ndarray:
    """Sum of pixel values per image, ``images`` (B, H, W, C) in [0, 1] -> (B,) float64."""
    return np.asarray(images, np.float64).reshape(len(images), -1).sum(axis=1)


@dataclasses.dataclass(frozen=True)
class DigitCaptions:
    """Captions "a [thin|bold] <digit name>" of the digits' labels and ink mass."""

    vocabulary: tuple[str, ...] = ("a", "thin", "bold", *DIGIT_NAMES)
    max_words: int = 3
    num_classes: int = 10

    def edges(self, ink: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """(num_classes, 2): each class's 1/3 and 2/3 quantiles of ink mass."""
        out = np.zeros((self.num_classes, 2))
        for k in range(self.num_classes):
            own = ink[labels == k]
            if len(own):
                out[k] = np.quantile(own, [1 / 3, 2 / 3])
        return out

    def captions(self, ink: np.ndarray, labels: np.ndarray, edges: np.ndarray) -> list[str]:
        out = []
        for mass, label in zip(np.asarray(ink), np.asarray(labels)):
            lo, hi = edges[int(label)]
            attribute = "thin " if mass < lo else "bold " if mass > hi else ""
            out.append(f"a {attribute}{DIGIT_NAMES[int(label)]}")
        return out


# data.captions -> captioner
CAPTIONERS: dict[str, DigitCaptions] = {"digits": DigitCaptions()}
