"""Sample quality against EMA length from one training run (EDM2's post-hoc EMA on the digits).

    diffusion-jax train --config configs/digits/edm_phema.py --workdir runs/digits_phema
    python experiments/digits_posthoc_ema/run.py --workdir runs/digits_phema [--sigma_rels 0.01,0.02,...]

The run tracks the power-function EMAs sigma_rel = 0.05 and 0.10 and snapshots them every 20
steps. This reconstructs the EMA of each requested sigma_rel at the final checkpoint
(``diffusion-jax posthoc_ema``), then evaluates every average with the main job's evaluation:
1,000 samples (EDM's Heun sampler, 12 steps) judged by the digits detector against the train
split (FID, Inception score, precision, recall). It also evaluates the raw parameters and the
run's main EMA (decay 0.999 with warm-up). Results: ``<workdir>/eval/results_<step>_<tag>.json``,
and a table (Markdown) on stdout and in ``<workdir>/posthoc_ema/sweep.md``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

from diffusion_jax import modes
from diffusion_jax.builders import config as config_lib
from diffusion_jax.modes.setup import quiet_library_notices

COLUMNS = ("fid", "fid_297", "inception_score", "precision", "recall")


def _evaluate(workdir: pathlib.Path, ema: str, step: int) -> tuple[dict, float]:
    config = config_lib.workdir_config(workdir)
    assert config is not None, f"{workdir} holds no config"
    config.sampling.ema = ema
    config.eval.begin_ckpt = step
    config.eval.end_ckpt = step
    config.eval.enable_loss = False
    config.eval.enable_bpd = False
    t0 = time.perf_counter()
    results = modes.evaluate(config, workdir)
    return results[step], time.perf_counter() - t0


def _row(label: str, res: dict) -> str:
    cells = []
    for c in COLUMNS:
        v = res.get(c)
        cells.append("-" if v is None else f"{v:.3f}" if c in ("precision", "recall") else f"{v:.2f}")
    return f"| {label} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--sigma_rels", default="0.01,0.02,0.03,0.05,0.075,0.1,0.15,0.2,0.25")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    args = parser.parse_args()
    quiet_library_notices()
    workdir = pathlib.Path(args.workdir)
    sigma_rels = [float(s) for s in args.sigma_rels.split(",")]
    config = config_lib.workdir_config(workdir)
    assert config is not None, f"{workdir} holds no config"
    t0 = time.perf_counter()
    report = modes.posthoc_ema(config, workdir, sigma_rels=sigma_rels, step=args.step)
    step = next(iter(report.values()))["step"]
    print(f"reconstructed {len(sigma_rels)} EMAs in {time.perf_counter() - t0:.1f} s", flush=True)

    keys = {c: c for c in COLUMNS}
    rows = []
    choices = [("raw parameters", "params"), (f"main EMA (decay {config.model.ema_rate}, warm-up)", "")]
    choices += [(f"sigma_rel {s:g}", f"sigma_rel:{s!r}") for s in sigma_rels]
    summary = []
    for label, ema in choices:
        res, seconds = _evaluate(workdir, ema, step)
        flat = dict(res)  # fid_297: the FID of the first 297 samples (the real test split's size)
        extra = ""
        if ema.startswith("sigma_rel:"):
            entry = report[float(ema.split(":")[1])]
            extra = f" (residual {entry['profile_residual']:.1e})"
        rows.append(_row(label + extra, flat))
        summary.append({"label": label, "ema": ema, "seconds": seconds, **{k: flat.get(k) for k in keys}})
        print(rows[-1], f"({seconds:.0f} s)", flush=True)
    header = "| average | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS)
    table = "\n".join([header, *rows])
    print(f"\nstep {step}:\n{table}")
    out = workdir / "posthoc_ema"
    (out / "sweep.md").write_text(f"step {step}\n\n{table}\n")
    (out / "sweep.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
