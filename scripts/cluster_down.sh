#!/usr/bin/env bash
# Stop the cluster-in-a-box services of RUN_DIR (default: data/cluster) started by cluster_up.sh:
# each service's whole process group (Spark executors and MLflow's server workers included) gets
# SIGTERM, then SIGKILL after a grace period; then it checks that nothing of them is left running.
# Idempotent: a folder with nothing running is a no-op. Exits non-zero if a process survives.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="${1:-$ROOT/data/cluster}"
GRACE_S="${COURIER_CLUSTER_STOP_GRACE_S:-15}"
[ -d "$RUN_DIR" ] || { echo "[cluster] nothing to stop: $RUN_DIR does not exist"; exit 0; }
RUN_DIR="$(cd "$RUN_DIR" && pwd)"
PIDS="$RUN_DIR/pids"
if [ -z "${COURIER_CLUSTER_LOCKED:-}" ]; then   # cluster_up.sh calls this while holding the lock
  exec 7>"$RUN_DIR/.lock"
  flock 7
fi

# A live (non-zombie) process in the group: zombies are dead, only not yet reaped by init.
group_alive() { ps -eo pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {found = 1} END {exit !found}'; }

# Ours: a process of the group carries this run folder in its environment (cluster_up exports it to
# every service). A pid file that outlived a reboot or a crash may name another program's group by now.
# The folder is compared resolved (symlinks), however either side spelled it.
ours() {
  local pid dir
  for pid in $(ps -eo pid=,pgid= | awk -v g="$1" '$2 == g {print $1}'); do
    dir="$(tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | sed -n 's/^COURIER_CLUSTER_RUN_DIR=//p')" || true
    [ -n "$dir" ] && [ "$(readlink -f "$dir")" = "$(readlink -f "$RUN_DIR")" ] && return 0
  done
  return 1
}

stopped=0
# Workers before the master and the store last, so no service logs errors about a vanished peer.
order=()
for f in "$PIDS"/mlflow.pid "$PIDS"/spark-worker-*.pid "$PIDS"/spark-master.pid "$PIDS"/s3.pid; do
  [ -f "$f" ] || continue
  if group_alive "$(cat "$f")" && ! ours "$(cat "$f")"; then
    echo "[cluster] $(basename "$f" .pid): process group $(cat "$f") is not this cluster's (a stale pid file): left alone" >&2
    rm -f "$f"
    continue
  fi
  order+=("$f")
done
for f in "${order[@]}"; do
  pgid="$(cat "$f")"
  if group_alive "$pgid"; then
    kill -TERM -- "-$pgid" 2>/dev/null || true
    stopped=$((stopped + 1))
  fi
done
deadline=$(( $(date +%s) + GRACE_S ))
for f in "${order[@]}"; do
  pgid="$(cat "$f")"
  while group_alive "$pgid" && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.2; done
  if group_alive "$pgid"; then
    echo "[cluster] $(basename "$f" .pid) (process group $pgid) ignored SIGTERM for ${GRACE_S}s: SIGKILL" >&2
    kill -KILL -- "-$pgid" 2>/dev/null || true
    for _ in $(seq 1 25); do group_alive "$pgid" || break; sleep 0.2; done
  fi
done
left=()
for f in "${order[@]}"; do
  group_alive "$(cat "$f")" && left+=("$(basename "$f" .pid) (process group $(cat "$f"))") || rm -f "$f"
done
if [ "${#left[@]}" -gt 0 ]; then
  echo "ERROR: still running after stop: ${left[*]}" >&2
  exit 1
fi
rm -f "$RUN_DIR/cluster.env"
echo "[cluster] stopped $stopped service(s) of $RUN_DIR; nothing left running"
