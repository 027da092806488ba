"""diffusion-jax train --config configs/celebahq/ve/ncsnpp_256_continuous.py --workdir runs/celebahq256_ve_ncsnpp_continuous --config.data.folder_path=/path/to/celebahq

NCSN++ with the VE SDE on CelebA-HQ 256x256: score_sde's
configs/ve/celebahq_256_ncsnpp_continuous.py. The LSUN 256x256 network and settings
(configs/lsun/ve/bedroom_ncsnpp_continuous.py) with sigma_max = 348.

Data: score_sde reads CelebA-HQ from TFRecords, which need TensorFlow and are not supported here.
Put the images (any size; they are centre-cropped and resized to 256x256) in a folder and pass it
with ``--config.data.folder_path``, as in the command above; ``data.folder_path`` is empty here.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("../../lsun/ve/bedroom_ncsnpp_continuous.py", relative_to=__file__)

    data = config.data
    data.dataset = "folder"
    data.folder_path = ""  # set on the command line
    data.category = ""
    data.image_size = 256
    data.num_channels = 3

    config.model.sigma_max = 348.0
    return config
