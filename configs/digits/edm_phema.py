"""diffusion-jax train --config configs/digits/edm_phema.py --workdir runs/digits_phema

The main job on EDM's SDE (configs/digits/edm_sigma.py) with EDM2's post-hoc EMA (Karras et al. 2024): besides the
main EMA (decay 0.999 with warm-up), two power-function EMAs of relative length sigma_rel = 0.05
and 0.10 (EDM2's pair) are tracked, and snapshots of them are saved every 20 steps (75 over the
1,500 steps, 1.3% of the run). Denser snapshots reconstruct other lengths more
closely: scripts/posthoc_ema_accuracy.py measures the error against the spacing. The network,
the data and the losses are edm_sigma.py's.

Then any EMA length, without retraining (docs/ema.md):

    diffusion-jax posthoc_ema --workdir runs/digits_phema --sigma_rel 0.02,0.05,0.1,0.2
    diffusion-jax eval --workdir runs/digits_phema --config.sampling.ema=sigma_rel:0.02

experiments/digits_posthoc_ema/run.py runs the whole sweep and writes the table of the README.
"""

from diffusion_jax.builders.config import load_config


def get_config():
    config = load_config("edm_sigma.py", relative_to=__file__)
    config.model.ema_sigma_rels = (0.05, 0.1)
    config.model.ema_snapshot_freq = 20
    return config
