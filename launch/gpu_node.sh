#!/usr/bin/env bash
# One GPU node: a single process drives every local GPU (JAX's usual single-host setup).
# The default mesh.shape=[-1,1,1] is pure data parallelism; for models that do not fit one
# GPU, shard weights with fsdp and/or tensor, e.g. mesh.shape=[1,8,1] or [2,2,2].
#
#   launch/gpu_node.sh [--python PATH] CONFIG [key=value ...]
# Install once per machine: pip install -e . "jax[cuda12]"
# PYTHON=interpreter (default: the active virtual environment's, else python3; launch/python.sh)
set -euo pipefail
source "$(dirname "$0")/python.sh"
if [ $# -lt 1 ]; then echo "usage: $0 [--python PATH] CONFIG [key=value ...]" >&2; exit 2; fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec "$python" -m distillm2_jax.cli train "$@"
