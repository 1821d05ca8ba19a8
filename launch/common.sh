# shellcheck shell=bash
# Functions shared by the mimo launch scripts (sourced, not run): argument handling and the planner check.

MIMO_LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/env.sh
. "$MIMO_LAUNCH_DIR/env.sh"

PYTHON="${PYTHON:-python}"
TORCHRUN="${TORCHRUN:-torchrun}"

mimo_die() {
    echo "error: $*" >&2
    exit 2
}

# mimo_check_recipe NAME: the first argument of every launch script is a recipe name, not an override.
mimo_check_recipe() {
    case "${1:-}" in
        "" | -* | *=*) mimo_die "the first argument must be a recipe name (e.g. mimo_v2_flash_stage1), then key=value overrides" ;;
    esac
}

# mimo_local_gpus: GPUs visible on this node (1 when there are none, for a CPU run).
mimo_local_gpus() {
    local count=0
    if command -v nvidia-smi > /dev/null 2>&1; then
        count="$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)"
    fi
    if [ "$count" -gt 0 ]; then echo "$count"; else echo 1; fi
}

# mimo_plan WORLD_SIZE RECIPE [OVERRIDE...]: prints the planner's summary. A layout the planner refuses (it
# does not fit in memory) stops the launch unless MIMO_IGNORE_PLAN=1; a recipe that does not compose always
# stops it, since the trainer would fail on it too.
mimo_plan() {
    local world_size="$1" recipe="$2" status=0
    shift 2
    "$PYTHON" -m mimo.train.tools.plan --config-name "$recipe" --world-size "$world_size" \
        --gpu "$MIMO_GPU" --mfu "$MIMO_MFU" "$@" || status=$?
    if [ "$status" -eq 1 ] && [ "${MIMO_IGNORE_PLAN:-0}" = 1 ]; then
        echo "warning: mimo-plan refused this layout; launching anyway because MIMO_IGNORE_PLAN=1" >&2
    elif [ "$status" -eq 1 ]; then
        echo "error: mimo-plan refused this layout (see above); change it, or set MIMO_IGNORE_PLAN=1 to launch anyway" >&2
        exit 1
    elif [ "$status" -ne 0 ]; then
        echo "error: the recipe or its overrides are invalid (see above); nothing was launched" >&2
        exit "$status"
    fi
}

# mimo_run_dir RECIPE [OVERRIDE...]: the run directory the recipe and its overrides resolve to.
mimo_run_dir() {
    "$PYTHON" -c 'import sys; from mimo.recipes import load_config
print(load_config(sys.argv[2:], config_name=sys.argv[1]).run.dir)' "$@"
}
