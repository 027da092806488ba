"""Convert a score_sde checkpoint into a diffusion_jax workdir (same as ``diffusion-jax convert``).

    python scripts/convert_score_sde.py --config configs/cifar10/ve/ncsnpp_continuous.py \\
        --checkpoint checkpoint_26.pth --workdir runs/converted_ncsnpp [--source score_sde_jax]

The workdir then works with ``diffusion-jax sample``, ``eval`` (likelihoods) and ``train``
(fine-tuning). ``.pth`` files are read with torch's weights-only loader, so no pickled code
runs (``pip install "diffusion_jax[convert]"`` for torch).
"""

from diffusion_jax.cli import main

if __name__ == "__main__":
    import sys

    sys.argv.insert(1, "convert")
    main()
