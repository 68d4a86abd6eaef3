#!/usr/bin/env bash
# Stage-I, then Stage-II once Stage-I has finished successfully (afterok):
#   slurm/pipeline.sh STAGE1_CONFIG STAGE2_CONFIG [key=value ...] [-- sbatch options]
# key=value overrides apply to both stages, except run.dir, which is given per stage with
#   stage1.run.dir=DIR and stage2.run.dir=DIR (defaults: the configs' run.dir). Stage-II's
# model.stage1_checkpoint is set to Stage-I's run directory. Extra sbatch options (after --) go to both jobs.
# Prints the two job ids. Site settings: slurm/site.env (or $STACKGAN_SITE_ENV).
# Exit codes: 0 both jobs submitted; 1 sbatch refused a job (Stage-I is cancelled if Stage-II was refused);
# 2 bad usage or config (one line, nothing submitted). Stage-II starts only if Stage-I's job succeeds
# (afterok): train.sbatch fails the job whenever the run is unfinished (a crash, exit 2, a failed requeue).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
if [ $# -lt 2 ]; then
  echo "usage: slurm/pipeline.sh STAGE1_CONFIG STAGE2_CONFIG [key=value ...] [-- sbatch options]" >&2; exit 2
fi
# absolute config paths: the jobs run in the repository (train.sbatch cds to $STACKGAN_ROOT)
c1="$(realpath "$1")"; c2="$(realpath "$2")"; shift 2
common=(); s1=(); s2=(); sb=()
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; sb=("$@"); break ;;
    stage1.*) s1+=("${1#stage1.}") ;;
    stage2.*) s2+=("${1#stage2.}") ;;
    *) common+=("$1") ;;
  esac
  shift
done
site="${STACKGAN_SITE_ENV:-$root/slurm/site.env}"
# shellcheck disable=SC1090
[ -f "$site" ] && source "$site"
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
