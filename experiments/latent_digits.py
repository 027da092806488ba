"""Text-to-digits in latent space: does the model draw the prompted digit, and avoid the negative
prompt's?

    diffusion-jax train --config configs/digits/autoencoder.py --workdir runs/digits_ae
    diffusion-jax eval --workdir runs/digits_ae
    diffusion-jax encode --workdir runs/digits_ae --out runs/digits_latents
    diffusion-jax train --config configs/digits/text_latent.py --workdir runs/digits_t2i
    python experiments/latent_digits.py --ae runs/digits_ae --t2i runs/digits_t2i [--per_prompt 20]

The judge is the digits detector's classifier (trained on the real 8x8 train digits,
:mod:`diffusion_jax.evaluation.digits`), reading each decoded 16x16 image after 2x2 average
pooling back to 8x8. For each guidance scale w ((1 + w) s(x | prompt) - w s(x | negative)):

* prompted: ``per_prompt`` samples of "a <digit>" for each digit; the fraction read as that digit;
* negative: ``per_prompt`` samples of the empty prompt with the negative prompt "a <digit>", for
  each digit; the fraction *not* read as that digit (w = 0 is the unconditional model: about
  90% by chance);
* thickness: the mean ink mass (sum of pixels in [0, 1]) of "a thin <digit>" and "a bold <digit>"
  samples over all digits.

Also the classifier's accuracy on the held-out real digits at 16x16 (pooled back, the samples'
path) and on their reconstructions by the autoencoder. Writes a Markdown table to stdout and to
``<t2i>/latent_digits.md``, and one PNG grid per scale (rows: the digits 0-9 prompted "a
<digit>", up to 10 samples each) to ``<t2i>/latent_digits_w<w>.png``.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import numpy as np

from diffusion_jax.builders import autoencoder as ae_builders
from diffusion_jax.builders import config as config_lib
from diffusion_jax.builders.data import build_data
from diffusion_jax.builders.model import caption_tokenizer
from diffusion_jax.builders.sampler import build_sampler
from diffusion_jax.data.captions import DIGIT_NAMES, ink_mass
from diffusion_jax.evaluation.digits import DigitsClassifier, digits_classifier_params
from diffusion_jax.modes import setup
from diffusion_jax.modes.prompts import Prompt, sample_prompt
from diffusion_jax.training.logging import save_image_grid


def pool_to_8x8(images: np.ndarray) -> np.ndarray:
    """(B, 8k, 8k, 1) images in [0, 1] -> (B, 8, 8, 1) by k x k average pooling."""
    b, h, _, c = images.shape
    k = h // 8
    return images.reshape(b, 8, k, 8, k, c).mean(axis=(2, 4))


def read_digits(images: np.ndarray) -> np.ndarray:
    """The detector's class of each image (B, 8k, 8k, 1) in [0, 1]."""
    _, logits = DigitsClassifier().apply(digits_classifier_params(), pool_to_8x8(np.asarray(images, np.float32)))
    return np.asarray(np.argmax(logits, axis=-1))


def held_out(ae_workdir: pathlib.Path) -> tuple[int, float, float]:
    """(examples, accuracy on the held-out digits at the autoencoder's size, on their reconstructions)."""
    restored = ae_builders.restore_autoencoder(ae_workdir)
    images, recons, labels = [], [], []
    for batch in build_data(restored.config, split="eval", evaluation=True):
        keep = batch["mask"]
        x = batch["image"][keep]
        x_hat = np.asarray(restored.module.apply({"params": restored.params}, x))
        images.append((x + 1) / 2)
        recons.append(np.clip((x_hat + 1) / 2, 0, 1))
        labels.append(batch["label"][keep])
    y = np.concatenate(labels)
    real = float(np.mean(read_digits(np.concatenate(images)) == y))
    return len(y), real, float(np.mean(read_digits(np.concatenate(recons)) == y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ae", required=True, type=pathlib.Path, help="the autoencoder's workdir")
    parser.add_argument("--t2i", required=True, type=pathlib.Path, help="the text-conditioned model's workdir")
    parser.add_argument("--per_prompt", type=int, default=20, help="samples per prompt")
    parser.add_argument("--scales", default="0,1,3", help="guidance scales w, comma-separated")
    parser.add_argument("--raw", action="store_true", help="sample the trained parameters, not their EMA")
    args = parser.parse_args()
    setup.quiet_library_notices()
    n_real, real, recon = held_out(args.ae)

    config = config_lib.workdir_config(args.t2i)
    run = setup.prepare(config, args.t2i, create=False)
    exp = run.exp
    step, state = setup.restore_state(run.config, exp, args.t2i, None)
    sampler = build_sampler(run.config, sde=exp.sde)
    n = args.per_prompt
    params = state.params if args.raw else state.ema_params

    tok = caption_tokenizer(run.config.data.captions)
    empty = tok([""])

    def draw(prompts: list[str], negatives: list[str] | None, w: float, seed: int) -> np.ndarray:
        """``n`` samples of each prompt (with its negative prompt), decoded, prompt by prompt."""
        ids = np.repeat(tok(prompts), n, axis=0)
        neg = np.repeat(tok(negatives), n, axis=0) if negatives else np.repeat(empty, len(ids), axis=0)
        x, _ = sample_prompt(exp, params, jax.random.PRNGKey(seed), len(ids), sampler, Prompt(ids, neg), w)
        images = np.asarray(exp.to_data_range(x))
        return images.reshape(len(prompts), n, *images.shape[1:])

    rows = [
        f"Checkpoint {step} of {args.t2i} ({'trained parameters' if args.raw else 'EMA'}); {n} samples per prompt; "
        "judge: the digits classifier on 2x2-pooled images.",
        "",
        '| guidance scale w | prompted digit read ("a <digit>") | negative digit avoided ("" not "a <digit>") '
        '| ink of "a thin <digit>" / "a bold <digit>" | seconds |',
        "|---|---|---|---|---|",
    ]
    for w in (float(s) for s in args.scales.split(",")):
        t0 = time.perf_counter()
        digits = np.repeat(np.arange(10), n)
        prompted = draw([f"a {name}" for name in DIGIT_NAMES], None, w, 1)
        hits = read_digits(prompted.reshape(-1, *prompted.shape[2:])) == digits
        grid = prompted[:, :10].reshape(-1, *prompted.shape[2:])
        negative = draw([""] * 10, [f"a {name}" for name in DIGIT_NAMES], w, 2)
        avoided = read_digits(negative.reshape(-1, *negative.shape[2:])) != digits
        thin = ink_mass(draw([f"a thin {name}" for name in DIGIT_NAMES], None, w, 3).reshape(-1, *prompted.shape[2:]))
        bold = ink_mass(draw([f"a bold {name}" for name in DIGIT_NAMES], None, w, 4).reshape(-1, *prompted.shape[2:]))
        seconds = time.perf_counter() - t0
        rows.append(
            f"| {w:g} | {np.mean(hits):.3f} | {np.mean(avoided):.3f} | {np.mean(thin):.1f} / {np.mean(bold):.1f} "
            f"| {seconds:.0f} |"
        )
        save_image_grid(
            args.t2i / f"latent_digits{'_raw' if args.raw else ''}_w{w:g}.png", grid, ncol=min(n, 10), upscale=4
        )
    rows += [
        "",
        f"Held-out real digits ({n_real}, 16x16 pooled to 8x8) read correctly: {real:.3f}; their autoencoder "
        f"reconstructions: {recon:.3f}.",
    ]
    table = "\n".join(rows)
    print(table)
    (args.t2i / f"latent_digits{'_raw' if args.raw else ''}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
