"""diffusion-jax train --config configs/ffhq/ve/ncsnpp_1024_continuous.py --workdir runs/ffhq1024_ve_ncsnpp_continuous --config.data.folder_path=/path/to/ffhq

NCSN++ with the VE SDE on FFHQ 1024x1024: score_sde's configs/ve/ffhq_ncsnpp_continuous.py,
identical to the CelebA-HQ 1024x1024 config (configs/celebahq/ve/ncsnpp_1024_continuous.py)
except that the loss is averaged over pixels (``training.reduce_mean = True``).

Data: score_sde reads FFHQ from TFRecords, which need TensorFlow and are not supported here.
Put FFHQ's images1024x1024 in a folder and pass it with ``--config.data.folder_path``, as in the
command above; ``data.folder_path`` is empty here.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("../../celebahq/ve/ncsnpp_1024_continuous.py", relative_to=__file__)
    config.training.reduce_mean = True
    config.data.folder_path = ""  # set on the command line
    return config
