#!/usr/bin/env bash
# N cooperating processes on localhost (jax.distributed over gloo on CPU):
# the multi-host code path, testable on one machine. Each process's console
# goes to WORKDIR.procI.log; the exit status is the first failure's.
#   launch/multiprocess.sh 2 configs/shapes_demo.py workdir/mp [flags...]
set -euo pipefail
n=${1:?usage: launch/multiprocess.sh NUM_PROCESSES CONFIG WORKDIR [flags...]}
config=${2:?}; workdir=${3:?}; shift 3
port=${PORT:-$((20000 + RANDOM % 20000))}
mkdir -p "$(dirname "${workdir%/}")"
pids=()
for ((i = 0; i < n; i++)); do
  "${PYTHON:-python3}" -m muse_jax.main --config="$config" --workdir="$workdir" \
    --coordinator_address="127.0.0.1:$port" --num_processes="$n" \
    --process_id="$i" "$@" > "${workdir%/}.proc$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  if ! wait "$pid"; then
    rc=$?
    if [ "$status" -eq 0 ]; then status=$rc; fi
  fi
done
exit $status
