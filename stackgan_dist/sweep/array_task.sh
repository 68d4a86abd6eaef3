#!/usr/bin/env bash
# One task of a sweep's Slurm job array: the trial stage that SLURM_ARRAY_TASK_ID names, run through
# slurm/train.sbatch in this same shell (exec), so its requeue and preemption handling apply as they are: its
# `scontrol requeue $SLURM_JOB_ID` requeues this task alone (an array task has its own job id).
#   sbatch --array=0-(n-1)%N [train.sbatch's #SBATCH options] array_task.sh TRAIN_SBATCH ARGS_DIR
# ARGS_DIR/K.args: task K's `stackgan train` arguments, one per line (written by `stackgan sweep --on slurm`).
set -uo pipefail
if [ $# -ne 2 ]; then echo "usage: sbatch --array=... array_task.sh TRAIN_SBATCH ARGS_DIR" >&2; exit 2; fi
f="$2/${SLURM_ARRAY_TASK_ID:?array_task.sh runs as a Slurm array task}.args"
if [ ! -f "$f" ]; then echo "array_task.sh: no trial for array task ${SLURM_ARRAY_TASK_ID} ($f)" >&2; exit 2; fi
mapfile -t args < "$f"
exec bash "$1" "${args[@]}"
