"""Training throughput of the full-size CIFAR-10 networks on this machine.

    python scripts/benchmark_training.py [--configs configs/cifar10/ve/ncsnpp_continuous.py ...]
        [--batches 8 32] [--bf16 off on] [--remat off on] [--repeats 5] [--warmup 2]
        [--peak-gflops X | --peak-size 2048] [--pytorch-json port.jsonl] [--profile N] [--json results.jsonl]

One train step is what ``diffusion-jax train`` runs: :func:`make_train_step` (the loss forward
and backward with dropout, gradient clipping, Adam, the EMA update and the non-finite check),
jitted with the state donated and replicated on the device mesh, exactly as
``builders/experiment.train`` builds it; on CPU that is its unrolled form (XLA:CPU runs
convolution gradients inside while loops about 25x slower). One optimizer step per call
(``n_jitted_steps = 1``), random images of the config's shape, the config's own optimizer.

Every configuration (config x batch x bf16 x remat) runs in a fresh process, so its peak
resident memory (``getrusage`` max RSS, compilation included) is its own. Reported:

* compile s: ``lower`` + ``compile`` of the step;
* step s: median wall time of ``--repeats`` calls after ``--warmup`` calls; images/s = batch / step s;
* GFLOP/step: XLA's cost analysis of the compiled step (``compiled.cost_analysis()['flops']``);
* MFU: (GFLOP/step / step s) / peak GFLOP/s. The peak is measured, in its own process, as the
  best of ``--repeats`` float32 ``--peak-size`` square matmuls through XLA on this machine (a
  practical peak, printed with the table), unless ``--peak-gflops`` states one (e.g. cores x
  GHz x FLOPs per cycle). bf16 rows use the same float32 peak: XLA:CPU has no faster bf16 path.
* peak RSS MB (the progress lines also give the RSS of the imported libraries alone), and
  XLA's own estimate of the step's buffers (arguments + outputs + temporaries,
  ``compiled.memory_analysis()``);
* speed-up over score_sde's PyTorch port, float32 without remat as it runs: with
  ``--pytorch-json``, the port's train step timed on this machine by
  ``scripts/benchmark_pytorch_port.py --json``; otherwise the best of eager and ``torch.compile``
  per row of the shared fixtures' ``peer_timings.md`` (another CPU: 3.19 / 12.54 s for NCSN++ at
  batch 8 / 32, 2.56 / 8.83 s for DDPM++).

``--profile N`` traces ``N`` more calls after the timed ones (``jax.profiler``, with XLA:CPU's
per-operation trace events turned on by ``--xla_cpu_enable_xprof_traceme=true`` in the child's
``XLA_FLAGS``) and reports, per call, how long the machine was busy with each kind of compiled
operation: convolutions (fusions that contain one), dots, reductions, layout changes (transposes
and copies) and other elementwise fusions. Operations of different kinds can run at the same
time on the two cores, so the kinds add up to more than the busy time of all of them together.

Prints a Markdown table; ``--json`` also writes one JSON object per configuration.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import platform
import time

from _bench import max_rss_mb, print_result, run_child

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CONFIGS = ["configs/cifar10/ve/ncsnpp_continuous.py", "configs/cifar10/vp/ddpmpp_continuous.py"]

# score_sde's PyTorch port, train step, seconds: best of eager and torch.compile
# (the shared fixtures' peer_timings.md), keyed by config file name and batch.
FIXTURE_PYTORCH_SECONDS = {
    ("ncsnpp_continuous", 8): 3.19,
    ("ncsnpp_continuous", 32): 12.54,
    ("ddpmpp_continuous", 8): 2.56,
    ("ddpmpp_continuous", 32): 8.83,
}


# --------------------------------------------------------------------------------------------
# Child processes: one measurement each
# --------------------------------------------------------------------------------------------


def _set(config, dotted: str, value):
    *path, last = dotted.split(".")
    node = config
    for p in path:
        node = node[p]
    node[last] = value


def measure_step(spec: dict) -> dict:
    """Compile and time the train step of one configuration (runs in its own process)."""
    import statistics

    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from diffusion_jax.builders import diffusion as diffusion_builders
    from diffusion_jax.builders import experiment
    from diffusion_jax.builders.config import load_config
    from diffusion_jax.training.state import init_train_state
    from diffusion_jax.training.step import make_train_step, replicate, shard_batch

    rss_imports = max_rss_mb()  # the libraries alone, before any network or compilation
    config = load_config(str(ROOT / spec["config"]) if not os.path.isabs(spec["config"]) else spec["config"])
    config.training.batch_size = spec["batch"]
    config.model.dtype = "bfloat16" if spec["bf16"] else "float32"
    config.model.remat = spec["remat"]
    for key, value in spec.get("overrides", {}).items():
        _set(config, key, value)

    exp = experiment.build_experiment(config)
    optimizer = diffusion_builders.build_optimizer(config)
    loss_fn = diffusion_builders.build_loss(
        config, model_fn=exp.model_fn(train=True), sde=exp.sde, parametrization=exp.parametrization
    )
    params = exp.init_params(jax.random.PRNGKey(0))
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    state = replicate(init_train_state(params, optimizer, jax.random.PRNGKey(1)), exp.mesh)
    rng = np.random.default_rng(0)
    low = -1.0 if config.data.centered else 0.0
    batch = {"image": rng.uniform(low, 1.0, size=(1, spec["batch"]) + exp.input_shape).astype(np.float32)}
    if exp.null_label is not None:
        batch["label"] = rng.integers(0, exp.module.num_classes, size=(1, spec["batch"])).astype(np.int32)
    batch = shard_batch(batch, exp.mesh, leading_steps=True)

    replicated = NamedSharding(exp.mesh, P())
    step = jax.jit(
        make_train_step(
            loss_fn,
            optimizer,
            ema_rate=config.model.ema_rate,
            ema_warmup=config.model.ema_warmup,
            grad_accum_steps=config.training.grad_accum_steps,
            learning_rate_fn=diffusion_builders.learning_rate_fn(config),
        ),
        out_shardings=(jax.tree_util.tree_map(lambda _: replicated, state), replicated),
        donate_argnums=0,
    )
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost["flops"]) if cost and "flops" in cost else None
    memory = compiled.memory_analysis()
    buffers = None
    if memory is not None:
        buffers = (
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes
        )
    rss_after_compile = max_rss_mb()

    for _ in range(spec["warmup"]):
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    busy = None
    if spec.get("profile"):
        busy, state = profile_calls(compiled, state, batch, spec["profile"])
    return dict(
        spec,
        busy_s=busy,
        params=n_params,
        devices=jax.device_count(),
        compile_s=compile_s,
        step_s=step_s,
        times=times,
        images_per_s=spec["batch"] / step_s,
        flops=flops,
        xla_buffers_mb=None if buffers is None else buffers / 2**20,
        rss_imports_mb=rss_imports,
        rss_after_compile_mb=rss_after_compile,
        peak_rss_mb=max_rss_mb(),
        loss=float(np.asarray(metrics["loss"])[-1]),
    )


def _operation_kinds(hlo_text: str) -> dict[str, str]:
    """Kind of every instruction of a compiled module's text, by what its fused computation holds."""
    import re

    bodies, current = {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            current = bodies.setdefault(header.group(1), [])
        elif current is not None:
            current.append(line)
    kinds = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s+(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(", line)
        if not m:
            continue
        called = re.search(r"calls=%?([\w.\-]+)", line)
        body = "\n".join(bodies.get(called.group(1), [])) if called else line
        if " convolution(" in body:
            kinds[m.group(1)] = "convolution"
        elif " dot(" in body:
            kinds[m.group(1)] = "dot"
        elif " reduce(" in body or " reduce-window(" in body:
            kinds[m.group(1)] = "reduction"
        elif " transpose(" in body or " copy(" in body or m.group(2) in ("copy", "transpose"):
            kinds[m.group(1)] = "layout (transpose, copy)"
        else:
            kinds[m.group(1)] = "other"
    return kinds


def _busy_seconds(intervals: list[tuple[int, int]]) -> float:
    """Length of the union of [start, end) nanosecond intervals, in seconds."""
    total, start, end = 0, None, None
    for s, e in sorted(intervals):
        if end is not None and s <= end:
            end = max(end, e)
            continue
        if end is not None:
            total += end - start
        start, end = s, e
    if end is not None:
        total += end - start
    return total / 1e9


def profile_calls(compiled, state, batch, calls: int) -> tuple[dict, object]:
    """Busy seconds per call for each kind of operation over ``calls`` traced calls."""
    import collections
    import glob
    import tempfile

    import jax

    kinds = _operation_kinds(compiled.as_text())
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(calls):
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
        files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        if not files:
            raise RuntimeError("jax.profiler wrote no trace")
        data = jax.profiler.ProfileData.from_file(files[0])
    intervals = collections.defaultdict(list)
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                kind = kinds.get(event.name)
                if kind is not None:
                    interval = (event.start_ns, event.start_ns + event.duration_ns)
                    intervals[kind].append(interval)
                    intervals["all operations"].append(interval)
    if not intervals:
        raise RuntimeError("the trace has no per-operation events; is --xla_cpu_enable_xprof_traceme=true set?")
    return {kind: _busy_seconds(v) / calls for kind, v in intervals.items()}, state


def measure_peak(size: int, repeats: int) -> dict:
    """Best float32 matmul rate through XLA on this machine (GFLOP/s)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul).lower(a, b).compile()
    jax.block_until_ready(matmul(a, b))
    best = float("inf")
    for _ in range(max(repeats, 3)):
        t0 = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        best = min(best, time.perf_counter() - t0)
    return {"peak_gflops": 2.0 * size**3 / best / 1e9, "size": size, "seconds": best}


def _child(args) -> None:
    if args.one_peak:
        result = measure_peak(args.peak_size, args.repeats)
    else:
        result = measure_step(json.loads(args.one))
    print_result(result)


# --------------------------------------------------------------------------------------------
# Parent: one child per configuration, then the table
# --------------------------------------------------------------------------------------------


def _run_child(extra: list[str], timeout: int, xla_flags: str = "") -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if xla_flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
    return run_child(__file__, extra, timeout=timeout, cwd=ROOT, env=env)


def _fmt(value, spec: str, missing="n/a") -> str:
    return missing if value is None else format(value, spec)


def load_pytorch_seconds(path: str) -> dict:
    """Train-step seconds of the port from ``benchmark_pytorch_port.py --json``, keyed like
    :data:`FIXTURE_PYTORCH_SECONDS`."""
    names = {"ncsnpp": "ncsnpp_continuous", "ddpmpp": "ddpmpp_continuous"}
    seconds = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                if r.get("what") == "train" and r.get("config") in names:
                    seconds[(names[r["config"]], r["batch"])] = r["step_s"]
    if not seconds:
        raise SystemExit(f"--pytorch-json {path}: no train-step rows of benchmark_pytorch_port.py in it")
    return seconds


def _table(rows: list[dict], peak: float, pytorch_seconds: dict) -> str:
    head = (
        "| network | params | batch | bf16 | remat | compile s | step s | images/s | GFLOP/step | GFLOP/s | MFU | "
        "peak RSS MB | XLA buffers MB | PyTorch s | speed-up |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        name = pathlib.Path(r["config"]).stem
        gflop = None if r["flops"] is None else r["flops"] / 1e9
        rate = None if gflop is None else gflop / r["step_s"]
        torch_s = pytorch_seconds.get((name, r["batch"])) if not (r["bf16"] or r["remat"]) else None
        lines.append(
            f"| {name} | {r['params'] / 1e6:.2f}M | {r['batch']} | {'on' if r['bf16'] else 'off'} | "
            f"{'on' if r['remat'] else 'off'} | {r['compile_s']:.1f} | {r['step_s']:.3f} | {r['images_per_s']:.2f} | "
            f"{_fmt(gflop, '.1f')} | {_fmt(rate, '.1f')} | {_fmt(None if rate is None else rate / peak, '.1%')} | "
            f"{r['peak_rss_mb']:,.0f} | {_fmt(r['xla_buffers_mb'], ',.0f')} | {_fmt(torch_s, '.2f', '')} | "
            f"{_fmt(None if torch_s is None else torch_s / r['step_s'], '.2f', '')}{'x' if torch_s else ''} |"
        )
    return "\n".join(lines)


def _profile_table(rows: list[dict]) -> str:
    kinds = ["convolution", "layout (transpose, copy)", "other", "reduction", "dot", "all operations"]
    head = "| network | batch | bf16 | remat | step s | " + " | ".join(kinds) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        busy = r.get("busy_s") or {}
        lines.append(
            f"| {pathlib.Path(r['config']).stem} | {r['batch']} | {'on' if r['bf16'] else 'off'} | "
            f"{'on' if r['remat'] else 'off'} | {r['step_s']:.3f} | "
            + " | ".join(_fmt(busy.get(k), ".3f") for k in kinds)
            + " |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--bf16", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--remat", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-gflops", type=float, default=None, help="stated peak GFLOP/s (default: measured)")
    parser.add_argument("--peak-size", type=int, default=2048, help="matrix side of the peak measurement")
    parser.add_argument(
        "--override",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides as Python literals, e.g. model.nf=8 (for a quick check)",
    )
    parser.add_argument(
        "--pytorch-json",
        default=None,
        help="the port's timings on this machine (benchmark_pytorch_port.py --json) for the "
        "speed-up column; default: the shared fixtures' peer_timings.md",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="trace N more calls and report the busy time per kind of operation",
    )
    parser.add_argument("--json", default=None, help="also write one JSON object per configuration here")
    parser.add_argument("--timeout", type=int, default=7200, help="seconds per configuration")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--one-peak", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one or args.one_peak:
        return _child(args)

    import ast

    overrides = {}
    for item in args.override:
        key, _, value = item.partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    if args.pytorch_json:
        pytorch_seconds, pytorch_source = load_pytorch_seconds(args.pytorch_json), f"this machine ({args.pytorch_json})"
    else:
        pytorch_seconds, pytorch_source = FIXTURE_PYTORCH_SECONDS, "peer_timings.md (another CPU)"
    import jax

    print(
        f"# jax {jax.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        flush=True,
    )
    if args.peak_gflops is None:
        peak = _run_child(["--one-peak", f"--peak-size={args.peak_size}", f"--repeats={args.repeats}"], args.timeout)
        peak_gflops = peak["peak_gflops"]
        print(
            f"# peak: {peak_gflops:.1f} GFLOP/s measured (best float32 {args.peak_size}^2 matmul, "
            f"{peak['seconds'] * 1e3:.1f} ms)",
            flush=True,
        )
    else:
        peak_gflops = args.peak_gflops
        print(f"# peak: {peak_gflops:.1f} GFLOP/s stated", flush=True)

    rows = []
    out = open(args.json, "w") if args.json else None
    try:
        for config, batch, bf16, remat in itertools.product(args.configs, args.batches, args.bf16, args.remat):
            spec = dict(
                config=config,
                batch=batch,
                bf16=bf16 == "on",
                remat=remat == "on",
                repeats=args.repeats,
                warmup=args.warmup,
                overrides=overrides,
                profile=args.profile,
            )
            t0 = time.perf_counter()
            r = _run_child(
                ["--one", json.dumps(spec)], args.timeout, "--xla_cpu_enable_xprof_traceme=true" if args.profile else ""
            )
            rows.append(r)
            print(
                f"# {pathlib.Path(config).stem} batch {batch} bf16 {bf16} remat {remat}: compile {r['compile_s']:.1f} s, "  # noqa: E501
                f"step {r['step_s']:.3f} s, peak RSS {r['peak_rss_mb']:,.0f} MB (libraries alone "
                f"{r['rss_imports_mb']:,.0f} MB; {time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
            if out:
                out.write(json.dumps(dict(r, peak_gflops=peak_gflops)) + "\n")
                out.flush()
    finally:
        if out:
            out.close()
    print()
    print(f"PyTorch s: score_sde's PyTorch port, train step, from {pytorch_source}")
    print()
    print(_table(rows, peak_gflops, pytorch_seconds))
    if args.profile:
        print()
        print(
            f"Busy seconds per step by kind of operation (mean of {args.profile} traced calls; kinds overlap in time)"
        )
        print()
        print(_profile_table(rows))


if __name__ == "__main__":
    main()
