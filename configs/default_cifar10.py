"""Base config for CIFAR-10: score_sde's configs/default_cifar10_configs.py (not run directly).

Training, sampling, evaluation, data and optimiser defaults shared by every CIFAR-10 experiment,
with score_sde's values. The variants under configs/cifar10/ start from this file and set the
SDE, the network and the sampler. Differences in meaning from score_sde:

* ``eval.begin_ckpt`` / ``eval.end_ckpt`` are optimizer steps here, checkpoint numbers there
  (score_sde's checkpoint k holds step k * snapshot_freq): checkpoints 9..26 are steps
  450,000..1,300,000.
* ``sampling.num_steps = 0`` samples with the SDE's N (``model.num_scales``) time steps on
  score_sde's time points (``sampling.grid = "score_sde"``), as score_sde's PC samplers do.
"""

from diffusion_jax.builders.config import default_config


def get_config():
    config = default_config()
    config.seed = 42

    training = config.training
    training.batch_size = 128
    training.n_iters = 1300001
    training.snapshot_freq = 50000
    training.log_freq = 50
    training.eval_freq = 100
    training.snapshot_freq_for_preemption = 10000
    training.snapshot_sampling = True
    training.likelihood_weighting = False
    training.continuous = True
    training.n_jitted_steps = 5
    training.reduce_mean = False

    sampling = config.sampling
    sampling.method = "pc"
    sampling.num_steps = 0  # the SDE's N
    sampling.grid = "score_sde"
    sampling.n_steps_each = 1
    sampling.noise_removal = True
    sampling.probability_flow = False
    sampling.snr = 0.16

    evaluate = config.eval
    evaluate.begin_ckpt = 9 * training.snapshot_freq
    evaluate.end_ckpt = 26 * training.snapshot_freq
    evaluate.batch_size = 1024
    evaluate.enable_sampling = False
    evaluate.num_samples = 50000
    evaluate.enable_loss = True
    evaluate.enable_bpd = False
    evaluate.bpd_dataset = "test"

    data = config.data
    data.dataset = "CIFAR10"
    data.image_size = 32
    data.random_flip = True
    data.centered = False
    data.uniform_dequantization = False
    data.num_channels = 3

    model = config.model
    model.sigma_min = 0.01
    model.sigma_max = 50.0
    model.num_scales = 1000
    model.beta_min = 0.1
    model.beta_max = 20.0
    model.dropout = 0.1
    model.embedding_type = "fourier"

    optim = config.optim
    optim.weight_decay = 0.0
    optim.optimizer = "Adam"
    optim.lr = 2e-4
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.warmup = 5000
    optim.grad_clip = 1.0
    return config
