#!/usr/bin/env bash
# Single-process run on this machine (CPU, one GPU, or one TPU host).
#   launch/local.sh configs/shapes_demo.py workdir/demo [--config.x=y ...]
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [flags...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [flags...]}
shift 2
exec "${PYTHON:-python3}" -m muse_jax.main --config="$config" --workdir="$workdir" "$@"
