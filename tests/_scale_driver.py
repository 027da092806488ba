"""Runs ``diffusion-jax`` with two optional instruments, for tests/test_scale_*.py:

``--log-indices FILE``   append, per batch read, the example indices this process loaded (one
                         JSON list per line), so a test can check which shard each host read;
``--concat-shards N``    make every training iterator the concatenation of the N per-host
                         shards (shard 0 first), so one process sees exactly the global batches
                         of an N-host run (hosts hold contiguous blocks of the batch axis).

usage: python tests/_scale_driver.py [--log-indices FILE] [--concat-shards N] -- MODE FLAGS...
"""

import json
import sys

import numpy as np


def _log_indices(path: str) -> None:
    from diffusion_jax.data import pipeline

    load = pipeline._LoadBatch.__call__

    def logged(self, indices, rng):
        ids = np.asarray(indices, np.int64)
        with open(path, "a") as f:
            f.write(json.dumps(ids[ids >= 0].tolist()) + "\n")
        return load(self, indices, rng)

    pipeline._LoadBatch.__call__ = logged


class _Concat:
    """The iterators of shards 0..N-1 as one, with a combined checkpointable state."""

    def __init__(self, parts):
        self.parts = parts
        self.info = parts[0].info

    def __iter__(self):
        return self

    def __next__(self):
        batches = [next(p) for p in self.parts]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def get_state(self):
        return [p.get_state() for p in self.parts]

    def set_state(self, state):
        for p, s in zip(self.parts, state):
            p.set_state(s)

    def close(self):
        for p in self.parts:
            p.close()


def _concat_shards(n: int) -> None:
    from diffusion_jax.builders import data

    build = data.build_data

    def concatenated(config, *, split, evaluation=None, **kwargs):
        if (split == "eval") if evaluation is None else evaluation:
            return build(config, split=split, evaluation=evaluation, **kwargs)
        return _Concat(
            [build(config, split=split, evaluation=False, shard_index=i, shard_count=n, **kwargs) for i in range(n)]
        )

    data.build_data = concatenated


def main(argv):
    split = argv.index("--")
    opts, cli_args = argv[1:split], argv[split + 1 :]
    while opts:
        flag, value, opts = opts[0], opts[1], opts[2:]
        if flag == "--log-indices":
            _log_indices(value)
        elif flag == "--concat-shards":
            _concat_shards(int(value))
        else:
            raise SystemExit(f"unknown option {flag}")
    from diffusion_jax import cli

    sys.argv = ["diffusion-jax", *cli_args]
    cli.main()


if __name__ == "__main__":
    main(sys.argv)
