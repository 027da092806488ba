"""Start-up and step rate of the main job's command line, cold and warm compilation cache, for
each grouping of optimizer steps per jitted call.

    python scripts/benchmark_startup.py [--config configs/digits/edm.py] [--groupings 1 4] [--steps 48] [--rounds 2]

For each ``training.n_jitted_steps`` in ``--groupings``, ``diffusion-jax train`` runs ``--steps``
steps in a fresh workdir: first with an empty compilation cache (cold), then with the cache it
left (warm); the groupings alternate within each round, so they share the machine's conditions.
Reported per run: the whole command's wall time, the time to the end of the first call (what the
training loop prints as "compiled the train step and ran k step(s) in X s": start-up of the step
itself), and the step rate after that call (the loop's last progress line). Snapshot sampling
and periodic evaluation are off, so the figures are the train step's alone.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_once(config: str, grouping: int, steps: int, cache: pathlib.Path) -> dict:
    with tempfile.TemporaryDirectory() as work:
        cmd = [
            sys.executable, "-m", "diffusion_jax", "train", "--config", config, "--workdir", f"{work}/run",
            "--cache_dir", str(cache), f"--config.training.n_iters={steps}",
            f"--config.training.n_jitted_steps={grouping}", "--config.training.snapshot_sampling=False",
            f"--config.training.eval_freq={10 * steps}", f"--config.training.log_freq={steps}",
            f"--config.training.snapshot_freq={steps}", f"--config.training.snapshot_freq_for_preemption={steps}",
        ]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    first = float(re.search(r"compiled the train step and ran \d+ step\(s\) in ([\d.]+) s", proc.stdout).group(1))
    rate = float(re.findall(r"\| ([\d.]+) steps/s", proc.stdout)[-1])
    return {"wall": wall, "first_call": first, "steps_per_s": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/digits/edm.py")
    parser.add_argument("--groupings", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict = {(g, phase): [] for g in args.groupings for phase in ("cold", "warm")}
    for r in range(args.rounds):
        for g in args.groupings:
            with tempfile.TemporaryDirectory() as cache:
                for phase in ("cold", "warm"):
                    res = run_once(args.config, g, args.steps, pathlib.Path(cache))
                    results[(g, phase)].append(res)
                    print(f"# round {r + 1} n_jitted_steps={g} {phase}: {res}", flush=True)
    print(f"\n{args.config}, {args.steps} steps, median of {args.rounds} round(s)\n")
    print("| n_jitted_steps | cache | command wall s | first call s | steps/s after it |")
    print("|---|---|---|---|---|")
    for (g, phase), runs in results.items():
        med = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
        print(f"| {g} | {phase} | {med['wall']:.1f} | {med['first_call']:.1f} | {med['steps_per_s']:.2f} |")


if __name__ == "__main__":
    main()
