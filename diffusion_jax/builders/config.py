"""The experiment configuration: one schema (every key, its type, default and meaning) and its checks.

Config files (``configs/**.py``) start from :func:`default_config` and override fields, as in
score_sde, whose key names are kept where they exist. :func:`validate_config` runs once when a run
starts, before any work: an unknown key, a value of the wrong type, an unknown name or an
impossible combination stops the run with one message (:class:`ConfigError`) listing every
problem and what is allowed.

Typed access at the boundary: the config stays an ``ml_collections.ConfigDict`` with this schema
beside it, rather than frozen dataclasses per section. Config files, command-line overrides
(``--config.training.batch_size=64``), score_sde's configs and the ``config.json`` of a workdir are
all dotted-key trees; one table of :class:`Key` entries types and documents every key of that
tree, so adding a key means one line here and a read in its one consumer (a dataclass per
section would repeat every key a second time). Once :func:`validate_config` has passed, a builder
may read ``config.section.key`` and rely on its type.

This module imports no JAX code: the command line can print help and check a config file
without starting JAX. Registries of names (SDEs, networks, samplers, ...) are looked up from the
library only when a config is validated.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import math
import os
import runpy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

__all__ = [
    "ConfigError",
    "Key",
    "SCHEMA",
    "SECTIONS",
    "default_config",
    "validate_config",
    "with_defaults",
    "config_diff",
    "load_config",
    "parse_override",
    "apply_overrides",
    "registries",
    "to_python",
    "markdown",
    "MUTABLE_KEYS",
    "workdir_config",
    "check_mutable",
    "ema_choice",
    "SIGMA_REL_MAX",
]

# What may differ from a workdir's stored config when its checkpoints are sampled or evaluated:
# the sampler, the evaluation, the seed, where the data and the other processes are, how `encode`
# writes latents and which autoencoder decodes them.
MUTABLE_KEYS = (
    "seed", "sampling", "eval", "distributed", "mesh", "data.data_dir", "data.num_threads", "data.num_workers",
    "autoencoder.encode_sample", "autoencoder.scale_factor", "data.autoencoder_workdir",
)  # fmt: skip


class ConfigError(ValueError):
    """A configuration problem a researcher can act on; the CLI prints it without a traceback."""


Check = Callable[[Any], "str | None"]


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key.

    path: dotted name, e.g. ``"training.batch_size"``.
    default: the value of :func:`default_config`.
    kind: ``"int"``, ``"float"``, ``"bool"``, ``"str"``, ``"ints"`` (a tuple of integers) or
        ``"floats"`` (a tuple of numbers).
    help: one line: what the key means (``docs/config.md`` is generated from it).
    optional: None is allowed (and then means what ``help`` says).
    check: a value constraint returning a message (without the key's name) or None.
    choices: allowed strings: a tuple, or the name of a library registry (see :func:`registries`).
    """

    path: str
    default: Any
    kind: str
    help: str
    optional: bool = False
    check: Check | None = None
    choices: tuple[str, ...] | str | None = None

    @property
    def section(self) -> str:
        return self.path.rpartition(".")[0]

    @property
    def name(self) -> str:
        return self.path.rpartition(".")[2]

    @property
    def type_name(self) -> str:
        base = {
            "int": "int", "float": "float", "bool": "bool", "str": "str", "ints": "tuple of int",
            "floats": "tuple of float",
        }[self.kind]  # fmt: skip
        return f"{base} or None" if self.optional else base


def _positive(v) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _unit(v) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _at_least(n: int) -> Check:
    return lambda v: None if v >= n else f"must be >= {n}"


def _all_at_least(n: int) -> Check:
    return lambda v: None if all(i >= n for i in v) else f"must hold integers >= {n}"


def _non_empty(v) -> str | None:
    return None if len(v) else "must not be empty"


# The longest power-function EMA profile, gamma = 0 (a uniform average); see training/ema.py.
SIGMA_REL_MAX = 12.0**-0.5


def _ema_rates(v) -> str | None:
    if not all(0 <= r < 1 for r in v):
        return "must hold decays in [0, 1)"
    return None if len(set(v)) == len(v) else "must not repeat a rate"


def _sigma_rels(v) -> str | None:
    if not all(0 < s <= SIGMA_REL_MAX for s in v):
        return f"must hold relative standard deviations in (0, {SIGMA_REL_MAX:.4f}] (EDM2's sigma_rel)"
    return None if len(set(v)) == len(v) else "must not repeat a value"


def ema_choice(text: str) -> tuple[str, float | None]:
    """``sampling.ema`` parsed: ``("main", None)`` for '', ``("params", None)``, ``("rate", R)``
    or ``("sigma_rel", S)``; a ValueError says what is allowed."""
    allowed = "'' (the EMA of model.ema_rate), 'params', 'rate:R' or 'sigma_rel:S'"
    text = text.strip()
    if text in ("", "params"):
        return ("main" if not text else "params"), None
    kind, colon, value = text.partition(":")
    if not colon or kind not in ("rate", "sigma_rel"):
        raise ValueError(f"must be {allowed}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number; must be {allowed}") from None
    if kind == "rate" and not 0 <= number < 1:
        raise ValueError("rate:R needs R in [0, 1)")
    if kind == "sigma_rel" and not 0 < number <= SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel:S needs S in (0, {SIGMA_REL_MAX:.4f}]")
    return kind, number


def _ema_choice_problem(v: str) -> str | None:
    try:
        ema_choice(v)
    except ValueError as e:
        return str(e)
    return None


def _mesh_size(v) -> str | None:
    return None if v == -1 or v >= 1 else "must be >= 1, or -1 for the rest of the devices"


def _rules_problem(v: str) -> str | None:
    from diffusion_jax.training.sharding import parse_rules

    try:
        parse_rules(v)
    except ValueError as e:
        return str(e)
    return None


def _K(path, default, kind, help, **kw) -> Key:  # noqa: N802 (a table constructor, read as a row)
    return Key(path, default, kind, help, **kw)


SECTIONS: dict[str, str] = {
    "": "the run as a whole",
    "training": "optimisation loop, loss and checkpoints",
    "sampling": "the sampler used for snapshots, `sample` and `eval`",
    "eval": "the `eval` mode",
    "data": "the data set and its pipeline",
    "model": "the network, its parametrization, the SDE's parameters and the EMA",
    "autoencoder": "the autoencoder of latent diffusion: its network, its training loss, and how `encode` writes "
    "latents",
    "optim": "the optimiser",
    "mesh": "the device mesh (data / fsdp / tensor) and how parameters are sharded over it (docs/training_at_scale.md)",
    "distributed": "multi-host start-up",
}

# fmt: off
SCHEMA: tuple[Key, ...] = (
    _K("seed", 42, "int", "seed of initialisation, training noise and sampling", check=_non_negative),

    # training
    _K("training.batch_size", 128, "int", "global batch over all devices and hosts", check=_positive),
    _K("training.n_iters", 1300001, "int", "optimizer steps to train", check=_non_negative),
    _K("training.snapshot_freq", 50000, "int", "steps between kept checkpoints (and sample grids)", check=_positive),
    _K("training.log_freq", 50, "int", "steps between logged metrics", check=_positive),
    _K("training.eval_freq", 100, "int", "steps between losses on an eval batch", check=_positive),
    _K("training.snapshot_freq_for_preemption", 10000, "int", "steps between the frequent 'latest' checkpoints",
       check=_positive),
    _K("training.snapshot_sampling", True, "bool", "write a sample grid at every kept checkpoint"),
    _K("training.n_jitted_steps", 1, "int", "optimizer steps per jitted call", check=_positive),
    _K("training.background_compile", True, "bool", "with n_jitted_steps > 1 on one process: start "
       "with one step per call while the n-step program compiles in a thread (runs of 200+ steps)"),
    _K("training.sde", "vesde", "str", "the SDE", choices="sde"),
    _K("training.continuous", True, "bool", "continuous-time training; False: score_sde's discrete SMLD / DDPM "
       "losses (vesde / vpsde only)"),
    _K("training.reduce_mean", False, "bool", "average the loss over dimensions instead of summing"),
    _K("training.likelihood_weighting", False, "bool", "score_sde's switch; the same as weighting = 'likelihood'"),
    _K("training.weighting", "sigma2", "str", "loss weighting over time", choices="weighting"),
    _K("training.time_sampler", "uniform", "str", "how training times are drawn", choices="time_sampler"),
    _K("training.eps", 1e-5, "float", "smallest training time (uniform / stratified / importance samplers)",
       check=_positive),
    _K("training.min_snr_gamma", 5.0, "float", "gamma of the min_snr weighting", check=_positive),
    _K("training.p_mean", -1.2, "float", "mean of ln(sigma) of the lognormal time sampler (EDM)"),
    _K("training.p_std", 1.2, "float", "std of ln(sigma) of the lognormal time sampler (EDM)", check=_positive),
    _K("training.grad_accum_steps", 1, "int", "micro-batches per optimizer step", check=_positive),
    _K("training.nan_policy", "skip", "str", "what a non-finite loss or gradient does", choices=("skip", "stop")),
    _K("training.max_consecutive_nan", 20, "int", "with nan_policy 'skip': stop after this many in a row",
       check=_positive),
    _K("training.max_to_keep", 2, "int", "recent preemption checkpoints kept besides the kept series",
       check=_positive),
    _K("training.async_checkpointing", True, "bool", "write checkpoints in the background"),
    _K("training.class_dropout", 0.1, "float", "classifier-free guidance: probability of dropping the label "
       "(class-conditional models)", check=_unit),
    _K("training.caption_dropout", 0.1, "float", "classifier-free guidance: probability of replacing the caption "
       "by the empty one (text-conditioned models)", check=_unit),
    _K("training.task", "score", "str", "what the network learns: 'score' (the diffusion model) or 'classifier' "
       "(a noise-conditional classifier of the data's labels for classifier guidance; model.name = 'classifier') "
       "or 'autoencoder' (the autoencoder of latent diffusion, set by the autoencoder section)",
       choices=("score", "classifier", "autoencoder")),
    _K("training.snapshot_samples", 64, "int", "images in each snapshot sample grid", check=_positive),

    # sampling
    _K("sampling.method", "pc", "str", "the sampler (docs/samplers.md)", choices="sampler"),
    _K("sampling.predictor", "euler_maruyama", "str", "pc: the predictor", choices="predictor"),
    _K("sampling.corrector", "none", "str", "pc: the corrector", choices="corrector"),
    _K("sampling.n_steps_each", 1, "int", "pc: corrector steps per predictor step", check=_positive),
    _K("sampling.noise_removal", True, "bool", "final denoising step (score_sde); the samplers' `denoise`"),
    _K("sampling.probability_flow", False, "bool", "pc: predictor on the probability-flow ODE"),
    _K("sampling.snr", 0.16, "float", "pc: Langevin signal-to-noise ratio", check=_non_negative),
    _K("sampling.num_steps", 0, "int", "steps of fixed-grid samplers; 0: the SDE's N (score_sde's num_scales), "
       "else 1000", check=_non_negative),
    _K("sampling.grid", "", "str", "time grid; '': the sampler's own", choices="grid"),
    _K("sampling.rho", 7.0, "float", "rho of the karras grid", check=_positive),
    _K("sampling.rtol", 1e-5, "float", "ode: relative tolerance", check=_positive),
    _K("sampling.atol", 1e-5, "float", "ode: absolute tolerance", check=_positive),
    _K("sampling.ode_solver", "dopri5", "str", "ode: the Runge-Kutta pair", choices=("dopri5", "tsit5")),
    _K("sampling.eta", None, "float", "ddim / ddpm / sde_dpmpp_2m noise scale; None: the sampler's default",
       optional=True, check=_non_negative),
    _K("sampling.s_churn", None, "float", "heun / edm: churn S_churn (Karras et al. 2022, Alg. 2)", optional=True,
       check=_non_negative),
    _K("sampling.s_tmin", None, "float", "heun / edm: S_tmin", optional=True, check=_non_negative),
    _K("sampling.s_tmax", None, "float", "heun / edm: S_tmax", optional=True, check=_non_negative),
    _K("sampling.s_noise", None, "float", "heun / edm: S_noise", optional=True, check=_positive),
    _K("sampling.order", None, "int", "unipc / ipndm order where selectable", optional=True, check=_positive),
    _K("sampling.thresholding", "none", "str", "clipping of the data prediction (samplers that predict data)",
       choices=("none", "static", "dynamic")),
    _K("sampling.dynamic_threshold_p", 0.995, "float", "dynamic thresholding percentile", check=_unit),
    _K("sampling.guidance_scale", 0.0, "float", "classifier-free guidance weight w (class-conditional models)",
       check=_non_negative),
    _K("sampling.batch_size", 64, "int", "samples per sampler call in eval / sample", check=_positive),
    _K("sampling.ema", "", "str", "the average that sample / eval / load use: '' the EMA of model.ema_rate, "
       "'params' none, 'rate:R' one of model.ema_rates, 'sigma_rel:S' a power EMA tracked or written by "
       "posthoc_ema (docs/ema.md)", check=_ema_choice_problem),

    # eval
    _K("eval.begin_ckpt", 0, "int", "first checkpoint step to evaluate", check=_non_negative),
    _K("eval.end_ckpt", -1, "int", "last checkpoint step to evaluate; -1: the newest"),
    _K("eval.batch_size", 512, "int", "global batch of the loss and bits/dim evaluation", check=_positive),
    _K("eval.enable_loss", True, "bool", "loss over the whole eval split"),
    _K("eval.enable_sampling", False, "bool", "draw num_samples samples per checkpoint"),
    _K("eval.num_samples", 64, "int", "samples per checkpoint (and the default of `sample`)", check=_positive),
    _K("eval.enable_bpd", False, "bool", "bits/dim through the probability-flow ODE"),
    _K("eval.bpd_dataset", "test", "str", "split of the bits/dim evaluation", choices=("test", "train")),
    _K("eval.bpd_num_probes", 1, "int", "Hutchinson probes per example", check=_positive),
    _K("eval.bpd_estimator", "hutchinson_rademacher", "str", "divergence estimator", choices="estimator"),
    _K("eval.bpd_rtol", 1e-5, "float", "ODE relative tolerance of bits/dim", check=_positive),
    _K("eval.bpd_atol", 1e-5, "float", "ODE absolute tolerance of bits/dim", check=_positive),
    _K("eval.bpd_max_examples", 0, "int", "examples of bits/dim; 0: the whole split", check=_non_negative),
    _K("eval.bpd_dequantization_draws", 1, "int", "dequantization draws averaged per example", check=_positive),
    _K("eval.enable_quality", False, "bool", "FID, KID, Inception score and precision/recall of the samples "
       "(with enable_sampling)"),
    _K("eval.detector", "inception", "str", "feature network of the sample-quality metrics (docs/evaluation.md)",
       choices="detector"),
    _K("eval.inception_weights", "", "str", "pytorch-fid's Inception weights (.pth, or .npz from "
       "scripts/inception_weights.py); '': $DIFFUSION_JAX_INCEPTION_WEIGHTS"),
    _K("eval.resize_mode", "pytorch_fid", "str", "how images are resized to 299x299 for Inception",
       choices="resize_mode"),
    _K("eval.reference_stats", "", "str", "reference statistics (.npz) of the real data; '': computed from the "
       "train split and kept in <workdir>/eval/"),
    _K("eval.fid_counts", (1000, 5000, 10000, 50000), "ints", "also report FID of the first n samples, for "
       "each n that fits", check=_all_at_least(2)),
    _K("eval.feature_batch_size", 200, "int", "images per detector call", check=_positive),
    _K("eval.is_splits", 10, "int", "Inception-score splits", check=_positive),
    _K("eval.kid_subsets", 100, "int", "KID subsets", check=_positive),
    _K("eval.kid_subset_size", 1000, "int", "KID subset size (capped at the sample count)", check=_positive),
    _K("eval.pr_k", 3, "int", "k of the k-nearest-neighbour manifolds of precision/recall", check=_positive),

    # data
    _K("data.dataset", "digits", "str", "data set name (case-insensitive; score_sde's CIFAR10, SVHN, CELEBA, "
       "LSUN too)", choices="dataset"),
    _K("data.data_dir", "", "str", "TFDS data directory; '': $DIFFUSION_JAX_DATA_DIR, else TFDS's default"),
    _K("data.image_size", 8, "int", "image side in pixels; None: the data set's own", optional=True,
       check=_positive),
    _K("data.num_channels", 1, "int", "image channels, checked against the data; None: the data's own",
       optional=True, check=_positive),
    _K("data.random_flip", False, "bool", "random horizontal flips in training"),
    _K("data.centered", True, "bool", "values in [-1, 1] instead of [0, 1]"),
    _K("data.uniform_dequantization", False, "bool", "(k + u) / L instead of k / (L - 1) in training"),
    _K("data.category", "", "str", "LSUN category, e.g. 'bedroom'"),
    _K("data.folder_path", "", "str", "image folder (dataset = 'folder')"),
    _K("data.num_levels", None, "int", "requantise to this many grey levels; None: the data's own", optional=True,
       check=_at_least(2)),
    _K("data.seed", None, "int", "shuffling and augmentation seed; None: seed", optional=True,
       check=_non_negative),
    _K("data.num_threads", None, "int", "Grain read threads; None: automatic", optional=True, check=_non_negative),
    _K("data.num_workers", 0, "int", "Grain worker processes", check=_non_negative),
    _K("data.shuffle_buffer", None, "int", "accepted for score_sde configs; epochs are exact permutations",
       optional=True),
    _K("data.tfrecords_path", "", "str", "score_sde's FFHQ / CelebA-HQ TFRecords: not supported (needs "
       "TensorFlow); must stay ''",
       check=lambda v: None if not v else "is not supported (TFRecords need TensorFlow); use dataset = 'folder'"),
    _K("data.latent_dir", "", "str", "a latent data set written by `diffusion-jax encode` (dataset = 'latent')"),
    _K("data.captions", "", "str", "captions generated from labels and attributes, written by `encode` into the "
       "latent data set and read by text-conditioned models; '': none", choices=("", "digits")),
    _K("data.autoencoder_workdir", "", "str", "latent data sets: the autoencoder that decodes samples; '': the "
       "workdir recorded in the latent set (its parameters must be the ones that wrote it)"),

    # model: the network
    _K("model.name", "ncsnpp", "str", "the network", choices="model"),
    _K("model.output", "", "str", "what the network predicts; '': score_sde's convention for the SDE",
       choices="output"),
    _K("model.noise_cond", "", "str", "the network's noise input; '': score_sde's convention", choices="noise_cond"),
    _K("model.sigma_data", 0.5, "float", "EDM's sigma_data (preconditioning and weighting)", check=_positive),
    _K("model.nf", 128, "int", "base channel count", check=_positive),
    _K("model.ch_mult", (1, 2, 2, 2), "ints", "channel multiplier per resolution", check=_non_empty),
    _K("model.num_res_blocks", 4, "int", "residual blocks per resolution", check=_positive),
    _K("model.attn_resolutions", (16,), "ints", "resolutions with self-attention", check=_all_at_least(1)),
    _K("model.dropout", 0.1, "float", "dropout rate", check=_unit),
    _K("model.resamp_with_conv", True, "bool", "convolutions in up- and down-sampling"),
    _K("model.conditional", True, "bool", "noise-conditional network"),
    _K("model.fir", True, "bool", "FIR up- and down-sampling (NCSN++)"),
    _K("model.fir_kernel", (1, 3, 3, 1), "ints", "FIR taps", check=_all_at_least(0)),
    _K("model.skip_rescale", True, "bool", "scale skip connections by 1/sqrt(2)"),
    _K("model.resblock_type", "biggan", "str", "NCSN++ residual blocks", choices=("ddpm", "biggan")),
    _K("model.progressive", "none", "str", "NCSN++ progressive output", choices=("none", "output_skip", "residual")),
    _K("model.progressive_input", "residual", "str", "NCSN++ progressive input",
       choices=("none", "input_skip", "residual")),
    _K("model.progressive_combine", "sum", "str", "NCSN++ progressive combination", choices=("sum", "cat")),
    _K("model.attention_type", "ddpm", "str", "attention block", choices=("ddpm",)),
    _K("model.init_scale", 0.0, "float", "scale of the last layers' initialisation", check=_non_negative),
    _K("model.embedding_type", "fourier", "str", "noise embedding", choices=("fourier", "positional")),
    _K("model.fourier_scale", 16.0, "float", "scale of the Fourier features", check=_positive),
    _K("model.conv_size", 3, "int", "convolution size (NCSN++ implements 3 only)", check=lambda v: None if v == 3
       else "must be 3 (score_sde's NCSN++ only implements 3x3 convolutions)"),
    _K("model.scale_by_sigma", True, "bool", "divide the output by sigma (VE score networks)"),
    _K("model.normalization", "GroupNorm", "str", "normalisation (GroupNorm for the U-Nets, InstanceNorm++ for "
       "NCSNv2)", choices=("GroupNorm", "InstanceNorm++")),
    _K("model.nonlinearity", "swish", "str", "activation", choices="activation"),
    _K("model.interpolation", "bilinear", "str", "NCSNv2 up-sampling",
       choices=("bilinear", "bilinear_half_pixel", "nearest_neighbor")),
    _K("model.num_classes", 0, "int", "> 0: class-conditional with a reserved null label; with training.task = "
       "'classifier', the classifier's number of classes", check=_non_negative),
    _K("model.cross_attn_resolutions", (), "ints", "resolutions with cross-attention to a context",
       check=_all_at_least(1)),
    _K("model.cross_attn_heads", 1, "int", "heads of the cross-attention", check=_positive),
    _K("model.context_dim", None, "int", "width of the cross-attention context; None: no context", optional=True,
       check=_positive),
    _K("model.text_encoder", "none", "str", "text conditioning: 'tiny' trains a small text transformer of width "
       "context_dim with the network on the captions of data.captions; 'precomputed' reads the caption embeddings "
       "that `encode --text_encoder DIR` stored with the latent data set (a frozen encoder such as CLIP's), with a "
       "learned null embedding for classifier-free guidance (docs/latent.md)",
       choices=("none", "tiny", "precomputed")),
    _K("model.remat", False, "bool", "recompute each block's activations in the backward pass"),
    _K("model.dtype", "float32", "str", "compute dtype (parameters stay float32)", choices=("float32", "bfloat16")),
    # model: DiT (model.name = 'dit'; docs/dit.md)
    _K("model.dit_preset", "", "str", "DiT: a published size (sets patch_size, hidden_size, depth, num_heads); '': "
       "those keys", choices="dit_preset"),
    _K("model.patch_size", None, "int", "DiT patch side; None: the preset's", optional=True, check=_positive),
    _K("model.hidden_size", None, "int", "DiT token width; None: the preset's", optional=True, check=_positive),
    _K("model.depth", None, "int", "DiT blocks; None: the preset's", optional=True, check=_positive),
    _K("model.num_heads", None, "int", "DiT attention heads; None: the preset's", optional=True, check=_positive),
    _K("model.mlp_ratio", 4.0, "float", "DiT MLP width / hidden_size", check=_positive),
    _K("model.learn_sigma", False, "bool", "DiT: also output the variance channels (the published checkpoints); "
       "the library's losses do not train them"),
    # model: the SDE's parameters (score_sde keeps them here)
    _K("model.sigma_min", 0.01, "float", "VE / EDM smallest noise level", check=_positive),
    _K("model.sigma_max", 50.0, "float", "VE / EDM largest noise level", check=_positive),
    _K("model.num_scales", 1000, "int", "N of the discrete chains and score_sde's grids", check=_positive),
    _K("model.beta_min", 0.1, "float", "VP / sub-VP beta(0)", check=_positive),
    _K("model.beta_max", 20.0, "float", "VP / sub-VP beta(1)", check=_positive),
    _K("model.cosine_s", 0.008, "float", "offset s of the cosine schedule", check=_positive),
    _K("model.T", 0.0, "float", "end time; 0: the SDE's default", check=_non_negative),
    _K("model.sampling_eps", 0.0, "float", "smallest sampling time t_min; 0: the SDE's default",
       check=_non_negative),
    # model: the EMA
    _K("model.ema_rate", 0.9999, "float", "EMA decay per step", check=_unit),
    _K("model.ema_warmup", False, "bool", "EMA decay min(rate, (1 + step) / (10 + step))"),
    _K("model.ema_rates", (), "floats", "more EMA decays tracked besides ema_rate (same warm-up); "
       "sampling.ema = 'rate:R' picks one (docs/ema.md)", check=_ema_rates),
    _K("model.ema_sigma_rels", (), "floats", "power-function EMAs (EDM2) tracked, by relative std sigma_rel; "
       "EDM2 tracks (0.05, 0.1) for post-hoc EMA", check=_sigma_rels),
    _K("model.ema_snapshot_freq", 0, "int", "steps between snapshots of the power-function EMAs "
       "(<workdir>/ema_snapshots, read by posthoc_ema); 0: none", check=_non_negative),

    # autoencoder (training.task = 'autoencoder'; Rombach et al. 2022, sec. 3)
    _K("autoencoder.block_out_channels", (32, 64, 64), "ints", "channels per level; the latents are 2^(levels - 1) "
       "times smaller than the images", check=_all_at_least(1)),
    _K("autoencoder.layers_per_block", 1, "int", "ResNet blocks per encoder level (decoder: one more)",
       check=_positive),
    _K("autoencoder.latent_channels", 4, "int", "latent channels", check=_positive),
    _K("autoencoder.norm_num_groups", 8, "int", "GroupNorm groups (must divide every channel count)",
       check=_positive),
    _K("autoencoder.mid_block_attention", True, "bool", "self-attention in the mid blocks"),
    _K("autoencoder.reconstruction", "l1", "str", "reconstruction loss, summed over pixels", choices=("l1", "l2")),
    _K("autoencoder.kl_weight", 1e-6, "float", "weight of KL(q(z|x) || N(0, I)) against the reconstruction",
       check=_non_negative),
    _K("autoencoder.sample_posterior", True, "bool", "train on a posterior sample (False: its mean)"),
    _K("autoencoder.disc_weight", 0.0, "float", "weight of the patch discriminator's generator loss; 0: no "
       "discriminator", check=_non_negative),
    _K("autoencoder.disc_start", 0, "int", "step from which the discriminator trains and its loss counts",
       check=_non_negative),
    _K("autoencoder.disc_channels", 64, "int", "channels of the discriminator's first layer", check=_positive),
    _K("autoencoder.disc_layers", 3, "int", "stride-2 layers of the discriminator", check=_positive),
    _K("autoencoder.encode_sample", False, "bool", "encode: write a seeded posterior sample per example "
       "instead of the posterior mean"),
    _K("autoencoder.scale_factor", None, "float", "encode: the latents' scale factor; None: 1 / std of the "
       "train split's latents (Rombach et al. 2022, App. G)", optional=True, check=_positive),

    # optim
    _K("optim.optimizer", "Adam", "str", "Adam (L2 weight decay) or AdamW (decoupled)", choices=("Adam", "AdamW")),
    _K("optim.lr", 2e-4, "float", "peak learning rate", check=_positive),
    _K("optim.beta1", 0.9, "float", "Adam beta1", check=_unit),
    _K("optim.beta2", 0.999, "float", "Adam beta2", check=_unit),
    _K("optim.eps", 1e-8, "float", "Adam epsilon", check=_positive),
    _K("optim.weight_decay", 0.0, "float", "weight decay", check=_non_negative),
    _K("optim.warmup", 5000, "int", "steps of linear learning-rate warm-up", check=_non_negative),
    _K("optim.grad_clip", 1.0, "float", "clip the global gradient norm to this; < 0: no clipping"),

    # mesh
    _K("mesh.data", -1, "int", "data-parallel size; -1: the devices left over by fsdp and tensor", check=_mesh_size),
    _K("mesh.fsdp", 1, "int", "devices each parameter, its Adam moments and its EMA are split over (FSDP); the "
       "batch is split over data x fsdp; -1: the rest", check=_mesh_size),
    _K("mesh.tensor", 1, "int", "tensor-parallel size (DiT attention heads and MLP); -1: the rest",
       check=_mesh_size),
    _K("mesh.rules", "", "str", "logical axis -> mesh axis rules in priority order, 'name:axis, ...' (axis fsdp "
       "or tensor); '': the library's (training/sharding.py DEFAULT_RULES)", check=_rules_problem),
    _K("mesh.replicate_unannotated", False, "bool", "on a sharded mesh, replicate parameters that declare no "
       "logical axes (with a warning) instead of refusing to start"),

    # distributed
    _K("distributed.coordinator_address", "", "str", "host:port of process 0; '': from the environment (TPU "
       "pods, SLURM) or a single process"),
    _K("distributed.num_processes", 0, "int", "number of processes; 0: from the environment", check=_non_negative),
    _K("distributed.process_id", -1, "int", "this process's index; -1: from the environment"),
    _K("distributed.initialization_timeout", 300, "int", "seconds to wait for the other processes",
       check=_positive),
)
# fmt: on

_BY_PATH: dict[str, Key] = {k.path: k for k in SCHEMA}

# Case-insensitive names (score_sde writes 'GroupNorm', 'Adam', 'CIFAR10').
_CASE_INSENSITIVE = {"model.normalization", "optim.optimizer", "data.dataset", "training.sde", "model.name"}


def _placeholder_type(kind: str) -> type:
    return {"int": int, "float": float, "bool": bool, "str": str, "ints": tuple, "floats": tuple}[kind]


def default_config() -> ml_collections.ConfigDict:
    """Every key a config may set, with its default (score_sde's names and defaults where they exist)."""
    config = ml_collections.ConfigDict()
    for section in SECTIONS:
        if section:
            config[section] = ml_collections.ConfigDict()
    for key in SCHEMA:
        target = config[key.section] if key.section else config
        target[key.name] = placeholder(_placeholder_type(key.kind)) if key.default is None else key.default
    return config


def with_defaults(partial: ml_collections.ConfigDict | dict) -> ml_collections.ConfigDict:
    """The schema's defaults overridden by a partial config (e.g. score_sde's ``model`` and ``data``
    sections alone): how code that builds one part takes a config that names only that part."""
    config = default_config()
    flat = _flatten(partial if isinstance(partial, dict) else partial.to_dict())
    for path, value in flat.items():
        section, _, name = path.rpartition(".")
        if section and section not in config:
            config[section] = ml_collections.ConfigDict()
        target = config[section] if section else config
        with target.ignore_type():
            target[name] = value
    return config


def load_config(path: str, relative_to: str | None = None) -> ml_collections.ConfigDict:
    """``get_config()`` of the config file at ``path`` (relative to the file ``relative_to``,
    e.g. ``__file__``): how a variant config starts from its base without import paths. A
    ``.json`` file (a workdir's ``config.json``) is read as a config too. A missing file, a file
    without ``get_config`` or one that raises gives a :class:`ConfigError`."""
    if relative_to is not None:
        path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    if path.endswith(".json"):
        try:
            with open(path) as f:
                return with_defaults(json.load(f))
        except ValueError as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    try:
        module = runpy.run_path(path)
        if "get_config" not in module:
            raise ConfigError(f"config file {path} defines no get_config()")
        config = module["get_config"]()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 (a user's file: report any error as one message)
        raise ConfigError(f"config file {path} raised {type(e).__name__}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"get_config() of {path} returned {type(config).__name__}, not an ml_collections.ConfigDict")
    return config


def to_python(config: ml_collections.ConfigDict, *, title: str = "A resolved diffusion_jax config.") -> str:
    """The config as a config file: every schema key set explicitly, loadable with ``--config``."""
    flat = _flatten(config.to_dict())
    lines = [
        f'"""{title}"""',
        "",
        "from diffusion_jax.builders.config import default_config",
        "",
        "",
        "def get_config():",
        "    config = default_config()",
    ]
    for key in SCHEMA:
        value = flat.get(key.path, key.default)
        if isinstance(value, list):
            value = tuple(value)
        lines.append(f"    config.{key.path} = {value!r}")
    lines += ["    return config", ""]
    return "\n".join(lines)


def _allowed(key: Key) -> str:
    if key.choices is None:
        return ""
    if isinstance(key.choices, str):
        names = registries()[key.choices] if key.choices != "dataset" else None
        if names is None:
            return "a data set name (docs/data.md)"
        return ", ".join(f"`{n}`" for n in names)
    return ", ".join(f"`{n}`" for n in key.choices)


def markdown() -> str:
    """``docs/config.md``: every key of the schema with its type, default and meaning."""
    out = [
        "# Config keys",
        "",
        "Generated from the schema in `diffusion_jax/builders/config.py` by `python scripts/generate_docs.py`;",
        "a test fails when this file is stale. Set a key in a config file (`config.training.batch_size = 64`)",
        "or on the command line (`--config.training.batch_size=64`); `--print_config` prints the resolved",
        "config. Values are checked before any work: an unknown key, a wrong type or an impossible value",
        "stops the run with one message (exit status 2).",
        "",
    ]
    for section, what in SECTIONS.items():
        keys = [k for k in SCHEMA if k.section == section]
        out += [f"## `{section or 'top level'}`: {what}" if section else f"## Top level: {what}", ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for k in keys:
            value = tuple(k.default) if k.kind in ("ints", "floats") and k.default is not None else k.default
            default = "None" if value is None else repr(value)
            meaning = k.help
            allowed = _allowed(k)
            if allowed:
                meaning += f"; one of {allowed}"
            out.append(f"| `{k.path}` | {k.type_name} | `{default}` | {meaning.replace('|', '/')} |")
        out.append("")
    return "\n".join(out)


def workdir_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict | None:
    """The config a workdir was trained with (its ``config.py``, else ``config.json``), or None."""
    for name in ("config.py", "config.json"):
        path = os.path.join(workdir, name)
        if os.path.isfile(path):
            return load_config(path)
    return None


def _mutable(path: str) -> bool:
    return any(path == k or path.startswith(k + ".") for k in MUTABLE_KEYS)


def check_mutable(stored: ml_collections.ConfigDict, config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuse a config for an existing workdir that differs from the stored one in a key that
    fixes what was trained (anything outside :data:`MUTABLE_KEYS`)."""
    bad = [k for k in config_diff(stored, config) if not _mutable(k)]
    if bad:
        raise ConfigError(
            f"workdir {workdir} was trained with other values of {', '.join(bad)}; sampling and evaluation may "
            f"change only {', '.join(MUTABLE_KEYS)}. Drop --config to use the workdir's own config."
        )


# --------------------------------------------------------------------------------------------
# Overrides (command line)
# --------------------------------------------------------------------------------------------


def _closest(path: str) -> str:
    close = difflib.get_close_matches(path, list(_BY_PATH), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def parse_override(path: str, text: str) -> Any:
    """The value of ``--config.<path>=<text>`` typed by the schema; a ConfigError for an unknown
    key (naming the closest one) or a value of the wrong type."""
    key = _BY_PATH.get(path)
    if key is None:
        raise ConfigError(f"unknown config key {path!r}{_closest(path)}; the keys are listed in docs/config.md")
    raw = text.strip()
    if key.optional and raw.lower() == "none":
        return None
    try:
        if key.kind == "bool":
            low = raw.lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError
        if key.kind == "int":
            return int(raw)
        if key.kind == "float":
            return float(raw)
        if key.kind == "ints":
            value = ast.literal_eval(raw if raw.startswith(("(", "[")) else f"({raw},)")
            if isinstance(value, int):
                value = (value,)
            if not isinstance(value, (tuple, list)) or not all(isinstance(i, int) for i in value):
                raise ValueError
            return tuple(value)
        if key.kind == "floats":
            value = ast.literal_eval(raw if raw.startswith(("(", "[")) else f"({raw},)")
            if isinstance(value, (int, float)):
                value = (value,)
            if not isinstance(value, (tuple, list)) or not all(
                isinstance(i, (int, float)) and not isinstance(i, bool) for i in value
            ):
                raise ValueError
            return tuple(float(i) for i in value)
        return text
    except (ValueError, SyntaxError):
        expected = {
            "bool": "True or False", "int": "an integer", "float": "a number", "ints": "integers like (1, 2)",
            "floats": "numbers like (0.05, 0.1)",
        }  # fmt: skip
        extra = " or None" if key.optional else ""
        raise ConfigError(f"--config.{path}={text}: expected {expected[key.kind]}{extra}") from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]]) -> None:
    """Set ``(dotted key, text)`` pairs on ``config`` (in place), typed by the schema."""
    for path, text in overrides:
        value = parse_override(path, text)
        section, _, name = path.rpartition(".")
        target = config[section] if section else config
        if section and section not in config:
            raise ConfigError(f"the config has no {section!r} section")
        with target.ignore_type():
            target[name] = value


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


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


def registries() -> dict[str, list[str]]:
    """Valid names of the registry-backed keys, from the library's literal registries."""
    from diffusion_jax import evaluation, likelihood, losses, models, parametrization, samplers, sde
    from diffusion_jax.data import datasets
    from diffusion_jax.models.dit import DIT_PRESETS
    from diffusion_jax.models.layers import ACTIVATIONS

    return {
        "sde": list(sde.SDES),
        "model": list(models.MODELS),
        "sampler": list(samplers.SAMPLERS),
        "predictor": list(samplers.PREDICTORS),
        "corrector": list(samplers.CORRECTORS),
        "grid": list(samplers.GRIDS),
        "weighting": list(losses.WEIGHTINGS),
        "time_sampler": list(losses.TIME_SAMPLERS),
        "output": list(parametrization.OUTPUTS),
        "noise_cond": list(parametrization.NOISE_CONDITIONINGS),
        "estimator": list(likelihood.ESTIMATORS),
        "activation": list(ACTIVATIONS),
        "dataset": list(datasets.DATASETS),
        "detector": list(evaluation.DETECTORS),
        "resize_mode": list(evaluation.RESIZE_MODES),
        "dit_preset": list(DIT_PRESETS),
    }


def _type_ok(key: Key, v: Any) -> bool:
    if v is None:
        return key.optional
    if key.kind == "bool":
        return isinstance(v, bool)
    if key.kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if key.kind == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
    if key.kind == "str":
        return isinstance(v, str)
    if key.kind == "floats":
        return isinstance(v, (tuple, list)) and all(
            isinstance(i, (int, float)) and not isinstance(i, bool) and not math.isnan(i) for i in v
        )
    return isinstance(v, (tuple, list)) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)


def _choice_problem(key: Key, v: str, regs: dict[str, list[str]]) -> str | None:
    if key.choices is None:
        return None
    if isinstance(key.choices, str):
        if key.choices == "dataset":
            from diffusion_jax.data.datasets import canonical_name

            try:
                canonical_name(v)
            except ValueError as e:
                return f"{key.path} = {v!r}: {e}"
            return None
        allowed = list(regs[key.choices])
    else:
        allowed = list(key.choices)
    if key.path in ("model.output", "model.noise_cond", "sampling.grid", "model.dit_preset"):
        allowed = ["", *allowed]
    folded = v.lower() if key.path in _CASE_INSENSITIVE else v
    pool = [a.lower() for a in allowed] if key.path in _CASE_INSENSITIVE else allowed
    if folded not in pool:
        return f"{key.path} = {v!r} is not allowed; valid: {', '.join(repr(a) if not a else a for a in allowed)}"
    return None


def _unknown_keys(cfg: dict) -> list[str]:
    problems = []
    for path in _flatten(cfg):
        if path not in _BY_PATH:
            section = path.rpartition(".")[0]
            if section and section not in SECTIONS:
                head = path.split(".")[0]
                close = difflib.get_close_matches(head, [s for s in SECTIONS if s], n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                problems.append(f"unknown section {head!r}{hint}; valid: {', '.join(s for s in SECTIONS if s)}")
                continue
            valid = ", ".join(k.name for k in SCHEMA if k.section == section)
            problems.append(f"unknown key {path!r}{_closest(path)}; valid keys in {section or 'the config'}: {valid}")
    return sorted(set(problems), key=problems.index)


# Checks that involve several keys. Each returns a message or None; they run only when every key
# has the right type.
def _cross_field_checks(c: dict[str, Any]) -> list[str]:
    out = []
    if c["training.likelihood_weighting"] and c["training.weighting"] not in ("sigma2", "likelihood"):
        out.append(
            "training.likelihood_weighting = True conflicts with training.weighting = "
            f"{c['training.weighting']!r}; set only one of them"
        )
    if not c["training.continuous"] and c["training.sde"].lower() not in ("vesde", "vpsde"):
        out.append(
            "training.continuous = False (discrete training) is defined for vesde (SMLD) and vpsde (DDPM), "
            f"not {c['training.sde']!r}"
        )
    if bool(c["model.output"]) != bool(c["model.noise_cond"]):
        out.append("set both model.output and model.noise_cond, or neither (score_sde's convention)")
    if c["model.sigma_min"] >= c["model.sigma_max"]:
        out.append(f"model.sigma_min = {c['model.sigma_min']} must be below model.sigma_max = {c['model.sigma_max']}")
    if c["model.beta_min"] >= c["model.beta_max"]:
        out.append(f"model.beta_min = {c['model.beta_min']} must be below model.beta_max = {c['model.beta_max']}")
    if c["model.cross_attn_resolutions"] and c["model.context_dim"] is None:
        out.append("model.cross_attn_resolutions needs model.context_dim (the width of the context)")
    if (c["training.task"] == "classifier") != (c["model.name"].lower() == "classifier"):
        out.append(
            f"training.task = {c['training.task']!r} and model.name = {c['model.name']!r}: the classifier task trains "
            "model.name = 'classifier', and that network learns nothing else"
        )
    if c["training.task"] == "classifier":
        if c["model.num_classes"] < 2:
            out.append("training.task = 'classifier' needs model.num_classes >= 2 (the data's classes)")
        samples = [k for k in ("training.snapshot_sampling", "eval.enable_sampling", "eval.enable_bpd") if c[k]]
        if samples:
            out.append(f"a classifier (training.task = 'classifier') draws no samples: set {', '.join(samples)} False")
    mesh = {a: c[f"mesh.{a}"] for a in ("data", "fsdp", "tensor")}
    if list(mesh.values()).count(-1) > 1:
        out.append(f"at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1 (the rest), got {mesh}")
    if c["model.text_encoder"] != "none":
        if not c["data.captions"]:
            out.append(f"model.text_encoder = {c['model.text_encoder']!r} needs data.captions (the captions it reads)")
        if c["data.dataset"].lower() != "latent":
            out.append("model.text_encoder reads the captions of a latent data set (data.dataset = 'latent')")
        kind, dim = c["model.text_encoder"], c["model.context_dim"]
        tiny = kind == "tiny"
        if dim is None or not c["model.cross_attn_resolutions"] or (tiny and dim % 4):
            width = (
                "the text encoder's width, a multiple of its 4 heads"
                if tiny
                else "the stored embeddings' width: the text encoder's hidden_size"
            )
            out.append(
                f"model.text_encoder = {kind!r} needs model.context_dim ({width}) and model.cross_attn_resolutions "
                "(where the network reads it)"
            )
    if c["data.dataset"].lower() == "latent" and not c["data.latent_dir"]:
        out.append("data.dataset = 'latent' needs data.latent_dir (a directory written by `diffusion-jax encode`)")
    if c["training.task"] == "autoencoder" and c["data.dataset"].lower() == "latent":
        out.append("training.task = 'autoencoder' trains on images; data.dataset = 'latent' holds latents")
    if c["eval.enable_quality"] and not c["eval.enable_sampling"]:
        out.append("eval.enable_quality needs eval.enable_sampling (the metrics are of the samples)")
    if c["model.ema_snapshot_freq"] and not c["model.ema_sigma_rels"]:
        out.append("model.ema_snapshot_freq > 0 needs model.ema_sigma_rels (the power-function EMAs to snapshot)")
    kind, value = ema_choice(c["sampling.ema"])
    tracked = (c["model.ema_rate"], *c["model.ema_rates"])
    untracked = value is not None and not any(math.isclose(value, r, rel_tol=0, abs_tol=1e-12) for r in tracked)
    if kind == "rate" and untracked:
        out.append(
            f"sampling.ema = {c['sampling.ema']!r}: the run tracks the rates "
            f"{', '.join(map(str, tracked))} (model.ema_rate and model.ema_rates)"
        )
    if c["training.eps"] >= 1.0 and c["training.sde"].lower() != "edm":
        out.append(f"training.eps = {c['training.eps']} must be below the end time 1")
    return out


def validate_config(config: ml_collections.ConfigDict | dict, *, build: bool = True) -> None:
    """Check a config against the schema; raise one ConfigError listing every problem.

    In order: unknown keys, each key's type, each key's value and name, the checks across keys,
    then (``build=True``) that the SDE, parametrization, network, loss and sampler build from it
    (their constructors check what only they know, e.g. which resolutions a U-Net reaches). All of
    this is cheap and runs before any work."""
    cfg = config if isinstance(config, dict) else config.to_dict()
    problems = _unknown_keys(cfg)
    flat = _flatten(cfg)
    regs = registries()
    typed = True
    for key in SCHEMA:
        if key.path not in flat:
            problems.append(f"{key.path} is missing (start configs from default_config())")
            typed = False
            continue
        v = flat[key.path]
        if not _type_ok(key, v):
            problems.append(f"{key.path} = {v!r} has the wrong type; expected {key.type_name}")
            typed = False
            continue
        if v is None:
            continue
        msg = key.check(v) if key.check else None
        if msg:
            problems.append(f"{key.path} = {v!r} {msg}")
        if key.kind == "str":
            msg = _choice_problem(key, v, regs)
            if msg:
                problems.append(msg)
    if typed and not problems:
        problems.extend(_cross_field_checks(flat))
    if build and not problems:
        from diffusion_jax.builders.experiment import check_buildable

        problems.extend(check_buildable(config if not isinstance(config, dict) else ml_collections.ConfigDict(config)))
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
