#!/usr/bin/env bash
# Run `distillm2 train` as N CPU processes on this machine, joined by jax.distributed over
# localhost: a rehearsal of a multi-host run (each process feeds its own data shard; only
# process 0 writes logs). Logs go to $LOG_DIR/process_<i>.log (default: the current folder).
#
#   launch/local_cpu.sh [--python PATH] N CONFIG [key=value ...]
#   launch/local_cpu.sh [--python PATH] N generate --model DIR --prompts SRC --out FILE [...]
#   DISTILLM2_CPU_DEVICES=2 (devices per process), DISTILLM2_PORT=free port (default: random),
#   PYTHON=interpreter (default: the active virtual environment's, else python3; launch/python.sh)
set -euo pipefail
source "$(dirname "$0")/python.sh"
if [ $# -lt 2 ]; then echo "usage: $0 [--python PATH] N CONFIG [key=value ...]" >&2; exit 2; fi
n=$1; shift
command=train
if [ "$1" = "train" ] || [ "$1" = "generate" ]; then command=$1; shift; fi
port=${DISTILLM2_PORT:-$((20000 + RANDOM % 20000))}
log_dir=${LOG_DIR:-.}
mkdir -p "$log_dir"
pids=()
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="" \
  DISTILLM2_CPU_DEVICES=${DISTILLM2_CPU_DEVICES:-2} \
  DISTILLM2_COORDINATOR=127.0.0.1:$port DISTILLM2_NUM_PROCESSES=$n DISTILLM2_PROCESS_ID=$i \
    "$python" -m distillm2_jax.cli "$command" "$@" >"$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
if [ "$status" -ne 0 ]; then echo "a process failed (exit $status); see $log_dir/process_*.log" >&2; fi
exit "$status"
