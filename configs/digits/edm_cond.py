"""diffusion-jax train --config configs/digits/edm_cond.py --workdir runs/digits_cond

The main job on EDM's SDE (configs/digits/edm_sigma.py) made class-conditional for classifier-free guidance
(Ho & Salimans 2022): the network takes the digit's class (``model.num_classes = 10``, label 10
is the reserved null label) and training replaces the label by the null label with probability
``training.class_dropout = 0.1``, so one network gives both s(x | c) and s(x).

Sampling with guidance: ``diffusion-jax sample --workdir runs/digits_cond --task class
--label 3 --guidance_scale 2``; avoiding a digit: ``--task negative_class --negative_label 3``.
The class-guidance experiment is experiments/digits_conditioning/.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("edm_sigma.py", relative_to=__file__)
    config.model.num_classes = 10
    config.training.class_dropout = 0.1
    # Snapshots of a class-conditional network cycle through the classes: 10 per class.
    config.training.snapshot_samples = 100
    return config
