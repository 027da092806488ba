"""diffusion-jax train --config configs/cifar10/edm/ddpmpp.py --workdir runs/cifar10_edm_ddpmpp

EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"),
unconditional CIFAR-10 as NVlabs/edm's ``train.py --arch=ddpmpp --precond=edm`` trains it with
its default options. Not one of score_sde's experiments.

* Noise process: sigma(t) = t from sigma_min = 0.002 to sigma_max = 80 (``training.sde = "edm"``).
* Preconditioning: EDM's c_skip / c_out / c_in / c_noise = ln(sigma) / 4 with sigma_data = 0.5;
  ``model.output`` / ``model.noise_cond`` are left empty, which selects it for ``sde = "edm"``.
* Loss: ln sigma ~ N(P_mean = -1.2, P_std = 1.2), weight (sigma^2 + sigma_data^2) /
  (sigma sigma_data)^2, summed over pixels (EDM's Table 1).
* Network: EDM's "DDPM++" is score_sde's DDPM++ with ch_mult (2, 2, 2) (three resolutions,
  256 channels each), 4 residual blocks per resolution, attention at 16x16, dropout 0.13 and a
  sinusoidal noise embedding, built here with score_sde's NCSN++/DDPM++ code. EDM's
  re-implementation differs in details such as the weight initialisation (Xavier-uniform), so
  its checkpoints are not interchangeable with ours; the parameter count is the same,
  55,732,739 (EDM reports 55.73M).
* Optimiser: Adam, lr 1e-3 ramped up linearly over 10M images (19,531 steps of 512), no gradient
  clipping; 200M training images = 390,625 steps of batch 512.
* EMA: EDM keeps a half-life of 500k images: decay 0.5 ** (512 / 500,000) = 0.99929 per step.
  EDM also shortens the half-life to 5% of the images seen early on; ``model.ema_warmup``
  (decay <= (1 + step) / (10 + step)) is the closest option here.
* Sampling: EDM's deterministic 2nd-order Heun sampler (Algorithm 1, S_churn = 0) on the Karras
  grid with rho = 7. EDM's "18 steps, 35 NFE" are 18 noise levels from 80 to 0.002 followed by
  a final Euler step to sigma = 0, which returns the denoiser D(x; 0.002): here 17 Heun steps
  between the same 18 levels (34 NFE) plus the final denoising evaluation
  (``sampling.noise_removal``), 35 NFE.

Not reproduced: EDM's non-leaking augmentation pipeline (``--augment=0.12``, with the network
conditioned on the augmentation parameters) has no counterpart here; EDM trains without plain
x-flips (``--xflip=False``), so ``data.random_flip`` is False.
"""

from diffusion_jax.builders.config import load_config

_BATCH = 512


def get_config():
    config = load_config("../../default_cifar10.py", relative_to=__file__)

    training = config.training
    training.sde = "edm"
    training.continuous = True
    training.batch_size = _BATCH
    training.n_iters = 200_000_000 // _BATCH  # EDM's --duration=200 (million images)
    training.weighting = "edm"
    training.likelihood_weighting = False
    training.time_sampler = "lognormal"
    training.p_mean = -1.2
    training.p_std = 1.2
    training.reduce_mean = False  # EDM sums the loss over pixels and averages over the batch

    sampling = config.sampling
    sampling.method = "heun"  # EDM's Algorithm 1 (the sampler library's EDMSampler)
    sampling.num_steps = 17  # 18 noise levels; with noise_removal: EDM's 18 steps, 35 NFE
    sampling.noise_removal = True
    sampling.grid = "karras"
    sampling.rho = 7.0
    sampling.s_churn = 0.0
    sampling.s_tmin = 0.0
    sampling.s_tmax = float("inf")
    sampling.s_noise = 1.0

    evaluate = config.eval
    evaluate.begin_ckpt = 0  # every checkpoint
    evaluate.end_ckpt = -1

    data = config.data
    data.centered = True  # EDM trains on [-1, 1]
    data.random_flip = False

    model = config.model
    model.sigma_min = 0.002
    model.sigma_max = 80.0
    model.sigma_data = 0.5
    model.output = ""  # "" with sde "edm": EDM's preconditioning
    model.noise_cond = ""
    model.ema_rate = 0.5 ** (_BATCH / 500_000)  # EMA half-life of 500k images
    model.ema_warmup = True

    model.name = "ncsnpp"
    model.nf = 128
    model.ch_mult = (2, 2, 2)
    model.num_res_blocks = 4
    model.attn_resolutions = (16,)
    model.dropout = 0.13
    model.embedding_type = "positional"
    model.scale_by_sigma = False  # the preconditioning scales the output
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = False
    model.skip_rescale = True
    model.resblock_type = "biggan"
    model.progressive = "none"
    model.progressive_input = "none"
    model.progressive_combine = "sum"
    model.attention_type = "ddpm"
    model.init_scale = 0.0
    model.conv_size = 3

    optim = config.optim
    optim.optimizer = "Adam"
    optim.lr = 1e-3
    optim.beta1 = 0.9
    optim.beta2 = 0.999
    optim.eps = 1e-8
    optim.weight_decay = 0.0
    optim.warmup = 10_000_000 // _BATCH  # EDM's lr ramp-up over 10M images
    optim.grad_clip = -1.0  # EDM does not clip gradients
    return config
