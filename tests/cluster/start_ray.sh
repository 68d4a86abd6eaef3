#!/usr/bin/env bash
# A one-node Ray cluster on loopback (head + dashboard/Jobs API on 127.0.0.1:8265), for the
# integration tests and for trying launch/ray_job.py locally. Idempotent: does nothing if it is up.
#   bash tests/cluster/start_ray.sh      # then: .venv/bin/python launch/ray_job.py --address http://127.0.0.1:8265 ...
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${STACKGAN_VENV:-$root/.venv}"
ray="$venv/bin/ray"
[ -x "$ray" ] || { echo "start_ray.sh: $ray not found (make venv-full first)" >&2; exit 1; }
dash_port="${RAY_DASHBOARD_PORT:-8265}"
# the cluster's `python` (job entrypoints, workers) is the project venv's
export PATH="$venv/bin:$PATH"
export RAY_USAGE_STATS_ENABLED=0
# Ray replaces --node-ip-address 127.0.0.1 by the host's routable address (services.resolve_ip_for_localhost)
# unless "cluster mode" is off; off, every Ray process (and the job drivers, which inherit this environment)
# binds and connects on loopback only. A real multi-node cluster must not set this.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# a job whose driver cannot be placed is failed by Ray after this long (Ray's default: 15 min); the tests leave
# one such job behind (launch/ray_job.py's PENDING watchdog reports it after --pending-timeout)
export RAY_JOB_START_TIMEOUT_SECONDS="${RAY_JOB_START_TIMEOUT_SECONDS:-120}"

up() { "$venv/bin/python" - "$dash_port" <<'PY'
import sys, urllib.request
try:
    urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/version", timeout=5).read()
except Exception:
    sys.exit(1)
PY
}
# a cluster left running by an earlier checkout whose venv is gone (its raylet binary deleted) starts no worker:
# such a cluster is stopped and started again from this venv
stale() { for p in $(pgrep -f 'raylet.*--node_ip_address=127\.0\.0\.1( |$)' || true); do
  [[ "$(readlink "/proc/$p/exe" 2>/dev/null)" == *"(deleted)" ]] && return 0; done; return 1; }
if stale; then echo "start_ray.sh: the running cluster's venv is gone; restarting it"; elif up; then
  echo "ray already up (dashboard http://127.0.0.1:$dash_port)"; exit 0; fi
"$ray" stop --force >/dev/null 2>&1 || true
"$ray" start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 --dashboard-port "$dash_port" \
  --num-cpus "${RAY_NUM_CPUS:-4}" --include-dashboard true --disable-usage-stats
for _ in $(seq 1 60); do up && break; sleep 1; done
up || { echo "start_ray.sh: Jobs API on 127.0.0.1:$dash_port did not come up" >&2; exit 1; }
echo "ray ready (dashboard/Jobs API http://127.0.0.1:$dash_port)"
