"""Ablation sweep on the embedded digits: which network / SDE / parametrization / sampler gives
the best samples in a fixed CPU budget.

    python experiments/digits_sweep.py --workdir runs/digits_sweep [--steps 1500] [--only A,B]

Each variant is the main job's config (configs/digits/ddpmpp_vp.py) plus command-line
overrides; it is trained with the real command line, then 500 samples are drawn and scored with
scripts/digits_quality.py (a digits "Inception score" from a classifier of real digits, and the
nearest-neighbour distance ratio). Results: <workdir>/results.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "digits" / "ddpmpp_vp.py"

EDM_ON_VP = [
    "--config.model.output=edm",
    "--config.model.noise_cond=edm",
    "--config.training.weighting=edm",
    "--config.training.time_sampler=lognormal",
]

VARIANTS = {
    "A_vp_eps_dpmpp2m": [],
    "B_vp_edm_precond": EDM_ON_VP,
    "C_vp_eps_nf64": ["--config.model.nf=64"],
    "D_vp_eps_nf16": ["--config.model.nf=16"],
    "E_edm_sde_heun": [
        "--config.training.sde=edm",
        "--config.model.sigma_min=0.002",
        "--config.model.sigma_max=80.0",
        "--config.training.weighting=edm",
        "--config.training.time_sampler=lognormal",
        "--config.sampling.method=heun",
        "--config.sampling.num_steps=12",
    ],
    "F_vp_eps_lr1e-3": ["--config.optim.lr=1e-3"],
    "G_vp_edm_precond_nf64": EDM_ON_VP + ["--config.model.nf=64"],
}


def run(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/digits_sweep")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--only", default="", help="comma-separated variant names (prefixes)")
    args = parser.parse_args()
    root = pathlib.Path(args.workdir)
    results = {}
    results_path = root / "results.json"
    if results_path.exists():
        results = json.loads(results_path.read_text())
    wanted = [v for v in VARIANTS if not args.only or any(v.startswith(p) for p in args.only.split(","))]
    for name in wanted:
        work = root / name
        common = [sys.executable, "-m", "diffusion_jax"]
        overrides = [
            f"--config={CONFIG}",
            f"--workdir={work}",
            f"--config.training.n_iters={args.steps}",
            "--config.training.snapshot_sampling=False",
            *VARIANTS[name],
        ]
        train_s, out = run(common + ["train", *overrides])
        samples = work / "sweep_samples"
        sample_s, _ = run(common + ["sample", *overrides, f"--num_samples={args.samples}", f"--out={samples}"])
        _, q = run([sys.executable, str(ROOT / "scripts" / "digits_quality.py"), f"{samples}.npz"])
        quality = json.loads(q)["samples"]
        summary = json.loads((work / "summary.json").read_text())
        results[name] = {
            "train_seconds_wall": train_s,
            "steps_per_second": summary["steps_per_second"],
            "final_loss": summary["last_metrics"].get("loss"),
            "sample_seconds_wall": sample_s,
            **quality,
        }
        root.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2))
        print(
            f"{name:26s} IS {quality['inception_score']:.2f}  nn {quality['nn_distance_ratio']:.2f}  "
            f"train {train_s:.0f}s ({summary['steps_per_second']:.2f} steps/s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
