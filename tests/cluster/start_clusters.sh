#!/usr/bin/env bash
# Starts the local clusters the integration tests use (Slurm, Ray). Each script is idempotent.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
for s in "$here"/start_*.sh; do
  [ "$(basename "$s")" = "start_clusters.sh" ] && continue
  echo "== $(basename "$s")"
  bash "$s"
done
