"""The FID Inception-v3 network in Flax, and its weights.

This is the network of pytorch-fid (``pytorch_fid.inception.fid_inception_v3``): torchvision's
``Inception3(num_classes=1008, aux_logits=False)`` with the blocks of the TensorFlow graph
``inception-2015-12-05`` that Heusel et al. (2017) used for FID. It differs from torchvision's
ImageNet Inception-v3 in four places, each of which changes FID:

* the average pools of the A, C and first E blocks (``Mixed_5b..5d``, ``Mixed_6b..6e``,
  ``Mixed_7b``) exclude the zero padding from the mean (``count_include_pad=False``);
* the last E block (``Mixed_7c``) pools its ``branch_pool`` with a 3x3 **max** pool;
* 1008 classes (the 2015 graph's softmax), ``fc`` with a bias;
* no ``transform_input``: the inputs are mapped from [0, 1] to [-1, 1] by ``2x - 1``
  (:mod:`diffusion_jax.evaluation.resize` does that together with the resize to 299x299).

Every convolution has no bias and is followed by BatchNorm (eps 1e-3, running statistics) and
ReLU. Layers keep PyTorch's names (``Mixed_6b.branch7x7dbl_3.conv``), so a pytorch-fid state dict
maps onto the parameter tree name by name: :func:`convert_state_dict` checks every name and
shape. Weights are never downloaded: :func:`load_inception_weights` reads pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` (needs torch) or our ``.npz`` copy of it
(:func:`save_inception_npz`, ``scripts/inception_weights.py``).

Layout: images NHWC (``(B, 299, 299, 3)``, values in [-1, 1]); outputs :class:`InceptionOutputs`.
The pytorch-fid block outputs (``block0`` 64 channels at 73x73, ``block1`` 192 at 35x35, ``block2``
768 at 17x17) are sown into the ``intermediates`` collection.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

__all__ = [
    "FIDInceptionV3",
    "InceptionOutputs",
    "InceptionWeightsError",
    "PYTORCH_FID_WEIGHTS_FILE",
    "WEIGHTS_ENV_VAR",
    "WEIGHTS_CONFIG_KEY",
    "BN_EPS",
    "expected_state_dict_shapes",
    "convert_state_dict",
    "load_inception_weights",
    "save_inception_npz",
    "resolve_inception_weights",
    "random_state_dict",
]

PYTORCH_FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_ENV_VAR = "DIFFUSION_JAX_INCEPTION_WEIGHTS"
WEIGHTS_CONFIG_KEY = "eval.inception_weights"
BN_EPS = 1e-3  # torchvision's BasicConv2d
NUM_CLASSES = 1008


class InceptionWeightsError(ValueError):
    """A weights file is missing, or a tensor in it is missing, extra or misshaped."""


class InceptionOutputs(NamedTuple):
    """pool3: (B, 2048) FID features; logits: (B, 1008) = pool3 @ W + b; logits_unbiased: pool3 @ W
    (the original Inception-score code's convention, no bias)."""

    pool3: jax.Array
    logits: jax.Array
    logits_unbiased: jax.Array


def _pad(kernel: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    return ((kernel[0] // 2, kernel[0] // 2), (kernel[1] // 2, kernel[1] // 2))


def _pointwise_conv(lhs, rhs, window_strides, padding, *, precision=None, **kwargs):
    """A 1x1, stride-1, unpadded NHWC convolution (HWIO kernel) as a matrix product over the
    channels, the same sum: XLA:CPU runs it about four times faster than the convolution, which
    it does not spread over the cores (``scripts/benchmark_inception.py``)."""
    del window_strides, padding, kwargs  # BasicConv uses it only for (1, 1) kernels, stride 1, no padding
    return jnp.einsum("nhwc,cd->nhwd", lhs, rhs[0, 0], precision=precision)


class BasicConv(nn.Module):
    """Conv (no bias) -> BatchNorm(eps 1e-3, running statistics) -> ReLU: torchvision's BasicConv2d."""

    features: int
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: Any = "same_odd"  # "same_odd": k // 2 on each side (torchvision's padding=k//2); or "VALID"
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        padding = _pad(self.kernel) if self.padding == "same_odd" else self.padding
        pointwise = tuple(self.kernel) == (1, 1) and self.stride == 1
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=(self.stride, self.stride),
            padding=padding,
            use_bias=False,
            precision=self.precision,
            conv_general_dilated=_pointwise_conv if pointwise else None,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x, include_pad: bool):
    # The FID blocks' F.avg_pool2d(kernel 3, stride 1, padding 1, count_include_pad=False).
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=include_pad)


def _max_pool_3x3_stride2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    pool_features: int
    precision: Any = None
    pool_include_pad: bool = False

    @nn.compact
    def __call__(self, x):
        c = lambda f, k=(1, 1), name=None: BasicConv(f, k, precision=self.precision, name=name)
        b1 = c(64, name="branch1x1")(x)
        b5 = c(64, (5, 5), name="branch5x5_2")(c(48, name="branch5x5_1")(x))
        d = c(64, name="branch3x3dbl_1")(x)
        d = c(96, (3, 3), name="branch3x3dbl_2")(d)
        d = c(96, (3, 3), name="branch3x3dbl_3")(d)
        p = c(self.pool_features, name="branch_pool")(_avg_pool_3x3(x, self.pool_include_pad))
        return jnp.concatenate([b1, b5, d, p], axis=-1)


class InceptionB(nn.Module):
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        c = lambda f, k=(1, 1), s=1, pad="same_odd", name=None: BasicConv(
            f, k, s, pad, precision=self.precision, name=name
        )
        b3 = c(384, (3, 3), 2, "VALID", name="branch3x3")(x)
        d = c(64, name="branch3x3dbl_1")(x)
        d = c(96, (3, 3), name="branch3x3dbl_2")(d)
        d = c(96, (3, 3), 2, "VALID", name="branch3x3dbl_3")(d)
        return jnp.concatenate([b3, d, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int
    precision: Any = None
    pool_include_pad: bool = False

    @nn.compact
    def __call__(self, x):
        c = lambda f, k=(1, 1), name=None: BasicConv(f, k, precision=self.precision, name=name)
        c7 = self.channels_7x7
        b1 = c(192, name="branch1x1")(x)
        b7 = c(c7, name="branch7x7_1")(x)
        b7 = c(c7, (1, 7), name="branch7x7_2")(b7)
        b7 = c(192, (7, 1), name="branch7x7_3")(b7)
        d = c(c7, name="branch7x7dbl_1")(x)
        d = c(c7, (7, 1), name="branch7x7dbl_2")(d)
        d = c(c7, (1, 7), name="branch7x7dbl_3")(d)
        d = c(c7, (7, 1), name="branch7x7dbl_4")(d)
        d = c(192, (1, 7), name="branch7x7dbl_5")(d)
        p = c(192, name="branch_pool")(_avg_pool_3x3(x, self.pool_include_pad))
        return jnp.concatenate([b1, b7, d, p], axis=-1)


class InceptionD(nn.Module):
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        c = lambda f, k=(1, 1), s=1, pad="same_odd", name=None: BasicConv(
            f, k, s, pad, precision=self.precision, name=name
        )
        b3 = c(320, (3, 3), 2, "VALID", name="branch3x3_2")(c(192, name="branch3x3_1")(x))
        b7 = c(192, name="branch7x7x3_1")(x)
        b7 = c(192, (1, 7), name="branch7x7x3_2")(b7)
        b7 = c(192, (7, 1), name="branch7x7x3_3")(b7)
        b7 = c(192, (3, 3), 2, "VALID", name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
    """``last=False``: FIDInceptionE_1 (average pool without padding); ``last=True``:
    FIDInceptionE_2, whose branch_pool is a 3x3 max pool (a quirk of the 2015 TF graph)."""

    last: bool
    precision: Any = None
    pool_include_pad: bool = False
    last_pool: str = "max"

    @nn.compact
    def __call__(self, x):
        c = lambda f, k=(1, 1), name=None: BasicConv(f, k, precision=self.precision, name=name)
        b1 = c(320, name="branch1x1")(x)
        b3 = c(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate([c(384, (1, 3), name="branch3x3_2a")(b3), c(384, (3, 1), name="branch3x3_2b")(b3)], -1)
        d = c(448, name="branch3x3dbl_1")(x)
        d = c(384, (3, 3), name="branch3x3dbl_2")(d)
        d = jnp.concatenate([c(384, (1, 3), name="branch3x3dbl_3a")(d), c(384, (3, 1), name="branch3x3dbl_3b")(d)], -1)
        if self.last and self.last_pool == "max":
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x, self.pool_include_pad)
        p = c(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, d, p], axis=-1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's Inception-v3. Input (B, 299, 299, 3) in [-1, 1] (other sizes run too, but FID
    is defined at 299). Returns :class:`InceptionOutputs`; sows ``block0``..``block2``.

    ``pool_include_pad`` and ``last_pool`` exist to show what the FID blocks change (the tests
    check that torchvision's choices, True and ``"avg"``, miss pytorch-fid's outputs); FID needs
    the defaults.
    """

    precision: Any = None
    pool_include_pad: bool = False
    last_pool: str = "max"

    @nn.compact
    def __call__(self, x) -> InceptionOutputs:
        p, inc = self.precision, self.pool_include_pad
        if self.last_pool not in ("max", "avg"):
            raise ValueError(f"last_pool must be 'max' (FID) or 'avg', got {self.last_pool!r}")
        c = lambda f, k, s=1, pad="VALID", name=None: BasicConv(f, k, s, pad, precision=p, name=name)
        # block 0
        x = c(32, (3, 3), 2, name="Conv2d_1a_3x3")(x)
        x = c(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = c(64, (3, 3), pad="same_odd", name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        self.sow("intermediates", "block0", x)
        # block 1
        x = c(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = c(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        self.sow("intermediates", "block1", x)
        # block 2
        x = InceptionA(32, p, inc, name="Mixed_5b")(x)
        x = InceptionA(64, p, inc, name="Mixed_5c")(x)
        x = InceptionA(64, p, inc, name="Mixed_5d")(x)
        x = InceptionB(p, name="Mixed_6a")(x)
        x = InceptionC(128, p, inc, name="Mixed_6b")(x)
        x = InceptionC(160, p, inc, name="Mixed_6c")(x)
        x = InceptionC(160, p, inc, name="Mixed_6d")(x)
        x = InceptionC(192, p, inc, name="Mixed_6e")(x)
        self.sow("intermediates", "block2", x)
        # block 3
        x = InceptionD(p, name="Mixed_7a")(x)
        x = InceptionE(False, p, inc, self.last_pool, name="Mixed_7b")(x)
        x = InceptionE(True, p, inc, self.last_pool, name="Mixed_7c")(x)
        pool3 = jnp.mean(x, axis=(1, 2))
        fc = nn.Dense(NUM_CLASSES, precision=p, name="fc")
        logits = fc(pool3)
        unbiased = jnp.matmul(pool3, fc.variables["params"]["kernel"], precision=p)  # pool3 @ W, no bias
        return InceptionOutputs(pool3, logits, unbiased)


# ---------------------------------------------------------------------------------------------
# Weights: pytorch-fid state dict <-> Flax variables.

# BatchNorm: torch name -> (Flax collection, Flax name)
_BN_NAMES = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}


@functools.lru_cache(maxsize=1)
def _flax_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    shapes = jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), jnp.zeros((1, 299, 299, 3)))
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}


def _torch_name_to_flax(name: str) -> tuple[tuple[str, ...], str] | None:
    """``Mixed_5b.branch1x1.conv.weight`` -> ((``params``, ``Mixed_5b``, ``branch1x1``, ``conv``,
    ``kernel``), layout), layout one of ``conv``, ``dense``, ``vector``; None for ignored names."""
    parts = name.split(".")
    if parts[-1] == "num_batches_tracked":
        return None
    if parts[:-1] == ["fc"]:
        return (
            ("params", "fc", "kernel" if parts[-1] == "weight" else "bias"),
            "dense" if parts[-1] == "weight" else "vector",
        )
    if len(parts) >= 3 and parts[-2] == "conv" and parts[-1] == "weight":
        return (("params", *parts[:-1], "kernel"), "conv")
    if len(parts) >= 3 and parts[-2] == "bn" and parts[-1] in _BN_NAMES:
        collection, leaf = _BN_NAMES[parts[-1]]
        return ((collection, *parts[:-1], leaf), "vector")
    raise InceptionWeightsError(f"unexpected tensor {name!r}: not a name of pytorch-fid's FID Inception-v3")


def _torch_shape(flax_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "conv":  # HWIO -> OIHW
        kh, kw, i, o = flax_shape
        return (o, i, kh, kw)
    if layout == "dense":  # (in, out) -> (out, in)
        return (flax_shape[1], flax_shape[0])
    return flax_shape


def expected_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor a pytorch-fid FID Inception state dict must hold, ``{name: torch shape}``
    (``num_batches_tracked`` counters are optional and ignored)."""
    out = {}
    for path, shape in _flax_shapes().items():
        _, *mods, leaf = path
        if mods == ["fc"]:
            name, layout = f"fc.{'weight' if leaf == 'kernel' else 'bias'}", "dense" if leaf == "kernel" else "vector"
        elif leaf == "kernel":
            name, layout = ".".join(mods) + ".weight", "conv"
        else:
            torch_leaf = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}[leaf]
            name, layout = ".".join(mods) + "." + torch_leaf, "vector"
        out[name] = _torch_shape(shape, layout)
    return out


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A pytorch-fid state dict ``{name: array}`` -> Flax variables ``{'params', 'batch_stats'}``.

    Every name and shape is checked: a missing, extra or misshaped tensor raises
    :class:`InceptionWeightsError` naming it. Arrays are cast to float32.
    """
    expected = expected_state_dict_shapes()
    missing = [n for n in expected if n not in state_dict]
    if missing:
        raise InceptionWeightsError(
            f"the Inception weights lack {len(missing)} tensor(s), first {missing[0]!r} "
            f"(shape {expected[missing[0]]}); is this pytorch-fid's {PYTORCH_FID_WEIGHTS_FILE}?"
        )
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for name, value in state_dict.items():
        mapped = _torch_name_to_flax(name)
        if mapped is None:
            continue
        if name not in expected:
            raise InceptionWeightsError(f"unexpected tensor {name!r} in the Inception weights")
        array = np.asarray(value)
        if tuple(array.shape) != expected[name]:
            raise InceptionWeightsError(
                f"tensor {name!r} has shape {tuple(array.shape)}, the FID Inception-v3 needs {expected[name]}"
            )
        path, layout = mapped
        if layout == "conv":
            array = array.transpose(2, 3, 1, 0)
        elif layout == "dense":
            array = array.T
        flat[path] = np.ascontiguousarray(array, dtype=np.float32)
    return traverse_util.unflatten_dict(flat)


def load_inception_weights(path: str | os.PathLike) -> dict[str, Any]:
    """Flax variables of the FID Inception from pytorch-fid's ``.pth`` (read with the weights-only
    loader; needs torch) or from our ``.npz`` (``{torch name: array}``, no torch needed)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InceptionWeightsError(f"Inception weights file {path!r} does not exist")
    if path.endswith(".npz"):
        with np.load(path) as data:
            state = {k: data[k] for k in data.files}
    else:
        from diffusion_jax.models.convert import load_torch_checkpoint  # noqa: PLC0415 (torch only here)

        state = load_torch_checkpoint(path)
    return convert_state_dict(state)


def save_inception_npz(state_dict: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes a checked pytorch-fid state dict as ``.npz`` (``{torch name: float32 array}``)."""
    convert_state_dict(state_dict)  # checks names and shapes
    arrays = {
        k: np.asarray(v, dtype=np.float32) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")
    }
    np.savez(path, **arrays)  # type: ignore[arg-type]


def resolve_inception_weights(path: str | os.PathLike | None = None) -> str:
    """The weights file: ``path`` if given, else ``$DIFFUSION_JAX_INCEPTION_WEIGHTS``; stops with
    one message naming the file, the config key and the environment variable otherwise."""
    chosen = os.fspath(path) if path else os.environ.get(WEIGHTS_ENV_VAR, "")
    hint = (
        f"FID with the Inception detector needs pytorch-fid's weights file {PYTORCH_FID_WEIGHTS_FILE} "
        f"(or an .npz written from it by scripts/inception_weights.py); nothing is downloaded. "
        f"Point {WEIGHTS_CONFIG_KEY} or the environment variable {WEIGHTS_ENV_VAR} to it"
    )
    if not chosen:
        raise InceptionWeightsError(hint + ".")
    if not os.path.isfile(chosen):
        raise InceptionWeightsError(f"{hint}; {chosen!r} does not exist.")
    return chosen


def random_state_dict(manifest: Mapping[str, Any], stored: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A random pytorch-fid state dict from a manifest ``{'seed', 'tensors': [{'key', 'shape',
    'recipe', 'std'?}]}`` (the parity fixture's recipe): ``normal`` tensors are drawn in manifest
    order from one ``numpy.random.RandomState(seed)`` stream as ``standard_normal(shape) * std`` in
    float64 and cast to float32; ``stored`` tensors come from ``stored``; ``ignored`` are skipped."""
    rs = np.random.RandomState(manifest["seed"])
    out = {}
    for entry in manifest["tensors"]:
        key, shape, recipe = entry["key"], tuple(entry["shape"]), entry["recipe"]
        if recipe == "normal":
            out[key] = (rs.standard_normal(size=shape) * entry["std"]).astype(np.float32)
        elif recipe == "stored":
            out[key] = np.asarray(stored[key], dtype=np.float32)
        elif recipe != "ignored":
            raise ValueError(f"unknown recipe {recipe!r} for {key!r}; known: normal, stored, ignored")
    return out
