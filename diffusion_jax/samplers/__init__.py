"""Samplers for score-based diffusion models: one entry point, :func:`sample`.

``samples, info = sample(key, score_fn, sde, shape, sampler)`` runs any sampler of
:data:`SAMPLERS` under ``jax.jit`` on device. See ``docs/samplers.md`` for the list, their orders
and NFE, and the benchmark.
"""

from diffusion_jax.samplers.api import SAMPLERS, get_sampler, sample, sampler_fields
from diffusion_jax.samplers.base import (
    THRESHOLDINGS,
    DynamicThreshold,
    FixedGridSampler,
    Model,
    NoiseSource,
    SampleInfo,
    Sampler,
    StaticClip,
)
from diffusion_jax.samplers.fast import (
    DDIM,
    IPNDM,
    PLMS,
    DPMSolverPP,
    EDMSampler,
    Euler,
    FastSampler,
    SDEDPMSolverPP,
    UniPC,
)
from diffusion_jax.samplers.grids import (
    GRIDS,
    ExplicitGrid,
    KarrasGrid,
    LogSNRGrid,
    QuadraticGrid,
    ScoreSDEGrid,
    UniformGrid,
    get_grid,
)
from diffusion_jax.samplers.ode import ProbabilityFlowSampler
from diffusion_jax.samplers.pc import (
    CORRECTORS,
    PREDICTORS,
    AncestralPredictor,
    AnnealedLangevinCorrector,
    EulerMaruyamaPredictor,
    LangevinCorrector,
    NoneCorrector,
    NonePredictor,
    PCSampler,
    ReverseDiffusionPredictor,
    pc_step,
)

__all__ = [
    "sample",
    "SAMPLERS",
    "Sampler",
    "FixedGridSampler",
    "FastSampler",
    "sampler_fields",
    "get_sampler",
    "SampleInfo",
    "Model",
    "NoiseSource",
    "StaticClip",
    "DynamicThreshold",
    "THRESHOLDINGS",
    "DDIM",
    "Euler",
    "EDMSampler",
    "PLMS",
    "IPNDM",
    "DPMSolverPP",
    "SDEDPMSolverPP",
    "UniPC",
    "ProbabilityFlowSampler",
    "GRIDS",
    "get_grid",
    "UniformGrid",
    "KarrasGrid",
    "LogSNRGrid",
    "QuadraticGrid",
    "ExplicitGrid",
    "ScoreSDEGrid",
    "PREDICTORS",
    "CORRECTORS",
    "PCSampler",
    "pc_step",
    "EulerMaruyamaPredictor",
    "ReverseDiffusionPredictor",
    "AncestralPredictor",
    "NonePredictor",
    "LangevinCorrector",
    "AnnealedLangevinCorrector",
    "NoneCorrector",
]
