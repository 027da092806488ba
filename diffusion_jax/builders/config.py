"""The experiment configuration: its schema (every key, with its default) and its validation.

Config files (``configs/**.py``) start from :func:`default_config` and override fields, as in
score_sde, whose key names are kept where they exist. :func:`validate_config` runs when a run
starts: an unknown key, an unknown name or an impossible value stops the run with one message
(:class:`ConfigError`) that says what is allowed.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

__all__ = ["ConfigError", "default_config", "validate_config", "config_to_dict", "config_diff", "load_config"]


class ConfigError(ValueError):
    """A configuration problem a researcher can act on; the CLI prints it without a traceback."""


def default_config() -> ml_collections.ConfigDict:
    """Every key a config may set, with its default (score_sde's names and defaults where they exist)."""
    config = ml_collections.ConfigDict()
    config.seed = 42

    config.training = training = ml_collections.ConfigDict()
    training.batch_size = 128  # global batch over all devices and hosts
    training.n_iters = 1300001  # optimizer steps
    training.snapshot_freq = 50000  # kept checkpoint series
    training.log_freq = 50
    training.eval_freq = 100
    training.snapshot_freq_for_preemption = 10000  # the frequent "latest" checkpoint
    training.snapshot_sampling = True  # sample grid at every snapshot
    training.n_jitted_steps = 1  # optimizer steps per jitted call
    training.sde = "vesde"
    training.continuous = True
    training.reduce_mean = False
    training.likelihood_weighting = False  # score_sde's switch; same as weighting = "likelihood"
    training.weighting = "sigma2"  # losses.WEIGHTINGS
    training.time_sampler = "uniform"  # losses.TIME_SAMPLERS
    training.eps = 1e-5  # smallest training time (score_sde: 1e-5 for every SDE)
    training.min_snr_gamma = 5.0
    training.p_mean = -1.2  # EDM log-normal time sampler
    training.p_std = 1.2
    training.grad_accum_steps = 1  # micro-batches per optimizer step
    training.nan_policy = "skip"  # skip | stop: what a non-finite loss or gradient does
    training.max_consecutive_nan = 20  # with "skip": stop after this many in a row
    training.max_to_keep = 2  # recent preemption checkpoints kept besides the snapshot series
    training.async_checkpointing = True
    training.class_dropout = 0.1  # classifier-free guidance: label-drop probability (class-conditional models)
    training.snapshot_samples = 64  # images in the snapshot sample grid

    config.sampling = sampling = ml_collections.ConfigDict()
    # Keys set to None use the chosen sampler's own default.
    sampling.method = "pc"  # samplers.SAMPLERS
    sampling.predictor = "euler_maruyama"  # pc: samplers.PREDICTORS
    sampling.corrector = "none"  # pc: samplers.CORRECTORS
    sampling.n_steps_each = 1  # pc: corrector steps per predictor step
    sampling.noise_removal = True  # final denoising step (score_sde); the samplers' `denoise`
    sampling.probability_flow = False  # pc: predictor on the probability-flow ODE
    sampling.snr = 0.16  # pc: Langevin signal-to-noise ratio
    sampling.num_steps = 0  # 0: the SDE's N (score_sde's num_scales), or 1000
    sampling.grid = ""  # "": the sampler's default; else samplers.GRIDS
    sampling.rho = 7.0  # karras grid
    sampling.rtol = 1e-5  # ode
    sampling.atol = 1e-5  # ode
    sampling.ode_solver = "dopri5"  # ode: dopri5 | tsit5
    sampling.eta = placeholder(float)  # ddim / ddpm / sde_dpmpp_2m noise scale
    sampling.s_churn = placeholder(float)  # heun / edm (Karras et al. 2022, Alg. 2)
    sampling.s_tmin = placeholder(float)
    sampling.s_tmax = placeholder(float)
    sampling.s_noise = placeholder(float)
    sampling.order = placeholder(int)  # unipc / ipndm / dpm-solver order where selectable
    sampling.thresholding = "none"  # none | static | dynamic (samplers that predict data)
    sampling.dynamic_threshold_p = 0.995
    sampling.guidance_scale = 0.0  # classifier-free guidance weight (class-conditional models)
    sampling.batch_size = 64  # samples per sampler call in eval / sample modes

    config.eval = evaluate = ml_collections.ConfigDict()
    evaluate.begin_ckpt = 0  # first checkpoint step to evaluate (0: all)
    evaluate.end_ckpt = -1  # last (-1: latest)
    evaluate.batch_size = 512
    evaluate.enable_loss = True
    evaluate.enable_sampling = False
    evaluate.num_samples = 64
    evaluate.enable_bpd = False
    evaluate.bpd_dataset = "test"
    evaluate.bpd_num_probes = 1
    evaluate.bpd_estimator = "hutchinson_rademacher"
    evaluate.bpd_rtol = 1e-5
    evaluate.bpd_atol = 1e-5
    evaluate.bpd_max_examples = 0  # 0: the whole split
    evaluate.bpd_dequantization_draws = 1

    config.data = data = ml_collections.ConfigDict()
    data.dataset = "digits"  # data.DATASETS (case-insensitive; score_sde's CIFAR10, SVHN, CELEBA, LSUN too)
    data.data_dir = ""  # "" : $DIFFUSION_JAX_DATA_DIR or TFDS's default
    data.image_size = 8
    data.num_channels = 1
    data.random_flip = False
    data.centered = True
    data.uniform_dequantization = False
    data.category = ""  # LSUN category
    data.folder_path = ""  # image-folder data set
    data.num_levels = placeholder(int)  # requantise to fewer grey levels (None: the data's own)
    data.seed = placeholder(int)  # None: config.seed
    data.num_threads = placeholder(int)  # Grain read threads (None: automatic)
    data.num_workers = 0  # Grain worker processes
    data.shuffle_buffer = placeholder(int)  # accepted for score_sde configs; epochs are exact permutations
    data.tfrecords_path = ""  # score_sde's FFHQ / CelebA-HQ: not supported (needs TensorFlow)

    config.model = model = ml_collections.ConfigDict()
    model.name = "ncsnpp"
    model.output = ""  # "" : score_sde's convention for the SDE; else parametrization.OUTPUTS
    model.noise_cond = ""  # "" : score_sde's convention; else parametrization.NOISE_CONDITIONINGS
    model.sigma_data = 0.5
    model.sigma_min = 0.01
    model.sigma_max = 50.0
    model.num_scales = 1000
    model.beta_min = 0.1
    model.beta_max = 20.0
    model.cosine_s = 0.008
    model.T = 0.0  # 0: the SDE's default end time
    model.sampling_eps = 0.0  # 0: the SDE's default t_min
    model.ema_rate = 0.9999
    model.ema_warmup = False
    model.dropout = 0.1
    model.embedding_type = "fourier"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 4
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = True
    model.fir_kernel = (1, 3, 3, 1)
    model.skip_rescale = True
    model.resblock_type = "biggan"
    model.progressive = "none"
    model.progressive_input = "residual"
    model.progressive_combine = "sum"
    model.attention_type = "ddpm"
    model.init_scale = 0.0
    model.fourier_scale = 16.0
    model.conv_size = 3
    model.scale_by_sigma = True
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.num_classes = 0  # > 0: class-conditional with a reserved null label
    model.cross_attn_resolutions = ()
    model.context_dim = placeholder(int)  # None: no cross-attention context; else >= 1
    model.remat = False
    model.dtype = "float32"  # compute dtype; parameters stay float32

    config.optim = optim = ml_collections.ConfigDict()
    optim.optimizer = "Adam"
    optim.lr = 2e-4
    optim.beta1 = 0.9
    optim.beta2 = 0.999
    optim.eps = 1e-8
    optim.weight_decay = 0.0
    optim.warmup = 5000
    optim.grad_clip = 1.0

    config.distributed = dist = ml_collections.ConfigDict()
    dist.coordinator_address = ""  # "" : from the environment (TPU pods, SLURM) or single process
    dist.num_processes = 0
    dist.process_id = -1
    dist.initialization_timeout = 300
    return config


def load_config(path: str, relative_to: str | None = None) -> ml_collections.ConfigDict:
    """``get_config()`` of the config file at ``path`` (relative to the file ``relative_to``,
    e.g. ``__file__``): how a variant config starts from its base without import paths."""
    import os
    import runpy

    if relative_to is not None:
        path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
    if not os.path.exists(path):
        raise ConfigError(f"config file {path} does not exist")
    module = runpy.run_path(path)
    if "get_config" not in module:
        raise ConfigError(f"config file {path} defines no get_config()")
    return module["get_config"]()


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    return config.to_dict()


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, path + "."))
        else:
            out[path] = v
    return out


def config_diff(
    a: ml_collections.ConfigDict | dict, b: ml_collections.ConfigDict | dict, keys: Iterable[str] | None = None
) -> list[str]:
    """Dotted keys whose values differ between two configs (restricted to prefixes ``keys``)."""
    fa = _flatten(a if isinstance(a, dict) else a.to_dict())
    fb = _flatten(b if isinstance(b, dict) else b.to_dict())
    names = sorted(set(fa) | set(fb))
    if keys is not None:
        keys = tuple(keys)
        names = [n for n in names if any(n == k or n.startswith(k + ".") for k in keys)]

    def norm(v):
        return list(v) if isinstance(v, (tuple, list)) else v

    return [n for n in names if norm(fa.get(n, "<missing>")) != norm(fb.get(n, "<missing>"))]


def _unknown_keys(config: dict, schema: dict, prefix: str = "") -> list[str]:
    problems = []
    for k, v in config.items():
        path = f"{prefix}{k}"
        if k not in schema:
            close = difflib.get_close_matches(k, list(schema), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            valid = ", ".join(sorted(schema))
            problems.append(f"unknown key {path!r}{hint}; valid keys in {prefix.rstrip('.') or 'the config'}: {valid}")
        elif isinstance(schema[k], dict):
            if not isinstance(v, dict):
                problems.append(f"{path!r} must be a section (ConfigDict), got {v!r}")
            else:
                problems.extend(_unknown_keys(v, schema[k], path + "."))
    return problems


def _one_of(name: str, allowed: Iterable[str]) -> Callable[[Any], str | None]:
    allowed = list(allowed)
    lowered = {a.lower() for a in allowed}

    def check(value):
        if not isinstance(value, str) or value.lower() not in lowered:
            return f"{name} = {value!r} is not allowed; valid: {', '.join(allowed)}"
        return None

    return check


def _positive(name: str, *, allow_zero: bool = False):
    def check(value):
        ok = isinstance(value, (int, float)) and (value >= 0 if allow_zero else value > 0)
        return None if ok else f"{name} = {value!r} must be {'>= 0' if allow_zero else '> 0'}"

    return check


def validate_config(config: ml_collections.ConfigDict, *, registries: dict[str, Iterable[str]] | None = None) -> None:
    """Check a config against the schema and the library's registries; raise one ConfigError
    listing every problem found.

    ``registries`` maps "sde", "model", "sampler", "dataset", "weighting", "time_sampler",
    "predictor", "corrector", "grid" to their valid names (the builders pass them in, so this
    module does not import the library).
    """
    cfg = config.to_dict()
    problems = _unknown_keys(cfg, default_config().to_dict())
    registries = registries or {}
    checks: dict[str, Callable[[Any], str | None]] = {
        "training.batch_size": _positive("training.batch_size"),
        "training.n_iters": _positive("training.n_iters", allow_zero=True),
        "training.snapshot_freq": _positive("training.snapshot_freq"),
        "training.snapshot_freq_for_preemption": _positive("training.snapshot_freq_for_preemption"),
        "training.log_freq": _positive("training.log_freq"),
        "training.eval_freq": _positive("training.eval_freq"),
        "training.n_jitted_steps": _positive("training.n_jitted_steps"),
        "training.grad_accum_steps": _positive("training.grad_accum_steps"),
        "training.nan_policy": _one_of("training.nan_policy", ["skip", "stop"]),
        "training.eps": _positive("training.eps"),
        "training.max_to_keep": _positive("training.max_to_keep"),
        "training.class_dropout": lambda v: None if 0 <= v < 1 else f"training.class_dropout = {v!r} must be in [0, 1)",
        "eval.batch_size": _positive("eval.batch_size"),
        "sampling.batch_size": _positive("sampling.batch_size"),
        "sampling.num_steps": _positive("sampling.num_steps", allow_zero=True),
        "sampling.rtol": _positive("sampling.rtol"),
        "sampling.atol": _positive("sampling.atol"),
        "sampling.ode_solver": _one_of("sampling.ode_solver", ["dopri5", "tsit5"]),
        "sampling.n_steps_each": _positive("sampling.n_steps_each"),
        "sampling.snr": _positive("sampling.snr", allow_zero=True),
        "sampling.thresholding": _one_of("sampling.thresholding", ["none", "static", "dynamic"]),
        "optim.optimizer": _one_of("optim.optimizer", ["Adam", "AdamW"]),
        "optim.lr": _positive("optim.lr"),
        "optim.warmup": _positive("optim.warmup", allow_zero=True),
        "model.ema_rate": lambda v: None if 0 <= v < 1 else f"model.ema_rate = {v!r} must be in [0, 1)",
        "model.dtype": _one_of("model.dtype", ["float32", "bfloat16"]),
        "model.dropout": lambda v: None if 0 <= v < 1 else f"model.dropout = {v!r} must be in [0, 1)",
        "data.image_size": _positive("data.image_size"),
        "data.num_channels": _positive("data.num_channels"),
    }
    for key, registry in (
        ("training.sde", "sde"),
        ("model.name", "model"),
        ("sampling.method", "sampler"),
        ("data.dataset", "dataset"),
        ("training.weighting", "weighting"),
        ("training.time_sampler", "time_sampler"),
        ("sampling.predictor", "predictor"),
        ("sampling.corrector", "corrector"),
        ("sampling.grid", "grid"),
        ("model.output", "output"),
        ("model.noise_cond", "noise_cond"),
    ):
        if registry in registries:
            names = list(registries[registry])
            if key in ("model.output", "model.noise_cond", "sampling.grid"):
                names = [""] + names
            checks[key] = _one_of(key, names)
    flat = _flatten(cfg)
    for key, check in checks.items():
        if key in flat:
            try:
                msg = check(flat[key])
            except TypeError:
                msg = f"{key} = {flat[key]!r} has the wrong type"
            if msg:
                problems.append(msg)
    if flat.get("training.likelihood_weighting") and flat.get("training.weighting") not in ("sigma2", "likelihood"):
        problems.append(
            "training.likelihood_weighting = True conflicts with training.weighting = "
            f"{flat.get('training.weighting')!r}; set only one of them"
        )
    grad_clip = flat.get("optim.grad_clip")
    if grad_clip is not None and not isinstance(grad_clip, (int, float)):
        problems.append(f"optim.grad_clip = {grad_clip!r} must be a number (< 0 disables clipping)")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
