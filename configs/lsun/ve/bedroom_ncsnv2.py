"""diffusion-jax train --config configs/lsun/ve/bedroom_ncsnv2.py --workdir runs/lsun_bedroom_ve_ncsnv2

NCSNv2 (Song & Ermon 2020) on LSUN bedroom 128x128: score_sde's configs/ve/ncsnv2/bedroom.py.
The 128x128 NCSNv2 network, discrete SMLD training over L = 1086 noise scales from 190 to 0.01,
batch 128; annealed Langevin dynamics (3 steps per scale, snr 0.095); Adam at 1e-4 without
warm-up or gradient clipping.

score_sde's file sets ``training.continuouse = False`` (a misspelt key that leaves continuous
training on); NCSNv2 is a discrete-noise-scale model, so ``training.continuous = False`` here.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("../../default_lsun.py", relative_to=__file__)

    training = config.training
    training.batch_size = 128
    training.sde = "vesde"
    training.continuous = False

    sampling = config.sampling
    sampling.method = "pc"
    sampling.predictor = "none"
    sampling.corrector = "annealed_langevin"
    sampling.n_steps_each = 3
    sampling.snr = 0.095

    data = config.data
    data.category = "bedroom"
    data.image_size = 128

    model = config.model
    model.name = "ncsnv2_128"
    model.scale_by_sigma = True
    model.sigma_max = 190.0
    model.num_scales = 1086
    model.ema_rate = 0.9999
    model.sigma_min = 0.01
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
