"""Builds a score network from an ml_collections config (the only model code that reads a config).

Reads ``config.model.*`` with score_sde's key names and ``config.data.{image_size, num_channels,
centered}``. Keys this project added (absent from score_sde's configs) are optional and default to
"off": ``num_classes`` (0 = unconditional), ``cross_attn_resolutions`` (``()``), ``cross_attn_heads``
(1), ``context_dim`` (None), ``remat`` (False), ``dtype`` ('float32'). Every value is checked; a bad
one raises ``ValueError`` naming the key and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import MODELS
from diffusion_jax.models.layers import ACTIVATIONS

__all__ = ["build_model", "model_input_shape", "OPTIONAL_MODEL_KEYS"]

# Keys added by diffusion_jax, with their defaults (one place, so old score_sde configs build).
OPTIONAL_MODEL_KEYS: dict[str, Any] = {
    "num_classes": 0,
    "cross_attn_resolutions": (),
    "cross_attn_heads": 1,
    "context_dim": None,
    "remat": False,
    "dtype": "float32",
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class _Section:
    """Typed, checked reads of one config section (``config.model`` or ``config.data``)."""

    def __init__(self, config: Any, section: str):
        self.prefix = f"config.{section}"
        try:
            self.cfg = config[section] if isinstance(config, Mapping) else getattr(config, section)
        except (KeyError, AttributeError):
            raise ValueError(f"the config has no '{section}' section") from None

    def _raw(self, key: str, needed_by: str, default: Any = ...) -> Any:
        cfg = self.cfg
        try:
            present = key in cfg
        except TypeError:
            present = hasattr(cfg, key)
        if not present:
            if default is ...:
                raise ValueError(f"{self.prefix} is missing the key '{key}' (needed by {needed_by})")
            return default
        return cfg[key] if isinstance(cfg, Mapping) else getattr(cfg, key)

    def fail(self, key: str, expected: str, value: Any):
        raise ValueError(f"{self.prefix}.{key}: expected {expected}, got {value!r}")

    def int(self, key: str, needed_by: str, *, minimum: int | None = None, default: Any = ...) -> int:
        v = self._raw(key, needed_by, default)
        if not _is_int(v):
            self.fail(key, "an integer", v)
        v = int(v)
        if minimum is not None and v < minimum:
            self.fail(key, f"an integer >= {minimum}", v)
        return v

    def optional_int(self, key: str, needed_by: str, *, minimum: int, default: Any) -> int | None:
        v = self._raw(key, needed_by, default)
        if v is None:
            return None
        if not _is_int(v) or v < minimum:
            self.fail(key, f"None or an integer >= {minimum}", v)
        return int(v)

    def float(
        self,
        key: str,
        needed_by: str,
        *,
        check: Callable[[float], bool] = lambda v: True,
        expected: str = "a number",
        default: Any = ...,
    ) -> float:
        v = self._raw(key, needed_by, default)
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float, np.integer, np.floating))
            or not math.isfinite(v)
            or not check(float(v))
        ):
            self.fail(key, expected, v)
        return float(v)

    def bool(self, key: str, needed_by: str, default: Any = ...) -> bool:
        v = self._raw(key, needed_by, default)
        if not isinstance(v, bool):
            self.fail(key, "True or False", v)
        return v

    def choice(
        self, key: str, needed_by: str, allowed: Sequence[str], *, lower: bool = True, default: Any = ...
    ) -> str:
        v = self._raw(key, needed_by, default)
        if not isinstance(v, str) or (v.lower() if lower else v) not in allowed:
            self.fail(key, f"one of {tuple(allowed)}", v)
        return v.lower() if lower else v

    def int_tuple(
        self, key: str, needed_by: str, *, minimum: int = 1, allow_empty: bool = True, default: Any = ...
    ) -> tuple[int, ...]:
        v = self._raw(key, needed_by, default)
        if not isinstance(v, (list, tuple)):
            self.fail(key, "a list or tuple of integers", v)
        items = tuple(v)
        if (not items and not allow_empty) or any(not _is_int(i) or i < minimum for i in items):
            self.fail(key, f"a {'non-empty ' if not allow_empty else ''}sequence of integers >= {minimum}", v)
        return tuple(int(i) for i in items)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _positive(v: float) -> bool:
    return v > 0


def _data(config: Any, name: str) -> tuple[int, int, bool]:
    data = _Section(config, "data")
    image_size = data.int("image_size", name, minimum=1)
    channels = data.int("num_channels", name, minimum=1)
    centered = data.bool("centered", name)
    return image_size, channels, centered


def _resolutions_check(model: _Section, key: str, values: tuple[int, ...], reachable: list[int]) -> None:
    bad = [r for r in values if r not in reachable]
    if bad:
        model.fail(key, f"resolutions among the network's {tuple(reachable)}", values)


def _new_keys(model: _Section, name: str, reachable: list[int]) -> dict[str, Any]:
    d = OPTIONAL_MODEL_KEYS
    out = dict(
        num_classes=model.int("num_classes", name, minimum=0, default=d["num_classes"]),
        cross_attn_resolutions=model.int_tuple("cross_attn_resolutions", name, default=d["cross_attn_resolutions"]),
        cross_attn_heads=model.int("cross_attn_heads", name, minimum=1, default=d["cross_attn_heads"]),
        context_dim=model.optional_int("context_dim", name, minimum=1, default=d["context_dim"]),
        remat=model.bool("remat", name, default=d["remat"]),
        dtype=_DTYPES[model.choice("dtype", name, tuple(_DTYPES), default=d["dtype"])],
    )
    _resolutions_check(model, "cross_attn_resolutions", out["cross_attn_resolutions"], reachable)
    if out["cross_attn_resolutions"] and out["context_dim"] is None:
        model.fail("context_dim", "an integer >= 1 when cross_attn_resolutions is set", None)
    return out


def _unet_common(model: _Section, name: str, image_size: int) -> tuple[dict[str, Any], list[int]]:
    ch_mult = model.int_tuple("ch_mult", name, allow_empty=False)
    levels = len(ch_mult)
    if image_size % (2 ** (levels - 1)):
        raise ValueError(
            f"config.data.image_size={image_size} must be divisible by 2**(len(config.model.ch_mult) - 1) = "
            f"{2 ** (levels - 1)}"
        )
    reachable = [image_size // 2**i for i in range(levels)]
    attn = model.int_tuple("attn_resolutions", name)
    _resolutions_check(model, "attn_resolutions", attn, reachable)
    model.choice("normalization", name, ("groupnorm",))
    common = dict(
        nf=model.int("nf", name, minimum=1),
        ch_mult=ch_mult,
        num_res_blocks=model.int("num_res_blocks", name, minimum=1),
        attn_resolutions=attn,
        dropout=model.float("dropout", name, check=lambda v: 0 <= v < 1, expected="a number in [0, 1)"),
        resamp_with_conv=model.bool("resamp_with_conv", name),
        conditional=model.bool("conditional", name),
        scale_by_sigma=model.bool("scale_by_sigma", name),
        sigma_min=model.float("sigma_min", name, check=_positive, expected="a number > 0"),
        sigma_max=model.float("sigma_max", name, check=_positive, expected="a number > 0"),
        num_scales=model.int("num_scales", name, minimum=1),
        nonlinearity=model.choice("nonlinearity", name, tuple(ACTIVATIONS)),
    )
    if common["sigma_min"] >= common["sigma_max"]:
        model.fail("sigma_min", f"a value below sigma_max={common['sigma_max']}", common["sigma_min"])
    return common, reachable


def _build_ncsnpp(config: Any, cls: type[nn.Module]) -> nn.Module:
    name = "ncsnpp"
    image_size, _, centered = _data(config, name)
    model = _Section(config, "model")
    common, reachable = _unet_common(model, name, image_size)
    model.choice("attention_type", name, ("ddpm",))
    conv_size = model.int("conv_size", name)
    if conv_size != 3:
        model.fail("conv_size", "3 (score_sde's NCSN++ only implements 3x3 convolutions)", conv_size)
    fields = dict(
        common,
        fir=model.bool("fir", name),
        fir_kernel=model.int_tuple("fir_kernel", name, minimum=0, allow_empty=False),
        skip_rescale=model.bool("skip_rescale", name),
        resblock_type=model.choice("resblock_type", name, ("ddpm", "biggan")),
        progressive=model.choice("progressive", name, ("none", "output_skip", "residual")),
        progressive_input=model.choice("progressive_input", name, ("none", "input_skip", "residual")),
        progressive_combine=model.choice("progressive_combine", name, ("sum", "cat")),
        embedding_type=model.choice("embedding_type", name, ("fourier", "positional")),
        fourier_scale=model.float("fourier_scale", name, check=_positive, expected="a number > 0"),
        init_scale=model.float("init_scale", name, check=lambda v: v >= 0, expected="a number >= 0"),
        centered=centered,
        **_new_keys(model, name, reachable),
    )
    if sum(fields["fir_kernel"]) == 0:
        model.fail("fir_kernel", "FIR taps with a non-zero sum", fields["fir_kernel"])
    return cls(**fields)


def _build_ddpm(config: Any, cls: type[nn.Module]) -> nn.Module:
    name = "ddpm"
    image_size, _, centered = _data(config, name)
    model = _Section(config, "model")
    common, reachable = _unet_common(model, name, image_size)
    for mult in (1,) + common["ch_mult"]:
        if (common["nf"] * mult) % 32:
            model.fail(
                "nf", "a width whose multiples by ch_mult are divisible by 32 (DDPM uses GroupNorm(32))", common["nf"]
            )
    return cls(**common, centered=centered, **_new_keys(model, name, reachable))


def _build_ncsnv2(config: Any, cls: type[nn.Module]) -> nn.Module:
    name = "ncsnv2"
    image_size, _, centered = _data(config, name)
    model = _Section(config, "model")
    downsamplings = sum(
        1 for _, blocks in cls.STAGES for _, resample, dilation in blocks if resample == "down" and dilation == 1
    )
    if image_size % (2**downsamplings):
        raise ValueError(
            f"config.data.image_size={image_size} must be divisible by {2**downsamplings} for {cls.__name__}"
        )
    model.choice("normalization", name, ("instancenorm++",))
    for key in ("num_classes",):
        if model._raw(key, name, 0):
            model.fail(key, "0 (NCSNv2 has no class conditioning)", model._raw(key, name))
    if model._raw("cross_attn_resolutions", name, ()):
        model.fail(
            "cross_attn_resolutions", "() (NCSNv2 has no cross-attention)", model._raw("cross_attn_resolutions", name)
        )
    fields = dict(
        nf=model.int("nf", name, minimum=1),
        centered=centered,
        nonlinearity=model.choice("nonlinearity", name, tuple(ACTIVATIONS)),
        interpolation=model.choice(
            "interpolation", name, ("bilinear", "bilinear_half_pixel", "nearest_neighbor"), default="bilinear"
        ),
        scale_by_sigma=model.bool("scale_by_sigma", name, default=True),
        sigma_min=model.float("sigma_min", name, check=_positive, expected="a number > 0"),
        sigma_max=model.float("sigma_max", name, check=_positive, expected="a number > 0"),
        num_scales=model.int("num_scales", name, minimum=1),
        remat=model.bool("remat", name, default=OPTIONAL_MODEL_KEYS["remat"]),
        dtype=_DTYPES[model.choice("dtype", name, tuple(_DTYPES), default=OPTIONAL_MODEL_KEYS["dtype"])],
    )
    return cls(**fields)


# config.model.name -> builder (the model class comes from diffusion_jax.models.MODELS).
_BUILDERS: dict[str, Callable[[Any, type[nn.Module]], nn.Module]] = {
    "ncsnpp": _build_ncsnpp,
    "ddpm": _build_ddpm,
    "ncsnv2_64": _build_ncsnv2,
    "ncsnv2_128": _build_ncsnv2,
    "ncsnv2_256": _build_ncsnv2,
}


def build_model(config: Any) -> nn.Module:
    """The Flax module described by ``config.model`` and ``config.data`` (score_sde key names)."""
    model = _Section(config, "model")
    name = model._raw("name", "every model")
    if not isinstance(name, str) or name.lower() not in _BUILDERS:
        raise ValueError(f"config.model.name: unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    key = name.lower()
    return _BUILDERS[key](config, MODELS[key])


def model_input_shape(config: Any, batch_size: int = 1) -> tuple[int, int, int, int]:
    """``(batch_size, image_size, image_size, num_channels)`` from ``config.data``."""
    image_size, channels, _ = _data(config, "the input shape")
    return (batch_size, image_size, image_size, channels)
