"""diffusion-jax train --config configs/folder/edm.py --workdir runs/folder --config.data.folder_path=/path/to/images

A folder of your own images (PNG, JPEG, ...), trained with the main job's EDM recipe at 32x32.

* Images are centre-cropped to a square and resized to ``data.image_size``; class subfolders
  (``/path/to/images/cat/*.png``, ``.../dog/*.png``) give labels, a flat folder gives none.
* ``data.num_channels = None`` takes the channel count from the images: 3 if any image is in
  colour, else 1. Setting it to a number that disagrees with the images stops the run with one
  message (colour images are never trained as grey by mistake).
* The folder has one split: ``eval`` reads the same images.
* For a class-conditional model with classifier-free guidance, add
  ``--config.model.num_classes=<number of subfolders>``.

Sampling and evaluation then need only the workdir:
``diffusion-jax sample --workdir runs/folder --num_samples=64``.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("../digits/edm.py", relative_to=__file__)

    data = config.data
    data.dataset = "folder"
    data.folder_path = ""  # set on the command line: --config.data.folder_path=/path/to/images
    data.image_size = 32
    data.num_channels = None  # from the images
    data.random_flip = True

    model = config.model
    model.nf = 64
    model.ch_mult = (1, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)

    training = config.training
    training.batch_size = 64
    training.n_iters = 20000
    training.snapshot_freq = 2000
    training.snapshot_freq_for_preemption = 1000
    training.eval_freq = 1000
    training.snapshot_samples = 64

    config.sampling.batch_size = 64
    config.eval.batch_size = 64
    config.eval.num_samples = 64
    config.eval.enable_bpd = False
    return config
