"""megatron_t1: T1-style RL (arXiv 2501.11651) on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron_t1",
    version="0.1.0",
    description="T1 reasoning RL (oversampling, entropy bonus, dynamic anchor) on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_t1", "megatron_t1.*"]),
    # Lower bounds only: clusters bring their own torch (NGC containers, vLLM's exact pin).
    # The exact CPU/CI pins live in constraints-cpu.txt.
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.12",
        "transformers>=4.45",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "sympy>=1.12",
        "math-verify>=0.7",
        "tensorboard>=2.15",
        "pyyaml>=6.0",
        "psutil>=5.9",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "numpy>=1.26",
        "pyarrow>=14",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]>=1.12"],
        "vllm": ["vllm>=0.8"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6", "champ-dataset>=1.0"],
    },
    entry_points={"console_scripts": ["megatron-t1=megatron_t1.__main__:main"]},
)
