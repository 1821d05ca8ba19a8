#!/bin/bash
# One node: torchrun starts one trainer process per GPU (or one process on a machine without GPUs).
#
#   launch/torchrun.sh RECIPE [key=value ...]
#   NPROC_PER_NODE=4 launch/torchrun.sh config train.steps=50
#
# Stopping: SIGTERM or Ctrl-C reaches torchrun, which passes SIGTERM on; the trainer finishes its step, saves a
# checkpoint and exits. torchrun then reports the signal it got (a SignalException traceback, exit status 1) even
# though every rank stopped cleanly: the trainer's "stopped at step N (signal)" line is the one to look for.
# Running the same command again resumes from the latest checkpoint in the run directory.
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "$0")/common.sh"

mimo_check_recipe "${1:-}"
recipe="$1"
shift
nproc="${NPROC_PER_NODE:-$(mimo_local_gpus)}"

mimo_plan "$nproc" "$recipe" "$@"
exec "$TORCHRUN" --standalone --nnodes=1 --nproc-per-node="$nproc" \
    -m mimo.train --config-name "$recipe" "$@"
