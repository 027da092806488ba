"""diffusion-jax train --config configs/digits/classifier.py --workdir runs/digits_classifier

A noise-conditional classifier of the 8x8 digits for classifier guidance (score_sde trained one
for CIFAR-10; Song et al. 2021, App. I.4): ``training.task = 'classifier'`` trains
``model.name = 'classifier'`` (a small residual encoder with the noise level embedded, see
diffusion_jax/models/classifier.py) by cross-entropy on digits noised as the diffusion loss of
configs/digits/edm_sigma.py noises them: the same SDE (EDM, time = sigma), the same
parametrization (EDM's input scaling c_in and noise input ln(sigma)/4) and log-normal noise
levels (with a wider spread, below). So ``t`` means the same noise level for the classifier and
that score model; guidance refuses a model of another SDE (for the main job's VE SDE, train with
the main job's training.sde, model.sigma_min/max, model.output and model.noise_cond).

Guiding the unconditional model towards a digit:
``diffusion-jax sample --workdir runs/digits_sigma --task class --label 3
--classifier_workdir runs/digits_classifier --guidance_scale 1``.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("edm_sigma.py", relative_to=__file__)
    training = config.training
    training.task = "classifier"
    training.n_iters = 1000
    training.snapshot_sampling = False
    # Classifier guidance needs the class at high noise too, where the data say little: drawing
    # sigma log-normally with a wider spread than the score model covers sigma up to ~20.
    training.p_std = 1.6

    model = config.model
    model.name = "classifier"
    model.num_classes = 10
    model.nf = 32
    model.ch_mult = (1, 2)
    model.num_res_blocks = 1
    model.dropout = 0.1
    model.embedding_type = "positional"

    evaluate = config.eval
    evaluate.enable_sampling = False
    evaluate.enable_quality = False
    evaluate.enable_bpd = False
    return config
