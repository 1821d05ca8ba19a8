#!/usr/bin/env bash
# Collects, on a machine with pip and a package index, the wheels mimo needs on a GPU machine that has only
# torch 2.11 (CUDA 13), Python 3.12 and its image's packages, and no network: megatron-core (a CPython 3.12
# manylinux build) and the Hydra config stack. They land in .whl/ (git-ignored), which travels with the repository
# when named in the device tool's `carry`; bench/gpu_check.sh installs them there.
#
#   bash bench/gpu_bundle.sh
set -euo pipefail
cd "$(dirname "$0")/.."

BUNDLE=.whl
LIMIT_MIB=64
PYTHON_VERSION=3.12
BINARY=(megatron-core==0.16.1)
PURE=(hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3)
# What the GPU image already holds of these wheels' requirements (the device notes' package list).
ON_IMAGE=(torch numpy packaging pyyaml)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
    manylinux2014_x86_64 manylinux1_x86_64)

rm -rf "$BUNDLE"
mkdir -p "$BUNDLE"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
    "${PLATFORMS[@]/#/--platform=}" -d "$BUNDLE" "${BINARY[@]}"
# Pure-Python packages install on any Python; one that is published only as a source archive (antlr4's runtime)
# is built into a wheel here, since the GPU machine cannot fetch build tools.
python3 -m pip wheel -q --no-deps -w "$BUNDLE" "${PURE[@]}"

# Every requirement of every wheel, for Python 3.12 on Linux, is in the bundle or on the image.
python3 - "$BUNDLE" "$PYTHON_VERSION" "${ON_IMAGE[@]}" <<'CHECK'
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

bundle, python_version, *on_image = sys.argv[1:]
wheels = sorted(Path(bundle).glob("*.whl"))
have = {canonicalize_name(wheel.name.split("-")[0]) for wheel in wheels} | {canonicalize_name(n) for n in on_image}
target = {"python_version": python_version, "sys_platform": "linux", "platform_machine": "x86_64", "extra": ""}
missing = []
for wheel in wheels:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    for line in lines:
        if line.startswith("Requires-Dist:"):
            need = Requirement(line.split(":", 1)[1].strip())
            applies = need.marker is None or need.marker.evaluate(target)
            if applies and canonicalize_name(need.name) not in have:
                missing.append(f"{need} (needed by {wheel.name})")
if missing:
    sys.exit("gpu_bundle: error: requirements neither bundled nor on the GPU image: " + "; ".join(missing))
CHECK

size_kib=$(du -sk "$BUNDLE" | cut -f1)
if ((size_kib > LIMIT_MIB * 1024)); then
    echo "gpu_bundle: error: $BUNDLE is $((size_kib / 1024)) MiB, over the ${LIMIT_MIB} MiB a device call carries" >&2
    exit 1
fi
ls -1 "$BUNDLE"
echo "bundle: $BUNDLE, $(du -sh "$BUNDLE" | cut -f1) (limit ${LIMIT_MIB} MiB); every requirement is bundled or on the image"
echo "carry it to the GPU machine with the repository: device run with carry [\"$BUNDLE\"] and the command"
echo "    bash bench/gpu_check.sh"
