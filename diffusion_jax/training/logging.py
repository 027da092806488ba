"""Run logging: JSON-lines metrics, TensorBoard event files (tensorboardX, no TensorFlow),
a progress line with step rate and ETA, and PNG sample grids. Only process 0 writes."""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import jax
import numpy as np

__all__ = ["MetricWriter", "Progress", "progress_bar", "image_grid", "save_image_grid"]


class MetricWriter:
    """Appends ``{"step": s, "split": ..., **metrics}`` lines to ``metrics.jsonl`` and scalars to
    TensorBoard (``<workdir>/tensorboard``, tag ``split/name``). Training, periodic evaluation and
    the ``eval`` mode all write here. :meth:`truncate` drops lines after a step, and TensorBoard
    discards its events after that step too, so a resumed run's history equals that of an
    uninterrupted one."""

    def __init__(self, workdir: str | pathlib.Path, *, enabled: bool | None = None, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb_dir = str(pathlib.Path(workdir) / "tensorboard") if tensorboard else None
        self._tb: Any = None
        self._purge_step: int | None = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def _tensorboard(self) -> Any:
        """The event writer, opened at the first scalar (after :meth:`truncate` set its purge step)."""
        if self._tb is None and self._tb_dir is not None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(self._tb_dir, purge_step=self._purge_step)
        return self._tb

    def truncate(self, step: int) -> None:
        """Keep only records with ``step <= step`` (called when resuming from ``step``)."""
        if not self.enabled:
            return
        self._purge_step = int(step) + 1 if step > 0 else None
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError):
                continue  # a line cut short by a kill
        # Whole or not at all: a kill during this rewrite must not lose the history.
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(l + "\n" for l in kept))
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict, *, split: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split}
        for k, v in metrics.items():
            v = np.asarray(v)
            record[k] = v.item() if v.size == 1 else v.tolist()
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        tb = self._tensorboard()
        if tb is not None:
            for k, v in record.items():
                if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    tb.add_scalar(f"{split}/{k}", v, int(step))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def write_hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        """A TensorBoard hparams summary for this run (the HParams view's columns): ``hparams``
        (strings, numbers, booleans) and the run's final ``metrics``, also written as scalars at
        step 0 (the HParams view reads the metrics' values from the scalars)."""
        if not self.enabled or self._tb_dir is None:
            return
        from tensorboardX.summary import hparams as hparams_summary

        tb = self._tensorboard()
        for summary in hparams_summary(hparams, metrics):
            tb.file_writer.add_summary(summary)
        for k, v in metrics.items():
            tb.add_scalar(k, float(v), 0)
        tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """One status line per call: step, metrics, steps/s and ETA (process 0 only)."""

    def __init__(self, total: int, start: int = 0, *, stream=None, enabled: bool | None = None):
        self.total, self.start = total, start
        self.t0 = time.perf_counter()
        self.stream = stream or sys.stdout
        self.enabled = jax.process_index() == 0 if enabled is None else enabled

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def restart(self, step: int) -> None:
        """Count rate and ETA from ``step`` on (after the first call, whose time is compilation)."""
        self.start, self.t0 = step, time.perf_counter()

    def rate(self, step: int) -> float:
        dt = time.perf_counter() - self.t0
        return (step - self.start) / dt if dt > 0 else float("nan")

    def update(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        rate = self.rate(step)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        parts = " | ".join(f"{k} {float(v):.4g}" for k, v in metrics.items())
        print(
            f"step {step}/{self.total} | {parts} | {rate:.2f} steps/s | ETA {_fmt_seconds(eta)}",
            file=self.stream,
            flush=True,
        )


T = TypeVar("T")


def progress_bar(
    items: Iterable[T], total: int, label: str, *, enabled: bool | None = None, stream=None
) -> Iterator[T]:
    """Yield ``items`` while showing ``label: i/total`` with the elapsed time and an ETA on
    stderr (process 0): one line redrawn in place on a terminal, a line per quarter otherwise."""
    stream = stream or sys.stderr
    enabled = (jax.process_index() == 0 if enabled is None else enabled) and total > 1
    tty = enabled and hasattr(stream, "isatty") and stream.isatty()
    t0 = time.perf_counter()
    shown = 0
    for i, item in enumerate(items, 1):
        yield item
        if not enabled:
            continue
        quarter = 4 * i // total
        if not tty and quarter == shown and i != total:
            continue
        shown = quarter
        elapsed = time.perf_counter() - t0
        eta = elapsed / i * (total - i)
        line = f"{label}: {i}/{total} ({_fmt_seconds(elapsed)} elapsed, ETA {_fmt_seconds(eta)})"
        stream.write(("\r" + line + ("\n" if i == total else "")) if tty else line + "\n")
        stream.flush()


def image_grid(images: np.ndarray, *, value_range=(0.0, 1.0), ncol: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile ``(N, H, W, C)`` images into one uint8 image (C = 1 or 3)."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, H, W, C), got {images.shape}")
    lo, hi = value_range
    images = np.clip((images - lo) / (hi - lo), 0.0, 1.0)
    n, h, w, c = images.shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    grid = np.ones((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), np.float32)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = images[i]
    return (grid * 255 + 0.5).astype(np.uint8)


def save_image_grid(
    path: str | pathlib.Path, images: np.ndarray, *, value_range=(0.0, 1.0), ncol: int | None = None, upscale: int = 1
) -> None:
    from PIL import Image

    grid = image_grid(images, value_range=value_range, ncol=ncol)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.Resampling.NEAREST)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
