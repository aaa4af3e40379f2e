#!/usr/bin/env bash
# Run `jaxlora train` on every host of a Cloud TPU VM pod slice (multi-host).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a scripts/launch_tpu_pod.sh configs/llama3-8b-lora-sft.yaml \
#       model_name_or_path=/mnt/models/Meta-Llama-3-8B-Instruct output_dir=/mnt/runs/llama3-sft
#
# Environment:
#   TPU_NAME, ZONE       the slice (required); PROJECT optional (gcloud default otherwise)
#   JAXLORA_DIR          where the jaxlora checkout lives on every worker (default ~/jaxlora)
#   SETUP=1              first `pip install -e .[tpu]` on every worker
# Every worker runs the same command. JAX discovers the slice topology itself (Cloud TPU sets
# TPU_WORKER_HOSTNAMES etc.), jaxlora calls jax.distributed.initialize(), each host feeds only
# its rows of every global batch, process 0 writes logs/exports, all hosts write their shards of
# the orbax checkpoints. model_name_or_path and output_dir must be paths every worker can read
# (and, for output_dir, write): a shared filesystem or a GCS FUSE mount.
# Preemption: the run exits 75 after checkpointing; rerun this script to resume.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
JAXLORA_DIR="${JAXLORA_DIR:-~/jaxlora}"
[ $# -ge 1 ] || { echo "usage: $0 CONFIG.yaml [key=value ...]" >&2; exit 2; }
ARGS=$(printf '%q ' "$@")
PROJECT_FLAG=()
[ -n "${PROJECT:-}" ] && PROJECT_FLAG=(--project "$PROJECT")
if [ "${SETUP:-0}" = "1" ]; then
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all \
    --command "cd $JAXLORA_DIR && python3 -m pip install -q -e '.[tpu]'"
fi
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all \
  --command "cd $JAXLORA_DIR && JAXLORA_DISTRIBUTED=1 jaxlora train $ARGS --no-progress"
