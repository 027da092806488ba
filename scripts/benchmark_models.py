"""Time the full-size CIFAR-10 score networks on this machine.

    python scripts/benchmark_models.py [--models ncsnpp_continuous ddpmpp_continuous]
        [--forward-batch 8 64] [--grad-batch 8] [--repeats 5] [--warmup 2]

For each network (built from score_sde's published CIFAR-10 settings, ``tests/model_configs.py``)
and batch size it reports:

* forward: one score evaluation, ``apply(params, x, labels)`` in eval mode (no dropout);
* forward+backward: ``grad`` of ``mean(apply(params, x, labels, train=True) ** 2)`` with respect
  to the parameters (dropout on, as in training);

each jitted; compile time (lower + compile) separately; then the median wall time (and process
CPU time, summed over threads) of ``--repeats`` calls after ``--warmup`` calls; and the FLOPs of
one call from XLA's cost analysis
(``jax.jit(f).lower(...).compile().cost_analysis()``). Inputs are 32x32x3 images with labels as
score_sde feeds them (sigma(t) for NCSN++ VE, 999 t for DDPM++ VP). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.builders.model import build_model

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _model_configs():
    spec = importlib.util.spec_from_file_location("model_configs", ROOT / "tests" / "model_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CIFAR10_MODELS


def _labels(config, key, batch):
    t = jax.random.uniform(key, (batch,), minval=1e-3, maxval=1.0)
    if config.model.embedding_type == "fourier" and config.model.name == "ncsnpp":
        smin, smax = config.model.sigma_min, config.model.sigma_max
        return smin * (smax / smin) ** t  # VE: sigma(t)
    return 999.0 * t  # VP: DDPM time step


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def _time(fn, args, *, warmup: int, repeats: int) -> tuple[float, float, float, float | None]:
    """(compile seconds, median wall seconds per call, median process CPU seconds per call,
    flops per call). CPU time sums all threads; unlike wall time it barely changes when other
    processes compete for the cores."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    wall, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        jax.block_until_ready(compiled(*args))
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return compile_s, statistics.median(wall), statistics.median(cpu), _flops(compiled)


def benchmark(name: str, config, *, forward_batches, grad_batches, warmup, repeats) -> list[dict]:
    module = build_model(config)
    size, channels = config.data.image_size, config.data.num_channels
    key = jax.random.key(0)
    x0 = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    params = jax.jit(lambda k: module.lazy_init(k, x0, jnp.ones((1,)))["params"])(key)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    rows = []

    def forward(p, x, labels):
        return module.apply({"params": p}, x, labels)

    def loss(p, x, labels, dropout_key):
        out = module.apply({"params": p}, x, labels, train=True, rngs={"dropout": dropout_key})
        return jnp.mean(out**2)

    grad = jax.grad(loss)
    for what, fn, batches in (("forward", forward, forward_batches), ("forward+backward", grad, grad_batches)):
        for batch in batches:
            kx, kt, kd = jax.random.split(jax.random.fold_in(key, batch), 3)
            x = jax.random.normal(kx, (batch, size, size, channels))
            args = (params, x, _labels(config, kt, batch))
            if what != "forward":
                args = args + (kd,)
            compile_s, median_s, cpu_s, flops = _time(fn, args, warmup=warmup, repeats=repeats)
            rows.append(
                dict(
                    model=name,
                    params=n_params,
                    what=what,
                    batch=batch,
                    compile_s=compile_s,
                    median_s=median_s,
                    cpu_s=cpu_s,
                    flops=flops,
                )
            )
            print(
                f"# {name} {what} batch {batch}: compile {compile_s:.1f} s, median {median_s:.3f} s, CPU {cpu_s:.3f} s",
                flush=True,
            )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    configs = _model_configs()
    parser.add_argument(
        "--models", nargs="+", default=["ncsnpp_continuous", "ddpmpp_continuous"], choices=sorted(configs)
    )
    parser.add_argument("--forward-batch", nargs="*", type=int, default=[8, 64])
    parser.add_argument("--grad-batch", nargs="*", type=int, default=[8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)

    print(
        f"# jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s), "
        f"{platform.processor() or platform.machine()}",
        flush=True,
    )
    rows = []
    for name in args.models:
        rows += benchmark(
            name,
            configs[name](),
            forward_batches=args.forward_batch,
            grad_batches=args.grad_batch,
            warmup=args.warmup,
            repeats=args.repeats,
        )
    print(
        f"# load average at the end: {' '.join(open('/proc/loadavg').read().split()[:3]) if pathlib.Path('/proc/loadavg').exists() else 'n/a'}"  # noqa: E501
    )
    print(
        "\n| network | params | what | batch | compile s | median wall s | median CPU s | GFLOP per call | GFLOP/s (wall) |"  # noqa: E501
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gflop = r["flops"] / 1e9 if r["flops"] is not None else None
        rate = f"{gflop / r['median_s']:.0f}" if gflop is not None else "n/a"
        gflop_s = f"{gflop:.1f}" if gflop is not None else "n/a"
        print(
            f"| {r['model']} | {r['params']:,} | {r['what']} | {r['batch']} | {r['compile_s']:.1f} | "
            f"{r['median_s']:.3f} | {r['cpu_s']:.3f} | {gflop_s} | {rate} |"
        )


if __name__ == "__main__":
    main()
