"""Write the documentation generated from the code: docs/config.md (every config key) and the
sampler registry table in docs/samplers.md.

    python scripts/generate_docs.py

tests/test_schema.py fails when a generated file is stale.
"""

import pathlib

from diffusion_jax.builders import config as config_lib
from diffusion_jax.samplers import api as samplers_api

ROOT = pathlib.Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- generated: sampler registry -->", "<!-- end of generated -->"


def samplers_md(current: str) -> str:
    """docs/samplers.md with the block between the markers replaced by the registry table."""
    head, rest = current.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{samplers_api.registry_markdown()}\n{END}{tail}"


def generated() -> dict[pathlib.Path, str]:
    """Each generated file and what it should contain."""
    samplers_path = ROOT / "docs" / "samplers.md"
    return {
        ROOT / "docs" / "config.md": config_lib.markdown(),
        samplers_path: samplers_md(samplers_path.read_text()),
    }


def main() -> None:
    for path, text in generated().items():
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
