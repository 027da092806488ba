"""Controllable generation on the embedded 8x8 digits: inverse problems on the held-out test
digits, and class guidance. See the README next to this file for the commands and results.

    python experiments/digits_conditioning/run.py inverse --workdir runs/digits_sigma --out OUT
        [--tasks bottom_half,random50,outpaint,sr4x4,deblur] [--methods ddrm,pigdm,...]
        [--num_images 297] [--sigma_y 0]
    python experiments/digits_conditioning/run.py guidance --workdir runs/digits_cond --out OUT
        [--scales 0,1,2,3,5] [--negative_scales 1,2,3,5] [--per_class 10]
    python experiments/digits_conditioning/run.py inputs --out OUT --num_images 10
    python experiments/digits_conditioning/run.py classifier_guidance --workdir runs/digits_sigma
        --classifier_workdir runs/digits_classifier --out OUT [--scales 0,1,2,4] [--per_class 10]

``inverse``: each held-out test digit (the 297 digits of the ``test`` split, which no network
saw) is measured by each task's operator, noise-free or with Gaussian noise of standard deviation
``--sigma_y`` (in model units, where the data span [-1, 1]), and completed by each method
(diffusion_jax.modes.tasks.TaskRunner, what ``diffusion-jax sample --task`` runs). Reported per
task and method: the largest change of a known pixel (masks; 0 means the measurement is kept
exactly), the measurement residual RMS ||A x - y|| / sqrt(m) in model units, and the accuracy of
the digits classifier of real digits (diffusion_jax.evaluation.digits, trained on the train split)
on the completed digits against their true labels; beside them the same classifier on the true
digits (the ceiling) and on the measurement itself shown as an image (the floor: no model).

``guidance`` (a class-conditional network trained with label dropout, configs/digits/edm_cond.py):
``per_class`` samples of each digit with classifier-free guidance weight w (1: the conditional
model, 0: the unconditional one), the fraction the digits classifier assigns to the requested
digit; and with each digit as a negative label (the positive label null), the fraction of
samples that avoid it. ``classifier_guidance``: the same fraction with a trained noise-conditional
classifier (configs/digits/classifier.py) guiding the unconditional model at scale w.

Results: ``OUT/<part>.json``, ``OUT/<part>.md`` (the tables) and PNG grids in ``OUT``; with
``--sigma_y`` > 0 the inverse results are ``OUT/inverse_sigma<sigma_y>*``, and ``--name`` gives
them another stem.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import diffusion_jax
from diffusion_jax.evaluation import get_detector
from diffusion_jax.evaluation.digits import load_digits_split
from diffusion_jax.modes.tasks import Task, TaskRunner
from diffusion_jax.training.logging import save_image_grid

TASKS = {
    "bottom_half": dict(task="inpaint", mask="bottom_half"),
    "random50": dict(task="inpaint", mask="random:0.5"),
    "outpaint": dict(task="outpaint", border=2),
    "sr4x4": dict(task="super_resolve", factor=2),
    "deblur": dict(task="deblur", blur="gaussian:1"),
}
# Each method with its step count chosen for a comparable budget (NFE in the table).
METHODS = {
    "ddrm": dict(num_steps=20),
    "pigdm": dict(num_steps=20),
    "diffpir": dict(num_steps=20),
    "replacement": dict(num_steps=20),
    "pc_projection": dict(num_steps=20),
    "dps": dict(num_steps=50),
    "daps": dict(num_steps=10, options=dict(ode_steps=2, langevin_steps=20)),
    # TDS weights its particles by p(y | x), so it needs sigma_y > 0; 4 particles per digit.
    "tds": dict(num_steps=20, options=dict(num_particles=4)),
}
# The methods that weight by p(y | x) and refuse sigma_y = 0 (conditioning.base.require_noisy).
NOISY_ONLY = ("daps", "tds")


def classify(detector, images: np.ndarray) -> np.ndarray:
    logits = jax.jit(detector.apply)(detector.params, jnp.asarray(np.clip(images, 0.0, 1.0)))[1]
    return np.asarray(jnp.argmax(logits, axis=-1))


def _grid_png(path, rows: list[np.ndarray], *, n: int = 10) -> None:
    save_image_grid(path, np.concatenate([r[:n] for r in rows]), ncol=n, upscale=4)


def inverse(args) -> None:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = diffusion_jax.load(args.workdir)
    runner = TaskRunner(model)
    images, labels = load_digits_split("test")
    images, labels = images[: args.num_images], labels[: args.num_images]
    detector = get_detector("digits")
    ceiling = float(np.mean(classify(detector, images) == labels))
    tasks = args.tasks.split(",")
    methods = args.methods.split(",")
    rows, record = [], {"workdir": str(args.workdir), "step": model.step, "num_images": len(images)}
    record["accuracy_true_digits"] = ceiling
    record["sigma_y"] = args.sigma_y
    record["options"] = args.options
    stem = args.name or ("inverse" if args.sigma_y == 0 else f"inverse_sigma{args.sigma_y:g}")
    for name in tasks:
        spec = dict(TASKS[name])
        grid = [images]
        for method in methods:
            m = METHODS[method]
            options = {**m.get("options", {}), **args.options.get(method, {})}
            task = Task(method=method, num_steps=m["num_steps"], options=options, sigma_y=args.sigma_y, **spec)
            key = jax.random.PRNGKey(args.seed)
            t0 = time.perf_counter()
            res = runner.run(task, key, inputs=images)
            seconds = time.perf_counter() - t0
            op, mask = runner.operator(task, seed=model.config.seed)
            x_model = jnp.asarray(runner.to_model(res.results))
            resid = np.asarray(op.forward(x_model)) - res.measurement
            rms = float(np.sqrt(np.mean(resid**2)))
            known = float(np.max(np.abs(res.results - images) * mask)) if mask is not None else None
            acc = float(np.mean(classify(detector, res.results) == labels))
            floor = float(np.mean(classify(detector, res.view) == labels))
            if len(grid) == 1:
                grid.append(res.view)
            grid.append(np.clip(res.results, 0.0, 1.0))
            row = dict(
                task=name,
                method=method,
                options=args.options.get(method, {}),
                nfe=res.nfe,
                seconds=round(seconds, 1),
                known_max_abs=known,
                residual_rms=rms,
                accuracy=acc,
                accuracy_measurement=floor,
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
        _grid_png(out / f"{stem}_{name}.png", grid)
    record["rows"] = rows
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2))
    lines = [
        f"Held-out test digits: {len(images)}; sigma_y = {args.sigma_y:g}; digits classifier on the true "
        f"digits: {ceiling:.3f}.",
        "",
        "| task | method | NFE | known pixels max abs change | residual RMS | accuracy | accuracy of the "
        "measurement alone | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        known = "-" if r["known_max_abs"] is None else f"{r['known_max_abs']:.1e}"
        lines.append(
            f"| {r['task']} | {r['method']} | {r['nfe']} | {known} | {r['residual_rms']:.1e} | "
            f"{r['accuracy']:.3f} | {r['accuracy_measurement']:.3f} | {r['seconds']} |"
        )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _fractions(runner, detector, *, scales, per_class, seed, negative: bool, classes: int = 10):
    """Per scale: the fraction of samples classified as the requested digit (or, ``negative``,
    that avoid the negative digit), over ``per_class`` samples of each digit."""
    digits = np.repeat(np.arange(classes), per_class)
    out, grids = [], {}
    for w in scales:
        if negative:
            task = Task(task="negative_class", negative_labels=digits.tolist(), guidance_scale=w)
        else:
            task = Task(task="class", labels=digits.tolist(), guidance_scale=w)
        t0 = time.perf_counter()
        res = runner.run(task, jax.random.PRNGKey(seed), num_samples=len(digits))
        pred = classify(detector, res.results)
        hit = pred != digits if negative else pred == digits
        per_digit = [float(np.mean(hit[digits == c])) for c in range(classes)]
        out.append(
            dict(
                scale=w,
                fraction=float(np.mean(hit)),
                per_digit=per_digit,
                nfe=res.nfe,
                seconds=round(time.perf_counter() - t0, 1),
            )
        )
        print(json.dumps(out[-1]), flush=True)
        grids[w] = res.results
    return out, grids


def _guidance_table(title: str, rows: list[dict], what: str) -> list[str]:
    lines = [title, "", f"| guidance scale w | {what} | NFE | per digit 0..9 |", "|---|---|---|---|"]
    for r in rows:
        per = " ".join(f"{v:.2f}" for v in r["per_digit"])
        lines.append(f"| {r['scale']:g} | {r['fraction']:.3f} | {r['nfe']} | {per} |")
    return lines + [""]


def guidance(args) -> None:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = diffusion_jax.load(args.workdir)
    runner = TaskRunner(model)
    detector = get_detector("digits")
    scales = [float(s) for s in args.scales.split(",")]
    pos, pos_grids = _fractions(
        runner, detector, scales=scales, per_class=args.per_class, seed=args.seed, negative=False
    )
    neg_scales = [float(s) for s in args.negative_scales.split(",")]
    neg, neg_grids = _fractions(
        runner, detector, scales=neg_scales, per_class=args.per_class, seed=args.seed, negative=True
    )
    # Each grid: one row per digit (the requested one, or the avoided one).
    for w in scales:
        save_image_grid(out / f"class_w{w:g}.png", pos_grids[w], ncol=args.per_class, upscale=4)
    for w in neg_scales:
        save_image_grid(out / f"negative_w{w:g}.png", neg_grids[w], ncol=args.per_class, upscale=4)
    record = dict(workdir=str(args.workdir), step=model.step, per_class=args.per_class, positive=pos, negative=neg)
    (out / "guidance.json").write_text(json.dumps(record, indent=2))
    lines = _guidance_table(
        f"Classifier-free guidance, {args.per_class} samples per digit (checkpoint {model.step}):",
        pos,
        "fraction classified as the requested digit",
    )
    lines += _guidance_table("Negative label (positive label null):", neg, "fraction avoiding the negative digit")
    (out / "guidance.md").write_text("\n".join(lines))
    print("\n".join(lines))


def classifier_guidance(args) -> None:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = diffusion_jax.load(args.workdir)
    runner = TaskRunner(model, classifier=diffusion_jax.load(args.classifier_workdir))
    detector = get_detector("digits")
    scales = [float(s) for s in args.scales.split(",")]
    rows, grids = _fractions(runner, detector, scales=scales, per_class=args.per_class, seed=args.seed, negative=False)
    for w in scales:
        save_image_grid(out / f"classifier_w{w:g}.png", grids[w], ncol=args.per_class, upscale=4)
    record = dict(workdir=str(args.workdir), classifier=str(args.classifier_workdir), rows=rows)
    (out / "classifier_guidance.json").write_text(json.dumps(record, indent=2))
    lines = _guidance_table(
        f"Classifier guidance of the unconditional model (checkpoint {model.step}), {args.per_class} per digit:",
        rows,
        "fraction classified as the requested digit",
    )
    (out / "classifier_guidance.md").write_text("\n".join(lines))
    print("\n".join(lines))


def inputs(args) -> None:
    """The first ``num_images`` held-out test digits as ``OUT/test_digits.npz`` (``images`` in
    [0, 1], ``labels``): the ``--input`` of the command-line examples."""
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = load_digits_split("test")
    np.savez(out / "test_digits.npz", images=images[: args.num_images], labels=labels[: args.num_images])
    print(f"wrote {out / 'test_digits.npz'}: {min(args.num_images, len(images))} test digits")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("inverse", "guidance", "classifier_guidance", "inputs"))
    parser.add_argument("--workdir")
    parser.add_argument("--classifier_workdir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--methods", default=",".join(m for m in METHODS if m not in NOISY_ONLY))
    parser.add_argument("--num_images", type=int, default=297)
    parser.add_argument("--sigma_y", type=float, default=0.0)
    parser.add_argument("--name", help="stem of the inverse part's result files (default: inverse[_sigma<s>])")
    parser.add_argument("--scales", default="0,1,2,3,5")
    # With the null label as the positive one, w = 1 is the unconditional model and w = 0 would
    # sample the negative digit itself: the negative sweep starts at 1.
    parser.add_argument("--negative_scales", default="1,2,3,5")
    parser.add_argument("--per_class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="a method option beside the defaults above, e.g. dps.scale=10 (repeatable)",
    )
    args = parser.parse_args(argv)
    args.options = {}
    for item in args.option:
        target, _, value = item.partition("=")
        method, _, key = target.partition(".")
        if method not in METHODS or not key or not value:
            parser.error(f"--option {item!r}: expected METHOD.KEY=VALUE with METHOD one of {', '.join(METHODS)}")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        args.options.setdefault(method, {})[key] = parsed
    unknown = [t for t in args.tasks.split(",") if t not in TASKS] + [
        m for m in args.methods.split(",") if m not in METHODS
    ]
    if unknown:
        parser.error(
            f"unknown task(s) or method(s) {unknown}; tasks: {', '.join(TASKS)}; methods: {', '.join(METHODS)}"
        )
    if args.sigma_y < 0:
        parser.error(f"--sigma_y must be >= 0, got {args.sigma_y}")
    noisy_only = [m for m in args.methods.split(",") if m in NOISY_ONLY]
    if args.part == "inverse" and args.sigma_y == 0 and noisy_only:
        parser.error(f"{', '.join(noisy_only)} needs a noisy measurement: pass --sigma_y > 0")
    if args.part != "inputs" and not args.workdir:
        parser.error(f"{args.part} needs --workdir")
    if args.part == "classifier_guidance" and not args.classifier_workdir:
        parser.error("classifier_guidance needs --classifier_workdir")
    parts = {"inverse": inverse, "guidance": guidance, "classifier_guidance": classifier_guidance, "inputs": inputs}
    parts[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
