"""Convert a score_sde_pytorch checkpoint into diffusion_jax parameters.

    python scripts/convert_score_sde.py --config path/to/config.py --checkpoint checkpoint_26.pth \\
        --out converted/ [--ema]

``--config`` is a Python file with ``get_config()`` returning an ml_collections ConfigDict whose
``model`` and ``data`` sections describe the checkpoint's network (score_sde's key names). The
``.pth`` file is read with torch's weights-only loader (``pip install "diffusion_jax[convert]"``).
Writes ``OUT/params`` (an orbax checkpoint of the Flax ``params`` tree) and ``OUT/config.json``.
``--ema`` converts the exponential-moving-average weights (the ones score_sde samples with).
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
from typing import Any, Mapping, Sequence

import orbax.checkpoint as ocp

from diffusion_jax.builders.model import build_model, model_input_shape
from diffusion_jax.models.convert import convert_checkpoint, load_torch_checkpoint


def load_config(path: str):
    """Calls ``get_config()`` of the Python config file at ``path``."""
    file = pathlib.Path(path).resolve()
    if not file.is_file():
        raise FileNotFoundError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_convert_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(file.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(file.parent))
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} defines no get_config()")
    return module.get_config()


def convert_to_directory(config: Any, checkpoint: Mapping[str, Any], out_dir: str, *, ema: bool = False) -> dict:
    """Converts a loaded checkpoint (numpy arrays) for the network of ``config`` and saves
    ``out_dir/params`` (orbax) and ``out_dir/config.json``. Returns the params."""
    module = build_model(config)
    params = convert_checkpoint(module, checkpoint, input_shape=model_input_shape(config), ema=ema)
    out = pathlib.Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out / "params", params)
    checkpointer.wait_until_finished()
    (out / "config.json").write_text(config.to_json_best_effort(indent=2))
    return params


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="Python config file with get_config()")
    parser.add_argument("--checkpoint", required=True, help="score_sde_pytorch .pth checkpoint")
    parser.add_argument("--out", required=True, help="output directory (params/ and config.json)")
    parser.add_argument("--ema", action="store_true", help="convert the EMA weights")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    convert_to_directory(config, load_torch_checkpoint(args.checkpoint), args.out, ema=args.ema)
    print(f"wrote {pathlib.Path(args.out) / 'params'} and {pathlib.Path(args.out) / 'config.json'}")


if __name__ == "__main__":
    main()
