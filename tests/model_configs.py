"""score_sde's CIFAR-10 network settings as ml_collections ConfigDicts (model and data sections).

Values mirror score_sde's published configs (``configs/default_cifar10_configs.py`` overridden by
``configs/ve/cifar10_ncsnpp_continuous.py``, ``configs/ve/cifar10_ncsnpp_deep_continuous.py``,
``configs/vp/cifar10_ddpmpp_continuous.py``, ``configs/vp/cifar10_ddpmpp_deep_continuous.py`` and
``configs/vp/ddpm/cifar10.py``); the parity fixtures' manifests record the same values. Only the
``model`` and ``data`` sections are reproduced here; the training configs copy them.
"""

import ml_collections


def _data(*, centered: bool) -> ml_collections.ConfigDict:
    data = ml_collections.ConfigDict()
    data.dataset = "CIFAR10"
    data.image_size = 32
    data.random_flip = True
    data.centered = centered
    data.uniform_dequantization = False
    data.num_channels = 3
    return data


def _default_model() -> ml_collections.ConfigDict:
    # score_sde's configs/default_cifar10_configs.py
    model = ml_collections.ConfigDict()
    model.sigma_min = 0.01
    model.sigma_max = 50
    model.num_scales = 1000
    model.beta_min = 0.1
    model.beta_max = 20.0
    model.dropout = 0.1
    model.embedding_type = "fourier"
    return model


def _ncsnpp_model(*, num_res_blocks: int) -> ml_collections.ConfigDict:
    model = _default_model()
    model.name = "ncsnpp"
    model.scale_by_sigma = True
    model.ema_rate = 0.999
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = num_res_blocks
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = True
    model.fir_kernel = [1, 3, 3, 1]
    model.skip_rescale = True
    model.resblock_type = "biggan"
    model.progressive = "none"
    model.progressive_input = "residual"
    model.progressive_combine = "sum"
    model.attention_type = "ddpm"
    model.init_scale = 0.0
    model.fourier_scale = 16
    model.conv_size = 3
    return model


def _ddpmpp_model(*, num_res_blocks: int) -> ml_collections.ConfigDict:
    model = _default_model()
    model.name = "ncsnpp"
    model.scale_by_sigma = False
    model.ema_rate = 0.9999
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = num_res_blocks
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = False
    model.fir_kernel = [1, 3, 3, 1]
    model.skip_rescale = True
    model.resblock_type = "biggan"
    model.progressive = "none"
    model.progressive_input = "none"
    model.progressive_combine = "sum"
    model.attention_type = "ddpm"
    model.init_scale = 0.0
    model.embedding_type = "positional"
    model.fourier_scale = 16
    model.conv_size = 3
    return model


def _config(model, *, centered):
    config = ml_collections.ConfigDict()
    config.model = model
    config.data = _data(centered=centered)
    return config


def cifar10_ncsnpp_continuous() -> ml_collections.ConfigDict:
    """NCSN++, VE SDE (configs/ve/cifar10_ncsnpp_continuous.py)."""
    return _config(_ncsnpp_model(num_res_blocks=4), centered=False)


def cifar10_ncsnpp_deep_continuous() -> ml_collections.ConfigDict:
    """NCSN++ deep, VE SDE (configs/ve/cifar10_ncsnpp_deep_continuous.py)."""
    return _config(_ncsnpp_model(num_res_blocks=8), centered=False)


def cifar10_ddpmpp_continuous() -> ml_collections.ConfigDict:
    """DDPM++, VP SDE (configs/vp/cifar10_ddpmpp_continuous.py)."""
    return _config(_ddpmpp_model(num_res_blocks=4), centered=True)


def cifar10_ddpmpp_deep_continuous() -> ml_collections.ConfigDict:
    """DDPM++ deep, VP SDE (configs/vp/cifar10_ddpmpp_deep_continuous.py)."""
    return _config(_ddpmpp_model(num_res_blocks=8), centered=True)


def cifar10_ddpm() -> ml_collections.ConfigDict:
    """DDPM (configs/vp/ddpm/cifar10.py; identical network for cifar10_continuous.py)."""
    model = _default_model()
    model.name = "ddpm"
    model.scale_by_sigma = False
    model.ema_rate = 0.9999
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    return _config(model, centered=True)


# manifest name -> (config factory, score_sde config file)
CIFAR10_MODELS = {
    "ncsnpp_continuous": cifar10_ncsnpp_continuous,
    "ncsnpp_deep_continuous": cifar10_ncsnpp_deep_continuous,
    "ddpmpp_continuous": cifar10_ddpmpp_continuous,
    "ddpmpp_deep_continuous": cifar10_ddpmpp_deep_continuous,
    "ddpm": cifar10_ddpm,
}
