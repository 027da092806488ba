"""diffusion_jax: score-based diffusion models in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="diffusion_jax",
    version="0.1.0",
    description="Score-based diffusion models (SDEs, networks, samplers, likelihoods, training) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["diffusion_jax", "diffusion_jax.*"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "ml-collections>=1.1",
        "numpy>=2.0",
        # tensorflow-datasets without TensorFlow: ArrayRecord files, data_source and Grain.
        "tensorflow-datasets>=4.9.10",
        "importlib_resources",
        "array_record>=0.8",
        "grain>=0.2.12",
        # The embedded default data set (handwritten digits) ships with scikit-learn.
        "scikit-learn>=1.5",
        "tensorboardX>=2.6",
        "pillow>=10",
        # Sweeps: Optuna's storage runs the points (SQLite by default, any SQLAlchemy URL to share
        # one sweep between machines); matplotlib draws the report's plots.
        "optuna>=5.0",
        "matplotlib>=3.8",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3",
            "scipy>=1.11",
            "ruff==0.17.6",
            "mypy==2.4.1",
            "regex",
            "ftfy",
            "psycopg[binary]>=3.1",
        ],
        # A sweep shared through PostgreSQL (--storage postgresql+psycopg://...).
        "postgres": ["psycopg[binary]>=3.1"],
        # CLIP's BPE vocabulary ships inside open-clip-torch, read in place without importing it:
        # install it with `pip install --no-deps open-clip-torch` (its own dependencies are torch).
        "clip": ["regex>=2023.0", "ftfy>=6.1"],
        # Converting score_sde_pytorch checkpoints reads .pth files with torch's weights-only loader.
        "convert": ["torch>=2.4"],
        # Optional comparison against k-diffusion in scripts/benchmark_samplers.py.
        "bench": ["torch>=2.4", "k-diffusion", "scipy>=1.11"],
    },
    entry_points={"console_scripts": ["diffusion-jax=diffusion_jax.cli:main"]},
)
