"""Sample quality of a digits checkpoint over several sampling seeds: the spread that one
evaluation hides.

    python scripts/digits_fid_seeds.py --workdir runs/digits [--seeds 0,1,2,3,4] [--num_samples 1000]

For each seed, ``num_samples`` samples (the workdir's own sampler, the EMA parameters, key
``PRNGKey(seed)``) are judged by the digits detector (``eval.detector = 'digits'``) against the
train split, as ``diffusion-jax eval`` judges them: FID, Inception score, precision and recall.
Prints one JSON line per seed, then the mean and standard deviation (ddof 1) over the seeds.
``eval`` itself draws one fixed set of samples per checkpoint (its key is the checkpoint step),
so comparing two checkpoints by one FID each cannot tell a difference from sampling noise.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

import diffusion_jax
from diffusion_jax import evaluation as ev
from diffusion_jax.evaluation.digits import load_digits_split

METRICS = ("fid", "inception_score", "precision", "recall")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--num_samples", type=int, default=1000)
    args = parser.parse_args(argv)
    model = diffusion_jax.load(args.workdir, args.step)
    detector = ev.get_detector("digits")
    train, _ = load_digits_split("train")
    real = ev.extract_features(detector, train).features
    reference = ev.ReferenceStatistics(ev.statistics_of(real), detector.name, detector.preprocessing)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        images, info = model.sample(jax.random.PRNGKey(seed), args.num_samples)
        m = ev.evaluate_samples(
            detector,
            np.clip(images, 0.0, 1.0),
            reference,
            key=jax.random.PRNGKey(0),
            real_features=real,
            counts=(),
            kid_subset_size=min(500, args.num_samples),
        )
        pr = m.precision_recall
        assert pr is not None  # real_features given
        row = {
            "seed": seed,
            "nfe": int(np.asarray(info.nfe)),
            "fid": m.fid.fid,
            "inception_score": m.inception_score.mean,
            "precision": pr.precision,
            "recall": pr.recall,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {"workdir": str(args.workdir), "step": model.step, "num_samples": args.num_samples, "seeds": len(rows)}
    for k in METRICS:
        values = np.asarray([r[k] for r in rows], np.float64)
        summary[k] = [float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0]
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
