"""Controllable generation with a trained model: ``diffusion-jax sample --task ...``.

A task is an inverse problem (``inpaint``, ``outpaint``, ``colorize``, ``super_resolve``,
``deblur``, ``denoise``: a measurement ``y = A x + sigma_y n`` of each input image, solved by a
posterior sampler of :data:`diffusion_jax.conditioning.METHODS`), an edit (``edit``: SDEdit with
a strength), or guidance (``class``: classifier-free guidance of a class-conditional network, or
classifier guidance with a trained noise-conditional classifier; ``negative_class``: guidance
away from a class). :class:`Task` holds the typed settings, :class:`TaskRunner` runs them on a
:class:`~diffusion_jax.modes.load.TrainedModel` (scripts use it directly), and
:func:`sample_task` is the command line's mode: it reads the inputs (PNG or ``.npz``) and the
mask (PNG or a named mask), refuses inputs that do not fit with one :class:`ConfigError`, and
writes ``<out>.npz`` (the results and the settings) and ``<out>.png`` (input, measurement and
result side by side).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import conditioning as cond_lib
from diffusion_jax import samplers as samplers_lib
from diffusion_jax.builders.config import ConfigError
from diffusion_jax.builders.sampler import build_sampler
from diffusion_jax.samplers.base import FixedGridSampler

__all__ = [
    "TASKS",
    "INVERSE_TASKS",
    "NAMED_MASKS",
    "Task",
    "TaskResult",
    "TaskRunner",
    "sample_task",
    "read_images",
    "read_mask",
    "named_mask",
]

INVERSE_TASKS = ("inpaint", "outpaint", "colorize", "super_resolve", "deblur", "denoise")
TASKS = (*INVERSE_TASKS, "edit", "class", "negative_class")
NAMED_MASKS = ("bottom_half", "top_half", "left_half", "right_half", "center", "random:F")
DEFAULT_METHOD = "ddrm"

# Which optional settings each task reads; any other one given is refused (a flag that would be
# silently ignored is a mistake the user should hear about).
_USES: dict[str, tuple[str, ...]] = {
    "inpaint": ("mask", "sigma_y", "method", "num_steps", "options", "measured"),
    "outpaint": ("mask", "border", "sigma_y", "method", "num_steps", "options", "measured"),
    "colorize": ("sigma_y", "method", "num_steps", "options", "measured"),
    "super_resolve": ("factor", "sigma_y", "method", "num_steps", "options", "measured"),
    "deblur": ("blur", "sigma_y", "method", "num_steps", "options", "measured"),
    "denoise": ("sigma_y", "method", "num_steps", "options", "measured"),
    "edit": ("strength",),
    "class": ("labels", "guidance_scale", "guidance_interval", "classifier_workdir"),
    "negative_class": ("labels", "negative_labels", "guidance_scale", "guidance_interval"),
}
_FLAG = {
    "mask": "--mask",
    "border": "--border",
    "factor": "--factor",
    "blur": "--blur",
    "sigma_y": "--sigma_y",
    "method": "--method",
    "num_steps": "--num_steps",
    "options": "--option",
    "measured": "--measured",
    "strength": "--strength",
    "labels": "--label/--labels",
    "negative_labels": "--negative_label",
    "guidance_scale": "--guidance_scale",
    "guidance_interval": "--guidance_interval",
    "classifier_workdir": "--classifier_workdir",
}


@dataclasses.dataclass(frozen=True)
class Task:
    """The settings of one task; None means the task's default (or: not given).

    ``mask``: a PNG path (white / non-zero = observed) or a name of :data:`NAMED_MASKS`
    (``random:F`` observes a fraction F of the pixels); ``border``: outpainting's hidden border in
    pixels (default a quarter of the image); ``factor``: super-resolution's pooling factor
    (default 2); ``blur``: ``gaussian:STD`` or ``uniform:SIZE`` (default ``gaussian:1``);
    ``sigma_y``: measurement noise in the model's units (the data scaled to [-1, 1] for centred
    images); ``method``: a :data:`~diffusion_jax.conditioning.METHODS` name (default ``ddrm``),
    ``num_steps`` and ``options`` its options; ``measured``: the inputs are measurements ``y``
    already (else the command measures the inputs); ``strength``: SDEdit's strength in (0, 1];
    ``labels`` / ``negative_labels``: classes; ``guidance_scale`` w: 1 is the conditional model
    (classifier-free) or the exact Bayes posterior (classifier guidance); ``guidance_interval``:
    ``(t_lo, t_hi)`` where classifier-free guidance acts; ``classifier_workdir``: a trained
    noise-conditional classifier (``training.task = 'classifier'``) for classifier guidance.
    """

    task: str
    mask: str | None = None
    border: int | None = None
    factor: int | None = None
    blur: str | None = None
    sigma_y: float | None = None
    method: str | None = None
    num_steps: int | None = None
    options: dict[str, Any] | None = None
    measured: bool | None = None
    strength: float | None = None
    labels: Sequence[int] | None = None
    negative_labels: Sequence[int] | None = None
    guidance_scale: float | None = None
    guidance_interval: tuple[float, float] | None = None
    classifier_workdir: str | None = None

    def check(self) -> None:
        """Refuse unknown tasks, settings the task does not read, and values out of range."""
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; valid: {', '.join(TASKS)}")
        extra = [
            _FLAG[f.name]
            for f in dataclasses.fields(self)
            if f.name in _FLAG and getattr(self, f.name) not in (None, False) and f.name not in _USES[self.task]
        ]
        if extra:
            raise ConfigError(f"task {self.task!r} does not take {', '.join(extra)}")
        if self.sigma_y is not None and not self.sigma_y >= 0:
            raise ConfigError(f"--sigma_y = {self.sigma_y}: the measurement noise must be >= 0")
        if self.task == "denoise" and not (self.sigma_y or 0) > 0:
            raise ConfigError("task 'denoise' needs --sigma_y > 0 (the noise level of the input)")
        if self.task == "inpaint" and self.mask is None:
            raise ConfigError(f"task 'inpaint' needs --mask (a PNG, or one of {', '.join(NAMED_MASKS)})")
        if self.method is not None and self.method not in cond_lib.METHODS:
            raise ConfigError(f"unknown method {self.method!r}; valid: {', '.join(cond_lib.METHODS)}")
        if self.strength is not None and not 0.0 < self.strength <= 1.0:
            raise ConfigError(f"--strength = {self.strength}: SDEdit's strength must be in (0, 1]")
        if self.factor is not None and self.factor < 2:
            raise ConfigError(f"--factor = {self.factor}: the super-resolution factor must be >= 2")
        if self.border is not None and self.border < 1:
            raise ConfigError(f"--border = {self.border}: the hidden border must be >= 1 pixel")
        if self.guidance_scale is not None and not self.guidance_scale >= 0:
            raise ConfigError(f"--guidance_scale = {self.guidance_scale} must be >= 0")
        if self.guidance_interval is not None and not self.guidance_interval[0] <= self.guidance_interval[1]:
            raise ConfigError(f"--guidance_interval = {self.guidance_interval}: expected LO,HI with LO <= HI")
        if self.task == "class" and not self.labels:
            raise ConfigError("task 'class' needs --label (or --labels): the class to sample")
        if self.task == "negative_class" and not self.negative_labels:
            raise ConfigError("task 'negative_class' needs --negative_label: the class to avoid")
        if self.guidance_interval is not None and self.classifier_workdir is not None:
            raise ConfigError("--guidance_interval applies to classifier-free guidance, not --classifier_workdir")
        if self.blur is not None:
            _parse_blur(self.blur)

    @property
    def needs_input(self) -> bool:
        return self.task in INVERSE_TASKS or self.task == "edit"

    def settings(self) -> dict[str, Any]:
        """The settings given (JSON-ready), with the method's default filled in."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
        if self.task in INVERSE_TASKS:
            out.setdefault("method", DEFAULT_METHOD)
            out.setdefault("sigma_y", 0.0)
        for k in ("labels", "negative_labels", "guidance_interval"):
            if k in out:
                out[k] = list(out[k])
        return out


@dataclasses.dataclass
class TaskResult:
    """``results`` (N, H, W, C) in the data's range; ``nfe`` per sample; ``inputs`` as read
    (data range, or the measurements when ``measured``); ``measurement`` ``y`` in the model's
    units; ``view`` the measurement shown at the image's shape (data range); ``mask``
    (inpainting, outpainting); ``labels`` / ``negative_labels``; ``seconds`` of the run."""

    results: np.ndarray
    nfe: int
    inputs: np.ndarray | None = None
    measurement: np.ndarray | None = None
    view: np.ndarray | None = None
    mask: np.ndarray | None = None
    labels: np.ndarray | None = None
    negative_labels: np.ndarray | None = None
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _shape_text(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


def _as_batch(arr: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    """``arr`` as ``(N,) + shape``; single images and channel-less grey images are accepted."""
    h, w, c = shape
    if arr.ndim == 4 and arr.shape[1:] == shape:
        return arr
    if arr.ndim == 3 and arr.shape == shape:
        return arr[None]
    if c == 1 and arr.ndim == 3 and arr.shape[1:] == (h, w):
        return arr[..., None]
    if c == 1 and arr.ndim == 2 and arr.shape == (h, w):
        return arr[None, ..., None]
    if arr.ndim in (3, 4) and arr.shape[-3:-1] == (h, w) and arr.shape[-1] != c:
        raise ConfigError(f"{what} has {arr.shape[-1]} channel(s); this needs {c} (images {_shape_text(shape)})")
    raise ConfigError(
        f"{what} has shape {_shape_text(arr.shape)}; this needs images of {_shape_text(shape)} "
        f"(one image H x W x C, or a batch N x H x W x C)"
    )


def _png(path: pathlib.Path, what: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode in ("1", "L", "I;16", "I"):
                arr = np.asarray(img.convert("L") if mode == "1" else img)
                scale = 255.0 if mode in ("1", "L") else 65535.0
                return (arr.astype(np.float32) / scale)[..., None]
            if mode not in ("P", "RGB"):
                raise ConfigError(f"{what} {path} is a {mode} PNG; give a grey (L) or colour (RGB) image")
            return np.asarray(img.convert("RGB") if mode == "P" else img, np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(f"{what} {path} is not a readable image: {e}") from None


def read_images(path: str | pathlib.Path, shape: tuple[int, ...], *, what: str = "--input") -> np.ndarray:
    """Images ``(N,) + shape`` in [0, 1] from a PNG (8-bit grey or RGB, divided by 255) or an
    ``.npz`` (the array ``images``, else ``samples``, else its only array; floats in [0, 1] or
    uint8). Wrong shapes, channel counts, ranges and non-finite values are ConfigErrors."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    if path.suffix.lower() == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                names = list(data.files)
                name = next((n for n in ("images", "samples") if n in names), names[0] if len(names) == 1 else None)
                if name is None:
                    raise ConfigError(f"{what} {path} holds {names}; name the images 'images'")
                arr = np.asarray(data[name])
        except (ValueError, OSError) as e:
            raise ConfigError(f"{what} {path} is not a readable .npz file: {e}") from None
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        elif not np.issubdtype(arr.dtype, np.floating):
            raise ConfigError(f"{what} {path}: array {name!r} has dtype {arr.dtype}; give floats in [0, 1] or uint8")
    elif path.suffix.lower() == ".png":
        arr = _png(path, what)
    else:
        raise ConfigError(f"{what} {path}: expected a .png or .npz file")
    arr = _as_batch(np.asarray(arr, np.float32), tuple(shape), f"{what} {path}")
    if not np.all(np.isfinite(arr)):
        raise ConfigError(f"{what} {path} holds non-finite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1e-6 or hi > 1.0 + 1e-6:
        raise ConfigError(f"{what} {path} has values in [{lo:g}, {hi:g}]; images must be in [0, 1]")
    return np.clip(arr, 0.0, 1.0)


def named_mask(name: str, shape: tuple[int, ...], *, seed: int = 0) -> np.ndarray:
    """A mask ``(H, W, 1)`` (1 observed, 0 hidden) named in :data:`NAMED_MASKS`: the bottom /
    top / left / right half hidden, the ``center`` (the middle half of each side) hidden, or
    ``random:F`` (each pixel observed with probability F, drawn with ``seed``)."""
    h, w = shape[0], shape[1]
    m = np.ones((h, w, 1), np.float32)
    if name == "bottom_half":
        m[h // 2 :] = 0
    elif name == "top_half":
        m[: h // 2] = 0
    elif name == "left_half":
        m[:, : w // 2] = 0
    elif name == "right_half":
        m[:, w // 2 :] = 0
    elif name == "center":
        m[h // 4 : h - h // 4, w // 4 : w - w // 4] = 0
    elif name.startswith("random:"):
        try:
            fraction = float(name.partition(":")[2])
        except ValueError:
            fraction = -1.0
        if not 0.0 < fraction < 1.0:
            raise ConfigError(f"--mask {name}: expected random:F with F in (0, 1), the observed fraction")
        m = cond_lib.random_mask(seed, (h, w, 1), fraction)
    else:
        raise ConfigError(f"--mask {name!r} is neither a .png file nor a named mask ({', '.join(NAMED_MASKS)})")
    return m


def read_mask(spec: str, shape: tuple[int, ...], *, seed: int = 0) -> np.ndarray:
    """The mask ``(H, W, 1)`` of ``--mask``: a named mask, or a PNG of the image's height and
    width (grey or RGB; a pixel is observed where it is brighter than half)."""
    if not spec.lower().endswith(".png"):
        return named_mask(spec, shape, seed=seed)
    path = pathlib.Path(spec)
    if not path.is_file():
        raise ConfigError(f"--mask {path} does not exist")
    arr = _png(path, "--mask")
    if arr.shape[:2] != tuple(shape[:2]):
        raise ConfigError(
            f"--mask {path} is {arr.shape[0]}x{arr.shape[1]} pixels; the images are {shape[0]}x{shape[1]}"
        )
    m = (arr.mean(axis=-1, keepdims=True) > 0.5).astype(np.float32)
    if m.min() == 1.0:
        raise ConfigError(f"--mask {path} hides no pixel (black = hidden, white = observed)")
    return m


def _parse_blur(text: str) -> tuple[str, float]:
    kind, _, width = text.partition(":")
    try:
        value = float(width) if width else 1.0
    except ValueError:
        value = -1.0
    if kind not in ("gaussian", "uniform") or value <= 0:
        raise ConfigError(f"--blur {text!r}: expected gaussian:STD or uniform:SIZE (SIZE odd)")
    if kind == "uniform" and (value != int(value) or int(value) % 2 == 0):
        raise ConfigError(f"--blur {text!r}: a uniform blur has an odd integer SIZE")
    return kind, value


# --------------------------------------------------------------------------------------------
# Running a task
# --------------------------------------------------------------------------------------------


def _conditional_score(experiment, params, x, t, labels):
    return experiment.score_fn(params, class_labels=labels)(x, t)


class TaskRunner:
    """Runs :class:`Task` s on one trained model (its compiled samplers are reused between calls
    with the same shapes). ``classifier``: a trained noise-conditional classifier (a
    :class:`~diffusion_jax.modes.load.TrainedModel` of ``training.task = 'classifier'``)."""

    def __init__(self, model, *, classifier=None):
        self.model = model
        self.exp = model.experiment
        self.shape = tuple(model.shape)
        if len(self.shape) != 3:
            raise ConfigError(f"controllable generation needs an image model; this one's data have shape {self.shape}")
        self.classifier = classifier
        self._cond = functools.partial(_conditional_score, self.exp)
        self._classifier_fn = None
        if classifier is not None:
            self._classifier_fn = _check_classifier(model, classifier)

    # The model's units: centred images live in [-1, 1].
    def to_model(self, images: np.ndarray) -> np.ndarray:
        centered = self.exp.data_info.centered if self.exp.data_info is not None else self.model.config.data.centered
        return images * 2.0 - 1.0 if centered else images

    def to_data(self, x) -> np.ndarray:
        return np.asarray(self.exp.to_data_range(np.asarray(jax.device_get(x))), np.float32)

    def operator(self, task: Task, *, seed: int = 0) -> tuple[cond_lib.Operator, np.ndarray | None]:
        """The measurement operator of an inverse task and its mask (masks only)."""
        shape, sigma_y = self.shape, float(task.sigma_y or 0.0)
        h, w, c = shape
        mask = None
        if task.task == "inpaint":
            mask = read_mask(str(task.mask), shape, seed=seed)
        elif task.task == "outpaint":
            if task.mask is not None:
                mask = read_mask(task.mask, shape, seed=seed)
            else:
                border = task.border if task.border is not None else max(1, min(h, w) // 4)
                if 2 * border >= min(h, w):
                    raise ConfigError(f"--border = {border} hides the whole {h}x{w} image; use < {min(h, w) // 2}")
                mask = cond_lib.border_mask((h, w, 1), border)
        if mask is not None:
            if mask.max() == 0.0:
                raise ConfigError(f"--mask {task.mask} observes no pixel (black = hidden, white = observed)")
            return cond_lib.inpainting(mask, sigma_y=sigma_y), mask
        if task.task == "colorize":
            if c != 3:
                raise ConfigError(f"task 'colorize' needs a model of colour images (3 channels); this one has {c}")
            return cond_lib.colorization(3, sigma_y=sigma_y), None
        if task.task == "super_resolve":
            factor = task.factor or 2
            if h % factor or w % factor:
                raise ConfigError(f"--factor = {factor} does not divide the {h}x{w} images")
            return cond_lib.super_resolution(shape, factor, sigma_y=sigma_y), None
        if task.task == "deblur":
            kind, width = _parse_blur(task.blur or "gaussian:1")
            if kind == "gaussian":
                return cond_lib.gaussian_blur(shape, width, sigma_y=sigma_y), None
            return cond_lib.uniform_blur(shape, int(width), sigma_y=sigma_y), None
        if task.task == "denoise":
            return cond_lib.denoising(sigma_y=sigma_y), None
        raise ConfigError(f"task {task.task!r} has no measurement operator")

    def measurement_shape(self, op: cond_lib.Operator) -> tuple[int, ...]:
        out = jax.eval_shape(op.forward, jax.ShapeDtypeStruct((1, *self.shape), jnp.float32))
        return tuple(out.shape[1:])

    def _unconditional(self, n: int):
        null = self.exp.null_label
        labels = None if null is None else jnp.full((n,), null, jnp.int32)
        return self.exp.score_fn(self.model.params, class_labels=labels)

    def _labels(self, given: Sequence[int] | None, n: int, *, classes: int, what: str) -> jnp.ndarray:
        given = list(given or [])
        bad = [y for y in given if not 0 <= y < classes]
        if bad:
            raise ConfigError(f"{what} {bad} outside the classes 0..{classes - 1}")
        if given and n % len(given) == 0:
            given = given * (n // len(given))  # cycled: 0..9 for 100 samples gives 10 of each
        if len(given) != n:
            raise ConfigError(
                f"{len(given)} labels for {n} samples; give one label, one per sample, or a list that divides them"
            )
        return jnp.asarray(given, jnp.int32)

    def run(self, task: Task, key: jax.Array, *, inputs: np.ndarray | None = None, num_samples: int | None = None):
        """Run ``task`` on ``inputs`` ``(N, H, W, C)`` (data range; the measurements for a
        ``measured`` task) or, for guidance, draw ``num_samples``; returns a :class:`TaskResult`."""
        task.check()
        t0 = time.perf_counter()
        if task.task in INVERSE_TASKS:
            result = self._inverse(task, key, inputs)
        elif task.task == "edit":
            result = self._edit(task, key, inputs)
        else:
            result = self._guided(task, key, num_samples)
        result.seconds = time.perf_counter() - t0
        return result

    def _check_inputs(self, inputs, shape) -> np.ndarray:
        if inputs is None:
            raise ConfigError("this task needs --input (images as .png or .npz)")
        inputs = np.asarray(inputs, np.float32)
        if inputs.ndim != 4 or inputs.shape[1:] != tuple(shape):
            raise ConfigError(f"inputs have shape {inputs.shape}; this needs (N, {', '.join(map(str, shape))})")
        return inputs

    def _inverse(self, task: Task, key, inputs) -> TaskResult:
        op, mask = self.operator(task, seed=self.model.config.seed)
        y_shape = self.measurement_shape(op)
        inputs = self._check_inputs(inputs, y_shape if task.measured else self.shape)
        n = inputs.shape[0]
        k_y, k_x = jax.random.split(key)
        if task.measured:
            # A measurement b = A x of data-range images is y = A(s x + o) = s b + A(o 1) in the
            # model's units (x -> s x + o, e.g. 2 x - 1); the offset term matters where A's rows
            # do not sum to 1 (a blur's zero boundary).
            zero = self.to_model(np.zeros((1, *self.shape), np.float32))
            scale = self.to_model(np.ones((1,), np.float32)) - self.to_model(np.zeros((1,), np.float32))
            y = jnp.asarray(scale * inputs) + op.forward(jnp.asarray(zero))
            if mask is not None:
                y = y * mask  # the hidden pixels of a given measurement carry nothing
        else:
            y = op.measure(k_y, jnp.asarray(self.to_model(inputs)))
        options = dict(task.options or {})
        if task.num_steps is not None:
            options["num_steps"] = task.num_steps
        name = task.method or DEFAULT_METHOD
        try:
            sampler = cond_lib.get_method(name, op, y, **options)
            sampler.validate(self.exp.sde)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"method {name!r}: {e}") from None
        x, info = samplers_lib.sample(k_x, self._unconditional(n), self.exp.sde, (n, *self.shape), sampler)
        # The measurement at the image's shape: itself (masks, blur, noise), else A^+ y
        # (super-resolution: each pixel repeated; colorization: the grey value in every channel).
        if tuple(y.shape[1:]) == self.shape:
            view = y
        elif isinstance(op, cond_lib.SVDOperator):
            view = op.pinv(y, jnp.zeros((1, *self.shape), y.dtype))
        elif isinstance(op, cond_lib.LinearOperator):
            view = op.transpose(y)
        else:
            view = jnp.zeros((n, *self.shape), y.dtype)
        return TaskResult(
            results=self.to_data(x),
            inputs=inputs,
            measurement=np.asarray(y),
            view=np.clip(self.to_data(view), 0.0, 1.0),
            mask=mask,
            nfe=int(info.nfe),
        )

    def _edit(self, task: Task, key, inputs) -> TaskResult:
        inputs = self._check_inputs(inputs, self.shape)
        sampler = build_sampler(self.model.config, sde=self.exp.sde)
        if not isinstance(sampler, FixedGridSampler):
            raise ConfigError(
                "task 'edit' runs the config's sampler from the noised input, which needs a fixed-grid sampler; "
                f"sampling.method = {self.model.config.sampling.method!r} is not one "
                "(e.g. --config.sampling.method=heun)"
            )
        n = inputs.shape[0]
        x, info = cond_lib.sdedit(
            key,
            self._unconditional(n),
            self.exp.sde,
            jnp.asarray(self.to_model(inputs)),
            sampler,
            strength=0.5 if task.strength is None else task.strength,
        )
        return TaskResult(results=self.to_data(x), inputs=inputs, nfe=int(info.nfe))

    def _guided(self, task: Task, key, num_samples) -> TaskResult:
        given = list(task.labels or [])
        n = num_samples or max(len(given), len(task.negative_labels or []), 1)
        w = 1.0 if task.guidance_scale is None else float(task.guidance_scale)
        sampler = build_sampler(self.model.config, sde=self.exp.sde)
        null = self.exp.null_label
        if task.task == "class" and self._classifier_fn is not None:
            classes = int(self.classifier.config.model.num_classes)
            labels = self._labels(given, n, classes=classes, what="--label")
            fn: Any = cond_lib.classifier_guidance(
                self._unconditional(n), self._classifier_fn, labels, self.exp.sde, scale=w
            )
            negative = None
        else:
            if null is None:
                raise ConfigError(
                    f"task {task.task!r} needs a class-conditional model (model.num_classes > 0, trained with "
                    "training.class_dropout > 0) or, for 'class', --classifier_workdir (a trained classifier)"
                )
            labels = self._labels(given, n, classes=null, what="--label") if given else jnp.full((n,), null, jnp.int32)
            negative = None
            if task.task == "negative_class":
                negative = self._labels(task.negative_labels, n, classes=null, what="--negative_label")
            fn = cond_lib.classifier_free_guidance(
                jax.tree_util.Partial(self._cond, self.model.params),
                labels,
                self.exp.sde,
                guidance=w,
                null_label=null,
                negative_labels=negative,
                interval=task.guidance_interval,
            )
        x, info = samplers_lib.sample(key, fn, self.exp.sde, (n, *self.shape), sampler)
        return TaskResult(
            results=self.to_data(x),
            labels=np.asarray(labels),
            negative_labels=None if negative is None else np.asarray(negative),
            nfe=int(info.nfe),
        )


def _check_classifier(model, classifier):
    """The classifier's ``classifier_fn`` after checking it fits the model: same data shape and
    the same noise level at each time (else its ``t`` would mean another noise level)."""
    if classifier.config.training.task != "classifier":
        raise ConfigError(
            f"--classifier_workdir {classifier.workdir} holds a {classifier.config.training.task!r} model, not a "
            "classifier (train one with training.task = 'classifier', e.g. configs/digits/classifier.py)"
        )
    if tuple(classifier.shape) != tuple(model.shape):
        raise ConfigError(
            f"the classifier in {classifier.workdir} takes images of {_shape_text(classifier.shape)}; the model's are "
            f"{_shape_text(model.shape)}"
        )
    sde_m, sde_c = model.sde, classifier.sde
    ts = np.linspace(float(sde_m.t_min), float(sde_m.T), 7)
    same = float(sde_c.t_min) == float(sde_m.t_min) and float(sde_c.T) == float(sde_m.T)
    if same:
        am, sm = (np.asarray(v) for v in sde_m.marginal(jnp.asarray(ts, jnp.float32)))
        ac, sc = (np.asarray(v) for v in sde_c.marginal(jnp.asarray(ts, jnp.float32)))
        same = np.allclose(am, ac, rtol=1e-5) and np.allclose(sm, sc, rtol=1e-5)
    if not same:
        raise ConfigError(
            f"the classifier in {classifier.workdir} was trained with another SDE (training.sde = "
            f"{classifier.config.training.sde!r}, the model's {model.config.training.sde!r}, or other parameters): "
            "its time would mean another noise level"
        )
    return cond_lib.trained_classifier(
        classifier.module, classifier.params, classifier.sde, classifier.experiment.parametrization
    )


# --------------------------------------------------------------------------------------------
# The command-line mode
# --------------------------------------------------------------------------------------------


def side_by_side(columns: Sequence[np.ndarray], *, per_band: int = 10) -> np.ndarray:
    """Images ordered for a grid of ``per_band`` columns: each band shows up to ``per_band``
    examples, one row per entry of ``columns`` (e.g. input, measurement, result)."""
    n = columns[0].shape[0]
    blank = np.ones_like(columns[0][:1])
    out = []
    for start in range(0, n, per_band):
        for col in columns:
            part = list(col[start : start + per_band])
            part += [blank[0]] * (min(per_band, n) - len(part))
            out.extend(part)
    return np.stack(out)


def sample_task(
    config,
    workdir,
    task: Task,
    *,
    input_path: str | None = None,
    num_samples: int | None = None,
    out: str | None = None,
    step: int | None = None,
) -> pathlib.Path:
    """``diffusion-jax sample --task ...``: run ``task`` on the checkpoint ``step`` (default the
    newest) of ``workdir`` and write ``<out>.npz`` (``samples`` in the data's range, ``inputs``,
    ``measurement`` (model units), ``measurement_view``, ``mask``, ``labels``,
    ``negative_labels`` where they apply, and ``settings``: the task's settings, step, seed, NFE)
    and ``<out>.png`` (input, measurement and result side by side; a grid of the samples for the
    guidance tasks). Returns the ``.npz`` path."""
    from diffusion_jax.modes.load import load
    from diffusion_jax.training.logging import save_image_grid

    task.check()
    if task.needs_input and input_path is None:
        raise ConfigError(f"task {task.task!r} needs --input (images as .png or .npz)")
    if not task.needs_input and input_path is not None:
        raise ConfigError(f"task {task.task!r} draws new samples; it takes no --input")
    if task.needs_input and num_samples is not None:
        raise ConfigError(f"task {task.task!r} makes one result per input image; it takes no --num_samples")
    model = load(workdir, step, config=config)
    classifier = load(task.classifier_workdir) if task.classifier_workdir else None
    runner = TaskRunner(model, classifier=classifier)
    inputs = None
    if task.needs_input:
        shape = runner.shape
        if task.measured:
            op, _ = runner.operator(task, seed=model.config.seed)
            shape = runner.measurement_shape(op)
        inputs = read_images(str(input_path), shape)
    key = jax.random.PRNGKey(model.config.seed + model.step)
    res = runner.run(task, key, inputs=inputs, num_samples=num_samples)

    name = (task.method or DEFAULT_METHOD) if task.task in INVERSE_TASKS else task.task
    out_path = pathlib.Path(out) if out else model.workdir / "samples" / f"{task.task}_{model.step:08d}_{name}"
    if jax.process_index() != 0:
        return out_path.with_suffix(".npz")
    settings = dict(task.settings(), step=model.step, seed=model.config.seed, nfe=res.nfe, input=input_path)
    known = None
    if res.mask is not None and res.inputs is not None and not task.measured and not task.sigma_y:
        # Noise-free: the observed pixels should come back as given.
        known = float(np.max(np.abs(res.results - res.inputs) * res.mask))
        settings["known_pixels_max_abs_error"] = known
    arrays: dict[str, Any] = {"samples": res.results, "settings": np.asarray(json.dumps(settings, default=str))}
    for k, v in (
        ("inputs", res.inputs),
        ("measurement", res.measurement),
        ("measurement_view", res.view),
        ("mask", res.mask),
        ("labels", res.labels),
        ("negative_labels", res.negative_labels),
    ):
        if v is not None:
            arrays[k] = v
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out_path.with_suffix(".npz"), **arrays)
    upscale = max(1, 64 // runner.shape[0])
    if task.task in INVERSE_TASKS:
        assert res.view is not None
        first = res.view if task.measured else res.inputs
        grid = side_by_side([first, res.view, res.results])
        save_image_grid(out_path.with_suffix(".png"), grid, ncol=min(len(res.results), 10), upscale=upscale)
    elif task.task == "edit":
        grid = side_by_side([res.inputs, res.results])
        save_image_grid(out_path.with_suffix(".png"), grid, ncol=min(len(res.results), 10), upscale=upscale)
    else:
        save_image_grid(out_path.with_suffix(".png"), res.results, ncol=min(len(res.results), 10), upscale=upscale)
    extra = f"; known pixels kept to {known:.2g}" if known is not None else ""
    print(
        f"{task.task}: {len(res.results)} result(s) of checkpoint {model.step} ({name}, nfe={res.nfe}, "
        f"{res.seconds:.1f} s){extra}; wrote {out_path.with_suffix('.npz')} and .png",
        flush=True,
    )
    return out_path.with_suffix(".npz")
