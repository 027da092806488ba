"""Shared test set-up.

Tests run in float32 by default, like the library; tests that want sharper checks use the
``x64`` fixture, which enables float64 for the duration of the test only.
"""

import os
import pathlib

import jax
import pytest

# Session fixtures of the scale tests (a shared data directory and one uninterrupted reference
# run), defined here so that every tests/test_scale_*.py module shares a single instance.
from _scale_cli import scale_data_dir, scale_reference  # noqa: F401

_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
jax.config.update("jax_compilation_cache_dir", os.environ.get("DIFFUSION_JAX_CACHE", str(_CACHE)))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

FIXTURES = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield
