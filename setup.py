"""Installs the top-level code folders as subpackages of one import package, ``mimo``."""

from setuptools import find_packages, setup

SUBPACKAGES = ("model", "parallel", "data", "train", "recipes")
"""Top-level folders that are import packages; their own subpackages are found below them."""

setup(
    name="mimo",
    version="0.1.0",
    description="Pre-training MiMo-V2-Flash on megatron-core",
    python_requires=">=3.10",
    packages=[
        f"mimo.{name}{suffix}" for name in SUBPACKAGES for suffix in ["", *(f".{sub}" for sub in find_packages(name))]
    ],
    package_dir={f"mimo.{name}": name for name in SUBPACKAGES},
    package_data={
        "mimo.recipes": ["*.yaml", "*/*.yaml"],
        "mimo.data": ["assets/*", "assets/*/*"],
    },
    install_requires=[
        # torch is not pinned here: install the build for your accelerator first (CPU: torch==2.13.0).
        "torch>=2.6",
        # Verified on 0.16.1; mimo's megatron patches refuse other versions (see parallel/megatron_patches).
        "megatron-core>=0.16.1,<0.17",
        "hydra-core>=1.3,<1.4",
        "datasets>=3.0",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "wandb>=0.18",
        "numpy>=1.26",
        "tqdm>=4.66",
        # megatron-core's checkpoint writer processes need it but megatron-core does not declare it.
        "psutil>=5.9",
        # mimo-report's figures (Agg renderer, no display needed).
        "matplotlib>=3.8",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]>=2.8"],
        "deepspeed": ["deepspeed>=0.16"],
        # deepspeed: its FLOPs profiler is the independent reference for the planner's FLOPs per token.
        "test": ["pytest>=8", "ruff>=0.6", "transformers>=5.23", "pandas", "pyarrow", "deepspeed>=0.16"],
    },
    entry_points={
        "console_scripts": [
            "mimo-train=mimo.train.cli:main",
            "mimo-plan=mimo.train.tools.plan.cli:main",
            "mimo-preprocess=mimo.data.preprocess:main",
            "mimo-convert=mimo.train.tools.convert.cli:main",
            "mimo-eval=mimo.train.tools.evaluate:main",
            "mimo-report=mimo.train.tools.report.cli:main",
        ]
    },
)
