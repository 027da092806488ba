"""Writes pytorch-fid's FID Inception weights as an .npz that needs no torch to read.

    pip install torch   # for this command only
    python scripts/inception_weights.py pt_inception-2015-12-05-6726825d.pth inception_fid.npz

The .pth (pytorch-fid's release file; nothing is downloaded here) is read with torch's
weights-only loader; every tensor's name and shape is checked against the network before
anything is written. Point ``eval.inception_weights`` or ``$DIFFUSION_JAX_INCEPTION_WEIGHTS`` to
either file.
"""

from __future__ import annotations

import argparse

from diffusion_jax.evaluation import inception
from diffusion_jax.models.convert import load_torch_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pth", help=f"pytorch-fid's {inception.PYTORCH_FID_WEIGHTS_FILE}")
    parser.add_argument("npz", help="output .npz")
    args = parser.parse_args(argv)
    state = load_torch_checkpoint(args.pth)
    inception.save_inception_npz(state, args.npz)
    print(f"wrote {len([k for k in state if not k.endswith('num_batches_tracked')])} tensors to {args.npz}")


if __name__ == "__main__":
    main()
