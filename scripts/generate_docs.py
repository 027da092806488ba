"""Write the documentation generated from the code: docs/config.md (every config key).

    python scripts/generate_docs.py

tests/test_schema.py fails when a generated file is stale.
"""

import pathlib

from diffusion_jax.builders import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
GENERATED = {ROOT / "docs" / "config.md": config_lib.markdown}


def main() -> None:
    for path, make in GENERATED.items():
        path.write_text(make())
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
