"""Controllable generation and inverse problems: measurement operators, guidance, editing and
posterior samplers, all composable with :func:`diffusion_jax.sample`.

```python
from diffusion_jax import conditioning as C

op = C.inpainting(C.box_mask((32, 32, 1), (8, 8), (16, 16)), sigma_y=0.05)
y = op.measure(key, x_true)
x, info = C.solve(key, score_fn, sde, x_true.shape, op, y, method="ddrm", num_steps=20)
guided = C.classifier_free_guidance(cond_score, labels, sde, guidance=3.0, null_label=10)
x, info = diffusion_jax.sample(key, guided, sde, shape, "dpmpp_2m", num_steps=20)
```

See ``docs/conditioning.md`` for each method's paper, equation, assumptions, cost and measured
accuracy.
"""

from diffusion_jax.conditioning.analytic import (
    MixturePosterior,
    component,
    mixture_class_counts,
    mixture_classifier,
    mixture_conditional_score,
    mixture_posterior,
)
from diffusion_jax.conditioning.api import METHODS, get_method, sdedit, solve
from diffusion_jax.conditioning.base import SubNoise, WindowGrid, project, run_between, step_once
from diffusion_jax.conditioning.classifier import classifier_loss_fn, trained_classifier
from diffusion_jax.conditioning.editing import PCProjection, Replacement, SDEdit
from diffusion_jax.conditioning.guidance import (
    ClassifierFreeGuidance,
    ClassifierGuidance,
    classifier_free_guidance,
    classifier_guidance,
)
from diffusion_jax.conditioning.operators import (
    FunctionOperator,
    LinearOperator,
    Mask,
    Operator,
    Separable,
    SVDOperator,
    border_mask,
    box_mask,
    colorization,
    denoising,
    dense_matrix,
    gaussian_blur,
    inpainting,
    random_mask,
    super_resolution,
    uniform_blur,
)
from diffusion_jax.conditioning.posterior import (
    DAPS,
    DDRM,
    DiffPIRGuidance,
    DPSGuidance,
    Guidance,
    Guided,
    PiGDMGuidance,
)
from diffusion_jax.conditioning.smc import TDS, systematic_resample

__all__ = [
    "Operator",
    "LinearOperator",
    "SVDOperator",
    "FunctionOperator",
    "Mask",
    "Separable",
    "box_mask",
    "random_mask",
    "border_mask",
    "inpainting",
    "colorization",
    "super_resolution",
    "gaussian_blur",
    "uniform_blur",
    "denoising",
    "dense_matrix",
    "MixturePosterior",
    "mixture_posterior",
    "mixture_classifier",
    "mixture_conditional_score",
    "mixture_class_counts",
    "component",
    "ClassifierGuidance",
    "ClassifierFreeGuidance",
    "classifier_guidance",
    "classifier_free_guidance",
    "classifier_loss_fn",
    "trained_classifier",
    "SDEdit",
    "Replacement",
    "PCProjection",
    "Guidance",
    "DPSGuidance",
    "PiGDMGuidance",
    "DiffPIRGuidance",
    "Guided",
    "DDRM",
    "DAPS",
    "TDS",
    "systematic_resample",
    "METHODS",
    "get_method",
    "solve",
    "sdedit",
    "WindowGrid",
    "SubNoise",
    "run_between",
    "step_once",
    "project",
]
