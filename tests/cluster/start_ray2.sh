#!/usr/bin/env bash
# A TWO-node Ray cluster on this machine, beside start_ray.sh's one-node cluster: a head on 127.0.0.2
# (GCS port 6390, dashboard/Jobs API http://127.0.0.2:8266) and a second Ray node on 127.0.0.3, each with
# RAY2_CPUS CPUs (default 2), its own temp dir. Both addresses are loopback (127.0.0.0/8): Ray's multi-node
# mode must be on (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1), and in that mode Ray swaps 127.0.0.1 (only) for the
# host's routable address, so the nodes use 127.0.0.2/.3, which it leaves alone. Idempotent.
#   bash tests/cluster/start_ray2.sh    # then: launch/ray_job.py --address http://127.0.0.2:8266 ...
#   bash tests/cluster/start_ray2.sh --node2-only    # (re)start just the second node (after a node-loss test)
#   bash tests/cluster/start_ray2.sh --stop          # stop this cluster only
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${STACKGAN_VENV:-$root/.venv}"
ray="$venv/bin/ray"
[ -x "$ray" ] || { echo "start_ray2.sh: $ray not found (make venv-full first)" >&2; exit 1; }
export PATH="$venv/bin:$PATH" RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1
export RAY_JOB_START_TIMEOUT_SECONDS="${RAY_JOB_START_TIMEOUT_SECONDS:-120}"
cpus="${RAY2_CPUS:-2}"
head=127.0.0.2; node2=127.0.0.3; gcs_port=6390; dash_port=8266
# every node's dashboard agent listens on a port of its own (Ray's default 52365 is the one-node cluster's)

count_nodes() { "$venv/bin/python" - "$head" "$dash_port" <<'PY'
import json, sys, urllib.request
try:
    d = json.load(urllib.request.urlopen(f"http://{sys.argv[1]}:{sys.argv[2]}/nodes?view=summary", timeout=5))
    print(sum(1 for n in d["data"]["summary"] if n["raylet"]["state"] == "ALIVE"))
except Exception:
    print(0)
PY
}
node2_pids() { pgrep -f "raylet.*--node_ip_address=$node2" || true; }
start_node2() {
  "$ray" start --address "$head:$gcs_port" --node-ip-address "$node2" --num-cpus "$cpus" \
    --resources '{"stackgan_node2": 1}' --dashboard-agent-listen-port 52367 --disable-usage-stats >/dev/null
}

# every process of this cluster (never the one-node cluster's: `ray stop` would end both)
cluster_pids() { ps -eo pid=,args= | grep -E '/tmp/ray2|node.ip.address=127\.0\.0\.[23]|127\.0\.0\.2:6390' \
  | grep -v grep | awk '{print $1}' || true; }
stop_cluster() {
  local pids; pids="$(cluster_pids)"; [ -n "$pids" ] && kill $pids 2>/dev/null; sleep 2
  pids="$(cluster_pids)"; [ -n "$pids" ] && kill -9 $pids 2>/dev/null; return 0
}
# a node left running by an earlier checkout whose venv is gone (its raylet binary deleted) starts no worker
stale() { for p in $(pgrep -f 'raylet.*--node_ip_address=127\.0\.0\.[23]( |$)' || true); do
  [[ "$(readlink "/proc/$p/exe" 2>/dev/null)" == *"(deleted)" ]] && return 0; done; return 1; }
if [ "${1:-}" = "--stop" ]; then
  stop_cluster; echo "two-node ray stopped"; exit 0
fi
if stale; then echo "start_ray2.sh: a running node's venv is gone; restarting the cluster"; stop_cluster; fi
if [ "${1:-}" = "--node2-only" ]; then
  # `ray start` returns once the new raylet has registered; the GCS may list the dead one as alive a while
  [ -n "$(node2_pids)" ] || start_node2
  echo "second ray node started ($node2)"; exit 0
else
  n="$(count_nodes)"
  # the GCS may still list a killed second node as alive: its raylet must be running too
  if [ "$n" = 2 ] && [ -n "$(node2_pids)" ]; then echo "two-node ray already up (http://$head:$dash_port)"; exit 0; fi
  if [ "$n" = 0 ]; then
    "$ray" start --head --node-ip-address "$head" --port "$gcs_port" --dashboard-host "$head" \
      --dashboard-port "$dash_port" --num-cpus "$cpus" --include-dashboard true --temp-dir /tmp/ray2 \
      --dashboard-agent-listen-port 52366 \
      --disable-usage-stats >/dev/null
  fi
  [ -n "$(node2_pids)" ] || start_node2
fi
for _ in $(seq 1 90); do [ "$(count_nodes)" = 2 ] && break; sleep 1; done
[ "$(count_nodes)" = 2 ] || { echo "start_ray2.sh: two Ray nodes did not come up" >&2; exit 1; }
echo "two-node ray ready (Jobs API http://$head:$dash_port; nodes $head, $node2)"
