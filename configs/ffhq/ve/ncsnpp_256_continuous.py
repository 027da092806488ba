"""diffusion-jax train --config configs/ffhq/ve/ncsnpp_256_continuous.py --workdir runs/ffhq256_ve_ncsnpp_continuous --config.data.folder_path=/path/to/ffhq

NCSN++ with the VE SDE on FFHQ 256x256: score_sde's configs/ve/ffhq_256_ncsnpp_continuous.py,
identical to the CelebA-HQ 256x256 config (configs/celebahq/ve/ncsnpp_256_continuous.py) but
for the data.

Data: score_sde reads FFHQ from TFRecords, which need TensorFlow and are not supported here.
Put the images in a folder (e.g. FFHQ's images1024x1024; they are resized to 256x256) and pass it
with ``--config.data.folder_path``, as in the command above; ``data.folder_path`` is empty here.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("../../celebahq/ve/ncsnpp_256_continuous.py", relative_to=__file__)
    config.data.folder_path = ""  # set on the command line
    return config
