#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: create (or reuse) the TPU VM, install this project on every
# worker, and run the same command on all of them. jax.distributed.initialize() finds the pod's
# coordinator by itself. Keep run_dir on storage every worker sees (a gcsfuse mount or NFS).
#
#   TPU_NAME=distill ZONE=us-central2-b ACCELERATOR=v4-32 launch/tpu_pod.sh CONFIG [key=value ...]
# Env: TPU_NAME, ZONE, ACCELERATOR (e.g. v4-32, v5p-64), RUNTIME (TPU software version),
#      REPO_URL (where workers clone this project from), PROJECT (gcloud project, optional).
set -euo pipefail
if [ $# -lt 1 ]; then echo "usage: $0 CONFIG [key=value ...]" >&2; exit 2; fi
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${ACCELERATOR:?set ACCELERATOR}" "${REPO_URL:?set REPO_URL}"
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
project_flag=${PROJECT:+--project=$PROJECT}
if ! gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" $project_flag >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR" \
    --version="$RUNTIME" $project_flag
fi
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all $project_flag --command "
  set -e
  if [ ! -d distillm2-jax ]; then git clone $REPO_URL distillm2-jax; fi
  cd distillm2-jax && git pull --ff-only
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -e . 'jax[tpu]'
  python -m distillm2_jax.cli train$args
"
