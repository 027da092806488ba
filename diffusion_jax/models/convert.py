"""Conversion of score_sde_pytorch weights to diffusion_jax parameters.

score_sde_pytorch checkpoints (``checkpoint.pth``) hold
``{'model': state_dict, 'ema': {'decay', 'num_updates', 'shadow_params'}, 'optimizer': ..., 'step': ...}``;
models trained with ``nn.DataParallel`` prefix every state-dict name with ``module.``.
``ema['shadow_params']`` is a list in ``model.parameters()`` order restricted to parameters with
``requires_grad`` (score_sde's ``ExponentialMovingAverage``), i.e. the state-dict order without
buffers and without the fixed Gaussian Fourier projection ``W``.

Layouts: ``Conv2d`` weights OIHW -> HWIO, ``Linear`` weights ``(out, in)`` -> ``(in, out)``,
``NIN.W`` ``(in, out)`` unchanged, GroupNorm ``weight/bias`` -> ``scale/bias``,
``GaussianFourierProjection.W`` and InstanceNorm++ ``alpha/gamma/beta`` unchanged.

Name mapping. NCSN++ and DDPM keep their layers in one list, ``all_modules.<i>``, used in order by
the forward pass; our networks create their top-level submodules in the same forward order, and
the names inside a block (``Conv_0``, ``GroupNorm_1``, ``NIN_0``, ``Conv2d_0``, ...) are the same in
both code bases. The i-th PyTorch unit is therefore paired with the i-th top-level submodule that
has parameters, in call order (recorded while tracing ``init``). NCSNv2 names its layers
(``begin_conv``, ``res1.0``, ``refine2.msf.convs.1``, ...); those are translated explicitly.

The core functions take numpy arrays; only :func:`load_torch_checkpoint` needs torch (imported
lazily; ``pip install "diffusion_jax[convert]"``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from diffusion_jax.models.ddpm import DDPM
from diffusion_jax.models.ncsnpp import NCSNpp
from diffusion_jax.models.ncsnv2 import NCSNv2

__all__ = [
    "ConversionError",
    "check_tensor_names",
    "TensorMapping",
    "load_torch_checkpoint",
    "strip_prefix",
    "read_safetensors",
    "write_safetensors",
    "read_state_dict",
    "state_dict_from_checkpoint",
    "torch_to_flax_mapping",
    "convert_state_dict",
    "convert_checkpoint",
    "flax_param_shapes",
    "ParamShapes",
    "count_params",
    "load_score_sde_flax_params",
]

BUFFERS = ("sigmas",)  # registered buffers of score_sde's networks (not parameters)


class ConversionError(ValueError):
    """A PyTorch entry and the Flax parameter tree do not match (name or shape)."""


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One PyTorch tensor and the Flax leaf it becomes."""

    torch_name: str
    flax_path: tuple[str, ...]
    layout: str  # 'conv' (OIHW -> HWIO), 'dense' ((out, in) -> (in, out)) or 'same'
    trainable: bool = True  # False for the fixed Fourier projection (not in score_sde's EMA)

    def apply(self, array: np.ndarray) -> np.ndarray:
        if self.layout == "conv":
            return np.transpose(array, (2, 3, 1, 0))
        if self.layout == "dense":
            return np.transpose(array, (1, 0))
        return array

    def converted_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(shape)
        if self.layout == "conv":
            return (shape[2], shape[3], shape[1], shape[0])
        if self.layout == "dense":
            return (shape[1], shape[0])
        return shape


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _to_numpy(obj: Any) -> Any:
    """Recursively converts torch tensors (anything with ``.detach().cpu().numpy()``) to numpy;
    bfloat16 tensors, which numpy cannot take from torch, become ``ml_dtypes.bfloat16`` arrays
    with the same bits."""
    if hasattr(obj, "detach") and hasattr(obj, "numpy"):
        tensor = obj.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            import torch  # noqa: PLC0415 (only torch tensors get here)

            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()
    if isinstance(obj, Mapping):
        return {k: _to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_numpy(v) for v in obj)
    return obj


def check_tensor_names(
    state: Mapping[str, Any], expected: Mapping[str, Any], *, what: str, built_with: str, extra_hint: str = ""
) -> None:
    """Stop with the first missing or unexpected tensor of a state dict, naming it, the counts
    and how the module was built (``expected``: the names the module needs)."""
    missing = [n for n in expected if n not in state]
    if missing:
        raise ConversionError(
            f"{what}: tensor {missing[0]!r} is missing ({len(missing)} missing in all); the module is built with "
            f"{built_with}"
        )
    extra = [n for n in state if n not in expected]
    if extra:
        raise ConversionError(
            f"{what}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected in all{extra_hint}); the module is "
            f"built with {built_with}"
        )


def load_torch_checkpoint(path: str) -> dict:
    """Loads a ``.pth`` file with torch's weights-only unpickler and returns numpy arrays.

    Needs torch (``pip install "diffusion_jax[convert]"``); nothing else here does.
    """
    try:
        import torch  # noqa: PLC0415 (optional dependency, imported only here)
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            'reading PyTorch checkpoints needs torch; install it with pip install "diffusion_jax[convert]"'
        ) from err
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return _to_numpy(obj)


def strip_prefix(state_dict: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """Removes ``nn.DataParallel``'s ``module.`` prefix (if every name has it)."""
    names = list(state_dict)
    if names and all(n.startswith(prefix) for n in names):
        return {n[len(prefix) :]: v for n, v in state_dict.items()}
    return dict(state_dict)


def state_dict_from_checkpoint(checkpoint: Mapping[str, Any], *, ema: bool = False) -> dict[str, np.ndarray]:
    """The model weights of a score_sde_pytorch checkpoint as ``{name: array}``.

    ``checkpoint`` is either a bare state dict or ``{'model': state_dict, 'ema': {...}, ...}``.
    With ``ema=True`` the trainable entries are replaced by ``ema['shadow_params']``, matched in
    state-dict order (buffers such as ``sigmas`` and the fixed Fourier ``W`` are not in that list
    and keep the model's values).
    """
    if "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        state = strip_prefix(checkpoint["model"])
    elif ema:
        raise ConversionError("ema=True needs a full checkpoint {'model': ..., 'ema': ...}, got a bare state dict")
    else:
        state = strip_prefix(checkpoint)
    state = {k: np.asarray(v) for k, v in state.items()}
    if not ema:
        return state
    if "ema" not in checkpoint or "shadow_params" not in checkpoint["ema"]:
        raise ConversionError("ema=True but the checkpoint has no 'ema' entry with 'shadow_params'")
    shadow = [np.asarray(p) for p in checkpoint["ema"]["shadow_params"]]
    trainable = [n for n in state if n not in BUFFERS and not _is_fourier_w(n, np.ndim(state[n]))]
    if len(shadow) != len(trainable):
        raise ConversionError(
            f"the EMA holds {len(shadow)} tensors but the model has {len(trainable)} trainable entries "
            f"(state dict without buffers {BUFFERS} and the Fourier projection W)"
        )
    out = dict(state)
    for name, value in zip(trainable, shadow):
        if value.shape != state[name].shape:
            raise ConversionError(
                f"EMA tensor for {name!r} has shape {value.shape}, the model's has {state[name].shape}; "
                f"the shadow list does not follow the state-dict order"
            )
        out[name] = value
    return out


def _is_fourier_w(name: str, ndim: int) -> bool:
    # GaussianFourierProjection.W: a 1-D 'W' directly under a top-level unit (NIN.W is 2-D).
    return re.fullmatch(r"all_modules\.\d+\.W", name) is not None and ndim == 1


# --------------------------------------------------------------------------------------------
# Flax structure
# --------------------------------------------------------------------------------------------


def _example_inputs(module: nn.Module, input_shape: Sequence[int]) -> tuple[tuple, dict]:
    x = jnp.zeros(tuple(input_shape), jnp.float32)
    labels = jnp.ones((input_shape[0],), jnp.float32)
    kwargs = {}
    if getattr(module, "cross_attn_resolutions", ()):
        dim = getattr(module, "context_dim", None) or 1
        kwargs["context"] = jnp.zeros((input_shape[0], 1, dim), jnp.float32)
    return (x, labels), kwargs


class ParamShapes(NamedTuple):
    """The parameter structure of a network: ``params``, the tree of ``jax.ShapeDtypeStruct``
    leaves, and ``order``, the names of its top-level submodules in call order."""

    params: dict
    order: list[str]


def flax_param_shapes(module: nn.Module, input_shape: Sequence[int]) -> ParamShapes:
    """The :class:`ParamShapes` ``(params, order)`` of ``module``, without allocating weights."""
    order: list[str] = []

    def record(next_fun, args, kwargs, context):
        scope = context.module.scope
        path = tuple(scope.path) if scope is not None else ()
        if len(path) == 1 and path[0] not in order:
            order.append(path[0])
        return next_fun(*args, **kwargs)

    args, kwargs = _example_inputs(module, input_shape)
    with nn.intercept_methods(record):
        variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
    return ParamShapes(params=variables["params"], order=order)


def count_params(module: nn.Module, input_shape: Sequence[int]) -> int:
    """Number of parameters (including the fixed Fourier projection), via ``jax.eval_shape``."""
    params = flax_param_shapes(module, input_shape).params
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(params)))


# --------------------------------------------------------------------------------------------
# Name mapping
# --------------------------------------------------------------------------------------------

Translate = Callable[[str], str]  # torch sub-module path ('conv2.conv') -> flax path ('ConvMeanPool_0/Conv_0')


def _leaf(torch_leaf: str, ndim: int) -> tuple[str, str]:
    """PyTorch parameter name -> (Flax parameter name, layout)."""
    if torch_leaf == "weight":
        if ndim == 4:
            return "kernel", "conv"
        if ndim == 2:
            return "kernel", "dense"
        return "scale", "same"  # normalisation layers
    return torch_leaf, "same"  # bias, NIN W/b, Fourier W, InstanceNorm++ alpha/gamma/beta


def _units_sequential(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """Groups ``all_modules.<i>.*`` names by unit, ordered by ``i``; returns (units, unexpected)."""
    units: dict[int, str] = {}
    unexpected = []
    for n in names:
        m = re.match(r"(all_modules\.(\d+))\.", n)
        if m:
            units[int(m.group(2))] = m.group(1)
        else:
            unexpected.append(n)
    return [units[i] for i in sorted(units)], unexpected


def _identity(path: str) -> str:
    return path.replace(".", "/")


def _plan_sequential(module, names, flax_order):
    units, unexpected = _units_sequential(names)
    if unexpected:
        raise ConversionError(
            f"unexpected PyTorch entry {unexpected[0]!r} for {type(module).__name__}: score_sde's "
            f"NCSN++/DDPM keep every layer under 'all_modules.<i>.'"
        )
    return [(u, f, _identity) for u, f in zip(units, flax_order)], units, flax_order


def _ncsnv2_block_translate(resample, dilation, changes_dim) -> Translate:
    if resample == "down" and dilation == 1:
        table = {"conv1": "Conv_0", "conv2.conv": "ConvMeanPool_0/Conv_0", "shortcut.conv": "ConvMeanPool_1/Conv_0"}
    elif resample == "down":
        table = {"conv1": "Conv_0", "conv2": "Conv_1", "shortcut": "Conv_2"}
    elif changes_dim:
        table = {"shortcut": "Conv_0", "conv1": "Conv_1", "conv2": "Conv_2"}
    else:
        table = {"conv1": "Conv_0", "conv2": "Conv_1"}
    table = dict(table, normalize1="InstanceNorm2dPlus_0", normalize2="InstanceNorm2dPlus_1")

    def translate(path: str) -> str:
        if path not in table:
            raise KeyError(path)
        return table[path]

    return translate


def _ncsnv2_refine_translate(n_inputs: int) -> Translate:
    def rcu_conv(b: str, s: str) -> str:
        return f"Conv_{(int(b) - 1) * 2 + int(s) - 1}"

    def translate(path: str) -> str:
        m = re.fullmatch(r"adapt_convs\.(\d+)\.(\d+)_(\d+)_conv", path)
        if m:
            return f"RCUBlock_{m.group(1)}/{rcu_conv(m.group(2), m.group(3))}"
        m = re.fullmatch(r"output_convs\.(\d+)_(\d+)_conv", path)
        if m:
            return f"RCUBlock_{n_inputs}/{rcu_conv(m.group(1), m.group(2))}"
        m = re.fullmatch(r"(msf|crp)\.convs\.(\d+)", path)
        if m:
            return f"{'MSFBlock' if m.group(1) == 'msf' else 'CRPBlock'}_0/Conv_{m.group(2)}"
        raise KeyError(path)

    return translate


def _plan_ncsnv2(module, names, flax_order):
    units: list[tuple[str, Translate]] = [("begin_conv", _identity)]
    dim = module.nf
    for stage, blocks in module.STAGES:
        for j, (mult, resample, dilation) in enumerate(blocks):
            out = module.nf * mult
            units.append((f"{stage}.{j}", _ncsnv2_block_translate(resample, dilation, out != dim)))
            dim = out
    for i, (refine, _) in enumerate(module.REFINES):
        units.append((refine, _ncsnv2_refine_translate(1 if i == 0 else 2)))
    units += [("normalizer", _identity), ("end_conv", _identity)]
    known = tuple(u for u, _ in units)
    unexpected = [n for n in names if not any(n.startswith(u + ".") for u in known)]
    if unexpected:
        raise ConversionError(
            f"unexpected PyTorch entry {unexpected[0]!r} for {type(module).__name__}; its units are {known}"
        )
    torch_units = [u for u, _ in units]
    plan = [(u, f, t) for (u, t), f in zip(units, flax_order)]
    return plan, torch_units, flax_order


def _unused_ncsnpp(module) -> Callable[[str], bool]:
    # With conditional=False the PyTorch port still creates each residual block's Dense_0 (never
    # applied, because temb is None); score_sde's Flax blocks and ours do not have it.
    if module.conditional:
        return lambda name: False
    return lambda name: re.fullmatch(r"all_modules\.\d+\.Dense_0\.(weight|bias)", name) is not None


def _unused_ddpm(module) -> Callable[[str], bool]:
    if not module.conditional:
        raise ConversionError(
            "score_sde_pytorch's DDPM ignores conditional=False (it always embeds the labels), while "
            "ours drops the embedding; build the DDPM with conditional=True to load PyTorch weights"
        )
    return lambda name: False


def _unused_none(module) -> Callable[[str], bool]:
    return lambda name: False


# Network class -> (unit pairing, PyTorch entries without a counterpart). Looked up along the MRO.
_SCHEMES: dict[type, tuple[Callable, Callable]] = {
    NCSNpp: (_plan_sequential, _unused_ncsnpp),
    DDPM: (_plan_sequential, _unused_ddpm),
    NCSNv2: (_plan_ncsnv2, _unused_none),
}


def _scheme(module: nn.Module):
    for cls in type(module).__mro__:
        if cls in _SCHEMES:
            return _SCHEMES[cls]
    raise ConversionError(
        f"no PyTorch name mapping for {type(module).__name__}; supported: {', '.join(c.__name__ for c in _SCHEMES)}"
    )


def torch_to_flax_mapping(
    module: nn.Module,
    torch_shapes: Mapping[str, Sequence[int]],
    input_shape: Sequence[int],
    *,
    structure: ParamShapes | None = None,
) -> list[TensorMapping]:
    """Pairs every PyTorch tensor (``{name: shape}``, buffers allowed) with one Flax leaf of
    ``module`` (initialised for inputs of ``input_shape``) and checks the shapes.
    ``structure`` may pass a precomputed :func:`flax_param_shapes` result.

    Raises :class:`ConversionError` naming the first PyTorch entry and Flax path that disagree.
    """
    if getattr(module, "num_classes", 0) or getattr(module, "cross_attn_resolutions", ()):
        raise ConversionError(
            "score_sde checkpoints have no class embedding or cross-attention; build the network with "
            "num_classes=0 and cross_attn_resolutions=() to convert them"
        )
    torch_shapes = {n: tuple(s) for n, s in strip_prefix(torch_shapes).items() if n not in BUFFERS}
    plan_fn, unused_fn = _scheme(module)
    is_unused = unused_fn(module)
    names = [n for n in torch_shapes if not is_unused(n)]
    params, order = structure if structure is not None else flax_param_shapes(module, input_shape)
    flat = {tuple(k): v for k, v in traverse_util.flatten_dict(params).items()}
    tops_with_params = [name for name in order if name in params]
    plan, torch_units, flax_units = plan_fn(module, names, tops_with_params)
    if len(torch_units) != len(flax_units):
        i = min(len(torch_units), len(flax_units))
        t = torch_units[i] if i < len(torch_units) else "<none>"
        f = flax_units[i] if i < len(flax_units) else "<none>"
        raise ConversionError(
            f"{len(torch_units)} PyTorch layers vs {len(flax_units)} Flax submodules with parameters; "
            f"the first unpaired ones are PyTorch {t!r} and Flax {f!r} "
            f"(is the network built with the checkpoint's config?)"
        )

    by_unit: dict[str, list[str]] = {}
    for n in names:
        for unit, _, _ in plan:
            if n.startswith(unit + "."):
                by_unit.setdefault(unit, []).append(n)
                break

    mappings: list[TensorMapping] = []
    used: set[tuple[str, ...]] = set()
    for unit, flax_top, translate in plan:
        for name in by_unit.get(unit, []):
            rest = name[len(unit) + 1 :]
            sub, _, leaf = rest.rpartition(".")
            shape = torch_shapes[name]
            flax_leaf, layout = _leaf(leaf, len(shape))
            try:
                sub_path = translate(sub) if sub else ""
            except KeyError:
                raise ConversionError(
                    f"PyTorch entry {name!r} has no counterpart in Flax submodule {flax_top!r}"
                ) from None
            path = (flax_top,) + (tuple(sub_path.split("/")) if sub_path else ()) + (flax_leaf,)
            if path not in flat:
                raise ConversionError(
                    f"PyTorch entry {name!r} maps to Flax path {'/'.join(path)!r}, which the network does not have"
                )
            m = TensorMapping(name, path, layout, trainable=not _is_fourier_w(name, len(shape)))
            if m.converted_shape(shape) != tuple(flat[path].shape):
                raise ConversionError(
                    f"shape mismatch: PyTorch {name!r} {shape} -> {m.converted_shape(shape)} but Flax "
                    f"{'/'.join(path)!r} is {tuple(flat[path].shape)}"
                )
            if path in used:
                raise ConversionError(f"two PyTorch entries map to Flax {'/'.join(path)!r} (second: {name!r})")
            used.add(path)
            mappings.append(m)
    missing = [p for p in flat if p not in used]
    if missing:
        raise ConversionError(f"Flax parameter {'/'.join(missing[0])!r} has no PyTorch entry ({len(missing)} missing)")
    return mappings


def convert_state_dict(
    module: nn.Module, state_dict: Mapping[str, Any], *, input_shape: Sequence[int], dtype=np.float32
) -> dict:
    """Converts a score_sde_pytorch state dict (``{name: array}``) to ``module``'s ``params``."""
    state = {n: np.asarray(v) for n, v in strip_prefix(state_dict).items()}
    mappings = torch_to_flax_mapping(module, {n: v.shape for n, v in state.items()}, input_shape)
    flat = {m.flax_path: np.asarray(m.apply(state[m.torch_name]), dtype=dtype) for m in mappings}
    return traverse_util.unflatten_dict(flat)


def convert_checkpoint(
    module: nn.Module, checkpoint: Mapping[str, Any], *, input_shape: Sequence[int], ema: bool = False
) -> dict:
    """``params`` from a score_sde_pytorch checkpoint dict (or bare state dict); ``ema=True``
    takes the exponential-moving-average weights."""
    return convert_state_dict(module, state_dict_from_checkpoint(checkpoint, ema=ema), input_shape=input_shape)


# --------------------------------------------------------------------------------------------
# score_sde (JAX) checkpoints
# --------------------------------------------------------------------------------------------


def load_score_sde_flax_params(
    module: nn.Module, state: Mapping[str, Any], *, input_shape: Sequence[int], ema: bool = True
) -> dict:
    """``params`` from a restored score_sde (JAX) training state.

    ``state`` is the nested dict that ``flax.serialization.msgpack_restore`` returns for a
    ``flax.training.checkpoints`` file of score_sde: ``{'step', 'optimizer': {'target': params,
    'state': ...}, 'lr', 'model_state', 'ema_rate', 'params_ema', 'rng'}``. ``ema=True`` takes
    ``params_ema``, otherwise ``optimizer.target``. A bare params tree is accepted too.

    The tree must match ``module``'s exactly (same submodule names and shapes); InstanceNorm++
    parameters stored as ``(1, 1, 1, C)`` are reshaped to our ``(C,)``. See
    ``docs/score_sde_jax_checkpoints.md`` for which networks this covers.
    """
    if "params_ema" in state or "optimizer" in state:
        key = "params_ema" if ema else "optimizer"
        if key not in state:
            raise ConversionError(f"the restored state has no {key!r} entry; keys: {sorted(state)}")
        tree = state["params_ema"] if ema else state["optimizer"].get("target")
        if tree is None:
            raise ConversionError("the restored state's 'optimizer' entry has no 'target' (the parameters)")
    else:
        tree = state
    expected = flax_param_shapes(module, input_shape).params
    want = {tuple(k): v for k, v in traverse_util.flatten_dict(expected).items()}
    got = {tuple(k): np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree)).items()}
    for path in got:
        if path not in want:
            raise ConversionError(f"checkpoint parameter {'/'.join(path)!r} does not exist in {type(module).__name__}")
    out = {}
    for path, leaf in want.items():
        if path not in got:
            raise ConversionError(
                f"{type(module).__name__} parameter {'/'.join(path)!r} is missing from the checkpoint"
            )
        value = got[path]
        if (
            value.shape != tuple(leaf.shape)
            and value.size == int(np.prod(leaf.shape))
            and value.shape[:-1] == (1, 1, 1)
        ):
            value = value.reshape(leaf.shape)  # score_sde's InstanceNorm++ keeps (1, 1, 1, C)
        if value.shape != tuple(leaf.shape):
            raise ConversionError(
                f"shape mismatch for {'/'.join(path)!r}: checkpoint {value.shape}, network {tuple(leaf.shape)}"
            )
        out[path] = value.astype(leaf.dtype)
    return traverse_util.unflatten_dict(out)


# --------------------------------------------------------------------------------------------
# Reading state dicts (safetensors, npz, weights-only PyTorch files)
# --------------------------------------------------------------------------------------------

# safetensors dtype names -> numpy dtypes (bfloat16 through ml_dtypes, which jax depends on).
_SAFETENSORS_DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _safetensors_dtype(name: str) -> Any:
    if name == "BF16":
        import ml_dtypes  # noqa: PLC0415 (a dependency of jax)

        return ml_dtypes.bfloat16
    if name not in _SAFETENSORS_DTYPES:
        raise ValueError(
            f"safetensors dtype {name!r} is not supported; supported: BF16, {', '.join(_SAFETENSORS_DTYPES)}"
        )
    return _SAFETENSORS_DTYPES[name]


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a ``.safetensors`` file into ``{name: numpy array}`` (copies, native byte order).

    The format: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
    ``{name: {'dtype', 'shape', 'data_offsets': [begin, end]}, '__metadata__': {...}}``, then the
    tensors' little-endian bytes, offsets relative to the end of the header. Needs only numpy.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a safetensors file (its header is not JSON: {err})") from None
        data = f.read()
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = np.dtype(_safetensors_dtype(info["dtype"])).newbyteorder("<")
        shape = tuple(info["shape"])
        if end > len(data) or (end - begin) != dtype.itemsize * math.prod(shape):
            raise ValueError(f"{path}: tensor {name!r} {info['dtype']}{list(shape)} has inconsistent offsets")
        out[name] = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=begin).reshape(shape).copy()
    return out


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, Any], *, metadata: Mapping[str, str] | None = None
) -> None:
    """Writes ``{name: array}`` as a ``.safetensors`` file (the layout :func:`read_safetensors`
    reads): tensors in the given order, little-endian, the JSON header padded with spaces to a
    multiple of 8 bytes (as the format asks, so every tensor starts aligned)."""
    names = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
    names[np.dtype(ml_dtypes.bfloat16)] = "BF16"
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    blobs, offset = [], 0
    for name, value in tensors.items():
        array = np.asarray(value)
        if array.dtype.newbyteorder("=") not in names:
            raise ValueError(f"write_safetensors: tensor {name!r} has dtype {array.dtype}, which safetensors lacks")
        dtype = array.dtype.newbyteorder("=")
        blob = np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": names[dtype], "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(os.fspath(path), "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def read_state_dict(source: Mapping[str, Any] | str | os.PathLike) -> dict[str, np.ndarray]:
    """``{name: numpy array}`` from a state dict (numpy arrays or torch tensors) or a file:
    ``.safetensors`` (read with numpy only), ``.npz``, or a weights-only PyTorch file
    (``.pth``/``.pt``/``.bin``, read with :func:`load_torch_checkpoint`,
    which needs torch). A ``{'state_dict': ...}`` wrapper is unwrapped and ``module.`` prefixes are
    removed."""

    loaded: Any = source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if path.endswith(".safetensors"):
            loaded = read_safetensors(path)
        elif path.endswith(".npz"):
            with np.load(path) as data:
                loaded = {k: data[k] for k in data.files}
        else:
            loaded = load_torch_checkpoint(path)
    if not isinstance(loaded, Mapping):
        raise TypeError(f"expected a state dict or a path to one, got {type(loaded).__name__}")
    if "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]
    out = {}
    for name, value in strip_prefix(loaded).items():
        if hasattr(value, "detach"):  # a torch tensor (numpy has no bfloat16: widen it)
            value = value.detach().cpu()
            value = (value.float() if str(value.dtype) == "torch.bfloat16" else value).numpy()
        out[name] = np.asarray(value)
    return out
