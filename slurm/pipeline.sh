#!/usr/bin/env bash
# Stage-I, then Stage-II once Stage-I has finished successfully (afterok):
#   slurm/pipeline.sh STAGE1_CONFIG STAGE2_CONFIG [--nodes N] [--gpus-per-node G] [key=value ...] [-- sbatch options]
#   e.g. 2 nodes x 8 GPUs:  slurm/pipeline.sh configs/birds/stage1.yaml configs/birds/stage2.yaml --nodes 2 --gpus-per-node 8
# --gpus-per-node G asks for G GPUs per node AND G tasks per node (one rank per GPU: sbatch has no input
# variable for tasks per node, and train.sbatch refuses a job whose GPUs and tasks differ). --nodes N: N nodes.
# key=value overrides apply to both stages, except run.dir, which is given per stage with
#   stage1.run.dir=DIR and stage2.run.dir=DIR (defaults: the configs' run.dir); stage1.KEY=V / stage2.KEY=V
# apply to one stage. Stage-II's model.stage1_checkpoint is set to Stage-I's run directory. Extra sbatch
# options (after --) go to both jobs (the shape may also be given there: --nodes=N --ntasks-per-node=T).
# Before it submits anything, both stages are dry-run (`stackgan train CONFIG --dry-run`, `--device cuda`
# when GPUs are asked for) at the job's world size (nodes x tasks per node) and loader workers, data paths
# included: a shape or dataset that the real start would refuse is refused here, after no queue wait.
# Stage-II's Stage-I checkpoint is the one check left for its job (Stage-I writes it).
# Prints the two job ids, then each stage's plan. Site settings: slurm/site.env (or $STACKGAN_SITE_ENV).
# Exit codes: 0 both jobs submitted; 1 sbatch refused a job (Stage-I is cancelled if Stage-II was refused);
# 2 bad usage, config, shape or data (one line, nothing submitted). Stage-II starts only if Stage-I's job
# succeeds (afterok): train.sbatch fails the job whenever the run is unfinished (a crash, exit 2, a failed
# requeue).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
if [ $# -lt 2 ]; then
  echo "usage: slurm/pipeline.sh STAGE1_CONFIG STAGE2_CONFIG [--nodes N] [--gpus-per-node G] [key=value ...] [-- sbatch options]" >&2; exit 2
fi
# absolute config paths: the jobs run in the repository (train.sbatch cds to $STACKGAN_ROOT)
c1="$(realpath "$1")"; c2="$(realpath "$2")"; shift 2
common=(); s1=(); s2=(); sb=(); gpn=""; nodes=""
need_value() { [ $# -ge 2 ] || { echo "pipeline.sh: $1 needs a value" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; sb=("$@"); break ;;
    --gpus-per-node=*) gpn="${1#*=}" ;;
    --gpus-per-node) need_value "$@"; gpn="$2"; shift ;;
    --nodes=*) nodes="${1#*=}" ;;
    --nodes) need_value "$@"; nodes="$2"; shift ;;
    --*) echo "pipeline.sh: unknown option $1 (pipeline options: --nodes N, --gpus-per-node G; sbatch options go after --)" >&2; exit 2 ;;
    stage1.*) s1+=("${1#stage1.}") ;;
    stage2.*) s2+=("${1#stage2.}") ;;
    *) common+=("$1") ;;
  esac
  shift
done
site="${STACKGAN_SITE_ENV:-$root/slurm/site.env}"  # first: its SBATCH_GPUS_PER_NODE is part of the shape
# shellcheck disable=SC1090
[ -f "$site" ] && source "$site"

# The job shape: pipeline options, else sbatch's own options after --, else slurm/site.env's
# SBATCH_GPUS_PER_NODE (tasks per node set to match), else train.sbatch's defaults (1 node, 1 task, 8 CPUs
# per task). Each sbatch option is read once; giving it both ways is refused.
sb_value() {  # sb_value LONG SHORT: the value of --LONG=V / --LONG V / -S V / -SV in the sbatch options
  local long="$1" short="$2" i v=""
  for ((i = 0; i < ${#sb[@]}; i++)); do
    case "${sb[i]}" in
      "--$long="*) v="${sb[i]#*=}" ;;
      "--$long") v="${sb[i + 1]:-}" ;;
      "-$short") [ -n "$short" ] && v="${sb[i + 1]:-}" ;;
      "-$short"?*) [ -n "$short" ] && v="${sb[i]#-"$short"}" ;;
    esac
  done
  printf '%s' "$v"
}
positive() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || { echo "pipeline.sh: $1 must be a positive whole number, got '$2'" >&2; exit 2; }; }
sb_nodes="$(sb_value nodes N)"; sb_tasks="$(sb_value ntasks-per-node "")"; sb_gpus="$(sb_value gpus-per-node "")"
if [ -z "$gpn" ] && [ -z "$sb_gpus" ] && [ -z "$sb_tasks" ] && [ -n "${SBATCH_GPUS_PER_NODE:-}" ]; then
  gpn="${SBATCH_GPUS_PER_NODE##*:}"  # "a100:4" -> 4: sbatch would ask for these GPUs and start one task
fi
[ -n "$sb_gpus" ] || sb_gpus="${SBATCH_GPUS_PER_NODE:-}"  # with an explicit --ntasks-per-node: checked below
if [ -n "$gpn" ]; then
  positive --gpus-per-node "$gpn"
  for o in ntasks-per-node gpus-per-node; do
    [ -z "$(sb_value "$o" "")" ] || { echo "pipeline.sh: --gpus-per-node $gpn sets sbatch's --$o itself; drop --$o from the sbatch options" >&2; exit 2; }
  done
  sb=(--ntasks-per-node="$gpn" --gpus-per-node="$gpn" "${sb[@]}")
  tasks="$gpn"; gpus="$gpn"
else
  tasks="${sb_tasks:-1}"; gpus="${sb_gpus##*:}"; gpus="${gpus:-0}"
  positive --ntasks-per-node "$tasks"
  if [ "$gpus" != 0 ] && [ "$gpus" != "$tasks" ]; then  # what train.sbatch would refuse after the queue wait
    echo "pipeline.sh: --gpus-per-node=$sb_gpus with --ntasks-per-node=$tasks: each task trains on one GPU; use the pipeline's --gpus-per-node $gpus (it sets both)" >&2; exit 2
  fi
fi
if [ -n "$nodes" ]; then
  positive --nodes "$nodes"
  [ -z "$sb_nodes" ] || { echo "pipeline.sh: --nodes given twice (pipeline option and sbatch option); keep one" >&2; exit 2; }
  sb=(--nodes="$nodes" "${sb[@]}")
else
  nodes="${sb_nodes:-1}"; nodes="${nodes%%-*}"  # a --nodes=MIN-MAX range: checked at its minimum
  positive --nodes "$nodes"
fi
cpus="$(sb_value cpus-per-task c)"; cpus="${cpus:-8}"
positive --cpus-per-task "$cpus"
world=$((nodes * tasks))

py="${STACKGAN_PYTHON:-$root/.venv/bin/python}"
if [ ! -x "$py" ]; then
  echo "pipeline.sh: python $py not found: create the venv (make venv) or set STACKGAN_PYTHON (slurm/site.env)" >&2
  exit 2
fi
export STACKGAN_ROOT="${STACKGAN_ROOT:-$root}"  # sbatch passes the environment on: the jobs find the repo
export STACKGAN_PYTHON="$py"                     # ... and the same interpreter

# Both stages' configs as the training will resolve them (config + overrides, relative to the repository):
# a bad key or value in either fails here, in one line, before anything is submitted. Prints Stage-I's run.dir.
check_configs() {
  (cd "$root" && "$py" - "$c1" "$c2" "${#common[@]}" "${#s1[@]}" "${common[@]}" "${s1[@]}" "${s2[@]}" <<'PY'
import os, sys
from stackgan_dist.errors import UserError
from stackgan_dist.config import load_config
c1, c2, nc, n1 = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rest = sys.argv[5:]
common, s1, s2 = rest[:nc], rest[nc:nc + n1], rest[nc + n1:]
try:
    cfg1 = load_config(c1, common + s1)
except UserError as e:
    sys.exit(f"pipeline.sh: Stage-I config {c1}: {e}")
run1 = os.path.abspath(cfg1.run.dir)
try:
    load_config(c2, common + [f"model.stage1_checkpoint={run1}"] + s2)
except UserError as e:
    sys.exit(f"pipeline.sh: Stage-II config {c2}: {e}")
print(run1)
PY
  )
}
run1="$(check_configs)" || exit 2

# Both stages as their jobs will start them: `stackgan train --dry-run` at world size nodes x tasks (WORLD_SIZE,
# which a dry run reads as the launchers' layout), on the device the job will have, with the loader workers
# train.sbatch's data.num_workers=auto will give each task (config.auto_num_workers: CPUs per task less one,
# at most 16). Runs without this shell's SLURM_* / rank variables: inside an allocation they would describe it.
workers=$((cpus - 1 > 16 ? 16 : cpus - 1))
device=(); [ "$gpus" != 0 ] && device=(--device cuda)
shape="$nodes node(s) x $tasks task(s)${device:+, cuda}"
dry_run() {  # dry_run WHAT CONFIG OVERRIDES...: the plan JSON on stdout, or one line on stderr and exit 2
  local what="$1" cfg="$2" out err line rc=0 auto=(); shift 2
  case " $* " in *" data.num_workers="*) ;; *) auto=("data.num_workers=$workers") ;; esac  # as train.sbatch
  out="$(mktemp)"; err="$(mktemp)"
  (
    for v in $(compgen -e); do case "$v" in SLURM_*|RANK|LOCAL_RANK|LOCAL_WORLD_SIZE|STACKGAN_LAUNCHER) unset "$v" ;; esac; done
    cd "$root" && WORLD_SIZE="$world" "$py" -m stackgan_dist train "$cfg" --dry-run "${device[@]}" "${auto[@]}" "$@"
  ) >"$out" 2>"$err" || rc=$?
  if [ "$rc" = 0 ]; then cat "$out"; rm -f "$out" "$err"; return 0; fi
  line="$(grep -m1 -i 'error' "$err" || true)"; [ -n "$line" ] || line="$(tail -n1 "$err")"
  rm -f "$out" "$err"
  echo "pipeline.sh: $what dry run at $shape refused: ${line#stackgan train: error: }" >&2
  return 2
}
plan1="$(dry_run Stage-I "$c1" "${common[@]}" "${s1[@]}")" || exit 2
plan_line() {  # the plan's numbers a user checks before a long run (the keys this version's dry run prints)
  "$py" -c 'import json, sys
d = json.loads(sys.stdin.read() or "{}")
keys = ("world_size", "device", "global_batch", "batch_per_worker", "grad_accum", "steps_per_epoch",
        "images_dropped_per_epoch", "total_steps", "lr_g", "lr_d", "train_samples")
print(" ".join(f"{k}={d[k]}" for k in keys if k in d))' 2>/dev/null || true
}
s2err="$(mktemp)"
if plan2="$(dry_run Stage-II "$c2" "${common[@]}" "model.stage1_checkpoint=$run1" "${s2[@]}" 2>"$s2err")"; then
  plan2_note="$(plan_line <<<"$plan2")"
else
  # Stage-I has not run yet, so its checkpoint cannot be read. The trainer checks it last (after the data, the
  # run directory and the shape), so that one refusal means everything else passed; any other is final.
  why="$(cat "$s2err")"
  case "$why" in
    *"refused: model.stage1_checkpoint: "*) plan2_note="checked, all but the Stage-I checkpoint (Stage-I writes it)" ;;
    *) rm -f "$s2err"; echo "$why" >&2; exit 2 ;;
  esac
fi
rm -f "$s2err"
submit() {  # sbatch, or one line with sbatch's first complaint (e.g. "invalid partition specified: x")
  local what="$1" out err; shift
  err="$(mktemp)"
  if ! out="$(sbatch --parsable "$@" 2>"$err")"; then
    local msg; msg="$(grep -m1 -o 'error: .*' "$err" | sed 's/^error: //')"
    [ -n "$msg" ] || msg="$(tr '\n' ' ' <"$err" | cut -c1-300)"
    echo "pipeline.sh: $what refused by sbatch: $msg" >&2
    rm -f "$err"; return 1
  fi
  rm -f "$err"; echo "${out%%;*}"
}
j1="$(submit Stage-I --job-name=stackgan-s1 "${sb[@]}" "$root/slurm/train.sbatch" "$c1" "${common[@]}" "${s1[@]}")"
j2="$(submit Stage-II --job-name=stackgan-s2 --dependency=afterok:"$j1" --kill-on-invalid-dep=yes "${sb[@]}" \
  "$root/slurm/train.sbatch" "$c2" "${common[@]}" "model.stage1_checkpoint=$run1" "${s2[@]}")" || {
  scancel "$j1" 2>/dev/null; echo "pipeline.sh: cancelled Stage-I job $j1" >&2; exit 1; }
echo "stage1 $j1 run.dir=$run1"
echo "stage2 $j2 (afterok:$j1)"
echo "stage1 plan ($shape): $(plan_line <<<"$plan1")"
echo "stage2 plan ($shape): $plan2_note"
