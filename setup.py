"""Installs the top-level code folders as subpackages of one import package, ``mimo``."""

from setuptools import setup

SUBPACKAGES = ("model", "parallel", "data", "train", "recipes")

setup(
    name="mimo",
    version="0.1.0",
    description="Pre-training MiMo-V2-Flash on megatron-core",
    python_requires=">=3.10",
    packages=[f"mimo.{name}" for name in SUBPACKAGES],
    package_dir={f"mimo.{name}": name for name in SUBPACKAGES},
    package_data={"mimo.recipes": ["**/*.yaml"]},
)
