"""Inception feature extraction: throughput next to pytorch-fid's own network, and a 10k FID.

    pip install torch==2.13.0 pytorch-fid   # for this script only
    python scripts/benchmark_inception.py --batch-sizes 50 200 --repeats 2 --fid-samples 10000
    python scripts/benchmark_inception.py --cpu-devices 2 ...   # ours on two CPU devices

Both networks get the same random weights (the parity fixture's recipe,
tests/fixtures/fid_inception, so no weights file is needed; speed does not depend on the values)
and the same 32x32 images in [0, 1], resized to 299x299 inside the timed call (pytorch-fid:
``InceptionV3([3], resize_input=True, normalize_input=True)`` in ``torch.no_grad()``; ours: the
``inception`` detector, jitted, batch sharded over the local devices). Each figure is images per
second over ``--repeats`` timed batches after one untimed warm-up batch (which compiles ours).
pytorch-fid's outputs on the first batch are compared with ours as a live parity check.

The end-to-end FID time covers ``--fid-samples`` images -> features -> streaming float64
statistics -> Frechet distance against precomputed reference statistics (computed beforehand
from other images, not timed). ``--skip-torch`` runs only ours.

XLA:CPU runs the network's convolutions on about one core, so on a CPU host ours splits each
batch over ``--cpu-devices`` CPU devices (JAX's ``jax_num_cpu_devices``, the same as
``XLA_FLAGS=--xla_force_host_platform_device_count=N``), one per core; pytorch-fid's network
uses torch's threads (``--torch-threads``, default: torch's choice).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time
import types

import jax
import numpy as np

from diffusion_jax import evaluation as ev
from diffusion_jax.evaluation import inception

FIXTURE = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "fid_inception"


def random_weights() -> dict[str, np.ndarray]:
    manifest = json.loads((FIXTURE / "state_dict_manifest.json").read_text())
    with np.load(FIXTURE / "inception_bn.npz") as bn:
        return inception.random_state_dict(manifest, bn)


def images(n: int, seed: int) -> np.ndarray:
    """Smooth-ish random 32x32 RGB images in [0, 1] (N, 32, 32, 3)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(size=(n, 8, 8, 3)).astype(np.float32)
    return np.clip(np.repeat(np.repeat(coarse, 4, 1), 4, 2) + 0.05 * rng.normal(size=(n, 32, 32, 3)), 0, 1).astype(
        np.float32
    )


def _import_pytorch_fid():
    try:
        from pytorch_fid import inception as pf  # noqa: PLC0415
    except RuntimeError as err:  # e.g. "operator torchvision::nms does not exist"
        # A torchvision wheel built for another torch (CUDA vs CPU) cannot load its compiled ops;
        # pytorch-fid uses only torchvision's pure-Python Inception3, so skip registering them.
        print(f"note: torchvision's compiled ops did not load ({err}); importing without them", flush=True)
        for name in [m for m in sys.modules if m.startswith(("torchvision", "pytorch_fid"))]:
            del sys.modules[name]
        for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
            sys.modules[name] = types.ModuleType(name)
        from pytorch_fid import inception as pf  # noqa: PLC0415
    return pf


def torch_network(state_dict):
    import torch  # noqa: PLC0415

    pf = _import_pytorch_fid()

    # pytorch-fid downloads its weights inside fid_inception_v3(); hand it ours instead.
    pf.load_state_dict_from_url = lambda *a, **k: {k_: torch.from_numpy(v) for k_, v in state_dict.items()}
    net = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True)
    return net.eval()


def time_batches(fn, batch: np.ndarray, repeats: int) -> tuple[float, np.ndarray]:
    """Images per second over ``repeats`` calls after one warm-up call, and the last output."""
    out = fn(batch)  # warm-up (compilation for ours)
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(batch)
    return repeats * len(batch) / (time.perf_counter() - start), np.asarray(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--fid-samples", type=int, default=10000)
    parser.add_argument("--fid-batch-size", type=int, default=200)
    parser.add_argument("--reference-samples", type=int, default=1000)
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--cpu-devices", type=int, default=1, help="CPU devices for ours (one per core)")
    args = parser.parse_args()
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)

    state = random_weights()
    detector = ev.get_detector("inception", variables=inception.convert_state_dict(state))
    mesh = ev.make_mesh()
    print(f"devices: {jax.devices()}; cpu: {platform.processor() or platform.machine()}", flush=True)
    results: dict[str, object] = {"devices": [str(d) for d in jax.devices()], "argv": sys.argv[1:]}

    def ours(batch):
        return ev.extract_features(detector, batch, batch_size=len(batch), mesh=mesh).features

    net = None
    if not args.skip_torch:
        import torch  # noqa: PLC0415

        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        results["torch_threads"] = torch.get_num_threads()
        net = torch_network(state)

        def theirs(batch):
            with torch.no_grad():
                return net(torch.from_numpy(batch.transpose(0, 3, 1, 2).copy()))[0][:, :, 0, 0].numpy()

    for bs in args.batch_sizes:
        batch = images(bs, seed=bs)
        results[f"ours_images_per_s_batch{bs}"], a = time_batches(ours, batch, args.repeats)
        print(f"batch {bs}: ours {results[f'ours_images_per_s_batch{bs}']:.2f} images/s", flush=True)
        if net is not None:
            results[f"pytorch_fid_images_per_s_batch{bs}"], b = time_batches(theirs, batch, args.repeats)
            print(f"batch {bs}: pytorch-fid {results[f'pytorch_fid_images_per_s_batch{bs}']:.2f} images/s", flush=True)
            results[f"pool3_max_rel_diff_batch{bs}"] = float(np.abs(a - b).max() / np.abs(b).max())
            print(
                f"batch {bs}: pool3 max|ours - pytorch-fid| / max|pytorch-fid| = "
                f"{results[f'pool3_max_rel_diff_batch{bs}']:.2e}",
                flush=True,
            )

    if args.fid_samples:
        ref_images = images(args.reference_samples, seed=123)
        reference = ev.feature_statistics(detector, ref_images, batch_size=args.fid_batch_size, mesh=mesh)

        def chunks(n, size=1000):
            for lo in range(0, n, size):
                yield images(min(size, n - lo), seed=10_000 + lo)

        start = time.perf_counter()
        s = ev.feature_statistics(detector, chunks(args.fid_samples), batch_size=args.fid_batch_size, mesh=mesh)
        fid = ev.frechet_distance(s.mu, s.sigma, reference.mu, reference.sigma)
        seconds = time.perf_counter() - start
        results.update(fid_samples=s.num_samples, fid_value=fid, fid_end_to_end_s=seconds)
        print(f"FID of {s.num_samples} samples end to end: {seconds:.1f} s (FID {fid:.3f})", flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
