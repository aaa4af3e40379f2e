#!/usr/bin/env bash
# SLURM multi-node GPU training: one jaxlora process per node, each driving all its GPUs.
#
#   sbatch --nodes=2 --gpus-per-node=8 scripts/launch_slurm.sh configs/llama3-8b-lora-sft.yaml \
#       model_name_or_path=/shared/models/Meta-Llama-3-8B-Instruct output_dir=/shared/runs/sft
#
#SBATCH --job-name=jaxlora
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --signal=B:TERM@120
#
# Environment it relies on:
#   SLURM_NTASKS > 1 (set by srun)  -> jaxlora calls jax.distributed.initialize(), which reads the
#                                      SLURM variables for coordinator address, process count/id
#   JAXLORA_VENV (optional)         -> a virtualenv to activate on every node (`pip install -e .[gpu]`)
#   XLA_PYTHON_CLIENT_MEM_FRACTION  -> defaults to 0.9 here
# The mesh comes from the config (`mesh: {data: -1, fsdp: 8, tensor: 1}` shards the base over a
# node's 8 GPUs and data-parallelises across nodes). --signal sends SIGTERM 120 s before the time
# limit: jaxlora checkpoints and exits 75, so `sbatch` the same command again to resume.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: sbatch $0 CONFIG.yaml [key=value ...]" >&2; exit 2; }
if [ -n "${JAXLORA_VENV:-}" ]; then source "$JAXLORA_VENV/bin/activate"; fi
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
srun --kill-on-bad-exit=1 jaxlora train "$@" --no-progress
