#!/usr/bin/env bash
# The GPU check: one command that measures everything a short GPU loan allows.
#
#   benchmarks/gpu_check.sh OUTDIR [--phases env,throughput,tests,loader,comm]
#
# Made for a machine that reaches no package registry: the wheels `make gpu-wheels` put into .whl/gpu (on a
# machine with PyPI) are installed into a scratch folder (pip --no-index --no-deps --target), and the project
# runs from this checkout (PYTHONPATH); nothing else is installed. The chosen phases run in this order, each
# under its own time budget (seconds, GPU_CHECK_BUDGET_<PHASE>), with one line per phase:
#   env         nvidia-smi, torch, CUDA, cuDNN, NCCL, TF32 flags, deepspeed            -> OUTDIR/env-<tag>.json
#   throughput  Stage-II then Stage-I at the paper's widths, batch 64: our step in bf16, NHWC, against the
#               baseline step; then the same compiled                        -> OUTDIR/throughput_*-<tag>.json
#   tests       pytest tests/gpu                                             -> OUTDIR/tests-<tag>.log
#   loader      benchmarks/dataloader.py with 16 workers                     -> OUTDIR/dataloader-<tag>.json
#   comm        PowerSGD's own work per step at the paper widths (benchmarks/hook_work.py), then the scaling
#               projection of the committed CPU results recomputed with it     -> OUTDIR/hook_work-<tag>.json,
#               OUTDIR/scaling-projection-<tag>.json and .png
# and a summary (OUTDIR/gpu-check-<tag>.json and .md; <tag> = device and date, as in benchmarks/results).
# The default budgets add up to 375 s (env 20, throughput 140, tests 110, loader 45, comm 60), plus the install.
# Without CUDA it stops at once, exit 3, with one line saying so. Exit 0 only when every phase passed.
set -uo pipefail

usage="usage: benchmarks/gpu_check.sh OUTDIR [--phases env,throughput,tests,loader,comm]"
[ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
case "$1" in -*) echo "$usage" >&2; exit 2 ;; esac
out="$1"; shift
phases="env,throughput,tests,loader,comm"
while [ $# -gt 0 ]; do
  case "$1" in
    --phases) [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }; phases="$2"; shift 2 ;;
    --phases=*) phases="${1#--phases=}"; shift ;;
    *) echo "gpu_check: unknown argument $1; $usage" >&2; exit 2 ;;
  esac
done
for p in ${phases//,/ }; do
  case "$p" in env|throughput|tests|loader|comm) ;; *) echo "gpu_check: unknown phase '$p' (env, throughput, tests, loader, comm)" >&2; exit 2 ;; esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${GPU_CHECK_PYTHON:-python3}"
unset PIP_CONSTRAINT  # the CPU torch pin of the Makefile must never reach this machine's pip

# no CUDA: one line, at once (no driver at all: without even importing torch)
if ! command -v nvidia-smi >/dev/null 2>&1 && ! ls /dev/nvidia0 >/dev/null 2>&1; then
  echo "gpu_check: no CUDA device here (no nvidia-smi, no /dev/nvidia0): run this on a GPU machine" >&2
  exit 3
fi
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() and torch.cuda.device_count() > 0 else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to $py (torch.cuda.is_available() is False or torch is missing): run this on a GPU machine" >&2
  exit 3
fi

mkdir -p "$out" || exit 2
out="$(cd "$out" && pwd)"
t_start=$(date +%s.%N)
elapsed() { echo "$(date +%s.%N) $1" | awk '{printf "%.1f", $1 - $2}'; }

# -- install: the wheels from `make gpu-wheels`, into a scratch folder -------------------------------------
wheels="${GPU_CHECK_WHEELS:-$repo/.whl/gpu}"
scratch="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_pkgs.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
t0=$(date +%s.%N)
if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
  echo "gpu_check: no wheels in $wheels: run \`make gpu-wheels\` on a machine with PyPI and bring .whl/gpu along" >&2
  exit 2
fi
if ! "$py" -m pip install -q --no-index --no-deps --disable-pip-version-check --target "$scratch" "$wheels"/*.whl \
    >"$out/install.log" 2>&1; then
  echo "gpu_check: installing $wheels failed (the wheels are for CPython 3.12; $py is $("$py" -V 2>&1)); see $out/install.log" >&2
  exit 2
fi
echo "phase install: ok ($(elapsed "$t0") s)"
export PYTHONPATH="$repo:$scratch${PYTHONPATH:+:$PYTHONPATH}"
export DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
tag="$("$py" -c '
import datetime, re, torch
name = torch.cuda.get_device_name(torch.cuda.current_device())
d = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + "-" + d)')"

declare -A budget=([env]="${GPU_CHECK_BUDGET_ENV:-20}" [throughput]="${GPU_CHECK_BUDGET_THROUGHPUT:-140}"
                   [tests]="${GPU_CHECK_BUDGET_TESTS:-110}" [loader]="${GPU_CHECK_BUDGET_LOADER:-45}"
                   [comm]="${GPU_CHECK_BUDGET_COMM:-60}")
status_file="$out/phases-$tag.tsv"
: >"$status_file"
failed=0

# -- phases -----------------------------------------------------------------------------------------------
phase_env() {
  { nvidia-smi || echo "nvidia-smi not available"; } >"$out/nvidia-smi-$tag.txt" 2>&1
  "$py" - "$out/env-$tag.json" <<'EOF'
import json, subprocess, sys
import torch

def smi(q):
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None

d = torch.cuda.current_device()
env = {"device": torch.cuda.get_device_name(d), "device_count": torch.cuda.device_count(),
       "capability": list(torch.cuda.get_device_capability(d)),
       "memory_gib": torch.cuda.get_device_properties(d).total_memory / 2**30,
       "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
       "nccl": ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None,
       "bf16_supported": torch.cuda.is_bf16_supported(),
       "tf32": {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                "float32_matmul_precision": torch.get_float32_matmul_precision()},
       "cudnn.benchmark_default": torch.backends.cudnn.benchmark,
       "nvidia_smi": smi("name,driver_version,memory.total,clocks.max.sm,power.limit,pstate")}
try:
    import deepspeed
    env["deepspeed"] = deepspeed.__version__
except Exception as e:  # noqa: BLE001
    env["deepspeed"] = f"import failed: {type(e).__name__}: {e}"
for m in ("webdataset", "pydantic"):
    try:
        env[m] = __import__(m).__version__
    except Exception as e:  # noqa: BLE001
        env[m] = f"import failed: {e}"
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps({k: env[k] for k in ("device", "torch", "cuda", "cudnn", "tf32", "deepspeed")}))
EOF
}

phase_throughput() {  # each run in its own process, each within what is left of the phase's budget
  local deadline=$1 rc=0 name args left
  local common_args=(--device cuda --batch-size 64 --precision bf16 --channels-last --warmup 3 --steps 30)
  local runs=("throughput_stage2|--stage 2 --baseline" "throughput_stage1|--stage 1 --baseline"
              "throughput_stage2_compiled|--stage 2 --compile" "throughput_stage1_compiled|--stage 1 --compile")
  for r in "${runs[@]}"; do
    name="${r%%|*}"; args="${r#*|}"
    left=$(( deadline - $(date +%s) ))
    if [ "$left" -lt 10 ]; then echo "  $name: skipped (phase budget spent)"; rc=1; continue; fi
    # shellcheck disable=SC2086
    timeout -k 5 "$left" "$py" "$repo/benchmarks/throughput.py" "${common_args[@]}" $args \
      --json "$out/$name-$tag.json" >"$out/$name-$tag.log" 2>&1
    local r_rc=$?
    if [ $r_rc -eq 0 ]; then echo "  $name: $(tail -n 1 "$out/$name-$tag.log")"
    else echo "  $name: FAILED (exit $r_rc$([ $r_rc -ge 124 ] && echo ', out of time')), see $name-$tag.log"; rc=1; fi
  done
  return $rc
}

phase_tests() {
  "$py" -m pytest -q -p no:cacheprovider "$repo/tests/gpu" --junitxml="$out/tests-$tag.xml" \
    >"$out/tests-$tag.log" 2>&1
  local rc=$?
  tail -n 3 "$out/tests-$tag.log" | sed 's/^/  /'
  return $rc
}

phase_loader() {
  "$py" "$repo/benchmarks/dataloader.py" --images 1024 --batch-size 64 --batches 4 --rounds 3 --workers 16 \
    --json "$out/dataloader-$tag.json" >"$out/dataloader-$tag.log" 2>&1
  local rc=$?
  tail -n 3 "$out/dataloader-$tag.log" | sed 's/^/  /'
  return $rc
}

phase_comm() {  # the projection's estimated input, measured; then the projection again with it
  local cpu_json="$repo/benchmarks/results/${SCALING_CPU_JSON:-scaling-2-core-cpu-shared-2026-12-02.json}"
  "$py" "$repo/benchmarks/hook_work.py" --device cuda --json "$out/hook_work-$tag.json" \
    >"$out/hook_work-$tag.log" 2>&1 || { tail -n 3 "$out/hook_work-$tag.log" | sed 's/^/  /'; return 1; }
  "$py" "$repo/benchmarks/scaling.py" --from-json "$cpu_json" --hook-work-json "$out/hook_work-$tag.json" \
    --json "$out/scaling-projection-$tag.json" --plot "$out/scaling-projection-$tag.png" \
    >"$out/scaling-projection-$tag.md" 2>"$out/scaling-projection-$tag.log"
  local rc=$?
  grep '^- Stage' "$out/scaling-projection-$tag.md" | sed 's/^/  /'
  return $rc
}

for p in env throughput tests loader comm; do
  case ",$phases," in *",$p,"*) ;; *) continue ;; esac
  b=${budget[$p]}
  t0=$(date +%s.%N)
  if [ "$p" = throughput ]; then
    phase_throughput $(( $(date +%s) + b )); rc=$?  # budgets each run itself
  else
    # a phase function runs in a subshell under `timeout` so that the budget bounds all its processes
    export -f "phase_$p"; export py repo out tag
    timeout -k 5 "$b" bash -c "phase_$p"; rc=$?
  fi
  s=$(elapsed "$t0")
  if [ $rc -eq 0 ]; then line="ok"; else line="FAILED (exit $rc$([ $rc -ge 124 ] && echo ", over its ${b} s budget"))"; failed=1; fi
  echo "phase $p: $line ($s s)"
  printf '%s\t%s\t%s\t%s\n' "$p" "$rc" "$s" "$b" >>"$status_file"
done

total=$(elapsed "$t_start")
"$py" - "$out" "$tag" "$status_file" "$total" <<'EOF'
import glob, json, os, sys
out, tag, status, total = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
phases = []
for line in open(status):
    p, rc, s, b = line.rstrip("\n").split("\t")
    phases.append({"phase": p, "exit": int(rc), "seconds": float(s), "budget_s": float(b)})
res = {}
for f in sorted(glob.glob(os.path.join(out, f"*-{tag}.json"))):
    name = os.path.basename(f)[: -len(f"-{tag}.json")]
    if name in ("gpu-check",):
        continue
    try:
        res[name] = json.load(open(f))
    except ValueError:
        res[name] = {"error": "unreadable JSON"}
summary = {"tag": tag, "total_s": total, "phases": phases, "results": res}
json.dump(summary, open(os.path.join(out, f"gpu-check-{tag}.json"), "w"), indent=1)
lines = [f"# GPU check {tag} ({total:.0f} s)", "", "| phase | exit | seconds | budget |", "|---|---|---|---|"]
lines += [f"| {p['phase']} | {p['exit']} | {p['seconds']:.1f} | {p['budget_s']:.0f} |" for p in phases]
rows = [(k, r) for k, v in res.items() if k.startswith("throughput") for r in v.get("results", [])]
if rows:
    lines += ["", "| run | stage | precision | layout | compiled | img/s | step p50 ms | TFLOP/s | MFU | baseline img/s | speedup |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in rows:
        m = f"{100 * r['mfu']:.1f}% ({r['mfu_basis']})" if r.get("mfu") is not None else "-"
        b = f"{r['baseline_img_per_s']:.1f}" if r.get("baseline_img_per_s") else "-"
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        lines.append(f"| {k} | {r['stage']} | {r['precision']} | {'NHWC' if r['channels_last'] else 'NCHW'} | "
                     f"{r['compile']} | {r['img_per_s']:.1f} | {r['step_ms_p50']:.1f} | "
                     f"{r['achieved_flop_s'] / 1e12:.1f} | {m} | {b} | {sp} |")
dl = res.get("dataloader", {}).get("dataloader")
if dl:
    lines += ["", f"loader (Stage II, {dl['workers']} workers): ours {dl.get('ours_total', 0):.0f} samples/s total, "
                  f"{dl['ours_per_worker']:.0f} per worker; reference {dl.get('reference_total', 0):.0f} total"]
sp = res.get("scaling-projection", {}).get("projection")
if sp:
    lines += ["", "scaling projection, PowerSGD work measured here (64 GPUs, 25 GB/s between nodes; a MODEL):"]
    lines += [f"- Stage {st}: {c['hook']}{' rank ' + str(c['rank']) if c['hook'] == 'powersgd' else ''}, bucket "
              f"{c['bucket_cap_mb']:g} MB, {c['algo']}: efficiency {c['efficiency']:.2f} "
              f"({'meets' if c['meets_target'] else 'MISSES'} 0.8; hook work {c['hook_ms']:.2f} ms)"
              for st, c in sorted(sp["chosen"].items())]
open(os.path.join(out, f"gpu-check-{tag}.md"), "w").write("\n".join(lines) + "\n")
EOF
echo "gpu_check: $( [ $failed -eq 0 ] && echo 'all phases passed' || echo 'some phases FAILED' ) in $total s; summary: $out/gpu-check-$tag.md"
exit $failed
