"""diffusion-jax train --config configs/cifar10/edm/ddpmpp_vpsde.py --workdir runs/cifar10_edm_ddpmpp_vpsde

EDM's preconditioning, loss and sampler (configs/cifar10/edm/ddpmpp.py) on score_sde's VP SDE
(beta_min = 0.1, beta_max = 20). The parametrization works on the scaled state x / alpha(t)
with EDM's sigma = sigma(t) / alpha(t), so D(x; sigma) = c_skip x~ + c_out F(c_in x~; ln(sigma) / 4)
is the same function as for ``training.sde = "edm"``; only the time at which each noise level
is reached changes. The log-normal training noise levels and the Karras sampling grid are set
in those scaled-sigma units (the grid runs from the VP SDE's sigma/alpha at T = 1, about 152,
down to its value at t_min = 1e-3, about 0.01).

A demonstration that the parametrization is independent of the SDE, not a published
experiment.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("ddpmpp.py", relative_to=__file__)
    config.training.sde = "vpsde"
    model = config.model
    model.beta_min = 0.1
    model.beta_max = 20.0
    model.output = "edm"  # for sde "vpsde" the empty default would be score_sde's eps prediction
    model.noise_cond = "edm"
    return config
