"""The floor of the main job's sample-quality metrics: the real test digits judged exactly as
``diffusion-jax eval`` judges samples (digits detector, train-split reference, same settings).

    python scripts/digits_real_quality.py [--config configs/digits/edm.py]

Prints one JSON line with the same keys as the ``eval`` results (FID at the 297 test digits,
KID, Inception score, precision/recall).
"""

import argparse
import json
import pathlib
import tempfile

import numpy as np

from diffusion_jax.builders import evaluation as quality
from diffusion_jax.builders.config import load_config
from diffusion_jax.modes import setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", default=str(pathlib.Path(__file__).resolve().parent.parent / "configs/digits/edm.py")
    )
    args = parser.parse_args()
    setup.quiet_library_notices()
    config = load_config(args.config)
    info = setup.data_info(config)

    def split(name):
        with setup.build_data(config, split=name, evaluation=True, uniform_dequantization=False) as it:
            for batch in it:
                x = batch["image"][batch["mask"]]
                yield np.clip((x + 1.0) / 2.0 if info.centered else x, 0.0, 1.0)

    detector = quality.build_detector(config)
    with tempfile.TemporaryDirectory() as tmp:
        reference = quality.build_reference(config, detector, lambda: split("train"), pathlib.Path(tmp), primary=True)
    test = np.concatenate(list(split("eval")))
    print(json.dumps({"split": "test", **quality.quality_metrics(config, detector, reference, test, step=0)}))


if __name__ == "__main__":
    main()
