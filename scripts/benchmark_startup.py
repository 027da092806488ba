"""Start-up and step rate of the main job's command line, cold and warm compilation cache, for
each way of grouping optimizer steps per jitted call.

    python scripts/benchmark_startup.py [--config configs/digits/edm.py] [--variants 1 4 4bg] [--steps 400] [--rounds 1]

Variants: ``1`` and ``4`` are ``training.n_jitted_steps`` 1 and 4 with
``training.background_compile=False``; ``4bg`` is four steps per call with the background
compilation (one step per call until the four-step program is ready). For each variant
``diffusion-jax train`` runs ``--steps`` steps in a fresh workdir: first with an empty
compilation cache (cold), then with the cache it left (warm); the variants alternate within each
round, so they share the machine's conditions. Reported per run: the whole command's wall time,
the time to the end of the first call (what the training loop prints as "compiled the train step
and ran k step(s) in X s": start-up of the step itself), the step rate after that call (all
steps after the first call), and the step rate over the last half of the run (from the progress
lines' cumulative rates). Snapshot sampling and periodic evaluation are off, so the figures are
the train step's alone.
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


VARIANTS = {"1": (1, False), "4": (4, False), "4bg": (4, True)}


def run_once(config: str, variant: str, steps: int, cache: pathlib.Path) -> dict:
    grouping, background = VARIANTS[variant]
    log_freq = max(4, steps // 10 // 4 * 4)  # a multiple of 4: every grouping logs the same steps
    with tempfile.TemporaryDirectory() as work:
        cmd = [
            sys.executable, "-m", "diffusion_jax", "train", "--config", config, "--workdir", f"{work}/run",
            "--cache_dir", str(cache), f"--config.training.n_iters={steps}",
            f"--config.training.n_jitted_steps={grouping}", f"--config.training.background_compile={background}",
            "--config.training.snapshot_sampling=False",
            f"--config.training.eval_freq={10 * steps}", f"--config.training.log_freq={log_freq}",
            f"--config.training.snapshot_freq={steps}", f"--config.training.snapshot_freq_for_preemption={steps}",
        ]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    first = re.search(r"compiled the train step and ran (\d+) step\(s\) in ([\d.]+) s", proc.stdout)
    start = int(first.group(1))
    # Progress lines: "step s/N | ... | r steps/s", r counted from the end of the first call, so the
    # time since then is (s - start) / r; the last half's rate follows from two such lines.
    lines = [(int(a), float(r)) for a, r in re.findall(r"step (\d+)/\d+ \|.*\| ([\d.]+) steps/s", proc.stdout)]
    elapsed = [(s_, (s_ - start) / r) for s_, r in lines if r > 0]
    mid = min(elapsed, key=lambda e: abs(e[0] - steps / 2))
    end = elapsed[-1]
    background_line = re.search(r"compiled the \d+-step train step in the background in ([\d.]+) s", proc.stdout)
    return {
        "wall": wall,
        "first_call": float(first.group(2)),
        "steps_per_s": lines[-1][1],
        "last_half_steps_per_s": (end[0] - mid[0]) / (end[1] - mid[1]),
        "background_compile_s": float(background_line.group(1)) if background_line else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/digits/edm.py")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["1", "4", "4bg"])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    results: dict = {(v, phase): [] for v in args.variants for phase in ("cold", "warm")}
    for r in range(args.rounds):
        for v in args.variants:
            with tempfile.TemporaryDirectory() as cache:
                for phase in ("cold", "warm"):
                    res = run_once(args.config, v, args.steps, pathlib.Path(cache))
                    results[(v, phase)].append(res)
                    print(f"# round {r + 1} variant {v} {phase}: {res}", flush=True)
    print(f"\n{args.config}, {args.steps} steps, median of {args.rounds} round(s)\n")
    print(
        "| variant | cache | command wall s | first call s | steps/s after it | steps/s, last half "
        "| background compile s |"
    )
    print("|---|---|---|---|---|---|---|")
    for (v, phase), runs in results.items():
        med = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
        print(
            f"| {v} | {phase} | {med['wall']:.1f} | {med['first_call']:.1f} | {med['steps_per_s']:.2f} "
            f"| {med['last_half_steps_per_s']:.2f} | {med['background_compile_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
