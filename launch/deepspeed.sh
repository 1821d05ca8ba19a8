#!/bin/bash
# Several nodes without Slurm: DeepSpeed's launcher reads an MPI-style hostfile ("node01 slots=8" per line),
# reaches every node over passwordless ssh (pdsh) and starts one trainer process per slot. Only the launcher is
# DeepSpeed's; the trainer is the same megatron-core program the other scripts start.
#
#   HOSTFILE=/shared/hostfile launch/deepspeed.sh mimo_v2_flash_stage1 cluster=h100_256 [key=value ...]
#
# The first host of the hostfile is the rendezvous (MASTER_ADDR/MASTER_PORT override it). The settings of
# launch/env.sh are passed to every node through DeepSpeed's environment file (DS_ENV_FILE).
#
# Stopping: send SIGTERM or SIGINT to this script (not to the `deepspeed` process). It sends SIGTERM to the
# trainer processes on every host; they finish their step, save a checkpoint and exit, and the launcher
# returns. DeepSpeed's own signal handling would kill the ranks within seconds, too soon for a checkpoint, so
# the launcher runs in its own session where terminal signals do not reach it. Running the same command again
# resumes from the latest checkpoint.
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "$0")/common.sh"

mimo_check_recipe "${1:-}"
recipe="$1"
shift
hostfile="${HOSTFILE:-hostfile}"
[ -r "$hostfile" ] || mimo_die "no hostfile at $hostfile; set HOSTFILE to a file of 'host slots=N' lines"
DEEPSPEED="${DEEPSPEED:-deepspeed}"

hosts="$(awk '!/^[[:space:]]*(#|$)/ { print $1 }' "$hostfile")"
world_size="$(awk '!/^[[:space:]]*(#|$)/ { split($2, kv, "="); total += kv[2] } END { print total + 0 }' "$hostfile")"
[ "$world_size" -gt 0 ] || mimo_die "$hostfile lists no slots; write one 'host slots=N' line per node"
master_addr="${MASTER_ADDR:-$(echo "$hosts" | head -n 1)}"
master_port="${MASTER_PORT:-29500}"

mimo_plan "$world_size" "$recipe" "$@"

env_file="$(mktemp "${TMPDIR:-/tmp}/mimo-deepspeed-env.XXXXXX")"
trap 'rm -f "$env_file"' EXIT
for name in $MIMO_EXPORTED_VARS; do
    if [ -n "${!name:-}" ]; then echo "$name=${!name}" >> "$env_file"; fi
done
export DS_ENV_FILE="$env_file"

setsid --wait "$DEEPSPEED" --hostfile "$hostfile" --master_addr "$master_addr" --master_port "$master_port" \
    --no_local_rank --module mimo.train --config-name "$recipe" "$@" &
launcher=$!

stopping=0
# shellcheck disable=SC2317  # trap handler
stop_trainers() {
    if [ "$stopping" -eq 0 ]; then
        stopping=1
        echo "stopping: asking the trainer on every host to checkpoint and exit"
        # The pattern matches the trainer's own command line, which only its ranks have; the brackets keep it
        # from matching the remote shell that runs pkill.
        pdsh -w "$(echo "$hosts" | paste -sd, -)" \
            "pkill -TERM -f -- '[-]m mimo[.]train --config-name $recipe'" || true
    fi
}
trap stop_trainers TERM INT

# A trapped signal interrupts `wait`; keep waiting until the launcher itself has exited, then take its status.
while :; do
    status=0
    wait "$launcher" || status=$?
    kill -0 "$launcher" 2> /dev/null || break
done
exit "$status"
