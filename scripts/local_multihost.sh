#!/usr/bin/env bash
# Runs one job as N JAX processes on this machine, each with its own simulated
# CPU devices, as on N hosts (a rehearsal of a multi-host run):
#
#   scripts/local_multihost.sh N GIN_FILE [more restem_jax.main flags, e.g. --gin.RUN_DIR="'runs/x'"]
#
# DEVICES_PER_PROCESS (default 4) devices each; PYTHON (default python3);
# PORT (default: a free one) for the coordinator.  Each output line starts
# with [pI].  When one process fails or is killed, the others are stopped
# (they could not go on without it) and the exit status is the failure's;
# rerunning the same command resumes the run.
set -u
if [ $# -lt 2 ]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
n=$1; shift
gin=$1; shift
python=${PYTHON:-python3}
devices=${DEVICES_PER_PROCESS:-4}
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
stop() { kill "${pids[@]}" 2>/dev/null; }
trap 'stop; exit 143' INT TERM
for ((i = 0; i < n; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu \
    "$python" -m restem_jax.main --gin_file="$gin" --coordinator_address="127.0.0.1:$port" \
    --num_processes="$n" --process_id="$i" "$@" > >(sed -u "s/^/[p$i] /") 2>&1 &
  pids+=($!)
done
status=0
left=("${pids[@]}")
while [ ${#left[@]} -gt 0 ]; do
  wait -n -p ended "${left[@]}"
  rc=$?
  still=()
  for p in "${left[@]}"; do [ "$p" = "$ended" ] || still+=("$p"); done
  left=("${still[@]}")
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$rc
    echo "local_multihost: a process exited with status $rc: stopping the others" >&2
    stop
  fi
done
exit "$status"
