"""What the tests of CLIP's tokenizer need: its BPE vocabulary, which ships inside the
open-clip-torch wheel (read in place, the package is not imported), and the regex package."""

import importlib.metadata
import importlib.util

import pytest


def has_clip_vocabulary() -> bool:
    try:
        importlib.metadata.distribution("open-clip-torch")
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("regex") is not None


needs_vocabulary = pytest.mark.skipif(
    not has_clip_vocabulary(),
    reason='CLIP\'s BPE vocabulary ships in open-clip-torch: pip install "diffusion_jax[clip]"',
)
