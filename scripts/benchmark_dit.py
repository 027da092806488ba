"""Train-step time and MFU of DiT backbones on this machine.

    python scripts/benchmark_dit.py [--presets DiT-S/2 DiT-B/2] [--batch 8] [--repeats 3]
        [--warmup 1] [--bf16] [--remat] [--peak-gflops X | --peak-size 2048] [--json out.jsonl]
    python scripts/benchmark_dit.py --memory [--presets DiT-S/2 DiT-B/2] [--batch 8]

One train step: the library's denoising loss as DiT was trained (Peebles & Xie 2023, sec. 4:
VP SDE with DDPM's linear betas, an epsilon-predicting network fed ``999 t``, the plain
epsilon MSE, class labels dropped to the null class with probability 0.1 by the training code),
its gradient and an Adam update (lr 1e-4, as the paper's AdamW without weight decay), jitted,
with the parameters and the optimizer state donated. Inputs are the paper's ImageNet-256
latents: 32x32x4, 1000 classes, ``learn_sigma=True`` (so the preset's parameter count is the
published one; the variance channels get no gradient from this loss).

Every preset runs in a fresh process. Reported per preset:

* compile s: ``lower`` + ``compile`` of the step;
* step s: median wall time of ``--repeats`` calls after ``--warmup`` calls; images/s;
* GFLOP/step: XLA's cost analysis of the compiled step (``compiled.cost_analysis()['flops']``),
  and GFLOP/image of the forward pass alone (a second, forward-only compilation), which should be
  about twice the paper's "Gflops" (it counts multiply-adds: 6.06 for DiT-S/2, 23.01 for
  DiT-B/2, Table 4);
* MFU: (GFLOP/step / step s) / peak, the peak being the best float32 square matmul through XLA
  measured in its own process (``benchmark_training.measure_peak``) unless ``--peak-gflops`` is
  given;
* peak RSS MB of the process.

``--memory`` instead measures the memory per device of the same train step on 8 simulated CPU
devices (``--xla_force_host_platform_device_count=8``, one process per preset and layout), with
the state laid out by the library's sharding (``diffusion_jax.training.sharding``, the default
rules) on the mesh (data=8) (parameters, Adam state and EMA replicated) and on (fsdp=8):

* state MiB/device: parameters + Adam moments + EMA held by each device, from the shardings of
  the layout (``sharding.shard_shape``; nothing is allocated);
* XLA MiB/device: XLA's buffer assignment of the compiled step for one device
  (``compiled.memory_analysis()``: arguments + outputs + temporaries - aliased), which is the
  peak of live buffers XLA planned; the step is compiled, not run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

from _bench import max_rss_mb, print_result, run_child

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_PRESETS = ["DiT-S/2", "DiT-B/2"]


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def measure_step(spec: dict) -> dict:
    """Compile and time one preset's train step (runs in the child process)."""
    import jax
    import jax.numpy as jnp
    import optax

    from diffusion_jax import losses
    from diffusion_jax import parametrization as param_lib
    from diffusion_jax import sde as sde_lib
    from diffusion_jax.builders.diffusion import make_model_fn
    from diffusion_jax.models.dit import count_dit_params, dit_preset

    module = dit_preset(spec["preset"], dtype=jnp.bfloat16 if spec["bf16"] else jnp.float32, remat=spec["remat"])
    batch_size = spec["batch"]
    key = jax.random.key(0)
    k_x, k_y, k_init = jax.random.split(key, 3)
    x = jax.random.normal(k_x, (batch_size, module.input_size, module.input_size, module.in_channels))
    labels = jax.random.randint(k_y, (batch_size,), 0, module.num_classes)
    batch = {"image": x, "label": labels}

    sde = sde_lib.VPSDE()
    parametrization = param_lib.score_sde_parametrization("vpsde", continuous=True)
    model_fn = make_model_fn(module, train=True, class_dropout=0.1, null_label=module.null_label)
    loss_fn = losses.dsm_loss_fn(model_fn, sde, parametrization, weighting="eps", reduce_mean=True)
    optimizer = optax.adam(1e-4)

    params = jax.jit(module.init)(k_init, x, jnp.zeros((batch_size,)), class_labels=labels)["params"]
    opt_state = optimizer.init(params)

    def step(params, opt_state, batch, key):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, batch, key).compile()
    compile_s = time.perf_counter() - t0
    flops = _flops(compiled)

    forward = jax.jit(lambda p, x, c, y: module.apply({"params": p}, x, c, class_labels=y))
    forward_flops = _flops(forward.lower(params, x, jnp.ones((batch_size,)), labels).compile())

    keys = iter(jax.random.split(jax.random.key(1), spec["warmup"] + spec["repeats"]))
    for _ in range(spec["warmup"]):
        params, opt_state, loss = compiled(params, opt_state, batch, next(keys))
        jax.block_until_ready(loss)
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state, batch, next(keys))
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return dict(
        spec,
        params=count_dit_params(module)["trainable"],
        compile_s=compile_s,
        step_s=step_s,
        times=times,
        images_per_s=batch_size / step_s,
        flops=flops,
        forward_gflops_per_image=None if forward_flops is None else forward_flops / batch_size / 1e9,
        peak_rss_mb=max_rss_mb(),
        loss=float(loss),
    )


def measure_memory(spec: dict) -> dict:
    """Per-device memory of one preset's train step on one layout (runs in an 8-device child).
    Nothing of the state is allocated: the step is lowered for abstract arrays that carry the
    layout's shardings, and the state's bytes per device come from those shardings."""
    import math

    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from diffusion_jax import losses
    from diffusion_jax import parametrization as param_lib
    from diffusion_jax import sde as sde_lib
    from diffusion_jax.builders.diffusion import make_model_fn
    from diffusion_jax.models import partitioning
    from diffusion_jax.models.dit import dit_preset
    from diffusion_jax.training import sharding
    from diffusion_jax.training.state import init_train_state
    from diffusion_jax.training.step import make_train_step, shard_batch

    module = dit_preset(spec["preset"])
    mesh = sharding.make_mesh(spec["mesh"])
    batch_size = spec["batch"]
    x = jnp.zeros((1, batch_size, module.input_size, module.input_size, module.in_channels))
    batch = shard_batch({"image": x, "label": jnp.zeros((1, batch_size), jnp.int32)}, mesh, leading_steps=True)
    model_fn = make_model_fn(module, train=True, class_dropout=0.1, null_label=module.null_label)
    loss_fn = losses.dsm_loss_fn(
        model_fn,
        sde_lib.VPSDE(),
        param_lib.score_sde_parametrization("vpsde", continuous=True),
        weighting="eps",
        reduce_mean=True,
    )
    optimizer = optax.adam(1e-4)

    def init(key):
        params = module.init(key, x[0], jnp.zeros((batch_size,)), class_labels=batch["label"][0])["params"]
        return init_train_state(params, optimizer, jax.random.key(1))

    abstract = jax.eval_shape(init, jax.random.key(0))
    layout = sharding.plan(
        partitioning.declared_axes("dit", abstract.params),
        sharding.param_shapes(abstract.params),
        mesh,
        sharding.DEFAULT_RULES,
    )
    shardings = sharding.state_shardings(abstract, layout)
    state = jax.tree_util.tree_map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), abstract, shardings)
    held = (state.params, state.opt_state, state.ema_params)
    per_device = sum(
        math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(held)
    )
    total = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(held))
    step = jax.jit(
        make_train_step(loss_fn, optimizer, ema_rate=0.9999),
        out_shardings=(shardings, NamedSharding(mesh, P())),
        donate_argnums=0,
    )
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    xla = None
    if memory is not None:
        xla = (
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes
        )
    return dict(
        spec,
        devices=jax.device_count(),
        state_bytes_max=per_device,
        state_bytes_total=total,
        xla_bytes=xla,
        temp_bytes=None if memory is None else memory.temp_size_in_bytes,
        compile_s=compile_s,
        peak_rss_mb=max_rss_mb(),
        unsharded=["/".join(p) for p in layout.replicated + layout.undeclared],
    )


def _run_child(extra: list[str], timeout: int, devices: int = 1) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        env["JAX_PLATFORMS"] = "cpu"
    return run_child(__file__, extra, timeout=timeout, cwd=ROOT, env=env)


def _memory_table(rows: list[dict]) -> str:
    lines = [
        "| preset | batch | mesh (data, fsdp, tensor) | state MiB/device | state MiB total | XLA MiB/device | "
        "XLA temporaries MiB | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    mb = lambda b: "n/a" if b is None else f"{b / 2**20:,.1f}"  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['batch']} | {tuple(r['mesh'])} | {mb(r['state_bytes_max'])} | "
            f"{mb(r['state_bytes_total'])} | {mb(r['xla_bytes'])} | {mb(r['temp_bytes'])} | {r['compile_s']:.1f} |"
        )
    return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _table(rows: list[dict], peak: float) -> str:
    lines = [
        "| preset | params | batch | bf16 | remat | compile s | step s | images/s | GFLOP/step | "
        "forward GFLOP/image | GFLOP/s | MFU | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rate = None if r["flops"] is None else r["flops"] / r["step_s"] / 1e9
        mfu = None if rate is None else 100.0 * rate / peak
        lines.append(
            f"| {r['preset']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {'on' if r['bf16'] else 'off'} | "
            f"{'on' if r['remat'] else 'off'} | {r['compile_s']:.1f} | {r['step_s']:.3f} | "
            f"{r['images_per_s']:.2f} | {_fmt(None if r['flops'] is None else r['flops'] / 1e9, '.1f')} | "
            f"{_fmt(r['forward_gflops_per_image'], '.2f')} | {_fmt(rate, '.1f')} | {_fmt(mfu, '.1f')}% | "
            f"{r['peak_rss_mb']:,.0f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 compute (float32 parameters)")
    parser.add_argument("--remat", action="store_true", help="rematerialise every block in the backward pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--peak-gflops", type=float, default=None, help="stated peak GFLOP/s (default: measured)")
    parser.add_argument("--peak-size", type=int, default=2048, help="matrix side of the peak measurement")
    parser.add_argument("--json", default=None, help="also write one JSON object per preset here")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per preset")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--one-peak", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--one-memory", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--memory", action="store_true", help="per-device memory on 8 simulated devices, data=8 against fsdp=8"
    )
    args = parser.parse_args(argv)

    if args.one_peak:
        from benchmark_training import measure_peak

        print_result(measure_peak(args.peak_size, args.repeats))
        return
    if args.one is not None:
        print_result(measure_step(json.loads(args.one)))
        return
    if args.one_memory is not None:
        print_result(measure_memory(json.loads(args.one_memory)))
        return

    from diffusion_jax.models.dit import DIT_PRESETS

    unknown = [p for p in args.presets if p not in DIT_PRESETS]
    if unknown:
        parser.error(f"unknown presets {unknown}; valid: {', '.join(DIT_PRESETS)}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}")
    if args.memory:
        rows = []
        for preset in args.presets:
            for mesh in ((8, 1, 1), (1, 8, 1)):
                spec = dict(preset=preset, batch=args.batch, mesh=mesh)
                row = _run_child(["--one-memory", json.dumps(spec)], args.timeout, devices=8)
                print(f"# {preset} {mesh}: {json.dumps(row)}", flush=True)
                rows.append(row)
                if args.json:
                    with open(args.json, "a") as out:
                        out.write(json.dumps(row) + "\n")
        print(f"# load after the runs {os.getloadavg()}")
        print(_memory_table(rows))
        return
    if args.peak_gflops is None:
        peak = _run_child(["--one-peak", "--peak-size", str(args.peak_size), "--repeats", "5"], args.timeout)
        peak_gflops = peak["peak_gflops"]
        print(f"# peak: {peak_gflops:.1f} GFLOP/s measured (best float32 {args.peak_size}^2 matmul)", flush=True)
    else:
        peak_gflops = args.peak_gflops
        print(f"# peak: {peak_gflops:.1f} GFLOP/s stated", flush=True)
    rows = []
    for preset in args.presets:
        spec = dict(
            preset=preset, batch=args.batch, bf16=args.bf16, remat=args.remat, warmup=args.warmup, repeats=args.repeats
        )
        row = _run_child(["--one", json.dumps(spec)], args.timeout)
        print(f"# {preset}: step {row['step_s']:.3f} s (times {[round(t, 3) for t in row['times']]})", flush=True)
        rows.append(row)
        if args.json:
            with open(args.json, "a") as out:
                out.write(json.dumps(dict(row, peak_gflops=peak_gflops)) + "\n")
    print(f"# load after the runs {os.getloadavg()}")
    print(_table(rows, peak_gflops))


if __name__ == "__main__":
    main()
