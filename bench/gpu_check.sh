#!/usr/bin/env bash
# mimo's first run on a GPU, in one command of at most 9 minutes on one H200 that has torch 2.11 (CUDA 13) and
# Python 3.12 but no network: installs the wheels bench/gpu_bundle.sh put in .whl/ (carried with the repository),
# then runs bench/gpu_check.py (stages and what they measure: its docstring). The JSON summary goes to $OUT when
# set (else the current folder), a table to stdout.
#
#   bash bench/gpu_check.sh          # on the GPU machine (device run, carry [".whl"])
#   bash bench/gpu_check.sh --cpu    # the same stages at toy size on a CPU machine with mimo installed (the tests)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

if [[ "${1:-}" != "--cpu" ]]; then
    SITE=$(mktemp -d /tmp/mimo-site.XXXXXX)
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "gpu_check: error: no wheels in .whl/; run bash bench/gpu_bundle.sh first and carry .whl" >&2
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
    # mimo itself from this tree: its top-level folders are the subpackages of the import package mimo.
    mkdir -p "$SITE/mimo"
    for package in model parallel data train recipes; do
        ln -s "$REPO/$package" "$SITE/mimo/$package"
    done
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec python3 bench/gpu_check.py "$@"
