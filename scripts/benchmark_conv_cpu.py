"""Where the CPU train step's time goes: the 3x3 convolutions of NCSN++/DDPM++, XLA against PyTorch.

    python scripts/benchmark_conv_cpu.py [--batch 8 32] [--repeats 7] [--threads 2] [--no-torch]
        [--no-winograd] [--json results.jsonl]

For every 3x3 "same" convolution shape of the full-size CIFAR-10 networks (32x32x128 ... 4x4x256
inputs, as many output as input channels), at each ``--batch``, one process times:

* XLA (jax.jit, float32, NHWC): the forward convolution, the input gradient and the weight
  gradient (each its own jitted function of ``jax.vjp``), and the three together (``jax.grad`` of
  a sum of squares, the work one train step does per convolution);
* PyTorch (if installed; ``torch.set_num_threads(--threads)``, NCHW as the port runs it): the same
  three with ``torch.nn.functional.conv2d`` and ``torch.nn.grad.conv2d_input/conv2d_weight``, and
  forward+backward through autograd;
* Winograd F(2x2, 3x3) and F(4x4, 3x3) written in XLA operations (tile transforms, a batched
  matrix product per tile position, the inverse transform; Lavin & Gray 2016), forward and
  backward through ``jax.grad``: 2.25x and 4x fewer multiplications than the direct convolution.
  Checked against the direct convolution before timing (relative max error printed).

and the best float32 2048x2048 matmul of each library (its practical peak on this machine).
Every time is the median of ``--repeats`` calls after one warm-up; GFLOP/s counts the direct
convolution's 2 N H W 9 C_in C_out multiply-adds per pass (for Winograd too, so its column is
comparable). Prints a Markdown table; ``--json`` also writes one JSON object per row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import numpy as np
from _bench import median_seconds

# (H = W, channels) of the 3x3 convolutions in NCSN++ / DDPM++ on 32x32 CIFAR-10 (ch_mult 1,2,2,2).
SHAPES = [(32, 128), (16, 256), (8, 256), (4, 256)]

# Winograd F(m x m, 3 x 3) matrices (Lavin & Gray 2016): Y = A^T [(G g G^T) * (B^T d B)] A.
WINOGRAD = {
    "F(2x2,3x3)": dict(
        m=2,
        BT=[[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        G=[[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        AT=[[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    "F(4x4,3x3)": dict(
        m=4,
        BT=[
            [4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1],
        ],
        G=[
            [1 / 4, 0, 0],
            [-1 / 6, -1 / 6, -1 / 6],
            [-1 / 6, 1 / 6, -1 / 6],
            [1 / 24, 1 / 12, 1 / 6],
            [1 / 24, -1 / 12, 1 / 6],
            [0, 0, 1],
        ],
        AT=[[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}


def _median_seconds(fn, repeats: int) -> float:
    """Median of ``repeats`` calls after one warm-up call (which also compiles jitted functions)."""
    return median_seconds(fn, repeats, warmup=1)[0]


def direct_conv(x, w):
    from jax import lax

    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def winograd_conv(x, w, spec: dict):
    """3x3 stride-1 "same" convolution (cross-correlation, as ``direct_conv``) by Winograd tiles."""
    import jax.numpy as jnp

    m = spec["m"]
    BT, G, AT = (jnp.asarray(np.array(spec[k], np.float64), x.dtype) for k in ("BT", "G", "AT"))
    a = m + 2  # tile side
    n, h, wd, c = x.shape
    k = w.shape[-1]
    th, tw = -(-h // m), -(-wd // m)
    xp = jnp.pad(x, ((0, 0), (1, th * m + 1 - h), (1, tw * m + 1 - wd), (0, 0)))
    rows = jnp.stack([xp[:, i : i + m * th : m] for i in range(a)], 0)  # (a, n, th, W_pad, c)
    v = jnp.einsum("ai,inhwc->anhwc", BT, rows)
    cols = jnp.stack([v[:, :, :, j : j + m * tw : m] for j in range(a)], 1)  # (a, a, n, th, tw, c)
    v = jnp.einsum("bj,ajnhwc->abnhwc", BT, cols).reshape(a, a, n * th * tw, c)
    u = jnp.einsum("ai,ijck,bj->abck", G, w, G)
    prod = jnp.einsum("abpc,abck->abpk", v, u).reshape(a, a, n, th, tw, k)
    y = jnp.einsum("ia,abnhwk,jb->nhiwjk", AT, prod, AT).reshape(n, th * m, tw * m, k)
    return y[:, :h, :wd]


def measure_xla(batch: int, size: int, channels: int, repeats: int, winograd: bool) -> dict:
    import jax
    import jax.numpy as jnp

    kx, kw, ky = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (batch, size, size, channels), jnp.float32)
    w = jax.random.normal(kw, (3, 3, channels, channels), jnp.float32) * (9 * channels) ** -0.5
    dy = jax.random.normal(ky, (batch, size, size, channels), jnp.float32)

    fwd = jax.jit(direct_conv)
    dgrad = jax.jit(lambda x, w, dy: jax.vjp(lambda x: direct_conv(x, w), x)[1](dy)[0])
    wgrad = jax.jit(lambda x, w, dy: jax.vjp(lambda w: direct_conv(x, w), w)[1](dy)[0])

    def grad_of(conv):
        return jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))

    out = dict(
        xla_fwd=_median_seconds(lambda: jax.block_until_ready(fwd(x, w)), repeats),
        xla_dgrad=_median_seconds(lambda: jax.block_until_ready(dgrad(x, w, dy)), repeats),
        xla_wgrad=_median_seconds(lambda: jax.block_until_ready(wgrad(x, w, dy)), repeats),
    )
    all3 = grad_of(direct_conv)
    out["xla_all"] = _median_seconds(lambda: jax.block_until_ready(all3(x, w)), repeats)
    if winograd:
        reference = fwd(x, w)
        for name, spec in WINOGRAD.items():
            conv = lambda x, w, spec=spec: winograd_conv(x, w, spec)  # noqa: E731
            error = float(jnp.max(jnp.abs(jax.jit(conv)(x, w) - reference)) / jnp.max(jnp.abs(reference)))
            g = grad_of(conv)
            out[f"winograd {name}"] = _median_seconds(lambda g=g: jax.block_until_ready(g(x, w)), repeats)
            out[f"winograd {name} error"] = error
    return out


def measure_torch(batch: int, size: int, channels: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=gen)
    w = torch.randn(channels, channels, 3, 3, generator=gen) * (9 * channels) ** -0.5
    dy = torch.randn(batch, channels, size, size, generator=gen)
    with torch.no_grad():
        out = dict(
            torch_fwd=_median_seconds(lambda: F.conv2d(x, w, padding=1), repeats),
            torch_dgrad=_median_seconds(lambda: torch.nn.grad.conv2d_input(x.shape, w, dy, padding=1), repeats),
            torch_wgrad=_median_seconds(lambda: torch.nn.grad.conv2d_weight(x, w.shape, dy, padding=1), repeats),
        )
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)

    def all3():
        (F.conv2d(xg, wg, padding=1) ** 2).sum().backward()

    out["torch_all"] = _median_seconds(all3, repeats)
    return out


def matmul_peaks(repeats: int, use_torch: bool, size: int = 2048) -> dict:
    import jax
    import jax.numpy as jnp

    flops = 2 * size**3
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    mm = jax.jit(jnp.matmul)
    peaks = dict(xla=flops / _median_seconds(lambda: jax.block_until_ready(mm(a, a)), repeats) / 1e9)
    if use_torch:
        import torch

        t = torch.randn(size, size)
        peaks["torch"] = flops / _median_seconds(lambda: t @ t, repeats) / 1e9
    return peaks


def _cell(seconds, flops):
    return "" if seconds is None else f"{seconds * 1e3:.1f} ({flops / seconds / 1e9:.0f})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--no-torch", action="store_true", help="XLA rows only")
    parser.add_argument("--no-winograd", action="store_true", help="skip the Winograd columns")
    parser.add_argument("--json", default=None, help="also write one JSON object per row here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or min(args.batch) < 1:
        parser.error("need --repeats, --threads and every --batch >= 1")

    import jax

    use_torch = not args.no_torch
    if use_torch:
        try:
            import torch
        except ImportError:
            parser.error("PyTorch is not installed; pass --no-torch for the XLA rows alone")
        torch.set_num_threads(args.threads)
    print(
        f"# jax {jax.__version__}"
        + (f", torch {torch.__version__} ({args.threads} threads)" if use_torch else "")
        + f"; {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        flush=True,
    )
    peaks = matmul_peaks(args.repeats, use_torch)
    print("# float32 2048^2 matmul: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()), flush=True)

    rows = []
    for batch in args.batch:
        for size, channels in SHAPES:
            r = dict(batch=batch, size=size, channels=channels, flops=2 * batch * size * size * 9 * channels * channels)
            r.update(measure_xla(batch, size, channels, args.repeats, not args.no_winograd))
            if use_torch:
                r.update(measure_torch(batch, size, channels, args.repeats))
            rows.append(r)
            print(
                f"# {batch}x{size}x{size}x{channels}: XLA fwd+dgrad+wgrad {r['xla_all'] * 1e3:.1f} ms"
                + (f", PyTorch {r['torch_all'] * 1e3:.1f} ms" if use_torch else ""),
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as out:
            for r in rows:
                out.write(json.dumps(dict(r, matmul_peaks=peaks)) + "\n")

    cols = [
        ("XLA fwd", "xla_fwd", 1),
        ("XLA dgrad", "xla_dgrad", 1),
        ("XLA wgrad", "xla_wgrad", 1),
        ("XLA all three", "xla_all", 3),
    ]
    if use_torch:
        cols += [
            ("PyTorch fwd", "torch_fwd", 1),
            ("PyTorch dgrad", "torch_dgrad", 1),
            ("PyTorch wgrad", "torch_wgrad", 1),
            ("PyTorch all three", "torch_all", 3),
        ]
    if not args.no_winograd:
        cols += [(f"Winograd {name} in XLA, all three", f"winograd {name}", 3) for name in WINOGRAD]
    print()
    print("ms (GFLOP/s of the direct convolution's work) per call")
    print()
    print("| input (N x H x W x C) | " + " | ".join(c[0] for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for r in rows:
        cells = [_cell(r.get(key), mult * r["flops"]) for _, key, mult in cols]
        print(f"| {r['batch']}x{r['size']}x{r['size']}x{r['channels']} | " + " | ".join(cells) + " |")
    if not args.no_winograd:
        errors = {name: max(r[f"winograd {name} error"] for r in rows) for name in WINOGRAD}
        print()
        print(
            "Winograd forward, max |error| / max |output| against the direct convolution: "
            + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
        )


if __name__ == "__main__":
    main()
