"""Train-step and score-evaluation timings of score_sde's PyTorch port on this machine.

    python scripts/benchmark_pytorch_port.py --port-dir /path/to/score_sde_pytorch \
        [--configs ncsnpp ddpmpp] [--batch 8 32] [--repeats 5] [--warmup 2] [--threads 2] \
        [--score-eval [--score-batch 64]] [--json results.jsonl]

Needs torch and ml_collections (not dependencies of the library) and a checkout of
https://github.com/yang-song/score_sde_pytorch (``--port-dir``); nothing of the port is copied
here. The rows match the shared fixtures' ``peer_timings.md`` (measured on another CPU), so the
two can be compared on the same machine as ``benchmark_training.py``.

The port's ``op`` package compiles StyleGAN2's CUDA ``upfirdn2d`` extension when it is imported,
which cannot work on a CPU-only machine. Before the port is imported, ``sys.modules['op']`` is
set to a replacement defined here: ``upfirdn2d`` in plain PyTorch (zero insertion, padding, a
per-channel convolution with the flipped FIR kernel, decimation -- the same formulation as
StyleGAN2's own ``upfirdn2d_native``) and the ``FusedLeakyReLU`` / ``fused_leaky_relu`` names the
package also exports. It is checked against an independent NumPy formulation before anything is
timed. The port's files are used unmodified.

Each row builds a full-size CIFAR-10 config the port ships, through its own ``get_config()``
(``configs/ve/cifar10_ncsnpp_continuous.py``, ``configs/vp/cifar10_ddpmpp_continuous.py``), on
the CPU:

* train step: one call of the port's ``losses.get_step_fn(sde, train=True, ...)`` exactly as its
  ``run_lib.train`` builds it -- the model from ``models.utils.create_model``, Adam from
  ``losses.get_optimizer``, ``losses.optimization_manager`` (warm-up, gradient clipping),
  ``models.ema.ExponentialMovingAverage`` -- so one call is the loss forward and backward (dropout
  on), the clipped Adam step and the EMA update. Random 32x32x3 images in [0, 1], scaled as
  run_lib's data scaler does (to [-1, 1] when ``data.centered``).
* score evaluation (``--score-eval``): one call of ``models.utils.get_score_fn(..., train=False)``
  under ``torch.no_grad()``, on prior samples at random times.

``torch.set_num_threads(--threads)``; ``--warmup`` calls, then ``--repeats`` timed calls: step s
is their median, first call s the time of the very first call. Every row runs in a fresh process,
so its peak resident memory (``getrusage`` max RSS) is its own. Prints a Markdown table; ``--json``
also writes one JSON object per row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import NamedTuple

from _bench import max_rss_mb, print_result, run_child

ROOT = pathlib.Path(__file__).resolve().parent.parent


class PortConfig(NamedTuple):
    label: str  # network name as BENCHMARKS.md writes it
    path: str  # the config file inside the port's checkout


# The port's two full-size CIFAR-10 continuous-time configs.
PORT_CONFIGS = {
    "ncsnpp": PortConfig("NCSN++", "configs/ve/cifar10_ncsnpp_continuous.py"),
    "ddpmpp": PortConfig("DDPM++", "configs/vp/cifar10_ddpmpp_continuous.py"),
}

# What the train step and the score function import from the port (besides the config files).
PORT_FILES = (
    "sde_lib.py",
    "losses.py",
    "models/utils.py",
    "models/ema.py",
    "models/ncsnpp.py",
    "models/layers.py",
    "models/layerspp.py",
    "models/normalization.py",
    "models/up_or_down_sampling.py",
    "configs/default_cifar10_configs.py",
)

# The shared fixtures' peer_timings.md, eager rows (2-core Intel Xeon, torch 2.13.0, 2 threads),
# seconds, keyed by (config, what, batch).
FIXTURE_EAGER_SECONDS = {
    ("ncsnpp", "train", 8): 3.45,
    ("ncsnpp", "train", 32): 13.24,
    ("ddpmpp", "train", 8): 2.56,
    ("ddpmpp", "train", 32): 8.83,
    ("ncsnpp", "score", 64): 8.00,
    ("ddpmpp", "score", 64): 5.43,
}

WHAT = {"train": "train step", "score": "score evaluation (no grad)"}


# --------------------------------------------------------------------------------------------
# The replacement for the port's CUDA `op` package
# --------------------------------------------------------------------------------------------


def upfirdn2d(input, kernel, up=1, down=1, pad=(0, 0)):
    """Upsample, FIR-filter and downsample every channel of ``input`` (N, C, H, W).

    The operation of StyleGAN2's ``upfirdn2d`` (Karras et al. 2020), with its signature: insert
    ``up - 1`` zeros after every sample along H and W, zero-pad ``pad[0]`` samples before and
    ``pad[1]`` after along both axes (negative values crop), convolve with ``kernel`` (kh, kw) --
    a true convolution, so the kernel is flipped for ``conv2d``'s cross-correlation -- and keep
    every ``down``-th sample. Returns (N, C, (H * up + pad[0] + pad[1] - kh) // down + 1,
    (W * up + pad[0] + pad[1] - kw) // down + 1).
    """
    import torch
    import torch.nn.functional as F

    n, c, h, w = input.shape
    kh, kw = kernel.shape
    p0, p1 = pad
    x = input.reshape(n * c, 1, h, w)  # each channel filtered on its own
    if up > 1:
        x = x.reshape(n * c, 1, h, 1, w, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(n * c, 1, h * up, w * up)
    x = F.pad(x, (max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)))
    x = x[:, :, max(-p0, 0) : x.shape[2] - max(-p1, 0), max(-p0, 0) : x.shape[3] - max(-p1, 0)]
    weight = torch.flip(kernel, (0, 1)).to(dtype=x.dtype, device=x.device).reshape(1, 1, kh, kw)
    x = F.conv2d(x, weight)[:, :, ::down, ::down]
    return x.reshape(n, c, x.shape[2], x.shape[3])


def _op_module():
    """A module standing in for the port's ``op`` package (what its ``__init__`` exports)."""
    import types

    import torch
    import torch.nn.functional as F

    def fused_leaky_relu(input, bias=None, negative_slope=0.2, scale=2**0.5):
        """leaky_relu(input + bias) * scale, the bias broadcast over dimension 1."""
        if bias is not None:
            input = input + bias.reshape(1, -1, *([1] * (input.ndim - 2)))
        return F.leaky_relu(input, negative_slope) * scale

    class FusedLeakyReLU(torch.nn.Module):
        def __init__(self, channel, bias=True, negative_slope=0.2, scale=2**0.5):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(channel)) if bias else None
            self.negative_slope = negative_slope
            self.scale = scale

        def forward(self, input):
            return fused_leaky_relu(input, self.bias, self.negative_slope, self.scale)

    op = types.ModuleType("op", "Plain-PyTorch CPU stand-in for score_sde_pytorch's CUDA op package.")
    op.__path__ = []  # a package, so `op.upfirdn2d` and `op.fused_act` resolve too
    op.upfirdn2d = upfirdn2d
    op.FusedLeakyReLU = FusedLeakyReLU
    op.fused_leaky_relu = fused_leaky_relu
    submodules = {}
    for name, attrs in {"upfirdn2d": ("upfirdn2d",), "fused_act": ("FusedLeakyReLU", "fused_leaky_relu")}.items():
        sub = types.ModuleType(f"op.{name}")
        for attr in attrs:
            setattr(sub, attr, getattr(op, attr))
        submodules[f"op.{name}"] = sub
    return op, submodules


def install_op_module() -> None:
    op, submodules = _op_module()
    sys.modules["op"] = op
    sys.modules.update(submodules)


def _upfirdn1d_reference(x, k, up, down, pad):
    """The same operation along the last axis of a NumPy array, from ``np.convolve``."""
    import numpy as np

    p0, p1 = pad
    length = x.shape[-1]
    z = np.zeros(x.shape[:-1] + (length * up,))
    z[..., ::up] = x
    full = np.apply_along_axis(lambda row: np.convolve(row, k), -1, z)  # length * up + K - 1
    # The padded signal's valid correlation with the flipped kernel is the full convolution
    # shifted by K - 1 - pad[0]: out[i] = full[i + K - 1 - pad[0]], zero outside it.
    n_out = length * up + p0 + p1 - len(k) + 1
    idx = np.arange(n_out) + len(k) - 1 - p0
    inside = (idx >= 0) & (idx < full.shape[-1])
    out = np.zeros(x.shape[:-1] + (n_out,))
    out[..., inside] = full[..., idx[inside]]
    return out[..., ::down]


def check_upfirdn2d() -> list[dict]:
    """Checks of :func:`upfirdn2d` that fail if the padding, flip or resampling is wrong."""
    import numpy as np
    import torch

    checks = []
    fir = np.array([1.0, 3.0, 3.0, 1.0])
    fir2d = np.outer(fir, fir) / np.outer(fir, fir).sum()

    # upsample_2d(factor=2) of the port calls upfirdn2d(x, 4 * k, up=2, pad=(2, 1)): a constant
    # image stays constant away from the border (where the zero padding enters).
    const = torch.full((1, 2, 8, 8), 0.7, dtype=torch.float64)
    y = upfirdn2d(const, torch.tensor(4 * fir2d), up=2, pad=(2, 1))
    checks.append(
        dict(
            name="up=2, [1,3,3,1], constant 8x8 -> 16x16 interior",
            shape_ok=tuple(y.shape) == (1, 2, 16, 16),
            error=float((y[..., 1:-1, 1:-1] - 0.7).abs().max()),
        )
    )
    # downsample_2d(factor=2): upfirdn2d(x, k, down=2, pad=(1, 1)).
    y = upfirdn2d(const, torch.tensor(fir2d), down=2, pad=(1, 1))
    checks.append(
        dict(
            name="down=2, [1,3,3,1], constant 8x8 -> 4x4 interior",
            shape_ok=tuple(y.shape) == (1, 2, 4, 4),
            error=float((y[..., 1:-1, 1:-1] - 0.7).abs().max()),
        )
    )

    # Random images and asymmetric separable kernels against the 1-D reference along each axis.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 7, 9))
    ky, kx = np.array([1.0, 2.0, 5.0, 3.0]), np.array([4.0, -1.0, 2.0])
    for up, down, pad in [(2, 1, (2, 1)), (1, 2, (1, 1)), (2, 2, (1, 2)), (1, 1, (3, 0)), (1, 2, (2, -1))]:
        ref = _upfirdn1d_reference(x, kx, up, down, pad)
        ref = np.swapaxes(_upfirdn1d_reference(np.swapaxes(ref, -1, -2), ky, up, down, pad), -1, -2)
        y = upfirdn2d(torch.tensor(x), torch.tensor(np.outer(ky, kx)), up=up, down=down, pad=pad).numpy()
        same = y.shape == ref.shape
        checks.append(
            dict(
                name=f"random 7x9, 4x3 kernel, up={up} down={down} pad={pad} vs NumPy",
                shape_ok=same,
                error=float(np.abs(y - ref).max()) if same else None,
            )
        )
    for c in checks:
        c["ok"] = bool(c["shape_ok"] and c["error"] is not None and c["error"] < 1e-10)
    return checks


# --------------------------------------------------------------------------------------------
# Child processes: one measurement each
# --------------------------------------------------------------------------------------------


def missing_port_files(port_dir: pathlib.Path, configs: list[str]) -> list[str]:
    needed = list(PORT_FILES) + [PORT_CONFIGS[name].path for name in configs]
    return [f for f in needed if not (port_dir / f).is_file()]


def _import_port(port_dir: pathlib.Path):
    """Import the port's modules from ``port_dir`` (after the ``op`` replacement is installed)."""
    import importlib

    sys.path.insert(0, str(port_dir))
    modules = {
        name: importlib.import_module(name)
        for name in ("sde_lib", "losses", "models.utils", "models.ema", "models.ncsnpp")
    }
    for name, module in modules.items():
        if not pathlib.Path(module.__file__).resolve().is_relative_to(port_dir):
            raise ImportError(
                f"'{name}' was imported from {module.__file__}, not from --port-dir {port_dir}; "
                f"another package of that name shadows the port"
            )
    return modules


def _load_config(port_dir: pathlib.Path, relative: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"port_config_{pathlib.Path(relative).stem}", port_dir / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _make_sde(sde_lib, config):
    """The forward SDE, as the port's run_lib.train builds it from ``training.sde``."""
    m = config.model
    makers = {
        "vesde": lambda: sde_lib.VESDE(sigma_min=m.sigma_min, sigma_max=m.sigma_max, N=m.num_scales),
        "vpsde": lambda: sde_lib.VPSDE(beta_min=m.beta_min, beta_max=m.beta_max, N=m.num_scales),
        "subvpsde": lambda: sde_lib.subVPSDE(beta_min=m.beta_min, beta_max=m.beta_max, N=m.num_scales),
    }
    name = config.training.sde.lower()
    if name not in makers:
        raise ValueError(f"config training.sde={config.training.sde!r}; the port's run_lib knows {sorted(makers)}")
    return makers[name]()


def measure(spec: dict) -> dict:
    """Build one config of the port and time its train step or score function (own process)."""
    import torch

    torch.set_num_threads(spec["threads"])
    install_op_module()
    port_dir = pathlib.Path(spec["port_dir"]).resolve()
    port = _import_port(port_dir)
    losses, mutils, sde_lib = port["losses"], port["models.utils"], port["sde_lib"]
    rss_imports = max_rss_mb()

    torch.manual_seed(0)
    config = _load_config(port_dir, PORT_CONFIGS[spec["config"]].path)
    config.device = torch.device("cpu")
    config.training.batch_size = spec["batch"]
    model = mutils.create_model(config)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sde = _make_sde(sde_lib, config)
    shape = (spec["batch"], config.data.num_channels, config.data.image_size, config.data.image_size)

    if spec["what"] == "train":
        ema = port["models.ema"].ExponentialMovingAverage(model.parameters(), decay=config.model.ema_rate)
        optimizer = losses.get_optimizer(config, model.parameters())
        state = dict(optimizer=optimizer, model=model, ema=ema, step=0)
        step_fn = losses.get_step_fn(
            sde,
            train=True,
            optimize_fn=losses.optimization_manager(config),
            reduce_mean=config.training.reduce_mean,
            continuous=config.training.continuous,
            likelihood_weighting=config.training.likelihood_weighting,
        )
        images = torch.rand(shape)
        # run_lib feeds datasets.get_data_scaler(config)(batch): x -> 2x - 1 when data.centered.
        batch = images * 2.0 - 1.0 if config.data.centered else images

        def call():
            return step_fn(state, batch)
    else:
        score_fn = mutils.get_score_fn(sde, model, train=False, continuous=config.training.continuous)
        x = sde.prior_sampling(shape)
        t = torch.rand(spec["batch"]) * (sde.T - 1e-5) + 1e-5

        def call():
            with torch.no_grad():
                return score_fn(x, t)

    times = []
    for _ in range(spec["warmup"] + spec["repeats"]):
        t0 = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
    value = float(out) if spec["what"] == "train" else float(out.abs().mean())
    if not math.isfinite(value):
        raise FloatingPointError(f"{spec['config']} {spec['what']}: non-finite output {value}")
    step_s = statistics.median(times[spec["warmup"] :])
    return dict(
        spec,
        params=n_params,
        trainable_params=n_trainable,
        first_call_s=times[0],
        step_s=step_s,
        times=times,
        images_per_s=spec["batch"] / step_s,
        rss_imports_mb=rss_imports,
        peak_rss_mb=max_rss_mb(),
        output=value,
        threads_used=torch.get_num_threads(),
        torch=torch.__version__,
    )


# --------------------------------------------------------------------------------------------
# Parent: checks, one child per row, then the table
# --------------------------------------------------------------------------------------------


def _table(rows: list[dict]) -> str:
    head = (
        "| network | params | what | batch | threads | first call s | step s | images/s | peak RSS MB | "
        "peer_timings.md eager s (Xeon) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        fixture = FIXTURE_EAGER_SECONDS.get((r["config"], r["what"], r["batch"]))
        lines.append(
            f"| {PORT_CONFIGS[r['config']].label} | {r['params'] / 1e6:.2f}M | {WHAT[r['what']]} | {r['batch']} | "
            f"{r['threads']} | {r['first_call_s']:.3f} | {r['step_s']:.3f} | {r['images_per_s']:.2f} | "
            f"{r['peak_rss_mb']:,.0f} | {'' if fixture is None else f'{fixture:.2f}'} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--port-dir",
        required=True,
        type=pathlib.Path,
        help="a checkout of score_sde_pytorch (its op/ package is not needed)",
    )
    parser.add_argument("--configs", nargs="+", choices=sorted(PORT_CONFIGS), default=list(PORT_CONFIGS))
    parser.add_argument(
        "--batch", nargs="*", type=int, default=[8, 32], help="train-step batch sizes (none: no train-step rows)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--score-eval", action="store_true", help="also time one no-grad score evaluation")
    parser.add_argument("--score-batch", type=int, default=64)
    parser.add_argument("--json", default=None, help="also write one JSON object per row here")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per row")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print_result(measure(json.loads(args.one)))
        return

    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error(
            f"need --repeats >= 1, --warmup >= 0, --threads >= 1 (got {args.repeats}, {args.warmup}, {args.threads})"
        )
    port_dir = args.port_dir.expanduser().resolve()
    if not port_dir.is_dir():
        parser.error(
            f"--port-dir {port_dir} does not exist; give a checkout of https://github.com/yang-song/score_sde_pytorch"
        )
    missing = missing_port_files(port_dir, args.configs)
    if missing:
        parser.error(
            f"--port-dir {port_dir} is not a complete score_sde_pytorch checkout: missing {', '.join(missing)}"
        )
    try:
        import ml_collections  # noqa: F401  (the port's configs are ConfigDicts)
        import numpy  # noqa: F401
        import torch
    except ImportError as error:
        sys.exit(f"the port needs torch, numpy and ml_collections: {error}")

    print(
        f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), "
        f"{args.threads} thread(s); port {port_dir}",
        flush=True,
    )
    checks = check_upfirdn2d()
    for c in checks:
        error = "n/a" if c["error"] is None else f"{c['error']:.1e}"
        print(
            f"# op.upfirdn2d check: {c['name']}: shape {'ok' if c['shape_ok'] else 'WRONG'}, "
            f"max |error| {error} -> {'ok' if c['ok'] else 'FAILED'}",
            flush=True,
        )
    if not all(c["ok"] for c in checks):
        sys.exit("the plain-PyTorch upfirdn2d failed its checks; nothing was timed")

    specs = [dict(config=name, what="train", batch=b) for name in args.configs for b in args.batch]
    if args.score_eval:
        specs += [dict(config=name, what="score", batch=args.score_batch) for name in args.configs]
    rows = []
    out = open(args.json, "w") if args.json else None
    try:
        for spec in specs:
            spec.update(repeats=args.repeats, warmup=args.warmup, threads=args.threads, port_dir=str(port_dir))
            t0 = time.perf_counter()
            r = run_child(
                __file__, ["--port-dir", spec["port_dir"], "--one", json.dumps(spec)], timeout=args.timeout, cwd=ROOT
            )
            rows.append(r)
            print(
                f"# {spec['config']} {spec['what']} batch {spec['batch']}: first call {r['first_call_s']:.3f} s, "
                f"step {r['step_s']:.3f} s, peak RSS {r['peak_rss_mb']:,.0f} MB (libraries alone "
                f"{r['rss_imports_mb']:,.0f} MB; {time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
            if out:
                out.write(json.dumps(dict(r, op_checks=checks)) + "\n")
                out.flush()
    finally:
        if out:
            out.close()
    print()
    print(_table(rows))


if __name__ == "__main__":
    main()
