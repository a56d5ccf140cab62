#!/usr/bin/env bash
# Runs the same command on every host of a Cloud TPU pod slice. The main job
# initialises jax.distributed itself (JAX detects the pod from the TPU
# metadata), so no address flags are needed.
#   launch/tpu_pod.sh TPU_NAME ZONE configs/shapes_demo.py gs://bucket/workdir
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [flags...]}
zone=${2:?}; config=${3:?}; workdir=${4:?}; shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd ~/muse_jax && python3 -m pip install -q -e . &&
  python3 -m muse_jax.main --config=$config --workdir=$workdir $*"
