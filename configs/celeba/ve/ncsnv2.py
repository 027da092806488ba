"""diffusion-jax train --config configs/celeba/ve/ncsnv2.py --workdir runs/celeba_ve_ncsnv2

NCSNv2 (Song & Ermon 2020) on CelebA 64x64: score_sde's configs/ve/ncsnv2/celeba.py. Discrete
SMLD training over L = 500 noise scales from 90 to 0.01; annealed Langevin dynamics (5 steps
per scale, snr 0.128, no predictor); Adam at 1e-4 without warm-up or gradient clipping.

score_sde's ``model.interpolation = 'bilinear'`` is the network's default here, and its unused
local sampling settings (step_size, ckpt_id, final_only, noise_removal) are left out.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("../../default_celeba.py", relative_to=__file__)

    training = config.training
    training.sde = "vesde"
    training.continuous = False

    sampling = config.sampling
    sampling.method = "pc"
    sampling.predictor = "none"
    sampling.corrector = "annealed_langevin"
    sampling.n_steps_each = 5
    sampling.snr = 0.128

    model = config.model
    model.name = "ncsnv2_64"
    model.scale_by_sigma = True
    model.num_scales = 500
    model.ema_rate = 0.999
    model.normalization = "InstanceNorm++"
    model.nonlinearity = "elu"
    model.nf = 128

    optim = config.optim
    optim.weight_decay = 0.0
    optim.optimizer = "Adam"
    optim.lr = 1e-4
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.warmup = 0
    optim.grad_clip = -1.0  # no clipping
    return config
